//! A datagram to the STUN port, and the answer it gets.
//! The harness, and what it checks, is `hydrascale::fuzzing::stun::stun`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::stun::stun(data));
