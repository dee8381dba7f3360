#!/usr/bin/env bash
# Brings up a working mqtls example on this machine: a private CA and device certificates, a real
# Mosquitto 2 with mutual TLS and an ACL per device, mqtls in front of it, and devices publishing through
# it. Ctrl-C stops it all. `--seconds N` runs for N seconds and exits non-zero if anything went wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The first build compiles every dependency: minutes on a small machine. Say so, and let cargo show its
# progress instead of staying silent.
if [ ! -x target/debug/examples/demo ]; then
  echo "building mqtls and the demo (the first build takes a few minutes)..." >&2
fi
cargo build --locked --bin mqtls --example demo
exec target/debug/examples/demo "$@"
