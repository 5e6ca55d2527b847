//! Postgres restarts under load: clients get clean errors, then the pooler serves
//! again without being restarted itself.

use std::time::Duration;

use dataplane_tests::{PgCluster, StartOptions};

use crate::common::env_on;

#[tokio::test]
async fn the_pooler_recovers_from_a_postgres_restart() {
    // Its own cluster: restarting the shared one would break the other tests.
    let cluster: &'static PgCluster = Box::leak(Box::new(
        tokio::task::spawn_blocking(|| PgCluster::start(StartOptions::default()))
            .await
            .unwrap()
            .unwrap(),
    ));
    let fixture = dataplane_tests::fixtures::migrated_database(cluster).await;
    let e = env_on(fixture, |c| c.query_wait_timeout_ms = 2_000).await;
    let app = e.app_with_pool(4).await;

    // Successes so far, so the restart waits for the load to be under way (on a busy
    // machine the first logins can take longer than any fixed pause).
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = |n: usize| {
        let config = e.config(&app.role, &app.password);
        let served = served.clone();
        tokio::spawn(async move {
            let mut ok = 0usize;
            let mut errors = Vec::new();
            for _ in 0..n {
                match dataplane_tests::connect(&config).await {
                    Ok(c) => match c.simple_query("SELECT 1").await {
                        Ok(_) => {
                            ok += 1;
                            served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => errors.push(e.to_string()),
                    },
                    Err(e) => errors.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, errors)
        })
    };
    let before = load(50);
    for _ in 0..600 {
        if served.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::spawn_blocking(move || cluster.restart())
        .await
        .unwrap()
        .unwrap();
    let (ok, errors) = before.await.unwrap();
    assert!(ok > 0);
    for e in &errors {
        // Clean errors, not hangs or protocol garbage.
        assert!(!e.contains("unexpected message"), "{e}");
    }

    // After the restart: fresh logins and queries work again.
    let mut recovered = false;
    for _ in 0..100 {
        if let Ok(c) = e.try_connect(&app.role, &app.password).await {
            if c.simple_query("SELECT 1").await.is_ok() {
                recovered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the pooler did not serve again after Postgres restarted"
    );
    let (ok, errors) = load(20).await.unwrap();
    assert_eq!(ok, 20, "{errors:?}");
    cluster.stop();
}
