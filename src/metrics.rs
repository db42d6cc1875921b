//! Prometheus metrics of one replica, served on their own listener
//! (`metrics_listen_addr`, `/metrics`, plus `/health` and `/ready` for probes).
//!
//! The planes bump counters and histograms in [`Metrics`] as things happen; everything
//! that is a state (Raft's view, the tailnet's size, DERP's current clients, the process)
//! is read at scrape time instead, so it can never drift from the truth. The text format
//! is written here directly: a handful of families does not warrant a client library.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::derp::DerpServer;
use crate::state::{Db, Meters};

/// Upper bounds (seconds) shared by every latency histogram: 100 µs to 10 s.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// A latency histogram with fixed buckets, lock-free to observe.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in nanoseconds, so it can be an integer atomic.
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// What the planes count as it happens. One per replica (tests run several in one
/// process), shared by `Arc`.
#[derive(Default)]
pub struct Metrics {
    pub noise_handshakes: AtomicU64,
    pub noise_handshake_failures: AtomicU64,
    /// Noise sessions that ended, by why: the peer closed it, it failed (an HTTP/2 or I/O
    /// error), or the peer fell silent and the replica closed it (`control::ts2021`).
    pub noise_sessions_closed: AtomicU64,
    pub noise_sessions_failed: AtomicU64,
    pub noise_sessions_silent: AtomicU64,
    /// Closed because they did not identify themselves in time (`control::limits`).
    pub noise_sessions_unidentified: AtomicU64,
    /// Connections refused or closed by the listeners' limits, by listener and reason
    /// (`listener`): indexed by [`Listener`] and [`ConnRefusal`].
    pub connections_refused: [[AtomicU64; ConnRefusal::ALL.len()]; Listener::ALL.len()],
    /// Requests refused by a bound on what clients control, by [`Limit`].
    pub limit_refusals: [AtomicU64; Limit::ALL.len()],
    pub registrations: AtomicU64,
    pub registrations_refused: AtomicU64,
    /// Open streaming map long-polls on this replica.
    pub map_streams: AtomicI64,
    pub map_responses_full: AtomicU64,
    pub map_responses_delta: AtomicU64,
    pub map_keepalives: AtomicU64,
    /// Compressed bytes of map responses handed to clients' connections.
    pub map_bytes: AtomicU64,
    /// Runs of peers in map messages whose compressed frame was reused from another
    /// stream's message, and those compressed anew (`mapper::shared_frames`).
    pub map_runs_shared: AtomicU64,
    pub map_runs_compressed: AtomicU64,
    /// Delta responses this replica sent as another stream had made them
    /// (`mapper::shared_frames::SharedDeltas`).
    pub map_deltas_shared: AtomicU64,
    /// From a change being applied here to the update that carries it being queued on a
    /// client's stream.
    pub update_fanout: Histogram,
    /// Time the state machine spends applying one committed entry.
    pub apply: Histogram,
    pub applied_entries: AtomicU64,
    /// ACME orders this replica placed (`tls::acme`), and certificate file pairs that
    /// changed but did not load (`tls::watch_files`).
    pub acme_orders: AtomicU64,
    pub tls_reload_failures: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl Meters for Metrics {
    fn applied(&self, took: Duration) {
        self.apply.observe(took);
        self.applied_entries.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a Noise session ended (see [`Metrics::session_ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The peer closed it.
    Closed,
    /// An HTTP/2 or I/O error ended it.
    Failed,
    /// The peer sent nothing for the silence limit, so the replica closed it.
    Silent,
    /// The peer did not identify itself (a registration, a map request of its node)
    /// within the deadline, so the replica closed it.
    Unidentified,
}

/// A listener whose connections are admitted under limits (`listener`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Control,
    Admin,
    Metrics,
}

impl Listener {
    pub const ALL: [Listener; 3] = [Listener::Control, Listener::Admin, Listener::Metrics];

    fn label(self) -> &'static str {
        match self {
            Listener::Control => "control",
            Listener::Admin => "admin",
            Listener::Metrics => "metrics",
        }
    }
}

/// Why a listener refused or closed a connection before serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    /// Its client address already had the most connections allowed.
    PerAddress,
    /// It sent no (complete) request head within the header timeout.
    HeaderTimeout,
    /// A trusted proxy sent a PROXY protocol header that does not parse.
    ProxyHeader,
}

impl ConnRefusal {
    pub const ALL: [ConnRefusal; 3] = [
        ConnRefusal::PerAddress,
        ConnRefusal::HeaderTimeout,
        ConnRefusal::ProxyHeader,
    ];

    fn label(self) -> &'static str {
        match self {
            ConnRefusal::PerAddress => "per_address",
            ConnRefusal::HeaderTimeout => "header_timeout",
            ConnRefusal::ProxyHeader => "proxy_header",
        }
    }
}

/// A bound on what a client controls in its requests (`control::limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A `/machine/register` or `/machine/map` body over its size cap.
    Body,
    /// A Hostinfo over its size cap.
    Hostinfo,
    /// Too many Endpoints, or one too long.
    Endpoints,
    /// Interactive logins from one client address (waiting at once, or started lately).
    LoginsPerAddress,
    /// Interactive logins on the whole server (waiting at once, or started lately).
    LoginsTotal,
    /// Map streams of one node open at once on this replica.
    MapStreamsPerNode,
    /// Noise sessions not yet identified on this replica.
    UnidentifiedSessions,
}

impl Limit {
    pub const ALL: [Limit; 7] = [
        Limit::Body,
        Limit::Hostinfo,
        Limit::Endpoints,
        Limit::LoginsPerAddress,
        Limit::LoginsTotal,
        Limit::MapStreamsPerNode,
        Limit::UnidentifiedSessions,
    ];

    fn label(self) -> &'static str {
        match self {
            Limit::Body => "body_size",
            Limit::Hostinfo => "hostinfo_size",
            Limit::Endpoints => "endpoints",
            Limit::LoginsPerAddress => "logins_per_address",
            Limit::LoginsTotal => "logins_total",
            Limit::MapStreamsPerNode => "map_streams_per_node",
            Limit::UnidentifiedSessions => "unidentified_sessions",
        }
    }
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn handshake(&self, ok: bool) {
        add(if ok {
            &self.noise_handshakes
        } else {
            &self.noise_handshake_failures
        });
    }

    pub fn session_ended(&self, why: SessionEnd) {
        add(match why {
            SessionEnd::Closed => &self.noise_sessions_closed,
            SessionEnd::Failed => &self.noise_sessions_failed,
            SessionEnd::Silent => &self.noise_sessions_silent,
            SessionEnd::Unidentified => &self.noise_sessions_unidentified,
        });
    }

    pub fn connection_refused(&self, listener: Listener, why: ConnRefusal) {
        let l = Listener::ALL
            .iter()
            .position(|x| *x == listener)
            .unwrap_or(0);
        let r = ConnRefusal::ALL.iter().position(|x| *x == why).unwrap_or(0);
        add(&self.connections_refused[l][r]);
    }

    pub fn refused(&self, limit: Limit) {
        let i = Limit::ALL.iter().position(|x| *x == limit).unwrap_or(0);
        add(&self.limit_refusals[i]);
    }

    pub fn registration(&self, ok: bool) {
        add(if ok {
            &self.registrations
        } else {
            &self.registrations_refused
        });
    }
}

/// What a scrape reads besides the counters.
#[derive(Clone)]
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub db: Db,
    pub derp: Option<DerpServer>,
    /// Whether this replica serves clients (in contact with a quorum).
    pub serving: watch::Receiver<bool>,
    /// The control listener's certificate, when `[tls]` is on.
    pub tls: Option<Arc<dyn ServedCert>>,
}

/// The control listener's certificate as a scrape sees it. `tls::CertStore` implements
/// it; a trait so that this module needs nothing from `tls`, which counts into
/// [`Metrics`] (no import circle between the two).
pub trait ServedCert: Send + Sync {
    /// Unix milliseconds the served certificate is valid from and until; `None` before
    /// the first certificate.
    fn validity_ms(&self) -> Option<(i64, i64)>;
    /// Certificates swapped in since start.
    fn swaps(&self) -> u64;
    /// Whether the certificate comes from ACME rather than files.
    fn acme(&self) -> bool;
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }

    fn labelled<V: std::fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        rows: impl IntoIterator<Item = (String, V)>,
    ) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(self.out, "{name}{{{labels}}} {v}");
        }
    }
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The whole exposition, in Prometheus text format 0.0.4.
pub fn render(src: &Sources) -> String {
    let mut out = String::with_capacity(8192);
    let m = &src.metrics;
    raft_metrics(&mut out, src);
    {
        let mut f = Family { out: &mut out };
        tailnet_metrics(&mut f, src);
        map_metrics(&mut f, m);
        session_metrics(&mut f, m);
        refusal_metrics(&mut f, m);
    }
    m.update_fanout.render(
        &mut out,
        "hydrascale_update_fanout_seconds",
        "From a change applied on this replica to the update carrying it queued on a client's stream.",
    );

    if let Some(derp) = &src.derp {
        derp_metrics(&mut Family { out: &mut out }, derp);
    }
    if let Some(store) = &src.tls {
        tls_metrics(&mut Family { out: &mut out }, store.as_ref(), src);
    }
    process_metrics(&mut out);
    out
}

