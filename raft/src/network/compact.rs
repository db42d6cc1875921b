//! The compact form of an append (`AppendEntriesCompact`): openraft's request as JSON with
//! every command's bytes taken out and carried as protobuf `bytes`. In the JSON form
//! (`AppendEntries`) serde spells each byte of a command as a decimal number, three to four
//! times its size, for the leader to write and each follower to parse.

use bytes::Bytes;
use openraft::raft::AppendEntriesRequest;
use openraft::EntryPayload;

use super::proto::CompactAppend;
use crate::TypeConfig;

/// `req` in compact form. Its commands are moved, not copied.
pub fn encode(mut req: AppendEntriesRequest<TypeConfig>) -> Result<CompactAppend, String> {
    let commands = req
        .entries
        .iter_mut()
        .filter_map(|e| match &mut e.payload {
            EntryPayload::Normal(c) => Some(Bytes::from(std::mem::take(c))),
            _ => None,
        })
        .collect();
    let header = serde_json::to_vec(&req).map_err(|e| format!("encoding an append: {e}"))?;
    Ok(CompactAppend {
        header: header.into(),
        commands,
    })
}

/// The request [`encode`] made `c` from.
pub fn decode(c: CompactAppend) -> Result<AppendEntriesRequest<TypeConfig>, String> {
    let mut req: AppendEntriesRequest<TypeConfig> =
        serde_json::from_slice(&c.header).map_err(|e| format!("undecodable append: {e}"))?;
    let mut commands = c.commands.into_iter();
    for e in &mut req.entries {
        if let EntryPayload::Normal(cmd) = &mut e.payload {
            *cmd = commands
                .next()
                .ok_or("an append with fewer commands than entries that carry one")?
                .into();
        }
    }
    if commands.next().is_some() {
        return Err("an append with more commands than entries that carry one".into());
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, Entry, LogId, Membership, Vote};
    use std::collections::BTreeSet;

    fn log_id(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn request() -> AppendEntriesRequest<TypeConfig> {
        let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], None);
        AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(log_id(2, 9)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(3, 11),
                    payload: EntryPayload::Normal((0..=255).collect()),
                },
                Entry {
                    log_id: log_id(3, 12),
                    payload: EntryPayload::Membership(membership),
                },
                Entry {
                    log_id: log_id(3, 13),
                    payload: EntryPayload::Normal(Vec::new()),
                },
                Entry {
                    log_id: log_id(3, 14),
                    payload: EntryPayload::Normal(b"{\"CreateUser\":{}}".to_vec()),
                },
            ],
            leader_commit: Some(log_id(3, 12)),
        }
    }

    #[test]
    fn an_append_comes_back_as_it_was_sent_and_smaller() {
        let req = request();
        let json = serde_json::to_vec(&req).expect("json");
        let c = encode(req.clone()).expect("encode");
        assert_eq!(c.commands.len(), 3);
        assert_eq!(&c.commands[0][..], (0..=255).collect::<Vec<u8>>());
        let raw: usize = c.commands.iter().map(Bytes::len).sum();
        let wire = c.header.len() + raw;
        // JSON spells each command byte in two to four characters and a comma.
        assert!(
            json.len() - wire > 2 * raw,
            "{wire} bytes against {} as JSON, commands {raw}",
            json.len()
        );
        let back = decode(c).expect("decode");
        assert_eq!(
            serde_json::to_value(&back).expect("json"),
            serde_json::to_value(&req).expect("json")
        );
    }

    #[test]
    fn commands_that_do_not_match_the_entries_are_refused() {
        let mut c = encode(request()).expect("encode");
        c.commands.pop();
        assert!(decode(c.clone()).unwrap_err().contains("fewer commands"));
        c.commands.push(Bytes::new());
        c.commands.push(Bytes::new());
        assert!(decode(c).unwrap_err().contains("more commands"));
        let bad = CompactAppend {
            header: Bytes::from_static(b"not json"),
            commands: Vec::new(),
        };
        assert!(decode(bad).unwrap_err().contains("undecodable"));
    }
}
