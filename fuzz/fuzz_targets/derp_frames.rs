//! A DERP client's byte stream through the frame decoder.
//! The harness, and what it checks, is `hydrascale::fuzzing::derp::derp_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::derp::derp_frames(data));
