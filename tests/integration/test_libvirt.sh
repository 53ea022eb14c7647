#!/bin/bash
# Integration test: the real libvirt storage driver (libvirtd + virsh, dir
# pool) runs vimg as `qemu-img`; the results are checked with the real
# /usr/bin/qemu-img.  Usage: test_libvirt.sh PATH_TO_VIMG
# Exit 0 if all checks pass, 1 on any failure, 77 if libvirtd cannot run here.
set -u

VIMG=${1:?usage: $0 PATH_TO_VIMG}
VIMG=$(readlink -f "$VIMG")
QEMU_IMG=/usr/bin/qemu-img
DRIVER=/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_storage.so
skip() { echo "SKIP: $*"; exit 77; }

[ -x "$VIMG" ] || { echo "FAIL: vimg not executable: $VIMG"; exit 1; }
[ -x "$QEMU_IMG" ] || skip "real qemu-img not installed ($QEMU_IMG)"
command -v libvirtd >/dev/null || skip "libvirtd not installed (apt-get install libvirt-daemon)"
command -v virsh >/dev/null || skip "virsh not installed (apt-get install libvirt-clients)"
[ -e "$DRIVER" ] || DRIVER=$(find /usr/lib -name libvirt_driver_storage.so 2>/dev/null | head -1)
[ -n "$DRIVER" ] && [ -e "$DRIVER" ] || skip "libvirt_driver_storage.so not found"
[ "$(id -u)" = 0 ] || skip "must run as root (needs unshare -m and bind mounts)"
command -v unshare >/dev/null || skip "unshare not available"
command -v python3 >/dev/null || skip "python3 not available"

