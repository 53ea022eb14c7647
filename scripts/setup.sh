#!/bin/sh
# Installs every Debian package vimg's build, tests, fuzzers and benchmarks
# need, only when missing; uses sudo when not root.
set -eu
PKGS="build-essential zlib1g-dev libzstd-dev libdeflate-dev liburing-dev libaio-dev libssl-dev
libcmocka-dev cmake ninja-build pkg-config clang qemu-utils python3 time zstd
libvirt-daemon libvirt-clients"
missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "setup: installing$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing
