//! Log entries into the state machine's `apply`, on replicas that must agree.
//! The harness, and what it checks, is `hydrascale::fuzzing::state::state_apply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::state::state_apply(data));
