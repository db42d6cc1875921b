//! Bounds on what a client controls through the control plane, checked before anything
//! is written through Raft: the size of `/machine/register` and `/machine/map` bodies,
//! of Hostinfo and Endpoints; interactive logins per client address and overall; map
//! streams per node; and Noise sessions that have not yet said who they are.
//!
//! The caps are far above what real clients send (Tailscale v1.102.3 in the tests: a
//! Hostinfo of 775 bytes and 2 endpoints; a machine with many interfaces, services or
//! routes sends a few KiB), so only a client that means harm meets them. Every refusal is counted
//! (`hydrascale_limit_refusals_total{limit}`) and tells the client what was wrong. The
//! whole list, with the listeners' own limits, is in `docs/security.md`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::metrics::Limit;
use crate::state::{Tailnet, LOGIN_TTL_MS, MAX_PENDING_LOGINS};

/// Largest `/machine/register` body.
pub const MAX_REGISTER_BODY: usize = 64 << 10;
/// Largest `/machine/map` body.
pub const MAX_MAP_BODY: usize = 128 << 10;
/// Largest Hostinfo, as JSON text: it is stored, replicated, and sent to every peer.
pub const MAX_HOSTINFO: usize = 32 << 10;
/// Most Endpoints in one map request, and the longest one (`[v6%zone]:port` fits).
pub const MAX_ENDPOINTS: usize = 256;
pub const MAX_ENDPOINT_LEN: usize = 128;
/// Map streams of one node open at once on one replica. A client holds one; a few
/// more cover a reconnect whose old stream the replica has not yet seen end.
pub const MAX_STREAMS_PER_NODE: u32 = 8;
/// A Noise session that has not identified itself (see [`SessionIdentity`]) this long
/// after its handshake is closed. The official client sends its first request at once.
pub const IDENTIFY_WITHIN: Duration = Duration::from_secs(30);
/// Noise sessions not yet identified from one client address at once, so that one
/// address cannot take all of `limits.max_unidentified_sessions`. A real client holds one
/// such session for the few milliseconds before its first answer.
pub const MAX_UNIDENTIFIED_PER_ADDRESS: usize = 64;

/// An address may start `max_pending_logins_per_address` logins per this window.
const LOGIN_WINDOW: Duration = Duration::from_secs(600);
/// Logins this replica starts, from all addresses together: bursts of this many, then
/// [`LOGINS_PER_SEC`]. Each is a Raft entry, so this bounds how fast unauthenticated
/// clients can grow the log however many addresses they have.
const LOGINS_BURST: f64 = 100.0;
const LOGINS_PER_SEC: f64 = 1.0;
/// Addresses with a login bucket kept before the full ones (nothing started lately)
/// are forgotten.
const KEPT_BUCKETS: usize = 4096;
/// A login admitted but not (yet) known to be written counts this long at most: longer
/// than a write may take, in case its request was dropped before it was told either way.
const IN_FLIGHT_MS: i64 = 60_000;

/// A request over a cap: what to tell the client, and which limit it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub limit: Limit,
    pub message: String,
}

impl Refusal {
    fn new(limit: Limit, message: String) -> Self {
        Self { limit, message }
    }
}

fn kib(n: usize) -> String {
    format!("{} KiB", n >> 10)
}

/// A body over `max` bytes for `route`.
pub fn body_too_large(route: &str, max: usize) -> Refusal {
    Refusal::new(
        Limit::Body,
        format!(
            "{route} body is larger than this server accepts ({}); a Tailscale client sends a few KiB",
            kib(max)
        ),
    )
}

/// The Hostinfo as stored, once it is within [`MAX_HOSTINFO`].
pub fn hostinfo_text(h: &serde_json::Value) -> Result<String, Refusal> {
    let text = h.to_string();
    if text.len() > MAX_HOSTINFO {
        return Err(Refusal::new(
            Limit::Hostinfo,
            format!(
                "Hostinfo is {} bytes, more than the {} this server accepts; nothing was changed",
                text.len(),
                kib(MAX_HOSTINFO)
            ),
        ));
    }
    Ok(text)
}

