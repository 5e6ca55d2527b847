//! Start-up and shutdown: build the shared state from a [`Config`], bind the
//! listeners, spawn the background tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::sync::watch;

use tokio::net::TcpStream;

use crate::admin::{self, AdminState};
use crate::auth::cache::VerifierCache;
use crate::auth::limiter::AuthLimiter;
use crate::backend::Target;
use crate::config::{Config, ConfigError};
use crate::frontdoor::{self, Listener, SessionError};
use crate::limits::{OpenFilesError, pool_config};
use crate::metrics::Metrics;
use crate::net::park::Lot;
use crate::net::{self, Tracker, tls};
use crate::notify::Hub;
use crate::notify::senders::{PgStatActivity, Senders};
use crate::pool::Pools;
use crate::replicas::Replicas;
use crate::session;
use crate::shared::{self, CancelMap, Hooks, PassThrough, Roles, Shared};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    OpenFiles(#[from] OpenFilesError),
    #[error("creating the parking lot's epoll: {0}")]
    Park(#[source] std::io::Error),
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
}

/// A started pooler.
pub struct Running {
    pub addr: SocketAddr,
    pub session_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// Fired when the grace period is over: clients still linked are closed.
    closing: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    tasks: Tracker,
    pub shared: Arc<Shared>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Validates the configuration, binds every listener and starts serving. Reloads are
/// refused: see [`start_with`].
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with(config, Hooks::default()).await
}

/// [`start`], with what reloads need.
pub async fn start_with(config: Config, hooks: Hooks) -> Result<Running, StartError> {
    config.validate()?;
    let config = Arc::new(config);
    let client_tls = crate::reload::client_acceptor(&config)?;
    let server_tls =
        tls::client_config(config.server_tls.mode, config.server_tls.ca_file.as_deref())?;
    let target = Target {
        host: config.upstream.host.clone(),
        port: config.upstream.port,
        dbname: config.upstream.dbname.clone(),
        tls: server_tls,
        connect_timeout: config.server_connect_timeout(),
        keepalive: config.tcp_keepalive(),
    };
    let cache = VerifierCache::new(
        config.upstream.clone(),
        target.tls.clone(),
        crate::auth::cache::CacheLimits {
            ttl: config.auth_cache_ttl(),
            negative_ttl: config.auth_negative_cache_ttl(),
            max_roles: config.auth_cache_max_roles,
            max_negative: config.auth_negative_cache_max,
            queue: config.auth_lookup_queue,
            notify_queue: config.auth_notify_queue,
        },
        config.auth_pool_size,
    );
    let roles = Arc::new(Roles::default());
    let servers: Arc<crate::registry::Registry<crate::registry::ServerInfo>> = Arc::default();
    let metrics = Arc::new(Metrics::new(
        config.metrics_per_role,
        config.metrics_max_roles,
    )?);
    metrics.watch_auth(cache.counters.clone())?;
    let connector = Arc::new(PassThrough {
        roles: roles.clone(),
        target: target.clone(),
        backoff: Default::default(),
        servers: Arc::clone(&servers),
        metrics: metrics.clone(),
    });
    let pools = Pools::new(pool_config(&config), connector);
    let replicas =
        Replicas::new(config.cancel_forwards_per_address_per_minute).map_err(StartError::Random)?;
    let mock_secret: [u8; 32] = match &config.auth_mock_secret {
        Some(secret) => {
            use sha2::Digest;
            sha2::Sha256::digest(secret.expose().as_bytes()).into()
        }
        None => {
            let mut random = [0u8; 32];
            getrandom::fill(&mut random).map_err(StartError::Random)?;
            random
        }
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (closing_tx, closing_rx) = watch::channel(false);

    let main = bind(config.listen).await?;
    let session = match config.session_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let admin_listener = bind(config.admin_listen).await?;
    let addr = main.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let session_addr = session.as_ref().and_then(|l| l.local_addr().ok());
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.admin_listen,
            source,
        })?;

    let shared = Arc::new(Shared {
        config: ArcSwap::new(config.clone()),
        cache: cache.clone(),
        roles: roles.clone(),
        pools: pools.clone(),
        cancels: Arc::new(CancelMap::default()),
        replicas: replicas.clone(),
        limiter: AuthLimiter::new(crate::auth::limiter::Limits {
            per_source: config.auth_failures_per_address_per_minute,
            per_role_source: config.auth_failures_per_role_per_address_per_minute,
            max_entries: config.auth_throttle_max_entries,
        }),
        target,
        mock_secret,
        client_tls: ArcSwapOption::from_pointee(client_tls),
        clients: roles.clients.clone(),
        servers: servers.clone(),
        pause: Default::default(),
        shutdown: shutdown_rx.clone(),
        shutdown_requested: watch::Sender::new(false),
        hooks,
        reloading: Default::default(),
        closing: closing_rx,
        metrics: metrics.clone(),
        tasks: Tracker::default(),
        lot: Lot::start().map_err(StartError::Park)?,
        names: Default::default(),
        notify: Hub::new(
            pools.clone(),
            Arc::new(Senders::new(
                servers.clone(),
                Arc::new(PgStatActivity(cache.clone())),
            )),
            metrics.clone(),
        ),
    });

    // A notification naming a role with clients here matters even when its cache entry
    // was evicted; every other name is ignored without a lookup (cache/listen.rs).
    let connected = roles.clone();
    let interest: crate::auth::cache::Interest =
        Arc::new(move |name| connected.get(name).is_some());
    tokio::spawn(cache.clone().run_listener(shutdown_rx.clone(), interest));
    let settings = shared.clone();
    replicas.spawn(pools.clone(), cache.clone(), move || {
        let c = settings.config();
        replica_settings(&c)
    });
    tokio::spawn(shared::apply_changes(cache.clone(), roles, pools));
    let tasks = shared.tasks.clone();
    tokio::spawn(session::park::sweep(Arc::downgrade(&shared)));
    let on = |listener: Listener| {
        let shared = shared.clone();
        move |tcp, peer| serve_client(tcp, peer, shared.clone(), listener)
    };
    tokio::spawn(net::accept_loop(
        main,
        on(Listener::Main),
        shutdown_rx.clone(),
        tasks.clone(),
    ));
    if let Some(l) = session {
        tokio::spawn(net::accept_loop(
            l,
            on(Listener::Session),
            shutdown_rx.clone(),
            tasks.clone(),
        ));
    }
    let draining = Arc::new(AtomicBool::new(false));
    let admin_app = admin::app(AdminState {
        cache,
        draining: draining.clone(),
        shared: shared.clone(),
    });
    // Up through the drain, so /readyz can say 503 while clients finish.
    let admin_limits = admin::listener::Limits {
        max_connections: config.admin_max_connections,
        header_timeout: config.admin_header_timeout(),
    };
    tokio::spawn(admin::listener::serve(
        admin_listener,
        admin_app,
        admin_limits,
        shared.metrics.clone(),
        shared.closing.clone(),
    ));
    tracing::info!(%addr, ?session_addr, %admin_addr, "pooler serving");
    Ok(Running {
        addr,
        session_addr,
        admin_addr,
        shutdown: shutdown_tx,
        closing: closing_tx,
        draining,
        tasks,
        shared,
    })
}

