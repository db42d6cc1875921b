#!/usr/bin/env bash
# Installs the official Tailscale client (tailscale + tailscaled) that Hydrascale is tested
# with, built from Tailscale's source with `go install` (Go 1.26 or newer), into .tools/bin
# (or $HYDRASCALE_TOOLS_DIR/bin). Nothing outside that directory is touched, and no
# service is started: README.md shows how to run it for a try-out.
set -euo pipefail
cd "$(dirname "$0")/.."

TAILSCALE_VERSION="${TAILSCALE_VERSION:-v1.102.3}"
TOOLS_DIR="${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}"

command -v go >/dev/null || {
  echo "Go (1.26 or newer) is needed to build the official Tailscale client: https://go.dev/dl/ (or install Tailscale's own package instead)" >&2
  exit 1
}
mkdir -p "$TOOLS_DIR/bin"
stamp="$TOOLS_DIR/bin/.tailscale-$TAILSCALE_VERSION"
if [ ! -x "$TOOLS_DIR/bin/tailscaled" ] || [ ! -x "$TOOLS_DIR/bin/tailscale" ] || [ ! -f "$stamp" ]; then
  echo "building the official Tailscale client $TAILSCALE_VERSION with go install (a few minutes the first time)" >&2
  GOBIN="$TOOLS_DIR/bin" GOFLAGS=-mod=mod go install \
    "tailscale.com/cmd/tailscale@$TAILSCALE_VERSION" "tailscale.com/cmd/tailscaled@$TAILSCALE_VERSION"
  touch "$stamp"
fi
echo "$TOOLS_DIR/bin: tailscale $("$TOOLS_DIR/bin/tailscale" version | head -1), tailscaled" >&2
