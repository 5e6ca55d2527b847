//! LISTEN/NOTIFY through the pooler: in transaction mode LISTEN does not pin, one
//! listener server per app holds its clients' channels, Postgres' commit and rollback
//! semantics hold, notifications reach idle clients at once and busy ones between their
//! transactions; and no app ever hears another app's notifications, on any port.
//!
//! "Nothing arrived" is shown without waiting for time to pass: a later notification
//! from a session of the listener's own app (a fence) is delivered in commit order, so
//! when the fence arrives first, what was sent before it was dropped.

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::error::DbError;
use tokio_postgres::{AsyncMessage, Notification};

use crate::common::{App, Env, env, eventually, message, sqlstate, value, with_admin};

/// A hang guard, never a measure: everything here takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// A client whose notifications and notices arrive on channels.
struct Listening {
    client: tokio_postgres::Client,
    notes: UnboundedReceiver<Notification>,
    notices: UnboundedReceiver<DbError>,
}

async fn listening(config: &tokio_postgres::Config) -> Listening {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let (notes_tx, notes) = tokio::sync::mpsc::unbounded_channel();
    let (notices_tx, notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                AsyncMessage::Notification(n) => {
                    let _ = notes_tx.send(n);
                }
                AsyncMessage::Notice(d) => {
                    let _ = notices_tx.send(d);
                }
                _ => {}
            }
        }
    });
    Listening {
        client,
        notes,
        notices,
    }
}

impl Listening {
    async fn next(&mut self) -> Notification {
        tokio::time::timeout(PATIENCE, self.notes.recv())
            .await
            .expect("a notification")
            .expect("the connection is up")
    }

    /// The next notification is `payload` on `channel`: nothing else came first.
    async fn expect(&mut self, channel: &str, payload: &str) {
        let n = self.next().await;
        assert_eq!(
            (n.channel(), n.payload()),
            (channel, payload),
            "expected {channel}/{payload}"
        );
    }

    fn nothing_yet(&mut self) {
        if let Ok(n) = self.notes.try_recv() {
            panic!(
                "unexpected notification {}/{} from pid {}",
                n.channel(),
                n.payload(),
                n.process_id()
            );
        }
    }
}

async fn run(client: &tokio_postgres::Client, sql: &str) {
    client.batch_execute(sql).await.unwrap();
}

async fn notify(client: &tokio_postgres::Client, channel: &str, payload: &str) {
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .unwrap();
}

fn config(e: &Env, app: &App) -> tokio_postgres::Config {
    e.config(&app.role, &app.password)
}

#[tokio::test]
async fn listening_clients_do_not_pin_and_share_one_listener_server() {
    let e = env(|c| {
        c.max_pinned_per_role = Some(1);
        with_admin(c);
    })
    .await;
    let app = e.app_with_pool(1).await;
    let mut listeners = Vec::new();
    for i in 0..5 {
        let l = listening(&config(&e, &app)).await;
        run(&l.client, &format!("LISTEN shared; LISTEN \"own {i}\"")).await;
        // Not pinned: the pool's one server serves everyone between LISTENs.
        listeners.push(l);
    }
    let role = e.pooler.shared.roles.get(&app.role).unwrap();
    assert_eq!(role.pinned(), 0, "LISTEN pins nobody");
    // Its pool (1) and one listener server; the pool's server still serves others.
    let other = e.connect(&app).await;
    assert_eq!(value(&other, "SELECT 41 + 1").await, "42");
    assert_eq!(e.backends(&app.role).await, 2);
    assert_eq!(e.pooler.shared.notify.listeners(), 1);
    // Idle clients get it without sending anything.
    notify(&other, "shared", "to all").await;
    notify(&other, "own 3", "to one").await;
    for (i, l) in listeners.iter_mut().enumerate() {
        l.expect("shared", "to all").await;
        if i == 3 {
            l.expect("own 3", "to one").await;
        }
    }
    notify(&other, "shared", "fence").await;
    for l in &mut listeners {
        l.expect("shared", "fence").await;
    }
    // SHOW SERVERS and /metrics list it, and when the last listener leaves it is closed.
    let rows = e
        .console()
        .await
        .simple_query("SHOW SERVERS")
        .await
        .unwrap();
    let listed = rows
        .iter()
        .filter(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                r.get("user") == Some(app.role.as_str())
                    && r.get("state") == Some("active")
                    && r.get("application_name")
                        .is_some_and(|a| a.contains("LISTEN"))
            }
            _ => false,
        })
        .count();
    assert_eq!(listed, 1);
    let shared = &e.pooler.shared;
    let text = shared
        .metrics
        .render(
            &shared.pools.stats(),
            &shared.roles.samples(),
            &shared.replicas.stats().sample(),
        )
        .unwrap();
    assert!(
        text.contains("dataplane_pooler_servers{state=\"listener\"} 1"),
        "{text}"
    );
    drop(listeners);
    eventually("the listener server is closed", async || {
        e.pooler.shared.notify.listeners() == 0 && e.backends(&app.role).await == 1
    })
    .await;
}

