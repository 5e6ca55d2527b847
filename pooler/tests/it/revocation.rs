//! The provisioner's changes reach connected clients at once.

use std::time::Duration;

use crate::common::{env, message, sqlstate};

async fn disconnected(client: &tokio_postgres::Client) -> bool {
    for _ in 0..100 {
        if client.is_closed() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.is_closed()
}

#[tokio::test]
async fn suspend_and_delete_disconnect_connected_clients() {
    let e = env(|_| {}).await;
    for op in ["suspend", "delete"] {
        let app = e.app(Default::default()).await;
        let idle = e.connect(&app).await;
        idle.simple_query("SELECT 1").await.unwrap();
        let name = e.name(&app);
        match op {
            "suspend" => {
                e.provisioner
                    .set_disabled(&name, true, &Default::default())
                    .await
                    .unwrap();
            }
            _ => {
                e.provisioner
                    .delete(&name, &Default::default())
                    .await
                    .unwrap();
            }
        }
        assert!(
            disconnected(&idle).await,
            "{op}: the client is still connected"
        );
        let err = e.try_connect(&app.role, &app.password).await.err().unwrap();
        assert_eq!(sqlstate(&err), "28P01", "{op}");
        assert_eq!(
            e.backends(&app.role).await,
            0,
            "{op}: servers of the role remain"
        );
    }
}

#[tokio::test]
async fn rotation_makes_the_old_password_fail_at_once() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let connected = e.connect(&app).await;
    connected.simple_query("SELECT 1").await.unwrap();
    let rotated = e
        .provisioner
        .rotate(&e.name(&app), &Default::default())
        .await
        .unwrap();
    // "At once" is as soon as the NOTIFY reaches the pooler: milliseconds, so allow a
    // loaded test machine a second.
    let mut refused = None;
    for _ in 0..50 {
        match e.try_connect(&app.role, &app.password).await {
            Err(err) => {
                refused = Some(err);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let err = refused.expect("the old password still works");
    assert_eq!(sqlstate(&err), "28P01", "{}", message(&err));
    let fresh = e
        .try_connect(&app.role, rotated.password.expose())
        .await
        .unwrap();
    fresh.simple_query("SELECT 1").await.unwrap();
    // A client that was already connected keeps working (a deploy rolls it later).
    connected.simple_query("SELECT 1").await.unwrap();
}
