//! The checked-in CRDs match the code, every example passes them, and every validation rule
//! refuses a bad spec with a message a person understands.
//!
//! Validation runs through `mailfleet-crdschema`, which prunes, defaults and validates as an
//! API server does (OpenAPI schema, then CEL rules).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::PathBuf;

use mailfleet_crdschema::Schema;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read_yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn schema_of(plural: &str) -> Schema {
    let crd = read_yaml(&format!("crds/{plural}.mailfleet.dev.yaml"));
    let versions = crd["spec"]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    Schema::compile(&versions[0]["schema"]["openAPIV3Schema"]).unwrap()
}

fn plural(kind: &str) -> &'static str {
    match kind {
        "RelayPool" => "relaypools",
        "SendingDomain" => "sendingdomains",
        "WarmupPlan" => "warmupplans",
        other => panic!("unknown kind {other}"),
    }
}

/// Admits `obj` as an API server would and returns the error messages.
fn admit(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let kind = obj["kind"].as_str().unwrap();
    let schema = schema_of(plural(kind));
    let mut obj = obj.clone();
    let old = old.map(|o| {
        let mut o = o.clone();
        schema.prune(&mut o);
        schema.apply_defaults(&mut o);
        o
    });
    schema
        .admit(&mut obj, old.as_ref())
        .into_iter()
        .map(|e| e.message)
        .collect()
}

fn example(name: &str) -> Value {
    read_yaml(&format!("examples/{name}.yaml"))
}

/// Sets the value at a JSON pointer, creating nothing: the parent must exist.
fn set(obj: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let target = obj
        .pointer_mut(parent)
        .unwrap_or_else(|| panic!("no {parent}"));
    match target {
        Value::Object(m) => {
            m.insert(key.to_owned(), value);
        }
        Value::Array(a) => a[key.parse::<usize>().unwrap()] = value,
        _ => panic!("{parent} is not a container"),
    }
}

fn remove(obj: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    obj.pointer_mut(parent)
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove(key);
}

#[track_caller]
fn assert_refused(obj: &Value, expected: &str) {
    let errors = admit(obj, None);
    assert!(
        errors.iter().any(|e| e.contains(expected)),
        "expected an error containing {expected:?}, got {errors:#?}"
    );
}

#[test]
fn checked_in_crds_match_the_code() {
    for (file, text) in mailfleet_api::crd_manifests().unwrap() {
        let on_disk =
            std::fs::read_to_string(repo().join("crds").join(&file)).unwrap_or_else(|_| {
                panic!("crds/{file} is missing: run `cargo run -p mailfleet -- crdgen`")
            });
        assert!(
            on_disk == text,
            "crds/{file} differs from the code: run `cargo run -p mailfleet -- crdgen`"
        );
    }
}

#[test]
fn chart_crds_match_the_code() {
    for (file, text) in mailfleet_api::crd_manifests().unwrap() {
        let in_chart = std::fs::read_to_string(repo().join("charts/mailfleet/crds").join(&file))
            .unwrap_or_else(|_| {
                panic!("charts/mailfleet/crds/{file} is missing: run `hack/gen.sh`")
            });
        assert!(
            in_chart == text,
            "charts/mailfleet/crds/{file} differs from the code: run `hack/gen.sh`"
        );
    }
}

#[test]
fn cel_rules_fit_the_api_server_budget() {
    for plural in ["relaypools", "sendingdomains", "warmupplans"] {
        let crd = read_yaml(&format!("crds/{plural}.mailfleet.dev.yaml"));
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let problems = mailfleet_crdschema::analyze_rules(schema);
        assert!(problems.is_empty(), "{plural}: {problems:#?}");
    }
}

#[test]
fn every_example_is_accepted() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj: Value = serde::Deserialize::deserialize(doc).unwrap();
            let Some(kind) = obj["kind"].as_str() else {
                continue;
            };
            if !["RelayPool", "SendingDomain", "WarmupPlan"].contains(&kind) {
                continue;
            }
            let errors = admit(&obj, None);
            assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected an example of each kind, saw {seen}");
}