#[tokio::test]
async fn listen_and_unlisten_take_effect_at_commit_and_never_on_rollback() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let mut a = listening(&config(&e, &app)).await;
    let sender = e.connect(&app).await;
    run(&a.client, "LISTEN fence").await;

    // Inside an open transaction a LISTEN has not happened yet.
    run(&a.client, "BEGIN; LISTEN x").await;
    notify(&sender, "x", "before commit").await;
    run(&a.client, "COMMIT").await;
    notify(&sender, "x", "after commit").await;
    a.expect("x", "after commit").await;

    // Rolled back: never listened.
    run(&a.client, "BEGIN; LISTEN y; ROLLBACK").await;
    let _ = a.client.batch_execute("BEGIN; LISTEN z; SELECT 1/0").await;
    run(&a.client, "ROLLBACK").await;
    notify(&sender, "y", "rolled back").await;
    notify(&sender, "z", "failed").await;
    notify(&sender, "fence", "1").await;
    a.expect("fence", "1").await;

    // An UNLISTEN rolled back leaves the channel; one committed takes it away.
    run(&a.client, "BEGIN; UNLISTEN x; ROLLBACK").await;
    notify(&sender, "x", "still").await;
    a.expect("x", "still").await;
    run(&a.client, "BEGIN; SELECT 1").await;
    run(&a.client, "UNLISTEN x").await;
    run(&a.client, "COMMIT").await;
    notify(&sender, "x", "gone").await;
    // In autocommit too, and UNLISTEN * and DISCARD ALL take everything.
    run(&a.client, "LISTEN w; UNLISTEN w").await;
    notify(&sender, "w", "gone").await;
    notify(&sender, "fence", "2").await;
    a.expect("fence", "2").await;
    run(&a.client, "LISTEN v; UNLISTEN *").await;
    notify(&sender, "v", "gone").await;
    notify(&sender, "fence", "3").await;
    run(&a.client, "LISTEN fence").await;
    notify(&sender, "fence", "4").await;
    a.expect("fence", "4").await;
    run(&a.client, "DISCARD ALL").await;
    run(&a.client, "LISTEN fence").await;
    notify(&sender, "v", "gone").await;
    notify(&sender, "fence", "5").await;
    a.expect("fence", "5").await;
    a.nothing_yet();
}

#[tokio::test]
async fn a_busy_client_gets_its_notifications_between_transactions() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let mut a = listening(&config(&e, &app)).await;
    let sender = e.connect(&app).await;
    run(&a.client, "LISTEN jobs").await;
    run(&a.client, "BEGIN; SELECT 1").await;
    let counts = &e.pooler.shared.metrics.notifications_delivered;
    let before = counts.get();
    notify(&sender, "jobs", "while busy").await;
    eventually("the notification is in the client's inbox", async || {
        counts.get() > before
    })
    .await;
    // It waits while the transaction goes on, and comes right after it.
    assert_eq!(
        value(&a.client, "SELECT 'still inside'").await,
        "still inside"
    );
    a.nothing_yet();
    run(&a.client, "COMMIT").await;
    a.expect("jobs", "while busy").await;
}

#[tokio::test]
async fn a_clients_own_notify_reaches_it_and_pg_listening_channels_is_the_servers() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = listening(&config(&e, &app)).await;
    run(&a.client, "LISTEN mine").await;
    run(&a.client, "NOTIFY mine, 'hello me'").await;
    a.expect("mine", "hello me").await;
    // In one transaction with the LISTEN, as Postgres does.
    run(
        &a.client,
        "BEGIN; LISTEN also; NOTIFY also, 'same tx'; COMMIT",
    )
    .await;
    a.expect("also", "same tx").await;
    // Documented: the function answers for the server the statement runs on, which
    // holds no client's channels between transactions.
    assert_eq!(
        value(&a.client, "SELECT count(*) FROM pg_listening_channels()").await,
        "0"
    );
}

