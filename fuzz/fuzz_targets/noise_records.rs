//! Bytes from a TS2021 peer after the handshake, read through `NoiseStream`.
//! The harness, and what it checks, is `hydrascale::fuzzing::noise::noise_records`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::noise::noise_records(data));
