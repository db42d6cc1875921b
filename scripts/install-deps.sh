#!/usr/bin/env bash
# Installs what building and testing Hydrascale needs on a fresh Debian machine:
# the C/C++ toolchain pieces RocksDB and protobuf code generation need, test tools,
# and the official Tailscale client (tailscale + tailscaled) built with `go install`.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_DIR="${HYDRASCALE_TOOLS_DIR:-$PWD/.tools}"

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v clang >/dev/null || need_apt+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v haproxy >/dev/null || need_apt+=(haproxy)
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v python3 >/dev/null || need_apt+=(python3)
# `tailscale ssh` runs the system's ssh client.
command -v ssh >/dev/null || need_apt+=(openssh-client)
# The chaos suite's network delay and loss (iptables' NFQUEUE and statistic match).
command -v iptables >/dev/null || need_apt+=(iptables)
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

command -v cargo >/dev/null || { echo "cargo (Rust >= 1.85) is required: install it with rustup" >&2; exit 1; }
command -v go >/dev/null || { echo "Go >= 1.26 is required to build the official Tailscale client" >&2; exit 1; }

# The official Tailscale client, as README.md tells a newcomer to install it.
./scripts/install-tailscale.sh

# Pebble, Let's Encrypt's ACME test server, for the TLS tests (certificates by ACME for
# one replica and for a cluster), built from the Go module proxy like the client above.
PEBBLE_VERSION="${PEBBLE_VERSION:-v2.9.0}"
stamp="$TOOLS_DIR/bin/.pebble-$PEBBLE_VERSION"
if [ ! -x "$TOOLS_DIR/bin/pebble" ] || [ ! -f "$stamp" ]; then
  echo "building Pebble $PEBBLE_VERSION with go install" >&2
  GOBIN="$TOOLS_DIR/bin" GOFLAGS=-mod=mod go install "github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION"
  touch "$stamp"
fi
"$TOOLS_DIR/bin/pebble" -version

# cargo-deb builds the .deb (the packaging test checks the package it makes).
CARGO_DEB_VERSION=3.8.0
if [ ! -x "$TOOLS_DIR/bin/cargo-deb" ] || ! "$TOOLS_DIR/bin/cargo-deb" --version | grep -q "$CARGO_DEB_VERSION"; then
  cargo install --quiet --locked --root "$TOOLS_DIR" "cargo-deb@$CARGO_DEB_VERSION"
fi
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is required (Debian's dpkg package)" >&2; exit 1; }

# A third-party headscale SDK from PyPI for the REST API test. headscale-api 0.2.0 pins
# betterproto 2.0.0b5, with which its own response parsing cannot work (it calls
# from_dict on the class, which betterproto supports from 2.0.0b7 on), so b7 replaces it.
venv="$TOOLS_DIR/pyvenv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import headscale_api' 2>/dev/null \
  || [ "$("$venv/bin/pip" show betterproto 2>/dev/null | sed -n 's/^Version: //p')" != 2.0.0b7 ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q headscale-api==0.2.0
  "$venv/bin/pip" install -q betterproto==2.0.0b7 2>&1 | grep -v "dependency resolver\|requires betterproto" || true
fi
"$venv/bin/python" -c 'import headscale_api.headscale' >/dev/null
# kubernetes-validate carries the Kubernetes API schemas: the deploy test validates the
# manifests in deploy/kubernetes with it, offline.
KUBERNETES_VALIDATE_VERSION=1.37.0
if [ "$("$venv/bin/pip" show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p')" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  "$venv/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
[ "$("$venv/bin/pip" show betterproto | sed -n 's/^Version: //p')" = 2.0.0b7 ]

# nanoidp, a real OIDC provider (authorization code with PKCE, discovery, JWKS), for the
# OIDC login test; in its own venv, away from the SDK's pinned packages.
NANOIDP_VERSION=3.4.0
oidcvenv="$TOOLS_DIR/oidcvenv"
if [ "$("$oidcvenv/bin/pip" show nanoidp 2>/dev/null | sed -n 's/^Version: //p')" != "$NANOIDP_VERSION" ]; then
  python3 -m venv "$oidcvenv"
  "$oidcvenv/bin/pip" install -q "nanoidp==$NANOIDP_VERSION"
fi
"$oidcvenv/bin/nanoidp" --help >/dev/null

# deploycheck loads deploy/compose/compose.yaml with compose-go, as `docker compose` does
# (no Docker engine runs on test machines), for the deploy test.
(cd tests/tools/deploycheck && GOFLAGS=-mod=mod go build -o "$TOOLS_DIR/bin/deploycheck" .)