/// Endpoints within [`MAX_ENDPOINTS`] and [`MAX_ENDPOINT_LEN`].
pub fn check_endpoints(e: &[String]) -> Result<(), Refusal> {
    if e.len() > MAX_ENDPOINTS {
        return Err(Refusal::new(
            Limit::Endpoints,
            format!(
                "{} endpoints, more than the {MAX_ENDPOINTS} this server accepts; nothing was changed",
                e.len()
            ),
        ));
    }
    if let Some(long) = e.iter().find(|e| e.len() > MAX_ENDPOINT_LEN) {
        return Err(Refusal::new(
            Limit::Endpoints,
            format!(
                "an endpoint of {} bytes, longer than the {MAX_ENDPOINT_LEN} this server accepts (ip:port); nothing was changed",
                long.len()
            ),
        ));
    }
    Ok(())
}

/// A token bucket: `cap` tokens, refilled at `per_sec`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(cap: f64, now: Instant) -> Self {
        Self {
            tokens: cap,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, cap: f64, per_sec: f64) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_sec).min(cap);
        self.at = now;
    }

    /// How long until a token is there (zero: now).
    fn wait(&self, per_sec: f64) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / per_sec)
        }
    }
}

/// A login this replica started (or is starting): from where, for which machine, when.
#[derive(Debug)]
struct Started {
    addr: IpAddr,
    machine_key: String,
    created: i64,
    /// Written through Raft; until then it counts even though the state lacks it.
    committed: bool,
}

#[derive(Debug)]
struct Logins {
    buckets: HashMap<IpAddr, Bucket>,
    total: Bucket,
    started: HashMap<String, Started>,
}

/// Interactive logins (`tailscale up` without an auth key): anyone who reaches the login
/// URL can start one, and each is a Raft entry and a place in the replicated state, so
/// they are checked here before they are proposed. Per client address: at most
/// `per_address` waiting at once, and as many started per [`LOGIN_WINDOW`]. Overall: at
/// most [`MAX_PENDING_LOGINS`] waiting (in the state, so across the cluster), and
/// [`LOGINS_BURST`] then [`LOGINS_PER_SEC`] started on this replica. A machine asking
/// again with the same node key gets its waiting login back, at no cost.
///
/// The per-address counts are this replica's own (a client that reaches three
/// replicas can have three times as many); the address is the TCP peer, or the client
/// a trusted proxy names (`trusted_proxies`).
#[derive(Debug)]
pub struct LoginLimiter {
    per_address: usize,
    logins: Mutex<Logins>,
}

impl LoginLimiter {
    pub fn new(per_address: usize) -> Self {
        let now = Instant::now();
        Self {
            per_address: per_address.max(1),
            logins: Mutex::new(Logins {
                buckets: HashMap::new(),
                total: Bucket::full(LOGINS_BURST, now),
                started: HashMap::new(),
            }),
        }
    }