/// Raft: term, leadership, log positions, membership, quorum contact, readiness, and
/// how long applying an entry takes.
fn raft_metrics(out: &mut String, src: &Sources) {
    let m = &src.metrics;
    let raft = &src.db.raft;
    let st = raft.status();
    let id = raft.node_id();
    {
        let mut f = Family { out: &mut *out };
        f.one(
            "hydrascale_raft_term",
            "gauge",
            "Current Raft term.",
            st.term,
        );
        f.one(
            "hydrascale_raft_is_leader",
            "gauge",
            "1 if this replica is the Raft leader.",
            u8::from(st.current_leader == Some(id)),
        );
        f.one(
            "hydrascale_raft_has_leader",
            "gauge",
            "1 if this replica knows a leader.",
            u8::from(st.current_leader.is_some()),
        );
        f.one(
            "hydrascale_raft_leader_id",
            "gauge",
            "node_id of the leader this replica knows (0: none).",
            st.current_leader.unwrap_or(0),
        );
        f.one(
            "hydrascale_raft_last_log_index",
            "gauge",
            "Index of the last entry in this replica's log.",
            st.last_log_index.unwrap_or(0),
        );
        f.one(
            "hydrascale_raft_applied_index",
            "gauge",
            "Index of the last entry applied to this replica's state.",
            st.last_applied.unwrap_or(0),
        );
        f.one(
            "hydrascale_raft_snapshot_index",
            "gauge",
            "Index the latest snapshot covers.",
            st.snapshot_index.unwrap_or(0),
        );
        f.one(
            "hydrascale_raft_log_entries",
            "gauge",
            "Entries in the log since the latest snapshot (what a restart replays).",
            st.last_log_index
                .unwrap_or(0)
                .saturating_sub(st.snapshot_index.unwrap_or(0)),
        );
        f.one(
            "hydrascale_raft_voters",
            "gauge",
            "Voting members of the cluster.",
            st.membership.iter().filter(|m| m.2).count(),
        );
        f.one(
            "hydrascale_raft_members",
            "gauge",
            "Members of the cluster, voters and learners.",
            st.membership.len(),
        );
        f.one(
            "hydrascale_raft_quorum_contact_age_seconds",
            "gauge",
            "Seconds since this replica last had evidence of a working quorum (-1: never).",
            raft.quorum_contact_age().map_or(-1.0, |a| a.as_secs_f64()),
        );
        if let Some(matched) = raft.matched_indexes() {
            let last = st.last_log_index.unwrap_or(0);
            f.labelled(
                "hydrascale_raft_member_lag_entries",
                "gauge",
                "On the leader: log entries each member has not yet got.",
                matched.into_iter().map(|(member, idx)| {
                    (
                        format!("member=\"{member}\""),
                        last.saturating_sub(idx.unwrap_or(0)),
                    )
                }),
            );
        }
        f.one(
            "hydrascale_ready",
            "gauge",
            "1 while /ready answers 200: in contact with a quorum and caught up with the leader.",
            u8::from(crate::cluster::readiness(&src.db, &src.serving).is_ok()),
        );
        f.one(
            "hydrascale_raft_applied_entries_total",
            "counter",
            "Entries applied to the state machine since start.",
            load(&m.applied_entries),
        );
    }
    m.apply.render(
        out,
        "hydrascale_raft_apply_duration_seconds",
        "Time to apply one committed entry to the state.",
    );
}