#[test]
fn examples_deserialize_into_the_typed_api() {
    let pool: mailfleet_api::RelayPool = serde_json::from_value(example("relaypool")).unwrap();
    assert_eq!(pool.spec.replicas, 3);
    let domain: mailfleet_api::SendingDomain =
        serde_json::from_value(example("sendingdomain")).unwrap();
    assert_eq!(domain.spec.domain, "mail.example.com");
    let plan: mailfleet_api::WarmupPlan = serde_json::from_value(example("warmupplan")).unwrap();
    assert_eq!(plan.spec.stages.len(), 8);
}

#[test]
fn defaults_are_filled_in() {
    let mut pool = example("relaypool");
    remove(&mut pool, "/spec/delivery");
    remove(&mut pool, "/spec/replicas");
    let schema = schema_of("relaypools");
    assert!(schema.admit(&mut pool, None).is_empty());
    assert_eq!(pool["spec"]["replicas"], 2);
    assert_eq!(pool["spec"]["delivery"]["maxQueueLifetime"], "72h");
    assert_eq!(pool["spec"]["delivery"]["retrySchedule"][0], "5m");
    assert_eq!(pool["spec"]["listener"]["maxRecipients"], 100);
}

// ---- RelayPool rules ----

#[test]
fn relaypool_refuses_negative_replicas() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/replicas", json!(-1));
    assert_refused(
        &p,
        "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0",
    );
}

#[test]
fn relaypool_refuses_bad_address() {
    let mut p = example("relaypool");
    set(
        &mut p,
        "/spec/egress/addresses/0/address",
        json!("192.0.2.300"),
    );
    assert_refused(&p, "address must be an IPv4 or IPv6 address");
}

#[test]
fn relaypool_refuses_duplicate_address() {
    let mut p = example("relaypool");
    set(
        &mut p,
        "/spec/egress/addresses/1/address",
        json!("192.0.2.10"),
    );
    assert_refused(&p, "spec.egress.addresses[1]: Duplicate value");
}

#[test]
fn relaypool_refuses_bad_cidr() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/cidrs", json!(["198.51.100.0/33"]));
    assert_refused(&p, "every entry of cidrs must be a CIDR");
}

#[test]
fn relaypool_refuses_huge_cidr() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/cidrs", json!(["10.0.0.0/8"]));
    assert_refused(&p, "egress cidrs may be at most /20 (IPv4) or /116 (IPv6)");
}

#[test]
fn relaypool_refuses_no_addresses() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/addresses", json!([]));
    set(&mut p, "/spec/egress/cidrs", json!([]));
    assert_refused(
        &p,
        "egress needs at least one address in addresses or cidrs",
    );
}

#[test]
fn relaypool_refuses_missing_helo_names() {
    let mut p = example("relaypool");
    remove(&mut p, "/spec/egress/heloNameTemplate");
    assert_refused(&p, "give heloNameTemplate, or a heloName for every address");
}

#[test]
fn relaypool_refuses_bad_helo_template() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/heloNameTemplate", json!("MTA_{ip}"));
    assert_refused(&p, "spec.egress.heloNameTemplate in body should match");
}

#[test]
fn relaypool_refuses_cilium_without_settings() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/mode", json!("ciliumEgressGateway"));
    assert_refused(&p, "egress.mode ciliumEgressGateway needs egress.cilium");
}

#[test]
fn relaypool_refuses_cilium_with_more_pods_than_addresses() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/mode", json!("ciliumEgressGateway"));
    set(
        &mut p,
        "/spec/egress/cilium",
        json!({"gatewayNodeSelector": {"egress": "true"}}),
    );
    set(&mut p, "/spec/egress/cidrs", json!([]));
    set(&mut p, "/spec/replicas", json!(5));
    assert_refused(&p, "each relay pod owns exactly one address");
}

#[test]
fn relaypool_refuses_unknown_egress_mode() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/egress/mode", json!("nat"));
    assert_refused(
        &p,
        "spec.egress.mode: Unsupported value: \"nat\": supported values: \"bind\", \"ciliumEgressGateway\"",
    );
}