    /// Admits a new login `auth_id` for `machine_key` from `addr` at `now` (ms), or says
    /// why not. An admitted login must be followed by [`Self::committed`] or
    /// [`Self::failed`].
    pub fn admit(
        &self,
        t: &Tailnet,
        addr: IpAddr,
        machine_key: &str,
        auth_id: &str,
        now: i64,
    ) -> Result<(), Refusal> {
        let live = |created: i64| created > now.saturating_sub(LOGIN_TTL_MS);
        // A machine's new login replaces its old one, so that one does not count.
        let waiting = t
            .pending_logins
            .values()
            .filter(|p| live(p.created) && p.machine_key != machine_key)
            .count();
        if waiting >= MAX_PENDING_LOGINS {
            return Err(Refusal::new(
                Limit::LoginsTotal,
                format!(
                    "{MAX_PENDING_LOGINS} interactive logins are already waiting for an administrator on this server; try again later, or log in with an auth key"
                ),
            ));
        }
        let key = crate::listener::address_key(addr);
        let per_address = self.per_address as f64;
        let per_address_rate = per_address / LOGIN_WINDOW.as_secs_f64();
        let at = Instant::now();
        let mut l = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        l.started.retain(|id, s| {
            live(s.created)
                && if s.committed {
                    t.pending_logins.contains_key(id)
                } else {
                    s.created > now.saturating_sub(IN_FLIGHT_MS)
                }
        });
        let from_here = l
            .started
            .values()
            .filter(|s| s.addr == key && s.machine_key != machine_key)
            .count();
        if from_here >= self.per_address {
            return Err(Refusal::new(
                Limit::LoginsPerAddress,
                format!(
                    "{from_here} interactive logins from your address are already waiting for an administrator (limits.max_pending_logins_per_address); finish them, let them expire (1 h), or log in with an auth key"
                ),
            ));
        }
        if l.buckets.len() >= KEPT_BUCKETS {
            l.buckets.retain(|_, b| {
                b.refill(at, per_address, per_address_rate);
                b.tokens < per_address
            });
        }
        let mut bucket = l
            .buckets
            .get(&key)
            .copied()
            .unwrap_or_else(|| Bucket::full(per_address, at));
        bucket.refill(at, per_address, per_address_rate);
        if bucket.tokens < 1.0 {
            l.buckets.insert(key, bucket);
            return Err(Refusal::new(
                Limit::LoginsPerAddress,
                format!(
                    "too many interactive logins were started from your address lately; try again in {} s, or log in with an auth key",
                    bucket.wait(per_address_rate).as_secs().max(1)
                ),
            ));
        }
        let mut total = l.total;
        total.refill(at, LOGINS_BURST, LOGINS_PER_SEC);
        l.total = total;
        if total.tokens < 1.0 {
            l.buckets.insert(key, bucket);
            return Err(Refusal::new(
                Limit::LoginsTotal,
                format!(
                    "too many interactive logins are being started on this server; try again in {} s, or log in with an auth key",
                    total.wait(LOGINS_PER_SEC).as_secs().max(1)
                ),
            ));
        }
        bucket.tokens -= 1.0;
        l.total.tokens -= 1.0;
        l.buckets.insert(key, bucket);
        l.started.insert(
            auth_id.to_string(),
            Started {
                addr: key,
                machine_key: machine_key.to_string(),
                created: now,
                committed: false,
            },
        );
        Ok(())
    }

    /// The login is in the replicated state: from now on it counts while the state has it.
    pub fn committed(&self, auth_id: &str) {
        let mut l = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = l.started.get_mut(auth_id) {
            s.committed = true;
        }
    }

    /// The login was not written; it no longer counts (its start still does).
    pub fn failed(&self, auth_id: &str) {
        let mut l = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        l.started.remove(auth_id);
    }
}

/// Whether a Noise session has identified itself: made a registration the server took
/// (the node is logged in, or an interactive login was started or is waited on), or a
/// map request of a node of this tailnet bound to its machine key. Until then it holds
/// one of the replica's `limits.max_unidentified_sessions` places and one of its client
/// address's [`MAX_UNIDENTIFIED_PER_ADDRESS`] (both taken before the handshake, so the
/// handshake's own work is bounded too), and after [`IDENTIFY_WITHIN`] it is closed.
#[derive(Debug)]
pub struct SessionIdentity {
    place: Mutex<Option<(OwnedSemaphorePermit, crate::listener::Slot)>>,
    known: watch::Sender<bool>,
}

/// The places a new session needs: one of the replica's, one of its address's.
pub fn session_places(
    replica: &Arc<tokio::sync::Semaphore>,
    addresses: &crate::listener::Slots,
    addr: IpAddr,
) -> Result<(OwnedSemaphorePermit, crate::listener::Slot), Refusal> {
    let refused = || {
        Refusal::new(
            Limit::UnidentifiedSessions,
            "too many new sessions on this server right now; retry shortly".into(),
        )
    };
    let slot = addresses
        .take(addr, MAX_UNIDENTIFIED_PER_ADDRESS)
        .ok_or_else(refused)?;
    let permit = replica.clone().try_acquire_owned().map_err(|_| refused())?;
    Ok((permit, slot))
}

impl SessionIdentity {
    pub fn new(place: (OwnedSemaphorePermit, crate::listener::Slot)) -> Arc<Self> {
        Arc::new(Self {
            place: Mutex::new(Some(place)),
            known: watch::Sender::new(false),
        })
    }

