//! Differential test: the same kubectl script (with kubectl 1.27, which reads `/openapi/v2`,
//! and with the current kubectl) and a small Helm script run against devcluster and against
//! a real kube-apiserver (`hack/kube-up`, from bin/kubecp). Every step's exit code, stdout
//! and stderr are normalized (uids, timestamps, resourceVersions, ages, generated names,
//! addresses) and must be equal; a failure prints every differing step as a diff.
//!
//! The real server is the reference: a step whose outcome there is not what the script
//! expects (e.g. an apply that should succeed) fails the test too, so a broken script cannot
//! pass by failing the same way on both servers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../common/mod.rs"]
mod common;
mod normalize;
mod real;
mod script;

use std::time::Instant;

use common::Cluster;
use real::{Outcome, RealCluster, Target};
use script::{Expect, Step};

fn run_script(target: &Target, steps: &[Step]) -> Vec<Outcome> {
    steps
        .iter()
        .map(|step| {
            let mut outcome = target.run(step.client, &step.args, step.stdin.as_deref());
            if let Some(filter) = step.filter {
                outcome.stdout = filter(&outcome.stdout);
            }
            outcome
        })
        .collect()
}

fn describe(o: &Outcome, table: bool) -> String {
    format!(
        "exit {}\n--- stdout\n{}\n--- stderr\n{}",
        o.code,
        normalize::normalize(&o.stdout, table),
        normalize::normalize(&o.stderr, table)
    )
}

#[test]
fn devcluster_answers_kubectl_and_helm_as_kube_apiserver_does() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    // The real control plane starts in the background while devcluster runs the script.
    let mut real = RealCluster::spawn(&work.path().join("kube"));
    let steps = script::steps(work.path());

    let dev = Cluster::start();
    let dev_target = Target {
        name: "devcluster",
        kubeconfig: dev.kubeconfig().to_path_buf(),
        home: work.path().join("home-devcluster"),
    };
    let dev_outcomes = run_script(&dev_target, &steps);
    let dev_done = started.elapsed();

    let real_target = Target {
        name: "kube-apiserver",
        kubeconfig: real.ready(),
        home: work.path().join("home-real"),
    };
    let up = started.elapsed();
    let real_outcomes = run_script(&real_target, &steps);

    // DIFFERENTIAL_DUMP=DIR keeps every step's normalized outputs, for a closer look.
    let dump = std::env::var_os("DIFFERENTIAL_DUMP").map(std::path::PathBuf::from);
    let mut report = String::new();
    let mut differing = 0;
    for (i, ((step, d), r)) in steps
        .iter()
        .zip(&dev_outcomes)
        .zip(&real_outcomes)
        .enumerate()
    {
        if let Some(dir) = &dump {
            std::fs::create_dir_all(dir).unwrap();
            let head = format!("# {}\n", step.command());
            for (side, o) in [("devcluster", d), ("real", r)] {
                let text = format!("{head}{}", describe(o, step.table));
                std::fs::write(dir.join(format!("{i:02}.{side}")), text).unwrap();
            }
        }
        let unexpected = match step.expect {
            Expect::Success => r.code != 0,
            Expect::Failure => r.code == 0,
        };
        if unexpected {
            report.push_str(&format!(
                "\n### {} `{}`: the real server's outcome is not the expected {:?}:\n{}\n",
                step.client.name(),
                step.command(),
                step.expect,
                describe(r, false)
            ));
        }
        let (dn, rn) = (describe(d, step.table), describe(r, step.table));
        if dn != rn {
            differing += 1;
            report.push_str(&format!(
                "\n### {} `{}` differs (- {}, + {}):\n{}",
                step.client.name(),
                step.command(),
                dev_target.name,
                real_target.name,
                normalize::diff(&dn, &rn)
            ));
        }
    }
    eprintln!(
        "differential: {} steps; devcluster done after {:.1} s, real control plane up after \
         {:.1} s, all done after {:.1} s; {differing} step(s) differ",
        steps.len(),
        dev_done.as_secs_f64(),
        up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        report.is_empty(),
        "devcluster differs from kube-apiserver:\n{report}"
    );
}
