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
# The README test runs the README's `cargo run`, which builds without the dev-dependencies
# (some crates' features differ from the test build's): build that here, so its time shows
# as a build step and not inside a test's timeout.
cargo build --bin hydrascale
# clippy only type-checks, but its RocksDB build script would compile the C++ again; point
# it at the library the test build just made (nothing is linked in a check build).
rocksdb_lib=$(ls -t "${CARGO_TARGET_DIR:-target}"/debug/build/librocksdb-sys-*/out/librocksdb.a | head -n 1)
ROCKSDB_LIB_DIR="$(dirname "$rocksdb_lib")" ROCKSDB_STATIC=1 \
  cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace -- --test-threads=2
