//! The warm-up engine against devcluster with an injected clock: thirty days of a plan run
//! in seconds. The test plays the coordinator: it writes the pool's cumulative counters into
//! RelayPool status as relay reports would, moves the clock a day on, and reads the
//! decisions from the WarmupPlan's status, its Events and the operator's metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mailfleet_api::relaypool::RelayPool;
use mailfleet_api::warmupplan::WarmupPlan;
use mailfleet_devcluster::{Config, DevCluster};
use mailfleet_operator::metrics::Metrics;
use mailfleet_operator::warmup;
use serde_json::{Value, json};
use tokio::sync::watch;

const DAY: i64 = 86_400;
const T0: i64 = 1_900_000_000;

async fn client(dc: &DevCluster) -> Client {
    let kc = Kubeconfig::read_from(&dc.kubeconfig).unwrap();
    let cc = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(cc).unwrap()
}

struct World {
    client: Client,
    now: Arc<AtomicI64>,
    /// Cumulative counters per address: delivered, hard bounces, complaints.
    totals: std::collections::BTreeMap<&'static str, (i64, i64, i64)>,
}

impl World {
    /// Moves the clock to the end of day `day` (plus a few seconds for late reports; day 0
    /// is the start) and writes the counters as the coordinator would.
    async fn day(&mut self, day: i64) {
        self.now.store(
            T0 + day * DAY + if day > 0 { 30 } else { 0 },
            Ordering::SeqCst,
        );
        let counters: Vec<Value> = self
            .totals
            .iter()
            .map(|(a, (d, b, c))| {
                json!({"address": a, "delivered": d, "hardBounces": b, "complaints": c})
            })
            .collect();
        let pools: Api<RelayPool> = Api::namespaced(self.client.clone(), "mail");
        pools
            .patch_status(
                "fleet",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"counters": counters, "observedGeneration": day}})),
            )
            .await
            .unwrap();
    }

    fn send(&mut self, address: &'static str, delivered: i64, bounces: i64, complaints: i64) {
        let t = self.totals.entry(address).or_default();
        t.0 += delivered;
        t.1 += bounces;
        t.2 += complaints;
    }
}

async fn plan(client: &Client) -> WarmupPlan {
    Api::<WarmupPlan>::namespaced(client.clone(), "mail")
        .get("ramp")
        .await
        .unwrap()
}

fn stage(plan: &WarmupPlan, address: &str) -> (i32, String, i64) {
    let a = plan
        .status
        .as_ref()
        .and_then(|s| s.addresses.iter().find(|a| a.address == address))
        .unwrap_or_else(|| panic!("{address} not in {:?}", plan.status));
    (
        a.stage,
        serde_json::to_value(a.state)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string(),
        a.limit,
    )
}

