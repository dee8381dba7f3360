#!/usr/bin/env bash
# Installs what mqtls's example and tests need on Debian: Mosquitto (the broker the tests run) and its
# command-line clients, Prometheus for its promtool (tests/it/recipes.rs checks and unit-tests the alert
# rules in deploy/prometheus/), the system's CA certificates (the AWS and Azure recipes use their roots),
# and systemd's tools (tests/it/systemd.rs checks the unit files). Does nothing when they are already there.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
# systemd-analyze and systemd-sysusers; the package installs without systemd running.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing with apt-get (a minute or two): ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian package enables a system broker on port 1883; the example and the tests start their own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    $sudo systemctl stop mosquitto || true
  fi
  # Likewise the prometheus package enables a server on :9090 that scrapes this host; the tests need only
  # promtool.
  if [[ " ${need[*]} " == *" prometheus "* ]]; then
    if [ -d /run/systemd/system ]; then
      $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
      $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
  fi
fi
