//! One replica: starts every plane in order and stops them in the reverse order.
//!
//! Start: state store -> Raft (replays the log into the store) -> admin API -> cluster
//! bootstrap -> agreement on the control key -> DERP/STUN -> control listener -> cluster
//! tasks. Stop: listeners and tasks first (no new work), then Raft, so every acknowledged
//! write is already in RocksDB when the process exits.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::control::{self, ControlState};
use crate::noise::{ControlKey, NoiseError};
use crate::state::{Db, StateStore};

mod tasks;

use tasks::{return_freed_memory, revoke_derp_sessions};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {what} address {addr}: {source} (is another server running? change it in the config)")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create the admin socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    #[error("data directory {path} can be read by other users (mode {mode:o}): it holds the tailnet's keys. Run `chmod 700 {path}` and start again")]
    DataDirOpen { path: String, mode: u32 },
    #[error("{setting}: {message}")]
    RaftIdentity { setting: String, message: String },
    #[error(transparent)]
    Key(#[from] NoiseError),
    #[error("raft: {0}")]
    Raft(#[from] hydrascale_raft::RaftError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("Raft TLS: {0}")]
    Tls(#[from] hydrascale_raft::tls::TlsError),
    #[error("derp.extra_regions_file {path}: {message}")]
    ExtraRegions { path: String, message: String },
    #[error("OIDC login: {0}")]
    Oidc(String),
    #[error("cannot start Raft's own threads: {0}")]
    RaftThreads(String),
    #[error("Raft stopped on this replica ({0}); it cannot take part in the cluster until it is restarted, and the other replicas go on without it. Remove the cause first: a full disk (free space), or a newer version's command (upgrade this replica)")]
    RaftStopped(String),
    #[error("[tls]: {0}")]
    ControlTls(#[from] crate::tls::TlsError),
    #[error("[tls] ACME: {0}")]
    Acme(String),
}

/// Raft runs on a runtime and OS threads of its own. Thousands of map streams keep the
/// main runtime's queue long while a tailnet churns; heartbeats and appends waiting in
/// that queue would time out, and replicas would start elections they do not need. On
/// their own threads they get the CPU the kernel shares fairly, however busy the rest is.
struct RaftThreads {
    handle: tokio::runtime::Handle,
    /// Ends the threads (after Raft has shut down). Dropped without a send, they live on:
    /// dropping a [`ServerHandle`] does not stop the replica.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RaftThreads {
    fn start() -> Result<Self, ServerError> {
        let err = |e: std::io::Error| ServerError::RaftThreads(e.to_string());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("raft")
            .enable_all()
            .build()
            .map_err(err)?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("raft-runtime".into())
            .spawn(move || {
                rt.block_on(async {
                    if stopped.await.is_err() {
                        std::future::pending::<()>().await;
                    }
                });
            })
            .map_err(err)?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }
}

/// A running replica. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    /// The URL clients pass to `--login-server`.
    pub server_url: String,
    pub control_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The admin API without API keys, for the server's own user (`data_dir/admin.sock`).
    pub admin_socket: std::path::PathBuf,
    pub stun_addr: Option<SocketAddr>,
    pub db: Db,
    pub control_key: ControlKey,
    /// The control listener's certificate while `[tls]` is on.
    pub tls: Option<Arc<crate::tls::CertStore>>,
    /// `tls.http_listen_addr` as bound.
    pub http_addr: Option<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    tasks: JoinSet<()>,
    raft_threads: RaftThreads,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn shutdown_signal(
    rx: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Makes the data directory, owner-only, or checks that an existing one is: it holds the
/// control key, the Raft CA's key and every node's state.
fn private_data_dir(dir: &std::path::Path) -> Result<(), ServerError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = dir.display().to_string();
    match std::fs::metadata(dir) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ServerError::DataDirOpen { path, mode });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| ServerError::DataDir { path, source }),
        Err(source) => Err(ServerError::DataDir { path, source }),
    }
}

