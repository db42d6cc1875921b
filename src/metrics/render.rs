//! The exposition: every family of a scrape, in Prometheus text format 0.0.4, one writer
//! per family, in the order a scrape has always listed them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::process::process_metrics;
use super::{ConnRefusal, Limit, Listener, Metrics, ServedCert, Sources};
use crate::derp::DerpServer;

pub(super) struct Family<'a> {
    pub(super) out: &'a mut String,
}

impl Family<'_> {
    pub(super) fn one(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        value: impl std::fmt::Display,
    ) {
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

pub(super) fn load(c: &AtomicU64) -> u64 {
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
