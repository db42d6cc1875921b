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
            .add_learner(n.node_id(), n.listen_addr().to_string())
            .await
            .expect("learner");
    }
    let voters = std::iter::once(leader)
        .chain(others)
        .map(RaftNode::node_id)
        .collect();
    leader.change_membership(voters).await.expect("membership");
}
