#!/usr/bin/env bash
# Install the host packages the testbed needs (Debian 12, as root); a no-op when all are present.
set -euo pipefail
here=$(dirname "$0")
mapfile -t pkgs < <(grep -v '^\s*#' "$here/host-packages.txt" | grep -v '^\s*$')
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "host-deps: missing packages (${missing[*]}); run as root or install them" >&2
    exit 1
fi
echo "host-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