/// How this replica's Raft traffic is protected: the certificates it was given; none, if
/// told so (logged loudly); or, for a replica alone (the config refuses a cluster without
/// TLS), a CA and certificate it makes itself in its data directory.
fn raft_tls(config: &Config) -> Result<Option<hydrascale_raft::RaftTls>, ServerError> {
    let c = &config.cluster;
    let (tls, setting) = if let Some(dir) = &c.tls_dir {
        (hydrascale_raft::RaftTls::load_dir(dir)?, "cluster.tls_dir")
    } else if let Some((ca, cert, key)) = c.tls_files() {
        (
            hydrascale_raft::RaftTls::load(ca, cert, key)?,
            "cluster.tls_cert_file",
        )
    } else if c.insecure_plaintext {
        tracing::error!(
            raft = %config.raft_listen_addr,
            "cluster.insecure_plaintext = true: Raft traffic between replicas is neither encrypted nor authenticated, and anyone who reaches raft_listen_addr can rewrite the tailnet (create API keys, read the control key). Set cluster.tls_dir instead (`hydrascale cluster certs`)"
        );
        return Ok(None);
    } else {
        let local = hydrascale_raft::tls::LocalTls::under(&config.data_dir);
        let tls = local.ensure(config.node_id)?;
        tracing::debug!(ca = %local.ca_dir.display(), "Raft speaks mutual TLS with this replica's own cluster CA");
        return Ok(Some(tls));
    };
    match tls.replica_id() {
        Ok(id) if id == config.node_id => Ok(Some(tls)),
        Ok(id) => Err(ServerError::RaftIdentity {
            setting: setting.into(),
            message: format!(
                "the certificate is replica {id}'s, but this is replica {} (node_id); give it its own (`hydrascale cluster certs --ids {}`)",
                config.node_id, config.node_id
            ),
        }),
        Err(message) => Err(ServerError::RaftIdentity {
            setting: setting.into(),
            message,
        }),
    }
}

/// Starts a replica from `config` and returns once every listener is bound.
pub async fn run_server(config: Config) -> Result<ServerHandle, ServerError> {
    private_data_dir(&config.data_dir)?;
    let local_key = ControlKey::load_or_create(&config.data_dir.join("control.key"))?;
    let derp_key = ControlKey::load_or_create(&config.data_dir.join("derp.key"))?;
    let extra_regions = extra_regions(&config)?;
    let metrics = crate::metrics::Metrics::new();
    let (raft_threads, db) = start_raft(&config, &metrics).await?;
    let raft_addr = db.raft.listen_addr();

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut up = Startup {
        db,
        metrics,
        stop: shutdown_rx,
        tasks: JoinSet::new(),
    };
    let admin_addr = up.start_admin_listener(&config).await?;
    let admin_socket = up.start_admin_socket(&config)?;
    let control_key = up.agree_on_control_key(&config, &local_key).await?;

    // With [tls] on: what the control listener serves, from files or (ACME) from the
    // replicated state, before the listener opens so no handshake finds nothing.
    let tls_store = control_cert_store(&config)?;
    let acme = crate::tls::acme::Acme::new(&config, up.db.clone(), up.metrics.clone())
        .map_err(ServerError::Acme)?;

    let control_listener = bind("control", config.listen_addr).await?;
    let control_addr = local_addr(&control_listener, "control", config.listen_addr)?;
    let mut config = config;
    // Port 0 in the config means "pick one"; the DERP map must then show the real port.
    if config.listen_addr.port() == 0 {
        let scheme = if tls_store.is_some() { "https" } else { "http" };
        config.server_url = format!("{scheme}://{control_addr}");
    }
    let (stun_addr, derp_server) = if config.derp.enabled {
        let (stun_addr, derp) = up.start_derp(&mut config, &derp_key, &control_key).await?;
        (Some(stun_addr), Some(derp))
    } else {
        (None, None)
    };
    let config = Arc::new(config);
    let (me, serving_rx) =
        up.start_cluster_tasks(&config, admin_addr, control_addr, derp_server.as_ref());
    let metrics_addr = up
        .start_metrics_listener(&config, &derp_server, &serving_rx, &tls_store)
        .await?;
    let oidc = control::oidc::Oidc::new(&config).map_err(ServerError::Oidc)?;
    let state = ControlState::new(
        config.clone(),
        control_key.clone(),
        up.db.clone(),
        me,
        serving_rx,
        extra_regions,
        oidc,
        up.metrics.clone(),
    );
    let http_addr = up
        .start_control_listeners(
            &config,
            control_listener,
            state,
            ControlExtras {
                tls_store: tls_store.clone(),
                acme,
                derp: derp_server,
            },
        )
        .await?;
    tracing::info!(
        login_server = %config.server_url(),
        control = %control_addr,
        admin = %admin_addr,
        raft = %raft_addr,
        metrics = %metrics_addr,
        "hydrascale replica {} is up",
        config.node_id
    );
    Ok(ServerHandle {
        server_url: config.server_url().to_string(),
        control_addr,
        admin_addr,
        raft_addr,
        metrics_addr,
        admin_socket,
        stun_addr,
        db: up.db,
        control_key,
        tls: tls_store,
        http_addr,
        shutdown_tx,
        tasks: up.tasks,
        raft_threads,
    })
}

