#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and integration tests against a real Mosquitto over real TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --locked --all-targets "$@"
