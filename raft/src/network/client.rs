//! Outgoing Raft RPCs: one lazily connected gRPC channel per target replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tonic::transport::{Channel, Endpoint};

use super::proto::raft_service_client::RaftServiceClient;
use super::proto::Payload;
use super::ForwardResult;
use crate::tls::{RaftTls, RAFT_TLS_NAME};
use crate::TypeConfig;
use rustls::pki_types::ServerName;

#[derive(Clone, Default)]
pub struct NetworkFactory {
    pub contacts: super::Contacts,
    pub tls: Option<Arc<RaftTls>>,
}

pub struct Connection {
    target: u64,
    contacts: super::Contacts,
    client: Option<RaftServiceClient<Channel>>,
    addr: String,
    /// Appends go in compact form (`super::compact`) until the target answers that it
    /// does not know it (a replica of an older version); then as JSON.
    compact: bool,
}

/// A channel to replica `target` that connects on first use, so creating a connection
/// never blocks. With `tls` it speaks mutual TLS and accepts only the certificate of
/// `target` from the cluster CA (`tls::RaftTls::client_config`).
pub fn channel(
    addr: &str,
    tls: Option<&RaftTls>,
    target: u64,
) -> Result<Channel, tonic::transport::Error> {
    let host = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    // HTTP/2 pings find a connection that died silently (a replica cut off by a partition):
    // it is dropped within seconds and the next call dials afresh. Without them, the
    // channel kept the dead connection, and after the partition healed its packets waited
    // on TCP's retransmission backoff, seconds more before the replica was back.
    let ep = Endpoint::from_shared(format!("http://{host}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let Some(tls) = tls else {
        return Ok(ep.connect_lazy());
    };
    // tonic's own TLS checks a name only; the replica's identity needs our verifier, so
    // the connector does TCP and TLS itself and tonic speaks HTTP/2 over what it returns.
    let config = match tls.client_config(target) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            // Checked when the replica started (its own material loaded); if it fails
            // here anyway, every call to this target fails and says why.
            let message = e.to_string();
            return Ok(
                ep.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                    let message = message.clone();
                    async move { Err::<TlsIo, _>(std::io::Error::other(message)) }
                })),
            );
        }
    };
    let dial = host.to_string();
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let (config, dial) = (config.clone(), dial.clone());
            async move {
                let connect = async {
                    let tcp = tokio::net::TcpStream::connect(&dial).await?;
                    tcp.set_nodelay(true)?;
                    let name =
                        ServerName::try_from(RAFT_TLS_NAME).map_err(std::io::Error::other)?;
                    let tls = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                };
                tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {dial} timed out"),
                        )
                    })?
            }
        })),
    )
}

/// The most command bytes one append carries (a single larger command still goes alone):
/// a follower behind by a long log catches up in bounded pieces instead of one message
/// that both ends hold whole in memory.
pub(crate) const MAX_APPEND_BYTES: usize = 4 << 20;

/// `None` if `entries` fit in `max` command bytes; else how many of the first ones do
/// (at least one).
fn entries_within(entries: &[openraft::Entry<TypeConfig>], max: usize) -> Option<u64> {
    let mut total = 0usize;
    for (i, e) in entries.iter().enumerate() {
        if let openraft::EntryPayload::Normal(cmd) = &e.payload {
            total = total.saturating_add(cmd.len());
        }
        if total > max {
            return Some(u64::try_from(i.max(1)).unwrap_or(1));
        }
    }
    None
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Connection {
            target,
            contacts: self.contacts.clone(),
            client: channel(&node.addr, self.tls.as_deref(), target)
                .ok()
                .map(RaftServiceClient::new),
            addr: node.addr.clone(),
            compact: true,
        }
    }
}

fn unreachable<E: std::error::Error + 'static>(e: &E) -> Unreachable {
    Unreachable::new(e)
}

type Answer = Result<Result<tonic::Response<Payload>, tonic::Status>, tokio::time::error::Elapsed>;

impl Connection {
    fn client<Err: std::error::Error>(
        &mut self,
    ) -> Result<&mut RaftServiceClient<Channel>, RPCError<u64, BasicNode, Err>> {
        let (target, addr) = (self.target, &self.addr);
        self.client.as_mut().ok_or_else(|| {
            RPCError::Unreachable(unreachable(&std::io::Error::other(format!(
                "bad address for replica {target}: {addr}"
            ))))
        })
    }

