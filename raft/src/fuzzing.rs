//! Fuzzing harnesses for this crate's wire decoders, and the stable stand-in driver that
//! runs every harness of the project (this crate's and the server's) in `cargo test`.
//!
//! Not part of the API. A harness takes bytes as a peer could send them and panics only on
//! a bug: the `cargo fuzz` target in `fuzz/` is a one-line call to it, and a unit test runs
//! it through [`stand_in`] over the committed seeds (`fuzz/corpus/<target>/`) and a few
//! thousand inputs mutated from them with a fixed seed, so the two cannot drift apart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "fuzz harnesses: a panic on what the harness itself built is the bug report"
)]

use std::path::{Path, PathBuf};

use prost::Message;

use crate::network::compact;
use crate::network::proto::CompactAppend;

/// A compact append (`AppendEntriesCompact`) as the gRPC server receives it: protobuf bytes
/// from the network. Whatever decodes is an append that, encoded again, decodes to the
/// same request, and whose encoding no longer changes from there on (`encode(decode(x))`
/// is stable): what a follower accepted is what the leader meant.
pub fn raft_compact(data: &[u8]) {
    let Ok(msg) = CompactAppend::decode(data) else {
        return;
    };
    let Ok(req) = compact::decode(msg) else {
        return;
    };
    let json = serde_json::to_value(&req).expect("a decoded append encodes as JSON");
    let once = compact::encode(req).expect("a decoded append encodes");
    let wire = once.encode_to_vec();
    let again = CompactAppend::decode(&wire[..]).expect("our own encoding decodes");
    assert_eq!(again, once, "protobuf round trip");
    let back = compact::decode(again).expect("our own encoding decodes as an append");
    assert_eq!(
        serde_json::to_value(&back).expect("json"),
        json,
        "the append changed on its way through encode and decode"
    );
    let twice = compact::encode(back).expect("encodes");
    assert_eq!(twice, once, "encode(decode(x)) is not stable");
}

/// Seeds of a target: the files of `fuzz/corpus/<target>/`, in name order.
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => panic!("seed corpus {}: {e}", dir.display()),
    };
    names.sort();
    names
        .iter()
        .filter(|p| p.is_file())
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

fn corpus_dir(target: &str) -> PathBuf {
    // This crate is `raft/` of the repository; `fuzz/` is beside it.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// The words of `fuzz/dicts/<target>.dict` (libFuzzer's format: one `"word"` a line,
/// optionally `name=` before it, with `\\`, `\"` and `\xNN` escapes), none if it has none.
pub fn dictionary(target: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/dicts")
        .join(format!("{target}.dict"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Vec::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let quoted = l
                .find('"')
                .and_then(|a| l.rfind('"').filter(|b| *b > a).map(|b| &l[a + 1..b]))
                .unwrap_or_else(|| panic!("{}: not a dictionary line: {l}", path.display()));
            unescape(quoted).unwrap_or_else(|| panic!("{}: bad escape in {l}", path.display()))
        })
        .collect()
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1)? {
            b'x' => {
                let hex = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 4;
            }
            c => {
                out.push(*c);
                i += 2;
            }
        }
    }
    Some(out)
}

/// A fixed-seed stand-in for libFuzzer: runs `harness` over every seed of `target`, then
/// `runs` inputs made from them by the mutations libFuzzer uses most (bits flipped, bytes
/// set to edge values, ranges dropped, repeated or overwritten, words of the target's
/// dictionary and other seeds spliced in, random bytes). The same inputs on every run. An
/// input that panics is printed (hex) before the panic goes on, to be kept as a seed.
pub fn stand_in(target: &str, runs: usize, mut harness: impl FnMut(&[u8])) {
    let seeds = corpus(target);
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let words = dictionary(target);
    let dict: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
    let mut run = |input: &[u8]| {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| harness(input)));
        if let Err(p) = res {
            eprintln!(
                "{target}: this input panics (hex): {}",
                input.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            std::panic::resume_unwind(p);
        }
    };
    for s in &seeds {
        run(s);
    }
    let mut rng = Rng(0x5eed_f022_u64 ^ target.len() as u64);
    for _ in 0..runs {
        let mut input = if rng.below(16) == 0 {
            // Now and then, bytes with no seed behind them.
            (0..rng.below(64)).map(|_| rng.byte()).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..=rng.below(4) {
            mutate(&mut input, &seeds, &dict, &mut rng);
        }
        run(&input);
    }
}

/// splitmix64: small, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>], dict: &[&[u8]], rng: &mut Rng) {
    const EDGES: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'0'];
    let len = input.len();
    // Where to insert (anywhere, the end included) and which byte to change.
    let at = rng.below(len + 1);
    let i = rng.below(len);
    match rng.below(9) {
        0 if len > 0 => input[i] ^= 1 << rng.below(8),
        1 if len > 0 => input[i] = EDGES[rng.below(EDGES.len())],
        2 if len > 0 => {
            let n = 1 + rng.below((len - i).min(16));
            input.drain(i..i + n);
        }
        3 if len > 0 => {
            // Repeat a range, as a length field that now overstates or understates it.
            let n = 1 + rng.below((len - i).min(32));
            let piece = input[i..i + n].to_vec();
            input.splice(at..at, piece);
        }
        4 if !dict.is_empty() => {
            let w = dict[rng.below(dict.len())];
            input.splice(at..at, w.iter().copied());
        }
        5 if !dict.is_empty() => {
            let w = dict[rng.below(dict.len())];
            let end = (at + w.len()).min(len);
            input.splice(at..end, w.iter().copied());
        }
        6 => {
            let other = &seeds[rng.below(seeds.len())];
            let from = rng.below(other.len() + 1);
            let n = rng.below(other.len() - from + 1);
            input.splice(at..at, other[from..from + n].iter().copied());
        }
        7 => input.truncate(at),
        _ => {
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            input.splice(at..at, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stand-in for `cargo fuzz run raft_compact`.
    #[test]
    fn raft_compact_stand_in() {
        stand_in("raft_compact", 50_000, raft_compact);
    }

    #[test]
    fn dictionary_lines_unescape() {
        assert_eq!(
            unescape(r#"a\"b\\c\x00\xff"#),
            Some(b"a\"b\\c\x00\xff".to_vec())
        );
        assert_eq!(unescape(r"\x4"), None);
    }

    /// The driver makes the same inputs on every run, and inputs that differ.
    #[test]
    fn the_stand_in_is_repeatable() {
        let seeds = vec![b"{\"a\":1}".to_vec(), vec![0u8; 10]];
        let make = || {
            let mut rng = Rng(7);
            (0..50)
                .map(|_| {
                    let mut i = seeds[rng.below(2)].clone();
                    mutate(&mut i, &seeds, &[b"null"], &mut rng);
                    i
                })
                .collect::<Vec<_>>()
        };
        let a = make();
        assert_eq!(a, make());
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 30, "{} distinct inputs", distinct.len());
    }
}
