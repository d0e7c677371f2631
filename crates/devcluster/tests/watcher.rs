//! A kube-rs watcher against devcluster: events arrive in order, and when the server's history
//! no longer holds the watcher's resourceVersion (410 Gone), the watcher relists and goes on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use mailfleet_devcluster::{Config, DevCluster};
use tokio::sync::mpsc;

fn describe(event: &Event<ConfigMap>) -> String {
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(o) => format!("InitApply {}", o.name_any()),
        Event::InitDone => "InitDone".into(),
        Event::Apply(o) => format!(
            "Apply {} {}",
            o.name_any(),
            o.data
                .as_ref()
                .and_then(|d| d.get("v"))
                .cloned()
                .unwrap_or_default()
        ),
        Event::Delete(o) => format!("Delete {}", o.name_any()),
    }
}

async fn next_matching(
    rx: &mut mpsc::UnboundedReceiver<String>,
    want: &str,
    log: &mut Vec<String>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => {
                log.push(e.clone());
                if e == want {
                    return;
                }
            }
            _ => panic!("watcher never produced {want:?}; got {log:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_events_in_order_and_recovers_from_410() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.bookmark_interval = Duration::from_secs(3600);
    let dc = DevCluster::start(config).await.unwrap();
    let kubeconfig = Kubeconfig::read_from(&dc.kubeconfig).unwrap();
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    let client = Client::try_from(client_config).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let secrets: Api<Secret> = Api::namespaced(client, "default");

    // A short server-side timeout makes the watcher re-watch from its last resourceVersion often.
    let stream = watcher::watcher(cms.clone(), watcher::Config::default().timeout(1));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Ok(event) = item
                && tx.send(describe(&event)).is_err()
            {
                break;
            }
        }
    });
    let mut log = Vec::new();
    next_matching(&mut rx, "InitDone", &mut log).await;

    let cm = |name: &str, v: &str| -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "data": {"v": v}}))
            .unwrap()
    };
    cms.create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("b", "1"))
        .await
        .unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"data": {"v": "2"}})),
    )
    .await
    .unwrap();
    cms.delete("b", &DeleteParams::default()).await.unwrap();
    next_matching(&mut rx, "Delete b", &mut log).await;
    let live: Vec<&String> = log
        .iter()
        .filter(|e| e.starts_with("Apply") || e.starts_with("Delete"))
        .collect();
    assert_eq!(
        live,
        vec!["Apply a 1", "Apply b 1", "Apply a 2", "Delete b"],
        "events in resourceVersion order"
    );

    // Move the history past the watcher's resourceVersion: a change it does not see (another
    // resource), then a compaction. Its next re-watch gets 410 Gone and must relist.
    let secret: Secret =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "s"}})).unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    dc.store().compact();
    log.clear();
    next_matching(&mut rx, "Init", &mut log).await;
    next_matching(&mut rx, "InitApply a", &mut log).await;
    next_matching(&mut rx, "InitDone", &mut log).await;
    cms.create(&PostParams::default(), &cm("c", "1"))
        .await
        .unwrap();
    next_matching(&mut rx, "Apply c 1", &mut log).await;

    task.abort();
    dc.shutdown().await;
}

/// What an operator does through kube-rs: register the CRDs, server-side apply a custom
/// resource and its status on `/status`, and meet 409s on a stale replace and on an apply
/// that changes a field another manager owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_server_side_apply_status_and_conflicts() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    use serde_json::json;

    let dir = tempfile::tempdir().unwrap();
    let dc = DevCluster::start(Config::new(dir.path())).await.unwrap();
    let kubeconfig = Kubeconfig::read_from(&dc.kubeconfig).unwrap();
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    let client = Client::try_from(client_config).unwrap();

    let crd_yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../crds/warmupplans.mailfleet.dev.yaml"),
    )
    .unwrap();
    let crd: DynamicObject = serde_yaml::from_str(&crd_yaml).unwrap();
    let crd_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    let crds: Api<DynamicObject> = Api::all_with(client.clone(), &crd_ar);
    crds.patch(
        "warmupplans.mailfleet.dev",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();

    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("mailfleet.dev", "v1alpha1", "WarmupPlan"),
        "warmupplans",
    );
    let plans: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let plan = |limit: i64| {
        json!({"apiVersion": "mailfleet.dev/v1alpha1", "kind": "WarmupPlan", "metadata": {"name": "p"},
            "spec": {"stages": [{"dailyLimit": limit}]}})
    };
    let created = plans
        .patch(
            "p",
            &PatchParams::apply("operator"),
            &Patch::Apply(plan(100)),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));

    // Status through the status subresource, by SSA: generation does not move.
    let status = json!({"apiVersion": "mailfleet.dev/v1alpha1", "kind": "WarmupPlan", "metadata": {"name": "p"},
        "status": {"observedGeneration": 1}});
    let after = plans
        .patch_status(
            "p",
            &PatchParams::apply("operator").force(),
            &Patch::Apply(status),
        )
        .await
        .unwrap();
    assert_eq!(after.metadata.generation, Some(1));
    assert_eq!(after.data["status"]["observedGeneration"], json!(1));

    // Another manager changing an owned field conflicts unless forced.
    let err = plans
        .patch(
            "p",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(plan(200)),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 409);
            assert!(
                status.message.contains("conflict with \"operator\""),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 409, got {other}"),
    }
    let forced = plans
        .patch(
            "p",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(plan(200)),
        )
        .await
        .unwrap();
    assert_eq!(forced.metadata.generation, Some(2));

    // A replace carrying an old resourceVersion is refused.
    let mut stale = created.clone();
    stale.data["spec"]["stages"][0]["dailyLimit"] = json!(300);
    let err = plans
        .replace("p", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err}"
    );

    // Schema validation reaches kube-rs as a 422 with causes.
    let err = plans
        .patch(
            "p",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(plan(-1)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.reason == "Invalid"),
        "{err}"
    );

    dc.shutdown().await;
}
