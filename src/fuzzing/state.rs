//! Harness for the state machine: log entries as Raft hands them to `apply`.

use hydrascale_raft::Application;

use crate::state::StateStore;

/// Most log entries one input is cut into.
const MAX_ENTRIES: usize = 64;

/// Target `state_apply`: the input cut at newlines into log entries (serde writes a
/// command on one line), applied in order to a replica's state machine, as bytes, the way
/// Raft applies a committed entry. Nothing panics, and the replicas agree:
/// - a second replica fed the same entries answers each the same and ends in the same
///   state (equal snapshots);
/// - a third one that joins halfway, from the first one's snapshot, answers the rest the
///   same and ends in the same state too;
/// - the final snapshot restores to a state whose snapshot is the same bytes;
/// - an entry that does not decode is refused alike by all and ends the run, as it stops
///   a real replica.
pub fn state_apply(data: &[u8]) {
    let entries: Vec<&[u8]> = data
        .split(|b| *b == b'\n')
        .filter(|e| !e.is_empty())
        .take(MAX_ENTRIES)
        .collect();
    let a = StateStore::new();
    let b = StateStore::new();
    let half = entries.len() / 2;
    let mut late: Option<StateStore> = None;
    for (i, entry) in entries.iter().enumerate() {
        let index = i as u64 + 1;
        if i == half {
            let joined = StateStore::new();
            assert!(
                joined.restore(&a.snapshot()).is_ok(),
                "a replica's own snapshot does not restore"
            );
            late = Some(joined);
        }
        let answer = a.apply(index, entry);
        assert!(
            b.apply(index, entry) == answer,
            "entry {index}: two replicas answer differently"
        );
        if let Some(late) = &late {
            assert!(
                late.apply(index, entry) == answer,
                "entry {index}: a replica restored from a snapshot answers differently"
            );
        }
        if answer.is_err() {
            // An entry a replica cannot read stops it (Raft halts before the entry counts
            // as applied): the replicas agreed on refusing it, and nothing follows.
            break;
        }
    }
    let snap = a.snapshot();
    assert!(b.snapshot() == snap, "two replicas end in different states");
    if let Some(late) = &late {
        assert!(
            late.snapshot() == snap,
            "a replica restored from a snapshot ends in another state"
        );
    }
    let restored = StateStore::new();
    assert!(
        restored.restore(&snap).is_ok(),
        "a snapshot does not restore"
    );
    assert!(
        restored.snapshot() == snap,
        "a snapshot restores to another state"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use hydrascale_raft::fuzzing::stand_in;

    /// Stand-in for `cargo fuzz run state_apply`.
    #[test]
    fn state_apply_stand_in() {
        stand_in("state_apply", 800, state_apply);
    }
}
