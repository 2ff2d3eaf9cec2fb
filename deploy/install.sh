#!/usr/bin/env bash
# Set up lungnode on a Debian machine from the repository root.
#   bash deploy/install.sh             Debian packages the node and `lungnode demo` need, then .venv with lungnode
#   bash deploy/install.sh --node-only the node alone (no Orthanc for the demo): servers and container images
#   bash deploy/install.sh --test      also the peers the tests use (dcmtk, dicom3tools, PostgreSQL) and dev tools
# Idempotent: running it again only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
case "$mode" in
  run|--run) mode=run ;; --node-only) mode=node ;; --test) mode=test ;;
  *) echo "usage: bash deploy/install.sh [--node-only|--test]" >&2; exit 2 ;;
esac

debs=(python3 python3-venv python3-pip)
[ "$mode" != node ] && debs+=(orthanc)  # the local PACS of `lungnode demo`
[ "$mode" = test ] && debs+=(dcmtk dicom3tools postgresql openssl rsyslog rsyslog-gnutls orthanc-dicomweb socat)  # openssl: the TLS tests make their own CA; rsyslog: the audit repository; orthanc-dicomweb: the STOW-RS peer; socat: its HTTPS front

missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian Orthanc service is not used: tests and the demo start Orthanc with their own config.
  if [ "$mode" != node ] && command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now orthanc >/dev/null 2>&1 || true; fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)" >&2
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
extra=""; [ "$mode" = test ] && extra="[dev,postgres]"
echo "installing lungnode$extra into .venv" >&2
log=$(mktemp)
if ! .venv/bin/python -m pip install -q -e ".$extra" >"$log" 2>&1; then
  cat "$log" >&2; echo "pip install failed (log above)" >&2; exit 1
fi
rm -f "$log"
.venv/bin/lungnode --version >&2
