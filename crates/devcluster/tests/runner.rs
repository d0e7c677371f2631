//! The pod runner with a stand-in relay (a tiny Python HTTP server): StatefulSet pods start in
//! ordinal order as local processes on their own loopback address with the pod's env,
//! readiness follows the probe, a crash restarts the process, deleting a pod stops it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::Cluster;
use mailfleet_devcluster::RunnerConfig;

const STAND_IN: &str = r#"#!/usr/bin/env python3
import http.server, json, os, sys
ip = os.environ["POD_IP"]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/crash":
            os._exit(3)
        if self.path == "/env":
            body = json.dumps({"env": dict(os.environ), "argv": sys.argv[1:]}).encode()
        else:
            body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("stand-in relay listening on", ip, flush=True)
http.server.HTTPServer((ip, 8080), H).serve_forever()
"#;

fn http_get(ip: &str, path: &str) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&format!("{ip}:8080").parse().ok()?, Duration::from_secs(2))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

const STS: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: relay
spec:
  replicas: 2
  serviceName: relay
  selector:
    matchLabels: {app: relay}
  template:
    metadata:
      labels: {app: relay}
    spec:
      containers:
      - name: relay
        image: mailfleet:dev
        args: ["relay", "--listen", "$(POD_IP)"]
        env:
        - name: GREETING
          value: hi
        - name: MY_IP
          valueFrom:
            fieldRef: {fieldPath: status.podIP}
        - name: SECRET_VALUE
          valueFrom:
            secretKeyRef: {name: relay-secret, key: token}
        readinessProbe:
          httpGet: {path: /readyz, port: 8080}
"#;

#[test]
fn statefulset_pods_run_as_processes() {
    let tools = tempfile::tempdir().unwrap();
    let program = tools.path().join("stand-in.py");
    std::fs::write(&program, STAND_IN).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner = RunnerConfig {
        relay_program: Some(program),
        restart_backoff: Duration::from_millis(200),
        interval: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let c = Cluster::with_runner(runner);
    c.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "relay-secret",
        "--from-literal=token=s3cret",
    ]);
    assert!(c.kubectl_stdin(&["apply", "-f", "-"], STS).status.success());

    let ready = |pod: &str| {
        c.kubectl(&[
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ])
        .stdout
        .starts_with(b"True")
    };
    // Ordinal order: relay-1 appears only once relay-0 is Ready.
    c.eventually("relay-1 to be created", || {
        let exists = c.kubectl(&["get", "pod", "relay-1"]).status.success();
        if exists {
            assert!(
                ready("relay-0"),
                "relay-1 was created before relay-0 was Ready"
            );
        }
        exists.then_some(())
    });
    c.eventually("both pods Ready", || {
        (ready("relay-0") && ready("relay-1")).then_some(())
    });
    c.eventually("statefulset status", || {
        let s = c.kubectl_ok(&[
            "get",
            "sts",
            "relay",
            "-o",
            "jsonpath={.status.readyReplicas}",
        ]);
        (s.trim() == "2").then_some(())
    });

    let ip0 = c.kubectl_ok(&["get", "pod", "relay-0", "-o", "jsonpath={.status.podIP}"]);
    let ip1 = c.kubectl_ok(&["get", "pod", "relay-1", "-o", "jsonpath={.status.podIP}"]);
    assert!(
        ip0.starts_with("127.") && ip1.starts_with("127."),
        "{ip0} {ip1}"
    );
    assert_ne!(ip0, ip1, "each pod has its own loopback address");

    // The process got the pod's env and args.
    let env: serde_json::Value = serde_json::from_str(&http_get(&ip0, "/env").unwrap()).unwrap();
    assert_eq!(env["env"]["GREETING"], "hi");
    assert_eq!(env["env"]["MY_IP"], ip0.as_str());
    assert_eq!(env["env"]["POD_IP"], ip0.as_str());
    assert_eq!(env["env"]["POD_NAME"], "relay-0");
    assert_eq!(env["env"]["SECRET_VALUE"], "s3cret");
    assert_eq!(
        env["argv"],
        serde_json::json!(["relay", "--listen", ip0.as_str()]),
        "$(POD_IP) in args is expanded as the kubelet does"
    );

    // The process's output is the pod's log.
    let logs = c.kubectl_ok(&["logs", "relay-0"]);
    assert!(
        logs.contains(&format!("stand-in relay listening on {ip0}")),
        "{logs}"
    );

    // A crash restarts the process and counts a restart, as the kubelet does.
    let _ = http_get(&ip0, "/crash");
    c.eventually("relay-0 restarted and Ready again", || {
        let n = c.kubectl_ok(&[
            "get",
            "pod",
            "relay-0",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ]);
        (n.trim() == "1" && ready("relay-0") && http_get(&ip0, "/readyz").is_some()).then_some(())
    });

    // Deleting a pod stops its process; the StatefulSet replaces it.
    let uid = c.kubectl_ok(&["get", "pod", "relay-1", "-o", "jsonpath={.metadata.uid}"]);
    c.kubectl_ok(&["delete", "pod", "relay-1"]);
    c.eventually("relay-1 replaced and Ready", || {
        let new_uid = c
            .kubectl(&["get", "pod", "relay-1", "-o", "jsonpath={.metadata.uid}"])
            .stdout;
        (!new_uid.is_empty() && new_uid != uid.as_bytes() && ready("relay-1")).then_some(())
    });

    // Scale to zero: pods go away and their processes stop.
    c.kubectl_ok(&["scale", "sts", "relay", "--replicas=0"]);
    c.eventually("pods deleted", || {
        let out = c.kubectl_ok(&["get", "pods", "-o", "name"]);
        out.trim().is_empty().then_some(())
    });
    c.eventually("processes stopped", || {
        http_get(&ip0, "/readyz").is_none().then_some(())
    });

    // Pods that are not relays are marked Running without a process.
    c.kubectl_ok(&["run", "web", "--image=nginx"]);
    c.eventually("plain pod Running", || {
        let phase = c.kubectl_ok(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]);
        (phase.trim() == "Running" && ready("web")).then_some(())
    });
    // Deleting the StatefulSet garbage-collects nothing left, and the table prints.
    let table = c.kubectl_ok(&["get", "pods"]);
    assert!(table.contains("READY") && table.contains("web"), "{table}");
}
