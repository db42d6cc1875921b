//! A whole DERP client connection served by the relay.
//! The harness, and what it checks, is `hydrascale::fuzzing::derp::derp_server`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::derp::derp_server(data));
