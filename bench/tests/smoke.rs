//! `bench --quick` as a smoke test: it runs every target and scenario to the end and
//! writes numbers. It never asserts speed: only that the machinery works.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn row<'a>(rows: &'a [Value], target: &str, scenario: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["target"] == target && r["scenario"] == scenario)
        .unwrap_or_else(|| panic!("no row for {target} ({scenario})"))
}

fn pgbouncer_installed() -> bool {
    Path::new("/usr/sbin/pgbouncer").is_file()
        || Command::new("sh")
            .args(["-c", "command -v pgbouncer"])
            .status()
            .is_ok_and(|s| s.success())
}

#[test]
fn quick_run_completes_and_writes_numbers() {
    let bench = Path::new(env!("CARGO_BIN_EXE_bench"));
    // The bench runs the real `pooler` binary of the same profile; `cargo test
    // --workspace` builds it (the pooler's own integration tests need it).
    let pooler = bench.with_file_name("pooler");
    assert!(
        pooler.is_file(),
        "no {}: build it first (cargo build -p pooler)",
        pooler.display()
    );
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(bench)
        .args(["--quick", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "bench --quick failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("quick.json")).unwrap())
            .unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3 * 11, "a row per target and scenario");
    let mut targets = vec!["pooler", "direct"];
    if pgbouncer_installed() {
        targets.push("pgbouncer");
    }
    for target in targets {
        for scenario in ["a", "b", "c", "d", "f"] {
            let r = row(rows, target, scenario);
            assert!(
                r["tps"].as_f64().is_some_and(|t| t > 0.0),
                "{target} ({scenario}) measured no transactions: {r}"
            );
            assert!(r["p99_ms"].as_f64().is_some(), "{r}");
        }
        for scenario in ["b", "c", "d"] {
            let r = row(rows, target, scenario);
            assert!(r["jain"].as_f64().is_some(), "{r}");
        }
    }
    let ours = row(rows, "pooler", "a");
    assert!(ours["target_cpu_s_per_1k"].as_f64().is_some(), "{ours}");
    assert!(
        ours["target_rss_kib"].as_u64().is_some_and(|k| k > 0),
        "{ours}"
    );
    // The same C client through every target: transactions, CPU and system calls per
    // transaction (or why perf could not count them) for the pooler.
    for scenario in ["a-pgbench", "a-pgbench-prepared"] {
        let r = row(rows, "pooler", scenario);
        assert!(
            r["transactions"].as_u64().is_some_and(|n| n > 0),
            "{scenario}: {r}"
        );
        assert!(r["target_cpu_s_per_1k"].as_f64().is_some(), "{r}");
        assert!(
            r["syscalls"]["total"].as_u64().is_some_and(|n| n > 0)
                || r["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("system calls not counted")),
            "{r}"
        );
    }
    let idle = row(rows, "pooler", "g");
    assert!(
        idle["idle_opened"].as_u64().is_some_and(|n| n > 0),
        "{idle}"
    );

    // (h): notifications arrive through the pooler, a latency is measured, the servers
    // held are counted, and no app hears another's.
    let listen = row(rows, "pooler", "h");
    assert!(listen["tps"].as_f64().is_some_and(|t| t > 0.0), "{listen}");
    assert!(listen["p99_ms"].as_f64().is_some(), "{listen}");
    assert!(listen["servers_max"].as_u64().is_some(), "{listen}");
    assert_eq!(
        listen["foreign_notifications"].as_u64(),
        Some(0),
        "{listen}"
    );

    let md = std::fs::read_to_string(out.path().join("quick.md")).unwrap();
    assert!(
        md.contains("## Ratios (us / PgBouncer, us / direct)"),
        "{md}"
    );
    assert!(md.contains("| (a) | pooler (us) |"), "{md}");
    let svg = std::fs::read_to_string(out.path().join("quick.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
}