/// The tailnet as the replicated state holds it: nodes, online nodes, users, keys.
fn tailnet_metrics(f: &mut Family<'_>, src: &Sources) {
    let (nodes, online, users, keys) = {
        let t = src.db.store.read();
        (
            t.nodes.len(),
            t.nodes.values().filter(|n| n.online).count(),
            t.users.len(),
            t.preauth_keys.len(),
        )
    };
    f.one("hydrascale_nodes", "gauge", "Nodes in the tailnet.", nodes);
    f.one(
        "hydrascale_nodes_online",
        "gauge",
        "Nodes streaming a map from any replica.",
        online,
    );
    f.one("hydrascale_users", "gauge", "Users in the tailnet.", users);
    f.one(
        "hydrascale_preauth_keys",
        "gauge",
        "Pre-auth keys, used or not.",
        keys,
    );
}

/// The map plane: open streams, responses by kind, bytes, shared work.
fn map_metrics(f: &mut Family<'_>, m: &Metrics) {
    f.one(
        "hydrascale_map_streams",
        "gauge",
        "Streaming map long-polls open on this replica (its connected nodes).",
        m.map_streams.load(Ordering::Relaxed),
    );
    f.labelled(
        "hydrascale_map_responses_total",
        "counter",
        "Map responses sent by this replica, by kind.",
        [
            ("kind=\"full\"".to_string(), load(&m.map_responses_full)),
            ("kind=\"delta\"".to_string(), load(&m.map_responses_delta)),
            ("kind=\"keepalive\"".to_string(), load(&m.map_keepalives)),
        ],
    );
    f.one(
        "hydrascale_map_bytes_total",
        "counter",
        "Bytes of map responses (compressed, framed) sent by this replica.",
        load(&m.map_bytes),
    );
    f.one(
        "hydrascale_map_deltas_shared_total",
        "counter",
        "Delta map responses sent as made once for several streams (same changes, no policy).",
        load(&m.map_deltas_shared),
    );
    f.labelled(
        "hydrascale_map_peer_runs_total",
        "counter",
        "Runs of peers in map responses, by whether their compressed frame was shared \
         with another stream's response or compressed anew.",
        [
            ("frame=\"shared\"".to_string(), load(&m.map_runs_shared)),
            (
                "frame=\"compressed\"".to_string(),
                load(&m.map_runs_compressed),
            ),
        ],
    );
}

