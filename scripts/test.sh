#!/usr/bin/env bash
# The whole test suite: installs the browser the status page test drives (if missing), then
# runs every unit and integration test. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo test --locked "$@"