#[test]
fn relaypool_refuses_open_relay() {
    let mut p = example("relaypool");
    remove(&mut p, "/spec/listener/auth");
    set(&mut p, "/spec/listener/allowedNetworks", json!([]));
    assert_refused(&p, "mailfleet never runs an open relay");
}

#[test]
fn relaypool_refuses_allow_all_networks() {
    let mut p = example("relaypool");
    set(
        &mut p,
        "/spec/listener/allowedNetworks",
        json!(["0.0.0.0/0"]),
    );
    assert_refused(&p, "allowedNetworks must not contain 0.0.0.0/0 or ::/0");
}

#[test]
fn relaypool_refuses_bad_allowed_network() {
    let mut p = example("relaypool");
    set(
        &mut p,
        "/spec/listener/allowedNetworks",
        json!(["10.0.0.1"]),
    );
    assert_refused(&p, "every entry of allowedNetworks must be a CIDR");
}

#[test]
fn relaypool_refuses_auth_without_tls() {
    let mut p = example("relaypool");
    remove(&mut p, "/spec/listener/tlsSecretRef");
    assert_refused(&p, "passwords are only accepted over TLS");
}

#[test]
fn relaypool_refuses_bad_port() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/listener/port", json!(70000));
    assert_refused(
        &p,
        "spec.listener.port in body should be less than or equal to 65535",
    );
}

#[test]
fn relaypool_refuses_bad_retry_duration() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/delivery/retrySchedule", json!(["5 minutes"]));
    assert_refused(
        &p,
        "spec.delivery.retrySchedule[0]: Invalid value: \"5 minutes\"",
    );
}

#[test]
fn relaypool_refuses_duplicate_provider_group() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/delivery/providers/1/group", json!("gmail"));
    assert_refused(
        &p,
        "spec.delivery.providers[1]: Duplicate value: {\"group\":\"gmail\"}",
    );
}

#[test]
fn relaypool_refuses_unknown_provider_group() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/delivery/providers/0/group", json!("aol"));
    assert_refused(
        &p,
        "spec.delivery.providers[0].group: Unsupported value: \"aol\"",
    );
}

#[test]
fn relaypool_refuses_bad_spool_size() {
    let mut p = example("relaypool");
    set(&mut p, "/spec/spool/size", json!("lots"));
    assert_refused(&p, "spec.spool.size in body should match");
}

#[test]
fn relaypool_requires_egress_and_listener() {
    let mut p = example("relaypool");
    remove(&mut p, "/spec/egress");
    remove(&mut p, "/spec/listener");
    assert_refused(&p, "spec.egress: Required value");
    assert_refused(&p, "spec.listener: Required value");
}

// ---- SendingDomain rules ----

#[test]
fn sendingdomain_refuses_bad_domain() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/domain", json!("Mail_Example.com."));
    assert_refused(
        &d,
        "spec.domain: Invalid value: \"Mail_Example.com.\": spec.domain in body should match",
    );
}

#[test]
fn sendingdomain_domain_is_immutable() {
    let old = example("sendingdomain");
    let mut d = old.clone();
    set(&mut d, "/spec/domain", json!("other.example.com"));
    let errors = admit(&d, Some(&old));
    assert!(
        errors.iter().any(|e| e.contains("domain is immutable")),
        "{errors:#?}"
    );
    assert!(admit(&old, Some(&old)).is_empty());
}

#[test]
fn sendingdomain_refuses_bad_selector_prefix() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/dkim/selectorPrefix", json!("MF."));
    assert_refused(&d, "spec.dkim.selectorPrefix in body should match");
}

#[test]
fn sendingdomain_refuses_unknown_algorithm() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/dkim/algorithm", json!("rsa1024"));
    assert_refused(&d, "spec.dkim.algorithm: Unsupported value: \"rsa1024\"");
}

#[test]
fn sendingdomain_refuses_rotation_of_external_keys() {
    let mut d = example("sendingdomain");
    set(
        &mut d,
        "/spec/dkim/keySecretRef",
        json!({"name": "my-keys"}),
    );
    assert_refused(&d, "keys from keySecretRef are managed outside mailfleet");
}