/// Registrations and TS2021 sessions: handshakes and how sessions ended.
fn session_metrics(f: &mut Family<'_>, m: &Metrics) {
    f.labelled(
        "hydrascale_registrations_total",
        "counter",
        "Registration requests handled by this replica, by outcome.",
        [
            ("result=\"ok\"".to_string(), load(&m.registrations)),
            (
                "result=\"refused\"".to_string(),
                load(&m.registrations_refused),
            ),
        ],
    );
    f.labelled(
        "hydrascale_noise_handshakes_total",
        "counter",
        "TS2021 Noise handshakes on this replica, by outcome.",
        [
            ("result=\"ok\"".to_string(), load(&m.noise_handshakes)),
            (
                "result=\"failed\"".to_string(),
                load(&m.noise_handshake_failures),
            ),
        ],
    );
    f.labelled(
        "hydrascale_noise_sessions_ended_total",
        "counter",
        "TS2021 Noise sessions that ended on this replica, by why: the client closed it, \
         an HTTP/2 or I/O error, or the client fell silent and the replica closed it.",
        [
            (
                "reason=\"closed\"".to_string(),
                load(&m.noise_sessions_closed),
            ),
            (
                "reason=\"error\"".to_string(),
                load(&m.noise_sessions_failed),
            ),
            (
                "reason=\"silent\"".to_string(),
                load(&m.noise_sessions_silent),
            ),
            (
                "reason=\"unidentified\"".to_string(),
                load(&m.noise_sessions_unidentified),
            ),
        ],
    );
}

