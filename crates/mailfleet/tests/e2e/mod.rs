//! What the end-to-end tests share: `kubectl` against devcluster, the operator as a process,
//! an OTLP trace receiver, and waiting for a condition.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

use serde_json::Value;

use mailfleet_devcluster::{Config, DevCluster, RunnerConfig};

use crate::common::{Proc, repo_root, require};

/// devcluster running relay pods as `mailfleet relay` processes, with the CRDs installed,
/// the namespaces `mailfleet-system` and `mail` created, and `kubectl` pointed at it.
pub struct Cluster {
    // Fields drop in this order: the cluster before the runtime it runs on.
    pub dc: DevCluster,
    pub k: Kubectl,
    pub rt: tokio::runtime::Runtime,
}

pub fn cluster(root: &Path) -> Cluster {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = Config::new(root.join("cluster"));
    config.runner = Some(RunnerConfig {
        relay_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_mailfleet"))),
        ..RunnerConfig::default()
    });
    let dc = rt.block_on(DevCluster::start(config)).unwrap();
    let k = Kubectl {
        kubeconfig: dc.kubeconfig.clone(),
        home: root.to_path_buf(),
    };
    k.ok(&["apply", "-f", repo_root().join("crds").to_str().unwrap()]);
    k.ok(&["create", "namespace", "mailfleet-system"]);
    k.ok(&["create", "namespace", "mail"]);
    Cluster { dc, k, rt }
}

pub fn kubectl_bin() -> PathBuf {
    std::env::var_os("KUBECTL")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| {
            let local = repo_root().join("bin/kubectl");
            if local.is_file() {
                local
            } else {
                require("kubectl")
            }
        })
}

pub struct Kubectl {
    pub kubeconfig: PathBuf,
    pub home: PathBuf,
}

impl Kubectl {
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(kubectl_bin())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .args(args)
            .output()
            .unwrap();
        crate::common::outcome(&out)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.run(args);
        assert!(ok, "kubectl {args:?} failed: {out}");
        out
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

pub fn operator(
    kubeconfig: &Path,
    log: &Path,
    coordinator: u16,
    health: u16,
    id: &str,
    otlp: Option<u16>,
) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailfleet"));
    cmd.args([
        "operator",
        &format!("--coordinator-addr=127.0.0.1:{coordinator}"),
        &format!("--coordinator-url=https://127.0.0.1:{coordinator}"),
        &format!("--metrics-addr=127.0.0.1:{health}"),
        &format!("--health-addr=127.0.0.1:{health}"),
        "--namespace=mailfleet-system",
        &format!("--identity={id}"),
        "--relay-image=example.invalid/mailfleet:test",
    ])
    .env("KUBECONFIG", kubeconfig)
    .env("RUST_LOG", "info,kube=warn")
    .stdout(Stdio::null())
    .stderr(log);
    if let Some(port) = otlp {
        cmd.env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        );
    }
    Proc(cmd.spawn().unwrap())
}

pub fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn condition(pool: &Value, type_: &str) -> bool {
    pool["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    })
}

/// address → pod, from the pool's status; asserts each address is listed once.
pub fn assignment(pool: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for a in pool["status"]["addresses"].as_array().unwrap() {
        let address = a["address"].as_str().unwrap().to_string();
        let pod = a["pod"].as_str().unwrap_or_default().to_string();
        assert!(
            out.insert(address.clone(), pod).is_none(),
            "{address} listed twice"
        );
    }
    out
}

pub fn pod_ip(k: &Kubectl, namespace: &str, pod: &str) -> String {
    eventually(30, "a pod IP", || {
        let p = k.json(&["-n", namespace, "get", "pod", pod]);
        p["status"]["podIP"].as_str().map(str::to_string)
    })
}

/// A span as the OTLP receiver got it: its service, name, ids (empty parent: a root span)
/// and attributes (values as text).
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
}

/// An OTLP/gRPC trace receiver recording every span it is sent.
#[derive(Clone, Default)]
pub struct Traces(Arc<Mutex<Vec<Span>>>);

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Traces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .and_then(|mut a| a.remove("service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    seen.push(Span {
                        service: service.clone(),
                        attributes: attributes(&span.attributes),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Traces {
    /// Serves the receiver on a free loopback port from `rt`; returns the port.
    pub fn serve(&self, rt: &tokio::runtime::Runtime) -> u16 {
        let otlp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = otlp.local_addr().unwrap().port();
        otlp.set_nonblocking(true).unwrap();
        let traces = self.clone();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(otlp).unwrap();
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(traces))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
                .await
                .unwrap();
        });
        port
    }

    /// The spans received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
}
