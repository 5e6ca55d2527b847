//! The harness itself: a cluster accepts SCRAM logins, and however its owning process
//! ends, no postmaster and no temp directory outlive it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dataplane_tests::{PgCluster, StartOptions};

const CHILD_ENV: &str = "DATAPLANE_HARNESS_CHILD";

/// Not a test on its own: the body of the child process the tests below start. It
/// starts a cluster, prints where it lives, and then ends the way the parent asked.
#[test]
#[ignore = "run by the cleanup tests as a child process"]
fn child_starts_a_cluster() {
    let Ok(how) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cluster = PgCluster::start(StartOptions::default()).unwrap();
    println!(
        "CLUSTER {} {}",
        cluster.dir().display(),
        cluster.postmaster_pid().unwrap()
    );
    // Like a static: never dropped, so only the watchdog can clean up.
    std::mem::forget(cluster);
    match how.as_str() {
        "exit" => std::process::exit(0),
        "panic" => panic!("the test failed"),
        // Wait to be SIGKILLed.
        _ => std::thread::sleep(Duration::from_secs(600)),
    }
}

fn start_child(how: &str) -> (Child, PathBuf, u32) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_starts_a_cluster",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, how)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("CLUSTER "))
        .expect("the child reports its cluster");
    let mut parts = line.split("CLUSTER ").nth(1).unwrap().split(' ');
    let dir = PathBuf::from(parts.next().unwrap());
    let pid = parts.next().unwrap().trim().parse().unwrap();
    (child, dir, pid)
}

fn assert_cleaned_up(dir: &std::path::Path, pid: u32) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while (dir.exists() || proc.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!proc.exists(), "postmaster {pid} outlived its test process");
    assert!(!dir.exists(), "{} outlived its test process", dir.display());
}

#[test]
fn nothing_is_left_after_a_normal_exit() {
    let (mut child, dir, pid) = start_child("exit");
    assert!(dir.exists());
    child.wait().unwrap();
    assert_cleaned_up(&dir, pid);
}

#[test]
fn nothing_is_left_after_a_failed_test() {
    let (mut child, dir, pid) = start_child("panic");
    assert!(!child.wait().unwrap().success());
    assert_cleaned_up(&dir, pid);
}

#[test]
fn nothing_is_left_after_sigkill() {
    let (mut child, dir, pid) = start_child("kill");
    assert!(
        PathBuf::from(format!("/proc/{pid}")).exists(),
        "the postmaster runs"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_cleaned_up(&dir, pid);
}

#[tokio::test]
async fn the_shared_cluster_speaks_scram_only_over_tcp() {
    let cluster = tokio::task::spawn_blocking(PgCluster::shared)
        .await
        .unwrap();
    let db = cluster.fresh_database().await;
    let client = dataplane_tests::connect(&cluster.superuser_config(&db))
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT current_database(), current_setting('password_encryption')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db);
    assert_eq!(row.get::<_, String>(1), "scram-sha-256");
    let hba: Vec<String> = client
        .query(
            "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !hba.is_empty() && hba.iter().all(|m| m == "scram-sha-256"),
        "{hba:?}"
    );
    // A wrong password is refused.
    let wrong = dataplane_tests::connect(&cluster.config(cluster.superuser(), "wrong", &db)).await;
    assert_eq!(
        wrong
            .err()
            .and_then(|e| e.code().cloned())
            .map(|c| c.code().to_owned())
            .as_deref(),
        Some("28P01")
    );
}