T=$(mktemp -d /tmp/vimg-libvirt.XXXXXX)
LIBVIRTD_PID=
cleanup() {
    if [ -n "$LIBVIRTD_PID" ] && kill -0 "$LIBVIRTD_PID" 2>/dev/null; then
        kill "$LIBVIRTD_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$LIBVIRTD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$LIBVIRTD_PID" 2>/dev/null
    fi
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

mkdir -p "$T/etc" "$T/run" "$T/drv" "$T/bin" "$T/pool"
ln -s "$DRIVER" "$T/drv/"
LOG=$T/argv.log
# Wrapper: log argv (one line per call), then exec vimg.
cat > "$T/bin/qemu-img" <<WRAP
#!/bin/sh
printf '%s\n' "\$*" >> '$LOG'
exec '$VIMG' "\$@"
WRAP
chmod +x "$T/bin/qemu-img"
: > "$LOG"
cat > "$T/libvirtd.conf" <<CONF
unix_sock_dir = "$T"
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0777"
log_outputs = "3:file:$T/libvirtd.log"
CONF

# Start libvirtd in a private mount namespace with /etc/libvirt and
# /run/libvirt replaced by temp dirs.
unshare -m --propagation private /bin/sh -c '
    mount --bind "$1/etc" /etc/libvirt || exit 90
    mkdir -p /run/libvirt 2>/dev/null
    mount --bind "$1/run" /run/libvirt || exit 91
    exec env -i PATH="$1/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        LIBVIRT_DRIVER_DIR="$1/drv" HOME="$1" \
        libvirtd --config "$1/libvirtd.conf" --pid-file "$1/libvirtd.pid"
' sh "$T" > "$T/libvirtd.out" 2>&1 &
LIBVIRTD_PID=$!   # exec chain: unshare -> sh -> env -> libvirtd keep this PID

URI="storage:///system?socket=$T/libvirt-sock"
V() { timeout 30 virsh -q -c "$URI" "$@"; }
up=0
for _ in $(seq 300); do   # up to ~30 s
    kill -0 "$LIBVIRTD_PID" 2>/dev/null || break
    if [ -S "$T/libvirt-sock" ] && timeout 5 virsh -q -c "$URI" pool-list --all >/dev/null 2>&1; then
        up=1; break
    fi
    sleep 0.1
done
if [ $up = 0 ]; then
    reason=$(tr '\n' ' ' < "$T/libvirtd.out" | cut -c1-200)
    skip "libvirtd could not start here: ${reason:-timeout}"
fi

PASS=0; FAIL=0
ok()   { PASS=$((PASS+1)); echo "ok   - $*"; }
bad()  { FAIL=$((FAIL+1)); echo "FAIL - $*"; }
# run DESC CMD...: pass if exit 0, show output on failure
run() {
    local d=$1; shift
    local out
    if out=$("$@" 2>&1); then ok "$d"; return 0; fi
    bad "$d: $out"; return 1
}
P=$T/pool

run "pool-define-as/start" V pool-define-as vp dir --target "$P" &&
run "pool-start" V pool-start vp || { echo "cannot set up pool"; echo "$PASS passed, $FAIL failed"; exit 1; }

# --- operations -----------------------------------------------------------
run "vol-create-as raw 32M"   V vol-create-as vp base.raw 32M --format raw
run "vol-create-as qcow2 32M" V vol-create-as vp base.qcow2 32M --format qcow2
run "vol-create-as qcow2 on qcow2 base" V vol-create-as vp ov-q2 32M --format qcow2 \
    --backing-vol base.qcow2 --backing-vol-format qcow2
run "vol-create-as qcow2 on raw base"   V vol-create-as vp ov-raw 32M --format qcow2 \
    --backing-vol base.raw --backing-vol-format raw
run "vol-create-as qcow2 --prealloc-metadata" V vol-create-as vp pmeta 64M \
    --allocation 16M --format qcow2 --prealloc-metadata
run "pool-refresh" V pool-refresh vp
run "vol-clone qcow2 overlay (flattens)" V vol-clone --pool vp ov-q2 clone-q2
run "vol-create-as qcow2 for resize" V vol-create-as vp rs.qcow2 32M --format qcow2
run "vol-resize qcow2 32M -> 48M" V vol-resize --pool vp rs.qcow2 48M
run "pool-refresh (final)" V pool-refresh vp

# --- libvirt's own view after refresh ------------------------------------
# xcheck VOL XPATH EXPECTED
xval() {
    V vol-dumpxml --pool vp "$1" 2>/dev/null | python3 -c '
import sys, xml.etree.ElementTree as E
r = E.fromstring(sys.stdin.read()); n = r.find(sys.argv[1])
print("" if n is None else (n.text if n.text is not None else n.attrib.get(sys.argv[2], "")))' "$2" "${3:-}"
}
xcheck() {
    local got; got=$(xval "$1" "$2" "${4:-}")
    if [ "$got" = "$3" ]; then ok "vol-dumpxml $1 $2${4:+@$4} = $3"
    else bad "vol-dumpxml $1 $2${4:+@$4}: expected '$3', got '$got'"; fi
}
xcheck ov-q2  ./target/format           qcow2 type
xcheck ov-q2  ./backingStore/path       "$P/base.qcow2"
xcheck ov-q2  ./backingStore/format     qcow2 type
xcheck ov-raw ./backingStore/path       "$P/base.raw"
xcheck ov-raw ./backingStore/format     raw type
xcheck ov-q2  ./capacity                33554432
xcheck pmeta  ./capacity                67108864
xcheck clone-q2 ./target/format         qcow2 type
xcheck clone-q2 ./backingStore/path     ""
xcheck rs.qcow2 ./capacity              50331648

# --- the real qemu-img's view --------------------------------------------
# icheck FILE FORMAT VSIZE BACKING BACKING_FMT
icheck() {
    local f=$P/$1 js got
    if ! js=$("$QEMU_IMG" info --output=json "$f" 2>&1); then
        bad "qemu-img info $1: $js"; return
    fi
    got=$(printf '%s' "$js" | python3 -c '
import sys, json; j = json.load(sys.stdin)
print(j.get("format"), j.get("virtual-size"), j.get("backing-filename", ""), j.get("backing-filename-format", ""), sep="|")')
    if [ "$got" = "$2|$3|${4:-}|${5:-}" ]; then ok "qemu-img info $1: $got"
    else bad "qemu-img info $1: expected '$2|$3|${4:-}|${5:-}', got '$got'"; fi
    if [ "$2" = qcow2 ]; then
        local c
        if c=$("$QEMU_IMG" check "$f" 2>&1) && printf '%s' "$c" | grep -q "No errors were found"; then
            ok "qemu-img check $1 clean"
        else bad "qemu-img check $1: $c"; fi
    fi
}
icheck base.raw   raw   33554432
icheck base.qcow2 qcow2 33554432
icheck ov-q2      qcow2 33554432 "$P/base.qcow2" qcow2
icheck ov-raw     qcow2 33554432 "$P/base.raw"   raw
icheck pmeta      qcow2 67108864
icheck clone-q2   qcow2 33554432
icheck rs.qcow2   qcow2 50331648
# metadata preallocation: L2 tables are allocated (disk usage well above empty)
pm=$("$QEMU_IMG" map --output=json "$P/pmeta" 2>/dev/null | python3 -c '
import sys, json; print(sum(e["length"] for e in json.load(sys.stdin) if e.get("offset") is not None))' 2>/dev/null)
if [ "${pm:-0}" -eq 67108864 ]; then ok "pmeta: all 64M mapped (preallocation=metadata)"
else bad "pmeta: expected 67108864 bytes mapped to offsets, got '${pm:-?}'"; fi

# the flattened clone has the same guest-visible content as its source
run "qemu-img compare ov-q2 clone-q2" "$QEMU_IMG" compare -f qcow2 -F qcow2 "$P/ov-q2" "$P/clone-q2"

# --- vimg really was the tool ----------------------------------------------
lcheck() {
    if grep -qxF -- "$1" "$LOG"; then ok "argv log: $1"
    else bad "argv log lacks '$1'; log: $(tr '\n' ';' < "$LOG")"; fi
}
lcheck "create -f qcow2 -o compat=0.10 $P/base.qcow2 32768K"
lcheck "create -f qcow2 -b $P/base.qcow2 -o backing_fmt=qcow2,compat=0.10 $P/ov-q2 32768K"
lcheck "create -f qcow2 -b $P/base.raw -o backing_fmt=raw,compat=0.10 $P/ov-raw 32768K"
lcheck "create -f qcow2 -o preallocation=metadata,compat=0.10 $P/pmeta 65536K"
lcheck "convert -f qcow2 -O qcow2 -o compat=0.10,cluster_size=65536 $P/ov-q2 $P/clone-q2"
lcheck "resize $P/rs.qcow2 50331648"
n=$(wc -l < "$LOG")
if [ "$n" -eq 7 ]; then ok "argv log has exactly 7 tool runs"
else bad "argv log has $n tool runs, expected 7: $(tr '\n' ';' < "$LOG")"; fi

kill -0 "$LIBVIRTD_PID" 2>/dev/null && ok "libvirtd still running" || bad "libvirtd died"
if [ "$FAIL" -ne 0 ]; then
    echo "--- libvirtd errors (log level 3) ---"; tail -n 20 "$T/libvirtd.log" 2>/dev/null
    echo "--- tool argv log ---"; cat "$LOG"
fi
echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]
