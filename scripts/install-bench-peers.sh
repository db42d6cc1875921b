#!/usr/bin/env bash
# Builds the servers Hydrascale is benchmarked beside (scripts/bench-vs-headscale.sh,
# scripts/bench-vs-derper.sh): headscale and Tailscale's derper, from source through the Go
# module proxy, into .tools/bin (or $HYDRASCALE_TOOLS_DIR/bin). Benchmarks only: CI never
# runs this, and nothing outside that directory and Go's module cache is touched.
#
# `go install module@version` refuses headscale (its go.mod has replace directives), so both
# are built the way that works: `go get` of the pinned version inside a throwaway module, then
# `go build` of the command package.
set -euo pipefail
cd "$(dirname "$0")/.."

HEADSCALE_VERSION="${HEADSCALE_VERSION:-v0.27.1}"
# Same version as the official client the tests use (scripts/install-tailscale.sh).
DERPER_VERSION="${DERPER_VERSION:-v1.102.3}"
TOOLS_DIR="${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}"

command -v go >/dev/null || {
  echo "Go (1.26 or newer) is needed to build headscale and derper: https://go.dev/dl/" >&2
  exit 1
}
mkdir -p "$TOOLS_DIR/bin"

# build NAME MODULE VERSION PACKAGE: go get MODULE@VERSION in a throwaway module, go build PACKAGE.
build() {
  local name="$1" module="$2" version="$3" package="$4"
  local stamp="$TOOLS_DIR/bin/.$name-$version"
  if [ -x "$TOOLS_DIR/bin/$name" ] && [ -f "$stamp" ]; then
    echo "$TOOLS_DIR/bin/$name: $version (already built)" >&2
    return
  fi
  echo "building $name $version from the Go module proxy (several minutes the first time)" >&2
  local work
  work="$(mktemp -d)"
  (
    cd "$work"
    go mod init "hydrascale.local/bench-$name" >/dev/null 2>&1
    GOFLAGS=-mod=mod go get "$module@$version"
    GOFLAGS=-mod=mod go build -trimpath -o "$TOOLS_DIR/bin/$name" "$package"
  )
  rm -rf "$work"
  rm -f "$TOOLS_DIR/bin/.$name-"*
  touch "$stamp"
  echo "$TOOLS_DIR/bin/$name: $version" >&2
}

build headscale github.com/juanfont/headscale "$HEADSCALE_VERSION" github.com/juanfont/headscale/cmd/headscale
build derper tailscale.com "$DERPER_VERSION" tailscale.com/cmd/derper