#[test]
fn sendingdomain_refuses_too_many_spf_includes() {
    let mut d = example("sendingdomain");
    let includes: Vec<String> = (0..10).map(|i| format!("_spf{i}.example.net")).collect();
    set(&mut d, "/spec/spf/includes", json!(includes));
    assert_refused(
        &d,
        "spec.spf.includes: Too many: 10: must have at most 9 items",
    );
}

#[test]
fn sendingdomain_refuses_bad_dmarc_pct_and_rua() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/dmarc/pct", json!(150));
    set(&mut d, "/spec/dmarc/rua", json!(["dmarc@example.com"]));
    assert_refused(
        &d,
        "spec.dmarc.pct in body should be less than or equal to 100",
    );
    assert_refused(
        &d,
        "spec.dmarc.rua[0]: Invalid value: \"dmarc@example.com\"",
    );
}

#[test]
fn sendingdomain_refuses_rfc2136_without_settings() {
    let mut d = example("sendingdomain");
    remove(&mut d, "/spec/dns/rfc2136");
    assert_refused(&d, "dns.provider rfc2136 needs dns.rfc2136");
}

#[test]
fn sendingdomain_refuses_rfc2136_settings_with_other_provider() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/dns/provider", json!("manual"));
    assert_refused(&d, "dns.rfc2136 is only used with dns.provider rfc2136");
}

#[test]
fn sendingdomain_refuses_bad_pinned_address() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/addresses", json!(["mta1.example.com"]));
    assert_refused(
        &d,
        "every entry of addresses must be an IPv4 or IPv6 address",
    );
}

#[test]
fn sendingdomain_refuses_short_ttl() {
    let mut d = example("sendingdomain");
    set(&mut d, "/spec/dns/ttl", json!(5));
    assert_refused(
        &d,
        "spec.dns.ttl in body should be greater than or equal to 30",
    );
}

// ---- WarmupPlan rules ----

#[test]
fn warmupplan_refuses_non_increasing_stages() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/stages/2/dailyLimit", json!(500));
    assert_refused(&w, "stage daily limits must strictly increase");
    let mut w = example("warmupplan");
    set(&mut w, "/spec/stages/2/dailyLimit", json!(300));
    assert_refused(&w, "stage daily limits must strictly increase");
}

#[test]
fn warmupplan_refuses_no_stages() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/stages", json!([]));
    assert_refused(&w, "spec.stages in body should have at least 1 items");
}

#[test]
fn warmupplan_refuses_rates_outside_unit_interval() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/gates/maxHardBounceRate", json!(1.5));
    set(&mut w, "/spec/gates/maxComplaintRate", json!(-0.1));
    assert_refused(
        &w,
        "spec.gates.maxHardBounceRate in body should be less than or equal to 1",
    );
    assert_refused(
        &w,
        "spec.gates.maxComplaintRate in body should be greater than or equal to 0",
    );
}

#[test]
fn warmupplan_refuses_hourly_above_daily() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/stages/0/hourlyLimit", json!(500));
    assert_refused(&w, "hourlyLimit cannot exceed dailyLimit");
}

#[test]
fn warmupplan_refuses_step_back_past_first_stage() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/onBreach/stepBackStages", json!(8));
    assert_refused(
        &w,
        "onBreach.stepBackStages must be smaller than the number of stages",
    );
}

#[test]
fn warmupplan_refuses_step_back_stages_without_step_back() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/onBreach/action", json!("hold"));
    set(&mut w, "/spec/onBreach/stepBackStages", json!(2));
    assert_refused(
        &w,
        "onBreach.stepBackStages is only used with action stepBack",
    );
}

#[test]
fn warmupplan_refuses_idle_reset_stage_beyond_plan() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/idleResetStage", json!(9));
    assert_refused(&w, "idleResetStage must name an existing stage");
}

#[test]
fn warmupplan_refuses_bad_window_and_overflow() {
    let mut w = example("warmupplan");
    set(&mut w, "/spec/window", json!("1 day"));
    set(&mut w, "/spec/overflow", json!("drop"));
    assert_refused(&w, "spec.window: Invalid value: \"1 day\"");
    assert_refused(
        &w,
        "spec.overflow: Unsupported value: \"drop\": supported values: \"queue\", \"warmAddresses\"",
    );
}