/// What listeners and the limits on client-controlled input refused.
fn refusal_metrics(f: &mut Family<'_>, m: &Metrics) {
    f.labelled(
        "hydrascale_connections_refused_total",
        "counter",
        "Connections a listener refused or closed before serving them, by listener and \
         reason: too many from the client's address, no request head within the header \
         timeout, or an invalid PROXY protocol header from a trusted proxy.",
        Listener::ALL.iter().enumerate().flat_map(|(l, listener)| {
            ConnRefusal::ALL.iter().enumerate().map(move |(r, why)| {
                (
                    format!(
                        "listener=\"{}\",reason=\"{}\"",
                        listener.label(),
                        why.label()
                    ),
                    load(&m.connections_refused[l][r]),
                )
            })
        }),
    );
    f.labelled(
        "hydrascale_limit_refusals_total",
        "counter",
        "Requests refused by a bound on what clients control, by limit (docs/security.md).",
        Limit::ALL
            .iter()
            .zip(&m.limit_refusals)
            .map(|(l, c)| (format!("limit=\"{}\"", l.label()), load(c))),
    );
}

/// The embedded DERP relay: clients, packets relayed, forwarded and dropped.
fn derp_metrics(f: &mut Family<'_>, derp: &DerpServer) {
    let s = derp.stats();
    f.one(
        "hydrascale_derp_clients",
        "gauge",
        "DERP clients connected (mesh peers included).",
        load(&s.clients_connected),
    );
    f.one(
        "hydrascale_derp_clients_accepted_total",
        "counter",
        "DERP connections accepted.",
        load(&s.clients_accepted),
    );
    f.one(
        "hydrascale_derp_clients_rejected_total",
        "counter",
        "DERP clients refused (not a node of this tailnet, or a bad mesh key).",
        load(&s.clients_rejected),
    );
    f.one(
        "hydrascale_derp_handshake_failures_total",
        "counter",
        "DERP connections that failed before their handshake completed.",
        load(&s.handshake_failures),
    );
    f.one(
        "hydrascale_derp_packets_relayed_total",
        "counter",
        "Packets delivered to a client of this relay.",
        load(&s.packets_relayed),
    );
    f.one(
        "hydrascale_derp_bytes_relayed_total",
        "counter",
        "Payload bytes delivered to clients of this relay.",
        load(&s.bytes_relayed),
    );
    f.one(
        "hydrascale_derp_packets_forwarded_total",
        "counter",
        "Packets forwarded to another replica's relay over the mesh.",
        load(&s.packets_forwarded),
    );
    f.labelled(
        "hydrascale_derp_packets_dropped_total",
        "counter",
        "Packets dropped, by reason.",
        [
            (
                "reason=\"queue_full\"".to_string(),
                load(&s.packets_dropped_queue_full),
            ),
            (
                "reason=\"unknown_dest\"".to_string(),
                load(&s.packets_dropped_unknown_dest),
            ),
        ],
    );
    f.labelled(
        "hydrascale_derp_control_frames_dropped_total",
        "counter",
        "Control frames not queued to a client whose queue was full (it pings faster \
         than it reads), by frame.",
        [
            ("frame=\"pong\"".to_string(), load(&s.pongs_dropped)),
            (
                "frame=\"peer_gone\"".to_string(),
                load(&s.peer_gone_dropped),
            ),
        ],
    );
    f.one(
        "hydrascale_derp_mesh_watchers_cut_total",
        "counter",
        "Mesh peers disconnected because they fell too far behind on peer presence frames \
         (they reconnect and start over).",
        load(&s.watchers_cut),
    );
}

