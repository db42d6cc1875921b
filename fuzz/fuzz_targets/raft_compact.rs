//! A compact Raft append (`AppendEntriesCompact`) as a follower decodes it.
//! The harness, and what it checks, is `hydrascale_raft::fuzzing::raft_compact`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale_raft::fuzzing::raft_compact(data));