/// Waits until the engine has evaluated the clock's current time for every address.
async fn settled(client: &Client, now: i64, addresses: usize) -> WarmupPlan {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = plan(client).await;
        let done = p.status.as_ref().is_some_and(|s| {
            s.addresses.len() == addresses
                && s.addresses.iter().all(|a| {
                    a.window_start
                        .as_ref()
                        .is_some_and(|t| now - t.0.as_second() < DAY)
                })
        });
        if done {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not evaluate: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_days_of_warm_up_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let dc = DevCluster::start(Config::new(dir.path().join("cluster")))
        .await
        .unwrap();
    let client = client(&dc).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, text) in mailfleet_api::crd_manifests().unwrap() {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "mail"}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    // Ten stages doubling from 100 a day; a breach steps back two stages; five idle days send
    // an address back to stage one.
    let plan_doc: WarmupPlan = serde_json::from_value(json!({
        "apiVersion": "mailfleet.dev/v1alpha1", "kind": "WarmupPlan",
        "metadata": {"name": "ramp", "namespace": "mail"},
        "spec": {
            "window": "24h",
            "stages": (0..10).map(|i| json!({"dailyLimit": 100 << i})).collect::<Vec<_>>(),
            "onBreach": {"action": "stepBack", "stepBackStages": 2},
            "idleResetDays": 5,
        }
    }))
    .unwrap();
    Api::<WarmupPlan>::namespaced(client.clone(), "mail")
        .create(&PostParams::default(), &plan_doc)
        .await
        .unwrap();
    let pool: RelayPool = serde_json::from_value(json!({
        "apiVersion": "mailfleet.dev/v1alpha1", "kind": "RelayPool",
        "metadata": {"name": "fleet", "namespace": "mail"},
        "spec": {
            "replicas": 1,
            "warmupPlanRef": {"name": "ramp"},
            "listener": {"allowedNetworks": ["10.0.0.0/8"]},
            "egress": {"addresses": [
                {"address": "192.0.2.1", "heloName": "a.example.test"},
                {"address": "192.0.2.2", "heloName": "b.example.test"},
            ]},
        }
    }))
    .unwrap();
    let pools: Api<RelayPool> = Api::namespaced(client.clone(), "mail");
    pools.create(&PostParams::default(), &pool).await.unwrap();
    // The RelayPool controller's address table, as it would write it.
    let rows = json!([
        {"address": "192.0.2.1", "pod": "fleet-0", "heloName": "a.example.test", "state": "warming"},
        {"address": "192.0.2.2", "pod": "fleet-0", "heloName": "b.example.test", "state": "warming"},
    ]);
    pools
        .patch_status(
            "fleet",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"addresses": rows}})),
        )
        .await
        .unwrap();

    let now = Arc::new(AtomicI64::new(T0));
    let clock = {
        let now = Arc::clone(&now);
        Arc::new(move || Timestamp::from_second(now.load(Ordering::SeqCst)).unwrap())
    };
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(warmup::Context {
        client: client.clone(),
        metrics: Arc::clone(&metrics),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "mailfleet-operator".into(),
                instance: None,
            },
        ),
        clock,
    });
    let (stop, mut stopped) = watch::channel(false);
    let engine = tokio::spawn(warmup::run(ctx, None, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));

    let mut w = World {
        client: client.clone(),
        now: Arc::clone(&now),
        totals: Default::default(),
    };
    w.day(0).await;
    let p = settled(&client, T0, 2).await;
    assert_eq!(stage(&p, "192.0.2.1"), (1, "warming".into(), 100));

    // Days 1-9: 192.0.2.1 sends its full limit cleanly every day and climbs a stage a day;
    // 192.0.2.2 sends a fifth of its limit and stays at stage one.
    for day in 1..=9 {
        let limit = stage(&plan(&client).await, "192.0.2.1").2;
        w.send("192.0.2.1", limit, 0, 0);
        w.send("192.0.2.2", 20, 0, 0);
        w.day(day).await;
        let p = settled(&client, T0 + day * DAY + 30, 2).await;
        assert_eq!(stage(&p, "192.0.2.1").0, 1 + day as i32, "day {day}: {p:?}");
        assert_eq!(stage(&p, "192.0.2.2").0, 1, "day {day}");
    }
    let p = plan(&client).await;
    let b = p
        .status
        .as_ref()
        .unwrap()
        .addresses
        .iter()
        .find(|a| a.address == "192.0.2.2")
        .unwrap();
    assert!(
        b.last_decision
            .as_deref()
            .unwrap()
            .contains("sent 20 of the 50 needed"),
        "{b:?}"
    );

    // Day 10: a bounce spike at stage 10 steps 192.0.2.1 back two stages and holds it.
    w.send("192.0.2.1", 900, 100, 0);
    w.day(10).await;
    let p = settled(&client, T0 + 10 * DAY + 30, 2).await;
    assert_eq!(stage(&p, "192.0.2.1"), (8, "held".into(), 100 << 7));

    // Days 11-13: clean again; it climbs back and completes the plan on day 13.
    for day in 11..=13 {
        let limit = stage(&plan(&client).await, "192.0.2.1").2;
        w.send("192.0.2.1", limit, 0, 0);
        w.day(day).await;
        settled(&client, T0 + day * DAY + 30, 2).await;
    }
    let p = plan(&client).await;
    assert_eq!(stage(&p, "192.0.2.1"), (10, "warm".into(), 0));
    assert_eq!(p.status.as_ref().unwrap().warm, 1);

    // Days 14-18: idle. On the fifth idle day it falls back to stage one.
    for day in 14..=18 {
        w.day(day).await;
        let p = settled(&client, T0 + day * DAY + 30, 2).await;
        let expected = if day < 18 { "warm" } else { "warming" };
        assert_eq!(stage(&p, "192.0.2.1").1, expected, "day {day}");
    }
    assert_eq!(stage(&plan(&client).await, "192.0.2.1").0, 1);

    // Days 19-30: it ramps again, and the metrics follow.
    for day in 19..=30 {
        let limit = stage(&plan(&client).await, "192.0.2.1").2;
        w.send("192.0.2.1", limit.max(100), 0, 0);
        w.day(day).await;
        settled(&client, T0 + day * DAY + 30, 2).await;
    }
    let p = plan(&client).await;
    assert_eq!(stage(&p, "192.0.2.1"), (10, "warm".into(), 0));
    let labels = [
        ("namespace", "mail"),
        ("plan", "ramp"),
        ("pool", "fleet"),
        ("address", "192.0.2.2"),
    ];
    assert_eq!(metrics.gauge("warmup_stage", &labels), Some(1.0));
    assert!(metrics.counter("warmup_decisions_total", &[("decision", "advanced")]) >= 18);
    assert_eq!(
        metrics.counter("warmup_decisions_total", &[("decision", "steppedBack")]),
        1
    );
    assert_eq!(
        metrics.counter("warmup_decisions_total", &[("decision", "idleReset")]),
        1
    );

    // The story is in the plan's Events.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "mail");
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for r in [
        "WarmupStarted",
        "WarmupAdvanced",
        "WarmupSteppedBack",
        "WarmupCompleted",
        "WarmupIdleReset",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), engine).await;
}
