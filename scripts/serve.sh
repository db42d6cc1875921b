#!/usr/bin/env bash
# Starts a working single-replica server on embedded defaults (data in ./hydrascale-data,
# listening on loopback) and prints the login-server URL and the next commands. A debug
# build (`cargo run`): the quickest to build, fine for a try-out; install a release build
# for real use (README.md). Arguments go to `hydrascale serve` (e.g. --set KEY=VALUE).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null && command -v clang >/dev/null && dpkg -s libclang-dev >/dev/null 2>&1 || {
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq protobuf-compiler clang libclang-dev
}
exec cargo run -- serve "$@"