/// The address `listener` was bound to (the port the system picked for port 0).
fn local_addr(
    listener: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, ServerError> {
    listener
        .local_addr()
        .map_err(|source| ServerError::Bind { what, addr, source })
}

/// `derp.extra_regions_file`'s regions, read once at start.
fn extra_regions(
    config: &Config,
) -> Result<std::collections::BTreeMap<String, serde_json::Value>, ServerError> {
    match &config.derp.extra_regions_file {
        Some(path) => crate::mapper::load_extra_regions(
            path,
            config.derp.enabled.then_some(config.derp.region_id),
        )
        .map_err(|message| ServerError::ExtraRegions {
            path: path.display().to_string(),
            message,
        }),
        None => Ok(Default::default()),
    }
}

/// Opens the state store and starts Raft on its own threads; Raft replays its log into
/// the store before this returns.
async fn start_raft(
    config: &Config,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<(RaftThreads, Db), ServerError> {
    let store = StateStore::with_meters(metrics.clone());
    let tls = raft_tls(config)?;
    let raft_config = hydrascale_raft::RaftConfig {
        node_id: config.node_id,
        data_dir: config.data_dir.join("raft"),
        listen_addr: config.raft_listen_addr,
        advertise_addr: config.cluster.advertise_raft_addr.clone(),
        election_timeout_ms: config.cluster.election_timeout_ms(),
        heartbeat_ms: config.cluster.heartbeat_ms(),
        tls,
        ..Default::default()
    };
    let raft_threads = RaftThreads::start()?;
    let raft = raft_threads
        .handle
        .spawn(hydrascale_raft::RaftNode::start(
            raft_config,
            Arc::new(store.clone()),
        ))
        .await
        .map_err(|e| ServerError::RaftThreads(e.to_string()))??;
    Ok((raft_threads, Db { raft, store }))
}

/// The control listener's certificate store while `[tls]` is on: from files, or a
/// placeholder that ACME (through the replicated state) replaces.
fn control_cert_store(config: &Config) -> Result<Option<Arc<crate::tls::CertStore>>, ServerError> {
    Ok(match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(crate::tls::CertStore::new(
            Some(crate::tls::load_files(cert, key)?),
            None,
        )?)),
        _ if config.tls.acme() => Some(Arc::new(crate::tls::CertStore::new(
            None,
            Some(config.tls.acme_hostname.trim()),
        )?)),
        _ => None,
    })
}

/// What the control listener serves beside the control plane.
struct ControlExtras {
    tls_store: Option<Arc<crate::tls::CertStore>>,
    acme: Option<crate::tls::acme::Acme>,
    derp: Option<crate::derp::DerpServer>,
}

/// What the start-up steps share once Raft runs: the replicated state, the counters, the
/// stop signal every supervised task watches, and the tasks themselves (stopped by
/// [`ServerHandle::shutdown`] before Raft).
struct Startup {
    db: Db,
    metrics: Arc<crate::metrics::Metrics>,
    stop: watch::Receiver<bool>,
    tasks: JoinSet<()>,
}

