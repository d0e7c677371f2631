//! Traces of one message through a real `mailfleet relay --config` process: swaks submits
//! it, the relay signs it with DKIM and delivers it to the sink MX (found through Knot), and
//! the OTLP receiver gets the `smtp.accept`, `dkim.sign` and `delivery.attempt` spans of
//! service `mailfleet-relay`, all carrying the queue id of the `250` reply as `message_id`,
//! `dkim.sign` as a child of `smtp.accept`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../relay/tests/common/mod.rs"]
mod common;
mod e2e;

use std::process::{Command, Stdio};

use common::{Knot, Proc, Sink, config, free_port, header, keys, require, wait_port};
use e2e::{Span, Traces, eventually};

#[test]
fn one_message_traces_accept_sign_and_delivery_with_its_queue_id() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let keys = keys(root);
    let sink = Sink::start(root, &[]);
    let knot = Knot::start(
        root,
        &[
            "dest.example.test. 60 MX 10 mx.example.test.",
            "mx.example.test. 60 A 127.0.0.1",
        ],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let traces = Traces::default();
    let otlp = traces.serve(&rt);

    let mut cfg = config(root, &[("127.0.0.1", "out.example.test")]);
    let smtp = free_port();
    cfg.listener.listen = format!("127.0.0.1:{smtp}").parse().unwrap();
    cfg.delivery.nameservers = vec![knot.addr()];
    cfg.delivery.port = sink.port;
    cfg.sending_domains[0].dkim = keys.dkim_configs();
    let config_file = root.join("relay.yaml");
    std::fs::write(&config_file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let log = std::fs::File::create(root.join("relay.log")).unwrap();
    let mut relay = Proc(
        Command::new(env!("CARGO_BIN_EXE_mailfleet"))
            .arg("relay")
            .arg("--config")
            .arg(&config_file)
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{otlp}"),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_port(smtp);

    let out = Command::new(require("swaks"))
        .args(["--server", "127.0.0.1", "--port", &smtp.to_string()])
        .args([
            "--from",
            "app@example.test",
            "--to",
            "user@dest.example.test",
        ])
        .args([
            "--h-From",
            "App <app@example.test>",
            "--h-Subject",
            "traced",
        ])
        .args(["--ehlo", "app.example.test"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let queue_id = out
        .lines()
        .find_map(|l| l.split("250 2.0.0 Ok: queued as ").nth(1))
        .unwrap_or_else(|| panic!("the relay did not queue the message:\n{out}"))
        .trim()
        .to_string();
    let msgs = sink.wait_for(1, 30);
    assert_eq!(msgs.len(), 1, "the sink got no message");
    assert_eq!(
        header(&msgs[0].1, "X-Sink-To"),
        Some("user@dest.example.test")
    );

    // SIGTERM: the relay drains and flushes its spans before it exits.
    let killed = Command::new("kill")
        .args(["-TERM", &relay.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = relay.0.wait().unwrap();
    let log = std::fs::read_to_string(root.join("relay.log")).unwrap();
    assert!(status.success(), "the relay failed ({status}):\n{log}");

    let spans = eventually(30, "the relay's spans over OTLP", || {
        let spans = traces.spans();
        let named = |name: &str| -> Option<Span> {
            spans
                .iter()
                .find(|s| s.name == name && s.service == "mailfleet-relay")
                .cloned()
        };
        Some([
            named("smtp.accept")?,
            named("dkim.sign")?,
            named("delivery.attempt")?,
        ])
    });
    for span in &spans {
        assert_eq!(
            span.attributes.get("message_id"),
            Some(&queue_id),
            "{} does not carry the queue id {queue_id}: {span:?}",
            span.name
        );
    }
    let [accept, sign, attempt] = &spans;
    let attr = |s: &Span, k: &str| s.attributes.get(k).cloned().unwrap_or_default();
    assert_eq!(attr(accept, "mail_from_domain"), "example.test");
    assert_eq!(attr(accept, "recipients"), "1");
    assert_eq!(attr(accept, "reply_code"), "250");
    assert_eq!(attr(sign, "domain"), "example.test");
    assert_eq!(attr(sign, "selectors"), "rsa,ed");
    assert_eq!(attr(attempt, "egress_address"), "127.0.0.1");
    assert_eq!(attr(attempt, "mx"), "mx.example.test");
    assert_eq!(attr(attempt, "outcome"), "delivered");
    // Signing is a child of the accept span; delivery, later and in another task, starts a
    // trace of its own.
    assert_eq!(sign.trace_id, accept.trace_id);
    assert_eq!(sign.parent_span_id, accept.span_id);
    assert!(attempt.parent_span_id.is_empty(), "{attempt:?}");
}