    async fn call<Req, Resp, Err>(
        &mut self,
        which: &'static str,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<u64, BasicNode, Err>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        Err: std::error::Error + serde::de::DeserializeOwned,
    {
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self.client()?;
        let payload = tonic::Request::new(Payload { data });
        let fut = async {
            match which {
                "append" => client.append_entries(payload).await,
                "vote" => client.vote(payload).await,
                _ => client.install_snapshot(payload).await,
            }
        };
        let answer = tokio::time::timeout(ttl, fut).await;
        self.answer(which, answer)
    }

    /// Sends `rpc` in compact form; gives it back, for the JSON form, if the target does
    /// not know the compact one.
    async fn append_compact(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<
        Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>>,
        AppendEntriesRequest<TypeConfig>,
    > {
        let msg = match super::compact::encode(rpc) {
            Ok(m) => m,
            Err(e) => {
                return Ok(Err(RPCError::Network(NetworkError::new(
                    &std::io::Error::other(e),
                ))))
            }
        };
        // Cheap: the commands are shared `Bytes`.
        let kept = msg.clone();
        let client = match self.client() {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        let answer = tokio::time::timeout(ttl, client.append_entries_compact(msg)).await;
        if matches!(&answer, Ok(Err(s)) if s.code() == tonic::Code::Unimplemented) {
            self.compact = false;
            tracing::info!(
                replica = self.target,
                "replica takes no compact appends (an older version): sending them as JSON"
            );
            return match super::compact::decode(kept) {
                Ok(rpc) => Err(rpc),
                Err(e) => Ok(Err(RPCError::Network(NetworkError::new(
                    &std::io::Error::other(e),
                )))),
            };
        }
        Ok(self.answer("append", answer))
    }

    fn answer<Resp, Err>(
        &self,
        which: &'static str,
        answer: Answer,
    ) -> Result<Resp, RPCError<u64, BasicNode, Err>>
    where
        Resp: serde::de::DeserializeOwned,
        Err: std::error::Error + serde::de::DeserializeOwned,
    {
        let resp = match answer {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return Err(RPCError::Unreachable(unreachable(&status))),
            Err(_) => {
                return Err(RPCError::Unreachable(unreachable(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{which} to replica {} timed out", self.target),
                ))))
            }
        };
        let res: Result<Resp, Err> = serde_json::from_slice(&resp.data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let ttl = option.hard_ttl();
        if let Some(fit) = entries_within(&rpc.entries, MAX_APPEND_BYTES) {
            // openraft sends again at once with at most `fit` entries.
            return Err(RPCError::PayloadTooLarge(
                openraft::error::PayloadTooLarge::new_entries_hint(fit),
            ));
        }
        let res = if self.compact {
            match self.append_compact(rpc, ttl).await {
                Ok(res) => res,
                Err(rpc) => self.call("append", &rpc, ttl).await,
            }
        } else {
            self.call("append", &rpc, ttl).await
        };
        if res.is_ok() {
            self.contacts.peer_answered(self.target);
        }
        res
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}

/// Sends client writes to the leader, keeping one channel per leader address so a
/// forwarded write does not pay for a new connection (and TLS handshake) each time.
#[derive(Default)]
pub struct WriteForwarder {
    pub tls: Option<Arc<RaftTls>>,
    channels: Mutex<HashMap<(String, u64), Channel>>,
}

impl WriteForwarder {
    pub fn new(tls: Option<Arc<RaftTls>>) -> Self {
        Self {
            tls,
            channels: Mutex::default(),
        }
    }

    /// The channel to replica `id` at `addr`, dialled on first use and kept.
    pub(crate) fn channel(&self, addr: &str, id: u64) -> Result<Channel, String> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.to_string(), id);
        match map.get(&key) {
            Some(ch) => Ok(ch.clone()),
            None => {
                let ch = channel(addr, self.tls.as_deref(), id).map_err(|e| e.to_string())?;
                map.insert(key, ch.clone());
                Ok(ch)
            }
        }
    }

    /// Asks replica `target` at `addr` to start an election after `delay` (leadership
    /// handover).
    pub async fn timeout_now(
        &self,
        addr: &str,
        target: u64,
        leader: u64,
        delay: Duration,
    ) -> Result<(), String> {
        let mut c = RaftServiceClient::new(self.channel(addr, target)?);
        c.timeout_now(super::proto::TimeoutNowRequest {
            leader,
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        })
        .await
        .map(|_| ())
        .map_err(|s| with_causes(&s))
    }

    /// Hands a client write to the leader, replica `leader` at `addr`.
    pub async fn write(
        &self,
        addr: &str,
        leader: u64,
        cmd: Vec<u8>,
    ) -> Result<ForwardResult, String> {
        let mut c = RaftServiceClient::new(self.channel(addr, leader)?);
        let resp = c
            .client_write(Payload { data: cmd })
            .await
            .map_err(|s| with_causes(&s))?;
        serde_json::from_slice(&resp.into_inner().data).map_err(|e| e.to_string())
    }
}

impl WriteForwarder {
    /// Asks replica `leader` at `addr` for its view of replication (`crate::view`);
    /// `None` from a replica of a version without it.
    pub async fn leader_view(
        &self,
        addr: &str,
        leader: u64,
    ) -> Result<Option<crate::view::LeaderView>, String> {
        let mut c = RaftServiceClient::new(self.channel(addr, leader)?);
        match c.leader_view(Payload { data: Vec::new() }).await {
            Ok(resp) => serde_json::from_slice(&resp.into_inner().data)
                .map(Some)
                .map_err(|e| e.to_string()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(with_causes(&s)),
        }
    }
}

/// A failed call's message and its causes: for a broken connection tonic's message is
/// hyper's bare "http2 error", and only the causes say why (a keep-alive ping unanswered,
/// a reset, the peer gone).
fn with_causes(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.ends_with(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, bytes: usize) -> openraft::Entry<TypeConfig> {
        openraft::Entry {
            log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: openraft::EntryPayload::Normal(vec![0; bytes]),
        }
    }

    #[test]
    fn appends_are_cut_to_a_byte_budget() {
        let small: Vec<_> = (0..10).map(|i| entry(i, 100)).collect();
        assert_eq!(entries_within(&small, 1000), None);
        assert_eq!(entries_within(&small, 999), Some(9));
        // One command larger than the budget still goes, alone.
        let big = vec![entry(0, 5000), entry(1, 10)];
        assert_eq!(entries_within(&big, 1000), Some(1));
        assert_eq!(entries_within(&[], 1), None);
    }
}
