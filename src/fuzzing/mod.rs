//! Fuzzing harnesses: one function per `cargo fuzz` target in `fuzz/`, each taking bytes as
//! a client, a relay peer or the Raft log could deliver them. Not part of the API.
//!
//! A harness panics only on a bug in the code it drives: a panic on network input is a
//! denial of service, and a state machine that ends in two different states from the same
//! log is a split tailnet. Each fuzz target is a one-line call to its harness, and a unit
//! test beside each harness runs it over the committed seeds (`fuzz/corpus/<target>/`) and
//! a few thousand inputs mutated from them with a fixed seed
//! ([`hydrascale_raft::fuzzing::stand_in`]), on stable Rust, so the two cannot drift.
//! `fuzz/README.md` says how to run the targets and how the seeds were made.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "fuzz harnesses: a panic on what the harness itself built is the bug report"
)]

pub mod control;
pub mod derp;
pub mod noise;
pub mod state;
pub mod stun;

pub use hydrascale_raft::fuzzing::raft_compact;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// The secret of the control (Noise) key the harnesses serve with; the seeds of a real
/// client's handshake were captured from a server given this key.
pub const CONTROL_SECRET: [u8; 32] = *b"hydrascale fuzzing control key!!";

/// The secret of the DERP key the harnesses relay with; the seeds of real DERP sessions
/// were captured from a server given this key, so their sealed ClientInfo opens here.
pub const DERP_SECRET: [u8; 32] = *b"hydrascale fuzzing derp key.....";

/// Polls `fut` once: for futures over in-memory I/O that is always ready, which must
/// therefore finish at once (waiting there would be a hang).
fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("waits on in-memory I/O that is always ready"),
    }
}

/// Reads the head of a script op: a tag byte and a big-endian u16 length (0 when the
/// input ends first). `None` at the end of the input.
fn op(rest: &mut &[u8]) -> Option<(u8, usize)> {
    let (&tag, r) = rest.split_first()?;
    let (len, r) = match r {
        [a, b, r @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), r),
        _ => (0, &[][..]),
    };
    *rest = r;
    Some((tag, len))
}

/// Takes up to `n` bytes off the front of `rest` (fewer at the end of the input).
fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (body, r) = rest.split_at(n.min(rest.len()));
    *rest = r;
    body
}
