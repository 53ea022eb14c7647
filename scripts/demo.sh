#!/bin/sh
# The main job on a built-in example: a sparse raw image with a pattern,
# converted, then shown by info and map (vimg and qemu-img side by side).
set -eu
VIMG=${1:-build/src/vimg}
D=$(mktemp -d "${TMPDIR:-/tmp}/vimg-demo.XXXXXX")
trap 'rm -rf "$D"' EXIT
cd "$D"
run() { echo "\$ $*"; "$@"; echo; }
VIMG_ABS=$(cd "$OLDPWD" && cd "$(dirname "$VIMG")" && pwd)/$(basename "$VIMG")
run "$VIMG_ABS" create -f raw disk.img 1T
# A pattern: 1 MiB of 0xa5 at 0, 64 KiB of text at 1 GiB, a block of zeros at 2 GiB.
python3 - <<'PY'
with open("disk.img", "r+b") as f:
    f.write(b"\xa5" * 1048576)
    f.seek(1 << 30); f.write(b"vimg demo " * 6553)
    f.seek(2 << 30); f.write(b"\0" * 65536)
PY
run "$VIMG_ABS" convert -p -f raw -O raw disk.img copy.img
run "$VIMG_ABS" info copy.img
run "$VIMG_ABS" map -f raw copy.img
run "$VIMG_ABS" compare -f raw -F raw disk.img copy.img
echo "disk.img: $(du -h disk.img | cut -f1) on disk, copy.img: $(du -h copy.img | cut -f1) on disk (virtual size 1 TiB each)"
