//! Idle clients are parked without a task (session/park.rs) and come back whenever
//! they have something to do: a request, or a signal that concerns them.

use std::time::Duration;

use crate::common::env;

/// Waits until `done` holds, for 10 s at most (a hang guard, not a timing assertion).
async fn until(done: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Waits until `n` clients are parked.
async fn parked(e: &crate::common::Env, n: usize) -> bool {
    until(|| e.pooler.shared.lot.len() == n).await
}

#[tokio::test]
async fn an_idle_client_parks_resumes_on_its_request_and_parks_again() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    assert!(parked(&e, 1).await, "a client just logged in parks");
    // Its request takes it out of the lot; a pipelined batch of several
    // transactions goes through as one would without parking.
    let rows = client
        .simple_query("SELECT 1; BEGIN; SELECT 2; COMMIT")
        .await
        .unwrap();
    assert!(rows.len() >= 4);
    client
        .batch_execute("SET application_name = 'p1'")
        .await
        .unwrap();
    // Busy, then quiet for a whole sweep period: parked again, state kept.
    assert!(parked(&e, 1).await, "a quiet client parks again");
    let rows = client
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, String>(0), "p1");
    // Parked, it still hears a revocation (its doorbell) and is told why.
    assert!(parked(&e, 1).await);
    e.provisioner
        .set_disabled(&e.name(&app), true, &Default::default())
        .await
        .unwrap();
    let mut closed = false;
    for _ in 0..500 {
        if client.is_closed() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        closed,
        "a parked client of a suspended app is still connected"
    );
    assert!(parked(&e, 0).await, "it left the lot");
}

#[tokio::test]
async fn a_parked_client_that_hangs_up_leaves_nothing_behind() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    client.simple_query("SELECT 1").await.unwrap();
    assert!(parked(&e, 1).await);
    drop(client);
    assert!(parked(&e, 0).await, "a hung-up client stays parked");
    assert!(
        until(|| e.pooler.shared.clients.is_empty()).await,
        "the hung-up client is still registered"
    );
}