/// One client connection from accept to close: through the front door, then to the
/// admin console or an app's session, whichever its startup packet asked for.
async fn serve_client(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, listener: Listener) {
    let (id, span) = frontdoor::span(peer);
    let served = async {
        let Some(arrival) = frontdoor::arrive(id, tcp, peer, &shared, listener).await? else {
            return Ok::<(), SessionError>(());
        };
        if arrival.console {
            // Boxed: an idle app client should not carry the console's state.
            Box::pin(admin::console::serve(arrival, &shared)).await
        } else {
            session::serve(arrival, &shared).await
        }
    };
    let result = tracing::Instrument::instrument(served, span.clone()).await;
    frontdoor::report(&shared, &span, result);
}

/// Raises the soft open-files limit to the hard limit (a default soft limit of 1,024
/// would refuse clients past about a thousand) and refuses a configuration whose
/// client and server limits cannot fit under it. For the binary: tests and embedders
/// keep their process's limits.
pub fn raise_open_files(config: &Config) -> Result<(), StartError> {
    Ok(crate::limits::raise_open_files(config)?)
}

/// What the heartbeat reads from the configuration in force.
fn replica_settings(c: &Config) -> crate::replicas::Settings {
    crate::replicas::Settings {
        heartbeat: c.replica_heartbeat(),
        lease: c.replica_lease(),
        budget: u32::try_from(c.max_server_connections).unwrap_or(u32::MAX),
        addr: c.advertised(),
    }
}

/// After the grace period, how long closing clients get to be told.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Running {
    /// Resolves when the admin console asked for `SHUTDOWN`; the caller then runs
    /// [`Running::shutdown`] as on SIGTERM.
    pub async fn shutdown_requested(&self) {
        let mut rx = self.shared.shutdown_requested.subscribe();
        // The sender lives as long as `self`, so this only returns on a request.
        let _ = rx.wait_for(|requested| *requested).await;
    }

    /// Stops accepting, tells idle clients to leave (57P01) as they finish their
    /// transactions, and waits up to `grace` for them.
    pub async fn shutdown(self, grace: Duration) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        self.shared.clients.wake_all();
        let live = self.tasks.live();
        if live > 0 {
            tracing::info!(
                clients = live,
                grace_ms = grace.as_millis() as u64,
                "draining clients"
            );
        }
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                clients = self.tasks.live(),
                "grace period over; closing the remaining clients"
            );
            // Each is told why (57P01) and its open transaction rolled back.
            let _ = self.closing.send(true);
            self.shared.clients.wake_all();
            let _ = tokio::time::timeout(CLOSE_WAIT, self.tasks.wait()).await;
        }
        // Last: the servers close and the row goes, so the other replicas may grow
        // into this one's share at once.
        let shared = &self.shared;
        shared.replicas.leave(&shared.pools, &shared.cache).await;
    }
}
