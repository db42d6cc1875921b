//! A `/machine/register` or `/machine/map` body, decoded and acted on as the handlers do.
//! The harness, and what it checks, is `hydrascale::fuzzing::control::control_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hydrascale::fuzzing::control::control_requests(data));