impl Startup {
    /// The admin API's TCP listener (API keys required); its bound address.
    async fn start_admin_listener(&mut self, config: &Config) -> Result<SocketAddr, ServerError> {
        let admin_listener = bind("admin", config.admin_listen_addr).await?;
        let admin_addr = local_addr(&admin_listener, "admin", config.admin_listen_addr)?;
        let db = self.db.clone();
        let join = config.cluster.join;
        let stop = shutdown_signal(&self.stop);
        let incoming = crate::listener::incoming(
            admin_listener,
            crate::listener::Limits {
                listener: crate::metrics::Listener::Admin,
                per_address: crate::listener::SMALL_LISTENER_PER_ADDRESS,
                trusted_proxies: Vec::new(),
            },
            self.metrics.clone(),
            self.stop.clone(),
        );
        self.tasks.spawn(async move {
            if let Err(e) = crate::admin::serve_admin(incoming, db, join, stop).await {
                tracing::error!(error = %e, "admin API stopped");
            }
        });
        Ok(admin_addr)
    }

    /// The admin socket (`data_dir/admin.sock`, owner-only, no API keys); its path.
    fn start_admin_socket(&mut self, config: &Config) -> Result<std::path::PathBuf, ServerError> {
        let admin_socket = config.data_dir.join("admin.sock");
        let socket_err = |source| ServerError::Socket {
            path: admin_socket.display().to_string(),
            source,
        };
        // A socket file left by a previous run: the Raft store's lock, taken above, already
        // proved no other server uses this data directory.
        match std::fs::remove_file(&admin_socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(socket_err(e)),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&admin_socket).map_err(socket_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&admin_socket, std::fs::Permissions::from_mode(0o600))
                .map_err(socket_err)?;
        }
        let db = self.db.clone();
        let join = config.cluster.join;
        let stop = shutdown_signal(&self.stop);
        self.tasks.spawn(async move {
            if let Err(e) = crate::admin::serve_admin_socket(listener, db, join, stop).await {
                tracing::error!(error = %e, "admin socket stopped");
            }
        });
        Ok(admin_socket)
    }

    /// Bootstraps or joins the cluster, then agrees with it on the control key (the
    /// founder seeds it from its own key or from a backup).
    async fn agree_on_control_key(
        &self,
        config: &Config,
        local_key: &ControlKey,
    ) -> Result<ControlKey, ServerError> {
        let founder = crate::cluster::bootstrap(config, &self.db).await?;
        let seed = match (&config.cluster.restore_from, founder) {
            (Some(path), true) => Some(crate::cluster::Seed::Backup(path.as_ref())),
            (None, true) => Some(crate::cluster::Seed::Key(local_key)),
            (Some(_), false) => {
                tracing::warn!("cluster.restore_from is only read by the replica that starts a new cluster (no cluster.peers, or the lowest id in it); ignoring it here");
                None
            }
            (None, false) => None,
        };
        Ok(crate::cluster::control_key(&self.db, local_key, seed, self.stop.clone()).await?)
    }

    /// STUN and the embedded DERP relay (with `derp.enabled`): the bound STUN address
    /// (written back into `config` for the DERP map) and the relay.
    async fn start_derp(
        &mut self,
        config: &mut Config,
        derp_key: &ControlKey,
        control_key: &ControlKey,
    ) -> Result<(SocketAddr, crate::derp::DerpServer), ServerError> {
        let stun = UdpSocket::bind(config.derp.stun_listen_addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "STUN",
                addr: config.derp.stun_listen_addr,
                source,
            })?;
        let bound = stun.local_addr().map_err(|source| ServerError::Bind {
            what: "STUN",
            addr: config.derp.stun_listen_addr,
            source,
        })?;
        config.derp.stun_listen_addr = bound;
        let rx = self.stop.clone();
        self.tasks.spawn(async move {
            crate::derp::run_stun(stun, rx).await;
        });
        let verifier: Option<crate::derp::ClientVerifier> = if config.derp.verify_clients {
            let db = self.db.clone();
            Some(std::sync::Arc::new(move |key: &[u8; 32]| {
                let text = format!("nodekey:{}", hex::encode(key));
                let now = crate::state::now_ms();
                db.store
                    .read()
                    .node_by_node_key(&text)
                    .is_some_and(|n| n.expiry.is_none_or(|e| e > now))
            }))
        } else {
            None
        };
        let revocations = verifier.clone();
        let derp = crate::derp::DerpServer::with_verifiers(
            *derp_key.secret(),
            Some(crate::cluster::mesh_key(control_key)),
            verifier,
            Some(crate::cluster::mesh_peer_verifier(self.db.clone())),
        );
        if let Some(current) = revocations {
            self.tasks.spawn(revoke_derp_sessions(
                derp.clone(),
                self.db.clone(),
                current,
                self.stop.clone(),
            ));
        }
        Ok((bound, derp))
    }

    /// This replica as the cluster sees it, and the cluster's background tasks (quorum
    /// watcher, ephemeral node removal, replica registration); the "serving" signal.
    fn start_cluster_tasks(
        &mut self,
        config: &Config,
        admin_addr: SocketAddr,
        control_addr: SocketAddr,
        derp: Option<&crate::derp::DerpServer>,
    ) -> (crate::state::Replica, watch::Receiver<bool>) {
        let advertised_admin = config
            .cluster
            .advertise_admin_addr
            .clone()
            .unwrap_or_else(|| admin_addr.to_string());
        let mut me = crate::mapper::local_replica(config, &advertised_admin, control_addr);
        me.derp_key = derp
            .map(|d| hex::encode(d.public_key()))
            .unwrap_or_default();
        me.command_level = crate::state::COMMAND_LEVEL;
        // The first answer must not wait for the quorum watcher's first tick.
        let serving = self
            .db
            .raft
            .quorum_contact_age()
            .is_some_and(|age| age < config.cluster.isolation_timeout());
        let (serving_tx, serving_rx) = watch::channel(serving);
        crate::cluster::spawn_tasks(
            &mut self.tasks,
            self.db.clone(),
            me.clone(),
            derp.cloned(),
            config.cluster.isolation_timeout(),
            config.ephemeral_inactivity_timeout(),
            serving_tx,
            self.stop.clone(),
        );
        (me, serving_rx)
    }

    /// Prometheus metrics and the probes; the bound address.
    async fn start_metrics_listener(
        &mut self,
        config: &Config,
        derp: &Option<crate::derp::DerpServer>,
        serving: &watch::Receiver<bool>,
        tls: &Option<Arc<crate::tls::CertStore>>,
    ) -> Result<SocketAddr, ServerError> {
        let metrics_listener = bind("metrics", config.metrics_listen_addr).await?;
        let metrics_addr = local_addr(&metrics_listener, "metrics", config.metrics_listen_addr)?;
        let sources = crate::metrics::Sources {
            metrics: self.metrics.clone(),
            db: self.db.clone(),
            derp: derp.clone(),
            serving: serving.clone(),
            tls: tls
                .clone()
                .map(|t| t as Arc<dyn crate::metrics::ServedCert>),
        };
        let limits = crate::listener::Limits {
            listener: crate::metrics::Listener::Metrics,
            per_address: crate::listener::SMALL_LISTENER_PER_ADDRESS,
            trusted_proxies: Vec::new(),
        };
        self.tasks.spawn(crate::listener::serve_http(
            metrics_listener,
            crate::metrics::router(sources),
            limits,
            self.metrics.clone(),
            self.stop.clone(),
        ));
        Ok(metrics_addr)
    }

    /// The control plane's tasks and listeners: the control listener (TS2021, DERP, REST
    /// API; TLS with `[tls]`), and with `[tls]` the certificate's upkeep and the plain
    /// HTTP listener (`tls.http_listen_addr`); that listener's bound address.
    async fn start_control_listeners(
        &mut self,
        config: &Arc<Config>,
        control_listener: TcpListener,
        state: Arc<ControlState>,
        extras: ControlExtras,
    ) -> Result<Option<SocketAddr>, ServerError> {
        let ControlExtras {
            tls_store,
            acme,
            derp,
        } = extras;
        let (db, metrics) = (self.db.clone(), self.metrics.clone());
        {
            let (state, stop) = (state.clone(), self.stop.clone());
            self.tasks.spawn(control::reconcile_online(state, stop));
        }
        self.tasks.spawn(return_freed_memory(self.stop.clone()));
        self.tasks.spawn(crate::dns::seed(
            db.clone(),
            config.dns.settings(),
            self.stop.clone(),
        ));
        if let Some(path) = &config.policy_path {
            self.tasks.spawn(crate::watched::follow(
                db.clone(),
                crate::watched::Source::Policy,
                path.clone(),
                self.stop.clone(),
            ));
        }
        if let Some(path) = &config.dns.extra_records_path {
            self.tasks.spawn(crate::watched::follow(
                db.clone(),
                crate::watched::Source::ExtraRecords,
                path.clone(),
                self.stop.clone(),
            ));
        }
        let plain_app = tls_store.as_ref().map(|_| {
            let mut plain = control::plain_router(state.clone())
                .merge(crate::tls::challenge_routes(db.clone()))
                .merge(crate::tls::redirect_to(config.server_url().to_string()));
            if let Some(derp) = &derp {
                plain = plain.merge(crate::derp::router(derp.clone()));
            }
            plain
        });
        let mut app = axum::Router::new();
        if let Some(derp) = &derp {
            app = app.merge(crate::derp::router(derp.clone()));
        }
        let api = crate::api::ApiContext {
            serving: state.serving.clone(),
            prefixes: config.prefixes,
            key_lifetime: config.node_expiry_ms(),
        };
        app = app.merge(control::router(state));
        app = app.merge(crate::api::router(db.clone(), api));
        let control_limits = crate::listener::Limits {
            listener: crate::metrics::Listener::Control,
            per_address: config.limits.max_connections_per_address,
            trusted_proxies: config.trusted_proxies.clone(),
        };
        let mut http_addr = None;
        let mut tls_side = None;
        if let (Some(store), Some(plain_app)) = (&tls_store, plain_app) {
            app = app.merge(crate::tls::challenge_routes(db.clone()));
            let alpn_challenge = config.tls.acme() && !config.tls.http01();
            let server_config = Arc::new(store.server_config(alpn_challenge)?);
            tls_side = Some(Arc::new(crate::listener::TlsSide {
                acceptor: tokio_rustls::TlsAcceptor::from(server_config),
                plain_app,
            }));
            match (&config.tls.cert_file, &config.tls.key_file) {
                (Some(cert), Some(key)) => {
                    self.tasks.spawn(crate::tls::watch_files(
                        store.clone(),
                        cert.clone(),
                        key.clone(),
                        metrics.clone(),
                        self.stop.clone(),
                    ));
                }
                _ => {
                    self.tasks.spawn(crate::tls::follow_state(
                        store.clone(),
                        db.clone(),
                        self.stop.clone(),
                    ));
                }
            }
            if let Some(acme) = acme {
                self.tasks
                    .spawn(crate::tls::acme::run(acme, self.stop.clone()));
            }
            if let Some(addr) = config.tls.http_listen_addr {
                let listener = bind("HTTP (tls.http_listen_addr)", addr).await?;
                http_addr = listener.local_addr().ok();
                let router = crate::tls::http_listener_router(db.clone(), config);
                self.tasks.spawn(crate::listener::serve_http(
                    listener,
                    router,
                    control_limits.clone(),
                    metrics.clone(),
                    self.stop.clone(),
                ));
            }
        }
        self.tasks.spawn(crate::listener::serve_http_tls(
            control_listener,
            app,
            tls_side,
            control_limits,
            metrics,
            self.stop.clone(),
        ));
        Ok(http_addr)
    }
}

impl ServerHandle {
    /// Stops listeners, then Raft; returns when RocksDB is closed.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        // Long-poll map streams do not end on their own; give listeners a moment, then abort.
        let deadline = tokio::time::sleep(std::time::Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => { self.tasks.abort_all(); break; }
            }
        }
        if let Err(e) = self.db.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Some(stop) = self.raft_threads.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Runs until SIGINT or SIGTERM, then shuts down in order. Returns an error if Raft
    /// stopped by itself first (a storage error such as a full disk): a replica whose
    /// Raft is gone only refuses clients, so it exits, and its supervisor (systemd's
    /// `Restart=on-failure`, Kubernetes) starts it again once it can.
    pub async fn wait_for_shutdown_signal(self) -> Result<(), ServerError> {
        let signal = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = ctrl_c.await;
                }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
        };
        let raft = self.db.raft.clone();
        tokio::select! {
            _ = signal => {
                tracing::info!("shutting down");
                self.shutdown().await;
                Ok(())
            }
            why = raft.stopped() => {
                let e = ServerError::RaftStopped(why);
                tracing::error!("{e}");
                self.shutdown().await;
                Err(e)
            }
        }
    }
}