/// The served certificate's lifetime (what the expiry alert watches), and with ACME the
/// cluster's ordering state from the replicated state.
fn tls_metrics(f: &mut Family<'_>, store: &dyn ServedCert, src: &Sources) {
    if let Some((not_before, not_after)) = store.validity_ms() {
        f.one(
            "hydrascale_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the TLS certificate this replica serves expires (unix seconds).",
            not_after / 1000,
        );
        f.one(
            "hydrascale_tls_certificate_lifetime_seconds",
            "gauge",
            "How long the TLS certificate this replica serves is valid in all (not after - not before).",
            (not_after - not_before) / 1000,
        );
        f.one(
            "hydrascale_tls_certificate_remaining_seconds",
            "gauge",
            "Seconds until the TLS certificate this replica serves expires (negative: expired).",
            (not_after - crate::state::now_ms()) / 1000,
        );
    }
    f.one(
        "hydrascale_tls_certificate_swaps_total",
        "counter",
        "TLS certificates swapped in without a restart (renewed files, a new ACME certificate).",
        store.swaps(),
    );
    f.one(
        "hydrascale_tls_reload_failures_total",
        "counter",
        "Changed certificate files that did not load (the previous certificate stays served).",
        load(&src.metrics.tls_reload_failures),
    );
    if !store.acme() {
        return;
    }
    f.one(
        "hydrascale_acme_orders_total",
        "counter",
        "ACME orders this replica placed.",
        load(&src.metrics.acme_orders),
    );
    let (holder, issued, failures) = {
        let t = src.db.store.read();
        let now = crate::state::now_ms();
        (
            t.tls
                .lease
                .as_ref()
                .filter(|l| l.until > now)
                .map_or(0, |l| l.replica),
            t.tls.issued,
            t.tls.failures_in_row,
        )
    };
    f.one(
        "hydrascale_acme_lease_holder",
        "gauge",
        "The replica holding the ACME lease (ordering the certificate now; 0: none).",
        holder,
    );
    f.one(
        "hydrascale_acme_certificates_issued",
        "gauge",
        "ACME certificates the cluster has installed since it began (replicated state).",
        issued,
    );
    f.one(
        "hydrascale_acme_failures_in_row",
        "gauge",
        "ACME orders that failed since the last certificate (replicated state).",
        failures,
    );
}

/// The fields of a `/proc/<pid>/stat` after the command name, which may hold spaces, so
/// they are counted from its closing parenthesis: the state is index 0, so field N
/// (1-based, man proc) is index N - 3.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

fn field(fields: &[&str], i: usize) -> Option<f64> {
    fields.get(i).and_then(|v| v.parse::<f64>().ok())
}

/// User and system CPU seconds from fields 14 and 15 (utime, stime, in clock ticks).
fn cpu_seconds(fields: &[&str]) -> Option<f64> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((field(fields, 11)? + field(fields, 12)?) / ticks)
}

/// CPU seconds (user + system) process `pid` has used so far; the benchmarks measure
/// the replicas they start with it.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_seconds(&stat_fields(&stat)?)
}

