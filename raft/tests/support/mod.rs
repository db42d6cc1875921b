//! Helpers shared by the Raft tests (`tests/replication.rs`) and the commit benchmark
//! (`benches/commit.rs`), which includes this file by path.

use hydrascale_raft::RaftNode;

/// A replica certificate from `ca` for node `id`, as the server's cluster TLS uses.
pub fn tls_for(ca: &hydrascale_raft::tls::CaPem, id: u64) -> hydrascale_raft::RaftTls {
    let (cert_pem, key_pem) = hydrascale_raft::tls::issue_replica(ca, id).expect("issue");
    hydrascale_raft::RaftTls {
        ca_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    }
}

/// Adds `others` to the initialized `leader`'s cluster as learners, then makes them and
/// the leader the voters.
pub async fn add_voters(leader: &RaftNode, others: &[RaftNode]) {
    for n in others {
        leader
            .add_learner(n.node_id(), n.advertise_addr().to_string())
            .await
            .expect("learner");
    }
    let voters = std::iter::once(leader)
        .chain(others)
        .map(RaftNode::node_id)
        .collect();
    leader.change_membership(voters).await.expect("membership");
}

/// A TCP relay in front of one node's Raft listener (the node advertises the relay's
/// address): cutting it drops every connection to the node and refuses new ones, as a
/// partition does to traffic towards it, while the node's own calls to the others go on.
#[allow(dead_code)] // The commit benchmark includes this file and cuts nothing.
pub struct Link {
    pub addr: std::net::SocketAddr,
    target: std::sync::Arc<std::sync::Mutex<Option<std::net::SocketAddr>>>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pumps: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

#[allow(dead_code)]
impl Link {
    pub async fn open() -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let link = Link {
            addr: listener.local_addr().expect("relay addr"),
            target: Default::default(),
            cut: Default::default(),
            pumps: Default::default(),
        };
        let (target, cut, pumps) = (link.target.clone(), link.cut.clone(), link.pumps.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *target.lock().expect("lock");
                let Some(to) = to else { continue };
                if cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let pump = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                pumps.lock().expect("lock").push(pump.abort_handle());
            }
        });
        link
    }

    /// Where the relay forwards to: the node's own listener, known once it started.
    pub fn forward_to(&self, to: std::net::SocketAddr) {
        *self.target.lock().expect("lock") = Some(to);
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for p in self.pumps.lock().expect("lock").drain(..) {
            p.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