    /// The session said who it is: it gives its place back and is not closed for it.
    pub fn identified(&self) {
        let place = self.place.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(place);
        self.known.send_replace(true);
    }

    /// Resolves once [`Self::identified`] was called.
    pub async fn wait(&self) {
        let mut rx = self.known.subscribe();
        let _ = rx.wait_for(|k| *k).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PendingLogin;

    const NOW: i64 = 1_700_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pending(t: &mut Tailnet, id: &str, machine: &str, created: i64) {
        t.pending_logins.insert(
            id.into(),
            PendingLogin {
                auth_id: id.into(),
                machine_key: machine.into(),
                node_key: "nodekey:00".into(),
                hostname: "h".into(),
                hostinfo: "{}".into(),
                ephemeral: false,
                created,
                prefixes: Default::default(),
                key_lifetime: None,
            },
        );
    }

    /// Starts a login from `addr` as the server does: admitted, then written.
    fn start(l: &LoginLimiter, t: &mut Tailnet, addr: &str, id: &str) -> Result<(), Refusal> {
        let machine = format!("mkey:{id}");
        l.admit(t, ip(addr), &machine, id, NOW)?;
        pending(t, id, &machine, NOW);
        l.committed(id);
        Ok(())
    }

    #[test]
    fn one_address_waits_for_at_most_its_share_and_others_are_not_affected() {
        let l = LoginLimiter::new(3);
        let mut t = Tailnet::default();
        for i in 0..3 {
            start(&l, &mut t, "192.0.2.1", &format!("a{i}")).unwrap();
        }
        let r = start(&l, &mut t, "192.0.2.1", "a3").unwrap_err();
        assert_eq!(r.limit, Limit::LoginsPerAddress);
        assert!(r.message.contains("already waiting"), "{}", r.message);
        // The same /64 is the same address; another address is not held up.
        start(&l, &mut t, "2001:db8::1", "b0").unwrap();
        start(&l, &mut t, "2001:db8::2", "b1").unwrap();
        start(&l, &mut t, "2001:db8::3", "b2").unwrap();
        assert!(start(&l, &mut t, "2001:db8::4", "b3").is_err());
        start(&l, &mut t, "192.0.2.2", "c0").unwrap();
        // A finished (or replaced) login frees its place, but the address's starts in
        // this window are spent.
        t.pending_logins.remove("a0");
        let r = start(&l, &mut t, "192.0.2.1", "a4").unwrap_err();
        assert!(r.message.contains("lately"), "{}", r.message);
    }

    #[test]
    fn the_same_machine_replacing_its_login_does_not_count_twice_but_spends_starts() {
        let l = LoginLimiter::new(2);
        let t = Tailnet::default();
        // Not committed yet: still counted, except for the machine itself.
        l.admit(&t, ip("192.0.2.1"), "mkey:m", "x1", NOW).unwrap();
        l.admit(&t, ip("192.0.2.1"), "mkey:m", "x2", NOW).unwrap();
        let r = l
            .admit(&t, ip("192.0.2.1"), "mkey:m", "x3", NOW)
            .unwrap_err();
        assert!(r.message.contains("lately"), "{}", r.message);
        // A failed write no longer counts as waiting.
        l.failed("x1");
        l.failed("x2");
        let r = l
            .admit(&t, ip("192.0.2.1"), "mkey:n", "x4", NOW)
            .unwrap_err();
        assert!(r.message.contains("lately"), "{}", r.message);
    }

    #[test]
    fn a_login_never_told_written_or_failed_stops_counting_after_a_minute() {
        let l = LoginLimiter::new(1);
        let t = Tailnet::default();
        l.admit(&t, ip("192.0.2.1"), "mkey:a", "a", NOW).unwrap();
        let r = l
            .admit(&t, ip("192.0.2.1"), "mkey:b", "b", NOW + 1000)
            .unwrap_err();
        assert!(r.message.contains("already waiting"), "{}", r.message);
        // Its request was dropped: after a minute it is no longer waiting (the address's
        // starts are still spent, so the refusal says so instead).
        let r = l
            .admit(&t, ip("192.0.2.1"), "mkey:b", "b", NOW + IN_FLIGHT_MS + 1)
            .unwrap_err();
        assert!(r.message.contains("lately"), "{}", r.message);
    }

    #[test]
    fn the_server_wide_cap_counts_live_logins_of_other_machines() {
        let l = LoginLimiter::new(10);
        let mut t = Tailnet::default();
        for i in 0..MAX_PENDING_LOGINS {
            pending(&mut t, &format!("p{i}"), &format!("mkey:{i}"), NOW);
        }
        let r = l
            .admit(&t, ip("192.0.2.1"), "mkey:new", "n", NOW)
            .unwrap_err();
        assert_eq!(r.limit, Limit::LoginsTotal);
        // A machine already waiting may replace its own.
        l.admit(&t, ip("192.0.2.1"), "mkey:7", "n7", NOW).unwrap();
        // Expired ones do not count.
        let later = NOW + LOGIN_TTL_MS + 1;
        l.admit(&t, ip("192.0.2.1"), "mkey:new", "n2", later)
            .unwrap();
    }

    #[test]
    fn the_server_wide_start_rate_bounds_many_addresses() {
        let l = LoginLimiter::new(10);
        let t = Tailnet::default();
        let admitted = (0..300u32)
            .filter(|i| {
                let addr = IpAddr::from([10, 0, (i >> 8) as u8, *i as u8]);
                l.admit(&t, addr, &format!("mkey:{i}"), &format!("id{i}"), NOW)
                    .is_ok()
            })
            .count();
        // The burst, and at most a token or two refilled while the test ran.
        assert!((100..=102).contains(&admitted), "{admitted}");
        let r = l
            .admit(&t, ip("192.0.2.99"), "mkey:late", "late", NOW)
            .unwrap_err();
        assert_eq!(r.limit, Limit::LoginsTotal);
    }

    #[test]
    fn sizes() {
        assert!(hostinfo_text(&serde_json::json!({"Hostname": "a"})).is_ok());
        let big = serde_json::json!({ "Hostname": "a".repeat(MAX_HOSTINFO) });
        assert_eq!(hostinfo_text(&big).unwrap_err().limit, Limit::Hostinfo);
        let ok: Vec<String> = (0..MAX_ENDPOINTS)
            .map(|i| format!("10.0.0.1:{i}"))
            .collect();
        assert!(check_endpoints(&ok).is_ok());
        let many: Vec<String> = (0..=MAX_ENDPOINTS)
            .map(|i| format!("10.0.0.1:{i}"))
            .collect();
        assert_eq!(check_endpoints(&many).unwrap_err().limit, Limit::Endpoints);
        assert!(check_endpoints(&["x".repeat(MAX_ENDPOINT_LEN + 1)]).is_err());
    }

    #[tokio::test]
    async fn an_identified_session_gives_its_place_back() {
        let places = Arc::new(tokio::sync::Semaphore::new(2));
        let addresses = crate::listener::Slots::default();
        let a = ip("192.0.2.1");
        let id = SessionIdentity::new(session_places(&places, &addresses, a).unwrap());
        let _other = session_places(&places, &addresses, ip("192.0.2.2")).unwrap();
        let r = session_places(&places, &addresses, ip("192.0.2.3")).unwrap_err();
        assert_eq!(r.limit, Limit::UnidentifiedSessions);
        let waiter = {
            let id = id.clone();
            tokio::spawn(async move { id.wait().await })
        };
        id.identified();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(session_places(&places, &addresses, ip("192.0.2.3")).is_ok());
        // Called again (a second request): nothing more to give back.
        id.identified();
    }

    #[test]
    fn one_address_holds_at_most_its_share_of_new_sessions() {
        let places = Arc::new(tokio::sync::Semaphore::new(1000));
        let addresses = crate::listener::Slots::default();
        let held: Vec<_> = (0..MAX_UNIDENTIFIED_PER_ADDRESS + 10)
            .filter_map(|_| session_places(&places, &addresses, ip("2001:db8::1")).ok())
            .collect();
        assert_eq!(held.len(), MAX_UNIDENTIFIED_PER_ADDRESS);
        assert!(session_places(&places, &addresses, ip("2001:db8:0:1::1")).is_ok());
    }
}
