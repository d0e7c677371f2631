//! Normalizing outputs before comparing them, and a readable line diff.
//!
//! What legitimately differs between two servers is replaced by a placeholder: uids,
//! timestamps, resourceVersions, ages, generated name suffixes, server addresses and Helm's
//! dates. Error bullets (`* field: message`) are sorted, because kube-apiserver reports the
//! errors of one object in map iteration order, which varies from run to run.

use std::sync::LazyLock;

use regex::Regex;

struct Rule {
    re: Regex,
    with: &'static str,
}

fn rule(re: &str, with: &'static str) -> Rule {
    Rule {
        re: Regex::new(re).expect("valid regex"),
        with,
    }
}

static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    vec![
        rule(
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "<uid>",
        ),
        rule(
            r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})",
            "<time>",
        ),
        // Helm: `helm list` (Go's time.String) and `helm status`/`history` (ANSIC).
        rule(
            r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d+)? [+-]\d{4} [A-Z]+",
            "<date>",
        ),
        rule(
            r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2} \d{4}",
            "<date>",
        ),
        rule(r#"(resourceVersion"?:\s*)"?\d+"?"#, "${1}<rv>"),
        rule(r"127\.0\.0\.1:\d+", "<server>"),
        // generateName suffixes of the script's objects.
        rule(r"\b(diff-gen-)[a-z0-9]{5}\b", "${1}<gen>"),
        // Cluster IPs of Services.
        rule(r"(clusterIPs?:\s*(- )?)\d+\.\d+\.\d+\.\d+", "${1}<ip>"),
    ]
});

static AGE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d+(s|m|h|d)(\d+(s|m|h))?\b").expect("valid regex"));
static COLUMNS: LazyLock<Regex> = LazyLock::new(|| Regex::new(r" {2,}").expect("valid regex"));

/// Normalizes one output. `table` also replaces ages and column padding (kubectl sizes
/// columns by their longest cell, so `3s` and `12s` shift every column).
pub fn normalize(text: &str, table: bool) -> String {
    let mut s = text.to_string();
    for r in RULES.iter() {
        s = r.re.replace_all(&s, r.with).into_owned();
    }
    if table {
        s = AGE.replace_all(&s, "<age>").into_owned();
        s = COLUMNS.replace_all(&s, "  ").into_owned();
        s = s.lines().map(str::trim_end).collect::<Vec<_>>().join("\n");
    }
    sort_bullets(&s)
}

/// Sorts each run of consecutive `* ` lines.
fn sort_bullets(s: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    let flush = |run: &mut Vec<&str>, out: &mut Vec<String>| {
        run.sort_unstable();
        out.extend(run.drain(..).map(str::to_string));
    };
    for line in s.split('\n') {
        if line.starts_with("* ") {
            run.push(line);
        } else {
            flush(&mut run, &mut out);
            out.push(line.to_string());
        }
    }
    flush(&mut run, &mut out);
    out.join("\n")
}

/// A unified-style diff of two texts (`-` devcluster, `+` real), from their longest common
/// subsequence of lines; the outputs compared are short.
pub fn diff(left: &str, right: &str) -> String {
    let a: Vec<&str> = left.lines().collect();
    let b: Vec<&str> = right.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("   {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!(" - {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!(" + {}\n", b[j]));
            j += 1;
        }
    }
    out
}

#[test]
fn normalizes_what_differs_between_servers() {
    let text = "uid: 0f8fad5b-d9cb-469f-a165-70867728950e\n\
                creationTimestamp: \"2026-12-04T16:02:21Z\"\n\
                resourceVersion: \"4711\"\n\
                configmap/diff-gen-x7k2p created\n\
                * b: two\n* a: one\n";
    assert_eq!(
        normalize(text, false),
        "uid: <uid>\ncreationTimestamp: \"<time>\"\nresourceVersion: <rv>\n\
         configmap/diff-gen-<gen> created\n* a: one\n* b: two\n"
    );
    assert_eq!(
        normalize("NAME   AGE\nx      12s\ny      3m4s", true),
        "NAME  AGE\nx  <age>\ny  <age>"
    );
    assert_eq!(diff("a\nb\n", "a\nc\n"), "   a\n - b\n + c\n");
}
