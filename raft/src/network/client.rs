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
use crate::tls::RaftTls;
use crate::TypeConfig;

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

/// A channel that connects on first use, so creating a connection never blocks. With
/// `tls` it speaks mutual TLS and only trusts replicas certified by the cluster CA.
pub fn channel(addr: &str, tls: Option<&RaftTls>) -> Result<Channel, tonic::transport::Error> {
    let host = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let scheme = if tls.is_some() { "https" } else { "http" };
    // HTTP/2 pings find a connection that died silently (a replica cut off by a partition):
    // it is dropped within seconds and the next call dials afresh. Without them, the
    // channel kept the dead connection, and after the partition healed its packets waited
    // on TCP's retransmission backoff, seconds more before the replica was back.
    let mut ep = Endpoint::from_shared(format!("{scheme}://{host}"))?
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        ep = ep.tls_config(tls.client_config())?;
    }
    Ok(ep.connect_lazy())
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Connection {
            target,
            contacts: self.contacts.clone(),
            client: channel(&node.addr, self.tls.as_deref())
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
    channels: Mutex<HashMap<String, Channel>>,
}

impl WriteForwarder {
    pub fn new(tls: Option<Arc<RaftTls>>) -> Self {
        Self {
            tls,
            channels: Mutex::default(),
        }
    }

    /// The channel to the replica at `addr`, dialled on first use and kept.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(addr) {
            Some(ch) => Ok(ch.clone()),
            None => {
                let ch = channel(addr, self.tls.as_deref()).map_err(|e| e.to_string())?;
                map.insert(addr.to_string(), ch.clone());
                Ok(ch)
            }
        }
    }

    /// Asks the replica at `addr` to start an election after `delay` (leadership handover).
    pub async fn timeout_now(
        &self,
        addr: &str,
        leader: u64,
        delay: Duration,
    ) -> Result<(), String> {
        let mut c = RaftServiceClient::new(self.channel(addr)?);
        c.timeout_now(super::proto::TimeoutNowRequest {
            leader,
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        })
        .await
        .map(|_| ())
        .map_err(|s| with_causes(&s))
    }

    pub async fn write(&self, addr: &str, cmd: Vec<u8>) -> Result<ForwardResult, String> {
        let mut c = RaftServiceClient::new(self.channel(addr)?);
        let resp = c
            .client_write(Payload { data: cmd })
            .await
            .map_err(|s| with_causes(&s))?;
        serde_json::from_slice(&resp.into_inner().data).map_err(|e| e.to_string())
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
