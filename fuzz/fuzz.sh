#!/usr/bin/env bash
# `cargo +nightly fuzz "$@"` in fuzz/, linking the RocksDB library the repository's debug
# build already compiled instead of compiling RocksDB's C++ again (about 20 minutes on two
# cores). Build the server once first (`cargo build` or `cargo test --no-run` at the top).
set -euo pipefail
cd "$(dirname "$0")"
# The server's lock file, so every crate (librocksdb-sys above all, whose library is linked
# here) has the version the debug build used; cargo adds libfuzzer-sys to it.
cp ../Cargo.lock Cargo.lock
lib=$(ls -t ../target/debug/build/librocksdb-sys-*/out/librocksdb.a 2>/dev/null | head -n 1 || true)
if [ -z "$lib" ]; then
  echo "no librocksdb.a under ../target/debug/build: run 'cargo build' at the top first" >&2
  exit 1
fi
# A fixed directory, so that a new build of the server (another hash in the path) does not
# make cargo rebuild the fuzz crates.
mkdir -p target/rocksdb
ln -sf "$(realpath "$lib")" target/rocksdb/librocksdb.a
export ROCKSDB_LIB_DIR="$PWD/target/rocksdb" ROCKSDB_STATIC=1
export PATH="${HYDRASCALE_TOOLS_DIR:-$PWD/../.tools}/bin:$PATH"
exec cargo +nightly fuzz "$@"
