#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Debian's Chromium and
# ChromeDriver, for the status page's headless browser test (tests/it/browser.rs).
# Idempotent: does nothing when both are there. Needs root or sudo (apt-get).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
install() {
    $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver
}
if ! install; then
    $sudo apt-get update -q
    install
fi
chromium --version
chromedriver --version
