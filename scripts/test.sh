#!/usr/bin/env bash
# The one command that runs every test on a fresh Debian machine (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export HYDRASCALE_TOOLS_DIR="${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}"
# Interop tests need the official client; they fail (not skip) when this is set and it is missing.
export HYDRASCALE_INTEROP=1
cargo fmt --all -- --check
# Build first: compiling RocksDB's C++ is most of a clean build.
cargo test --workspace --no-run
# The README test runs the README's `cargo run`: with the same features and profile (see
# Cargo.toml's build-override) it needs nothing the test build has not compiled; building
# it here keeps a mistake there from costing a test's timeout (RocksDB's C++ again).
cargo build --bin hydrascale
# clippy runs RocksDB's build script as the builds do and finds it fresh. (Pointing it at a
# prebuilt library with ROCKSDB_LIB_DIR would change that script's environment, and the
# next build would compile the C++ a third time.)
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace -- --test-threads=2
