#!/usr/bin/env bash
# Prepares an aarch64 Python 3.11 with the ncnn and numpy wheels from PyPI, to run under qemu-user:
# the arm target's outputs are checked on a real aarch64 ncnn build, not only the x86 one.
# Needs root (apt-get) and the package registries; idempotent. Usage: setup_aarch64.sh DEST
set -euo pipefail
dest="${1:?usage: setup_aarch64.sh DEST}"
[ -f "$dest/.ready" ] && exit 0
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pins="$(cd "$root" && "$root/.venv/bin/python" -c '
import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(d for d in deps["dependencies"] + deps["optional-dependencies"]["arm"] if d.startswith(("numpy", "ncnn"))))')"
updated=0
if ! command -v qemu-aarch64-static >/dev/null; then
    apt-get update -qq && updated=1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    updated=0
fi
[ "$updated" = 1 ] || apt-get update -qq
mkdir -p "$(dirname "$dest")"
work="$(mktemp -d "$dest.tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/root" "$work/wheels" "$work/site"
# apt-get download writes as the _apt user where it can; a private folder makes it fall back quietly.
chmod 777 "$work/debs"
(cd "$work/debs" && apt-get download -qq \
    python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libc6:arm64 libstdc++6:arm64 \
    libgcc-s1:arm64 libgomp1:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 libbz2-1.0:arm64 \
    liblzma5:arm64 libcrypt1:arm64 libuuid1:arm64 2>/dev/null)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/root"; done
# shellcheck disable=SC2086
"$root/.venv/bin/python" -m pip download -qq --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    -d "$work/wheels" $pins 2>/dev/null
for wheel in "$work"/wheels/*.whl; do "$root/.venv/bin/python" -m zipfile -e "$wheel" "$work/site"; done
rm -rf "$work/debs" "$work/wheels"
touch "$work/.ready"
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