/// What the allocator holds for live data and what it keeps freed: resident memory well
/// above the first is memory freed after a burst (a join storm) and not given back, not
/// state that grows.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_metrics(f: &mut Family<'_>) {
    // SAFETY: mallinfo2 reads the allocator's own counters and has no preconditions.
    let m = unsafe { libc::mallinfo2() };
    f.one(
        "hydrascale_heap_in_use_bytes",
        "gauge",
        "Bytes allocated and not yet freed (glibc mallinfo2: uordblks + hblkhd).",
        (m.uordblks + m.hblkhd) as f64,
    );
    f.one(
        "hydrascale_heap_free_bytes",
        "gauge",
        "Bytes freed but kept by the allocator in its arenas (glibc mallinfo2: fordblks).",
        m.fordblks as f64,
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_metrics(_f: &mut Family<'_>) {}

/// `process_*` families as the Go and Python clients name them, from /proc.
fn process_metrics(out: &mut String) {
    let mut f = Family { out };
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    let Some(fields) = stat_fields(&stat) else {
        return;
    };
    let num = |i: usize| field(&fields, i);
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    if let Some(cpu) = cpu_seconds(&fields) {
        f.one(
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            cpu,
        );
    }
    if let Some(rss) = num(21) {
        f.one(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss * page,
        );
    }
    heap_metrics(&mut f);
    if let Some(vsize) = num(20) {
        f.one(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize,
        );
    }
    if let (Some(start), Ok(uptime)) = (num(19), std::fs::read_to_string("/proc/uptime")) {
        let boot_ago = uptime
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        if let Some(up) = boot_ago {
            f.one(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, in seconds.",
                (now - up + start / ticks).round(),
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        f.one(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count(),
        );
    }
}

async fn metrics_handler(State(src): State<Sources>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&src),
    )
        .into_response()
}

async fn ready_handler(State(src): State<Sources>) -> Response {
    match crate::cluster::readiness(&src.db, &src.serving) {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

/// Routes of the metrics listener.
pub fn router(src: Sources) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler))
        .with_state(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_read_past_a_command_name_with_spaces_and_parentheses() {
        // utime 250 and stime 150 ticks are fields 14 and 15.
        let stat =
            "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 8 0 5000 1000 200";
        let fields = stat_fields(stat).expect("fields");
        assert_eq!(fields[0], "S");
        // SAFETY: sysconf only reads a system constant.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(cpu_seconds(&fields), Some(400.0 / ticks));
        assert_eq!(stat_fields("no command name"), None);
        assert!(process_cpu_seconds(std::process::id()).is_some_and(|c| c >= 0.0));
        assert_eq!(process_cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn a_store_counts_its_entries_into_the_registry_it_was_made_with() {
        use crate::state::StateStore;
        use hydrascale_raft::Application;
        let apply = |store: &StateStore, name: &str| {
            let cmd = crate::state::Command::CreateUser {
                name: name.into(),
                display_name: String::new(),
                now: 1,
                by_admin: true,
            };
            let bytes = serde_json::to_vec(&cmd).expect("encode");
            store.apply(1, &bytes).expect("applied");
        };
        let metrics = Metrics::new();
        let store = StateStore::with_meters(metrics.clone());
        apply(&store, "alice");
        apply(&store, "bob");
        assert_eq!(metrics.applied_entries.load(Ordering::Relaxed), 2);
        let mut out = String::new();
        metrics
            .apply
            .render(&mut out, "hydrascale_raft_apply_seconds", "help");
        assert!(
            out.contains("hydrascale_raft_apply_seconds_count 2\n"),
            "{out}"
        );
        // A store made without a registry counts into none of another store's.
        let unmetered = StateStore::new();
        apply(&unmetered, "carol");
        assert_eq!(metrics.applied_entries.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_is_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        let sum: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("x_seconds_sum "))
            .and_then(|v| v.parse().ok())
            .expect("sum");
        assert!((sum - 20.00305).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn process_metrics_read_this_process() {
        let mut out = String::new();
        process_metrics(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in {out}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(value("hydrascale_heap_in_use_bytes") > 0.0);
        assert!(value("process_open_fds") >= 3.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }
}
