#!/usr/bin/env bash
# The one command that runs every test on a fresh Debian machine (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export HYDRASCALE_TOOLS_DIR="${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}"
# Interop tests need the official client; they fail (not skip) when this is set and it is missing.
export HYDRASCALE_INTEROP=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace -- --test-threads=2
