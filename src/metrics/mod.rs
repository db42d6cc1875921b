//! Prometheus metrics of one replica, served on their own listener
//! (`metrics_listen_addr`, `/metrics`, plus `/health` and `/ready` for probes).
//!
//! The planes bump counters and histograms in [`Metrics`] as things happen; everything
//! that is a state (Raft's view, the tailnet's size, DERP's current clients, the process)
//! is read at scrape time instead, so it can never drift from the truth. The text format
//! is written here directly: a handful of families does not warrant a client library.
//! `render.rs` writes the exposition, one function per family; `process.rs` the
//! `process_*` families and the heap, from /proc.

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

mod process;
mod render;

pub use process::process_cpu_seconds;
#[cfg(test)]
use process::{cpu_seconds, process_metrics, stat_fields};
pub use render::render;

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
                profile: Default::default(),
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
