//! A client's handshake initiation (`X-Tailscale-Handshake`) into `accept_initiation`.
//! The harness, and what it checks, is `hydrascale::fuzzing::noise::noise_handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::noise::noise_handshake(data));