#[tokio::test]
async fn a_lost_listener_is_reported_and_listens_again() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = listening(&config(&e, &app)).await;
    run(&a.client, "LISTEN survives").await;
    let admin = e.fixture.admin().await;
    let listener_pid = || async {
        e.pooler
            .shared
            .servers
            .snapshot()
            .iter()
            .find(|s| s.is_listener() && *s.role == *app.role)
            .map(|s| s.remote_pid)
    };
    let pid = listener_pid().await.unwrap();
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let notice = tokio::time::timeout(PATIENCE, a.notices.recv())
        .await
        .expect("a notice")
        .unwrap();
    assert_eq!(notice.code().code(), "08006");
    assert!(
        notice.message().contains("LISTEN connection") && notice.message().contains("lost"),
        "{}",
        notice.message()
    );
    eventually("a new listener server", async || {
        listener_pid().await.is_some_and(|p| p != pid)
    })
    .await;
    // Its union is back: a notification sent now arrives. (A batch may still be on
    // its way: keep sending until one does.)
    let sender = e.connect(&app).await;
    let mut got = None;
    for i in 0..100 {
        notify(&sender, "survives", &format!("{i}")).await;
        if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(100), a.notes.recv()).await
        {
            got = Some(n);
            break;
        }
    }
    assert_eq!(
        got.expect("the listener listens again").channel(),
        "survives"
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_the_others_are_not_held_up() {
    let e = env(|c| c.max_client_notification_bytes = 64 * 1024).await;
    let app = e.app_with_pool(2).await;
    let mut reader = listening(&config(&e, &app)).await;
    run(&reader.client, "LISTEN flood").await;
    // A client that listens, then never reads again: its connection is not polled.
    // A small receive buffer (Linux would otherwise grow it to tens of megabytes).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(e.pooler.addr).await.unwrap();
    let (deaf, mut connection) = config(&e, &app)
        .connect_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = tokio::spawn(async move {
        tokio::select! {
            _ = &mut connection => {}
            _ = stopped => {}
        }
        // Kept open, never read.
        std::future::pending::<()>().await;
        drop(connection);
    });
    deaf.batch_execute("LISTEN flood").await.unwrap();
    let _ = stop.send(());
    let sender = e.connect(&app).await;
    let clients = e.pooler.shared.clients.len();
    let payload = "x".repeat(7000);
    // Far more than the socket buffers and the inbox hold.
    let n = 1500;
    for i in 0..n {
        notify(&sender, "flood", &format!("{i} {payload}")).await;
        let next = reader.next().await;
        assert!(next.payload().starts_with(&format!("{i} ")));
    }
    let overflows = &e.pooler.shared.metrics.notification_overflows;
    eventually("the deaf client is disconnected", async || {
        overflows.get() == 1 && e.pooler.shared.clients.len() == clients - 1
    })
    .await;
    driver.abort();
}

#[tokio::test]
async fn channels_per_client_and_listener_servers_are_capped() {
    let e = env(|c| {
        c.max_client_listen_channels = 2;
        c.max_listener_servers = Some(1);
    })
    .await;
    let (one, two) = (e.app_with_pool(1).await, e.app_with_pool(1).await);
    let a = e.connect(&one).await;
    run(&a, "LISTEN a; LISTEN b").await;
    let err = a.batch_execute("LISTEN c").await.unwrap_err();
    assert_eq!(sqlstate(&err), "53400");
    assert!(
        message(&err).contains("max_client_listen_channels"),
        "{}",
        message(&err)
    );
    // The first app holds the only listener server; another app's LISTEN is refused.
    let b = e.connect(&one).await;
    run(&b, "LISTEN a").await;
    let c = e.connect(&two).await;
    let err = c.batch_execute("LISTEN a").await.unwrap_err();
    assert_eq!(sqlstate(&err), "53400");
    assert!(
        message(&err).contains("max_listener_servers"),
        "{}",
        message(&err)
    );
    // Once the first app stops listening, the second may.
    drop(b);
    eventually("the first listener closes", async || {
        e.pooler.shared.notify.listeners() == 0
    })
    .await;
    let d = e.connect(&two).await;
    run(&d, "LISTEN a").await;
}

/// App B listens on app A's channel through every port and in every way a server can
/// hold a channel: multiplexed (transaction port), its own server (session port), and a
/// pinned server (a LISTEN the pooler cannot see, in a DO block). A notifies through
/// every port and straight to Postgres. B gets nothing of A's; each app's own
/// notifications reach its own listeners (so the silence is not a broken listener).
#[tokio::test]
async fn no_app_hears_another_apps_notifications_on_any_port() {
    let e = env(|c| c.session_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    // Session-mode clients and a pinned one hold servers of their own.
    let (a, b) = (e.app_with_pool(4).await, e.app_with_pool(4).await);
    let session_port = e.pooler.session_addr.unwrap().port();
    let mut b_listeners = vec![
        listening(&config(&e, &b)).await,
        listening(&e.config_on_port(&b.role, &b.password, session_port)).await,
        listening(&config(&e, &b)).await,
    ];
    run(&b_listeners[0].client, "LISTEN orders").await;
    run(&b_listeners[1].client, "LISTEN orders").await;
    run(
        &b_listeners[2].client,
        "DO $$ BEGIN EXECUTE 'LISTEN orders'; END $$",
    )
    .await;
    let role_b = e.pooler.shared.roles.get(&b.role).unwrap();
    eventually("B's DO-block listener is pinned", async || {
        role_b.pinned() == 1
    })
    .await;
    let mut a_listeners = vec![
        listening(&config(&e, &a)).await,
        listening(&e.config_on_port(&a.role, &a.password, session_port)).await,
    ];
    for l in &a_listeners {
        run(&l.client, "LISTEN orders").await;
    }
    let a_senders = [
        e.connect(&a).await,
        dataplane_tests::connect(&e.config_on_port(&a.role, &a.password, session_port))
            .await
            .unwrap(),
        // Straight to Postgres: a pid the pooler does not own, found in pg_stat_activity.
        dataplane_tests::connect(
            &e.fixture
                .cluster
                .config(&a.role, &a.password, &e.fixture.db),
        )
        .await
        .unwrap(),
    ];
    for (i, sender) in a_senders.iter().enumerate() {
        notify(sender, "orders", &format!("secret {i}")).await;
    }
    // The superuser is nobody's app either.
    notify(&e.fixture.admin().await, "orders", "admin").await;
    for l in &mut a_listeners {
        for i in 0..a_senders.len() {
            l.expect("orders", &format!("secret {i}")).await;
        }
    }
    let b_sender = e.connect(&b).await;
    notify(&b_sender, "orders", "b's own").await;
    for l in &mut b_listeners {
        l.expect("orders", "b's own").await;
    }
    // Neither B's nor the superuser's reached A: A's own fence comes next.
    notify(&a_senders[0], "orders", "fence").await;
    for l in &mut a_listeners {
        l.expect("orders", "fence").await;
    }
    assert!(
        e.pooler.shared.metrics.notifications_dropped.get() > 0,
        "the filter dropped something"
    );
}

#[tokio::test]
async fn a_client_that_always_has_its_next_request_waiting_still_gets_notifications() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let mut a = listening(&config(&e, &app)).await;
    run(&a.client, "LISTEN busy").await;
    let sender = e.connect(&app).await;
    notify(&sender, "busy", "to a busy client").await;
    // Ten requests in flight at a time, back to back: the next one is always there.
    let mut got = None;
    for _ in 0..2000 {
        let batch = (0..10).map(|_| a.client.simple_query("SELECT 1"));
        for r in futures_util::future::join_all(batch).await {
            r.unwrap();
        }
        if let Ok(n) = a.notes.try_recv() {
            got = Some(n);
            break;
        }
    }
    let n = got.expect("the notification came between its transactions");
    assert_eq!(n.payload(), "to a busy client");
}

/// A client waits for its role's listener server without holding a server of its own:
/// with a budget of one, its LISTEN's transaction server is given back, the slot moves
/// to the listener, and the LISTEN returns (holding it would wait for itself).
#[tokio::test]
async fn a_client_waits_for_its_listener_without_holding_a_server() {
    let e = env(|c| {
        c.max_server_connections = 1;
        c.min_idle_before_evict_ms = 50;
        c.query_wait_timeout_ms = 60_000;
    })
    .await;
    let app = e.app_with_pool(1).await;
    let a = e.connect(&app).await;
    run(&a, "LISTEN alone").await;
    assert_eq!(e.pooler.shared.notify.listeners(), 1);
    eventually("the only slot is the listener's", async || {
        e.backends(&app.role).await == 1
            && e.pooler
                .shared
                .pools
                .stats()
                .role(&app.role)
                .unwrap()
                .listener
                == 1
    })
    .await;
}

/// A listening client parked without a task (session/park.rs) wakes for its
/// notifications: the listener task rings the doorbell the parked client waits on.
#[tokio::test]
async fn a_parked_listening_client_wakes_for_its_notifications() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = listening(&config(&e, &app)).await;
    run(&a.client, "LISTEN parked").await;
    let sender = e.connect(&app).await;
    // The sender's login parks it at once; the listener parks after a sweep period.
    eventually("both clients are parked", async || {
        e.pooler.shared.lot.len() == 2
    })
    .await;
    notify(&sender, "parked", "wake up").await;
    a.expect("parked", "wake up").await;
    eventually("it parks again", async || e.pooler.shared.lot.len() == 2).await;
    notify(&sender, "parked", "again").await;
    a.expect("parked", "again").await;
}
