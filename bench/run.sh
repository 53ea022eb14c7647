#!/usr/bin/env bash
# vimg vs qemu-img, side by side, on the same workloads.
#
# usage: bench/run.sh PATH_TO_VIMG [-k PATTERN] [-n REPEATS] [-w WARMUPS] [-m] [-l] [-N]
#   -k PATTERN  only workloads whose name matches PATTERN (bash ERE; a plain
#               word works as a substring, e.g. -k qcow2, -k 'map|measure');
#               without -k the MATRIX rows run, with -k all rows are matched
#   -n REPEATS  timed runs per tool and workload (default 3; the median is shown)
#   -w WARMUPS  untimed runs per tool before those (default 1)
#   -m          print the result table as Markdown (for docs/performance.md)
#   -l          list the workloads and exit
#   -N          do not measure the machine's ceilings
#
# environment:
#   VIMG_BENCH_TMP          scratch base dir (default /tmp/vimg-bench); a private
#                           subdirectory is made there and removed at the end
#   VIMG_BENCH_SCALE        size factor of the generated inputs (default 1: the
#                           8 GiB / 2 GiB images; 0.0625 for a quick try); the
#                           1 TiB sparse image stays 1 TiB with 64 MiB of data
#   VIMG_BENCH_SEED         generator seed (default 1)
#   VIMG_BENCH_INPUTS       dir where generated inputs are kept across runs
#                           (in a subdir per seed+scale+generator version);
#                           default: made in the scratch dir and removed
#   QEMU_IMG, QEMU_IO       reference tools (default /usr/bin/qemu-img, qemu-io)
#   VIMG_BENCH_TIMEOUT      seconds before one run counts as failed (default 600)
#   VIMG_BENCH_DROP_CACHES  1: sync and drop the page cache before every timed
#                           run (cold cache; needs root).  Default: warm cache,
#                           i.e. the input is in the page cache for both tools.
#
# Method: vimg is copied into the scratch dir first (a rebuild during the run
# cannot swap it).  MATRIX rows read inputs made by bench/gen.py (seeded, the
# same bytes for the same seed and scale; made once per run, or once per
# VIMG_BENCH_INPUTS cache); EXTRA rows make their input fresh in their own
# scratch directory.  Each tool runs untimed first (warm-up), then the tools
# run in turns, the order rotating every round (MATRIX rows have three:
# qemu-img with its default command line, qemu-img with `-m 16 -W` added,
# and vimg with the default command line; EXTRA rows have qemu-img and vimg)
# so none always goes first.  Before every run the previous output is
# removed and `sync` is run, so all start from the same page cache state
# (input cached, no dirty data).  Wall time is taken with bash's
# $EPOCHREALTIME around the run; it includes the fork/exec cost of the
# timeout and time wrappers, printed in the header as "harness" (tens of ms
# on a small VM: mind it when reading the sub-second rows).  Peak RSS is GNU
# time's %M, the max over the runs.  The load average is printed at start
# and end: on a busy machine the times mean little.  Per-run times go to
# stderr.
# Correctness: MATRIX rows compare every tool's output of the last round
# with the source (`qemu-img compare`, must say identical) and run
# `qemu-img check` on qcow2 outputs (must be clean); EXTRA convert rows
# compare the two outputs with each other; the other EXTRA rows need equal
# stdout and exit status.  A row is FAIL when vimg or the default qemu-img
# fails a check (a failing `-m 16 -W` run is only noted).  The "alloc" column
# is the output's allocated MiB (stat blocks) of qemu-img / vimg; the check
# column says ALLOC>QEMU when vimg's is larger (not a failure).
# The script exits 1 if any row FAILed.

# shellcheck disable=SC2317  # the mk_* functions are called through the table
set -euo pipefail
export LC_ALL=C

# ---------------------------------------------------------------------------
# MATRIX (the default set; the copy-engine matrix): name | input | command | check
#   input:   an input of bench/gen.py (`bench/gen.py names`; sizes in its
#            docstring and in the run's header); @SRC@ is its path
#   command: the tool's arguments; @SRC@ @OUT@ are substituted.  The second
#            qemu-img run gets `-m 16 -W` right after `convert`
#   check:   source:SRCFMT:OUTFMT  each output must be identical to the
#            source (qemu-img compare -f SRCFMT -F OUTFMT @SRC@ output), and
#            `qemu-img check` must find a qcow2 output clean
# Every matrix command is qemu-img's plain command line: what a user types,
# so qemu-img runs with its defaults (cache=unsafe target, -m 8, in order).
# ---------------------------------------------------------------------------
MATRIX=(
    "scat-raw-to-qcow2         | scat.raw         | convert -f raw -O qcow2 @SRC@ @OUT@ | source:raw:qcow2"
    "scat-qcow2-to-raw         | scat.qcow2       | convert -f qcow2 -O raw @SRC@ @OUT@ | source:qcow2:raw"
    "scat-raw-to-qcow2-c-zlib  | scat.raw         | convert -c -f raw -O qcow2 @SRC@ @OUT@ | source:raw:qcow2"
    "scat-raw-to-qcow2-c-zstd  | scat.raw         | convert -c -o compression_type=zstd -f raw -O qcow2 @SRC@ @OUT@ | source:raw:qcow2"
    "scat-raw-to-vmdk-stream   | scat.raw         | convert -f raw -O vmdk -o subformat=streamOptimized @SRC@ @OUT@ | source:raw:vmdk"
    "scat-vmdk-stream-to-raw   | scat-stream.vmdk | convert -f vmdk -O raw @SRC@ @OUT@ | source:vmdk:raw"
    "scat-vmdk-sparse-to-raw   | scat-sparse.vmdk | convert -f vmdk -O raw @SRC@ @OUT@ | source:vmdk:raw"
    "scat-qcow2-to-qcow2       | scat.qcow2       | convert -f qcow2 -O qcow2 @SRC@ @OUT@ | source:qcow2:qcow2"
    "chain3-qcow2-to-raw       | chain-top.qcow2  | convert -f qcow2 -O raw @SRC@ @OUT@ | source:qcow2:raw"
    "sparse1T-raw-to-qcow2     | sparse1t.raw     | convert -f raw -O qcow2 @SRC@ @OUT@ | source:raw:qcow2"
    "sparse1T-raw-to-raw       | sparse1t.raw     | convert -f raw -O raw @SRC@ @OUT@ | source:raw:raw"
    "dense2G-raw-to-raw        | dense.raw        | convert -f raw -O raw @SRC@ @OUT@ | source:raw:raw"
)

# ---------------------------------------------------------------------------
# EXTRA (the older rows; run them with -k): name | setup | command | check
#   setup:   a mk_* function below plus its arguments (input format, size);
#            it creates $W/src (and $W/src2) in the workload's scratch dir
#   command: the tool's arguments; @SRC@ @SRC2@ @OUT@ are substituted
#   check:   compare:FMT  outputs must be identical (qemu-img compare -f/-F FMT)
#            stdout       stdout and exit status of both tools must be equal
# To add a format, add rows with that input format in the setup, e.g.
#   "convert-qcow2-1G-dense | mk_dense qcow2 1G | convert -f qcow2 -O raw @SRC@ @OUT@ | compare:raw"
# (the mk_* helpers build the data as raw and convert it with the reference
# qemu-img when the format is not raw).
# Note: qemu-img convert's default target cache mode is "unsafe" (it never
# flushes the output) and so is vimg's for a new target; the -t writeback
# rows (both flush) and -t unsafe rows (neither does) compare the copy
# engines at an explicit, equal durability.
# ---------------------------------------------------------------------------
EXTRA=(
    "convert-raw-1T-sparse        | mk_sparse raw 1T     | convert -f raw -O raw @SRC@ @OUT@    | compare:raw"
    "map-raw-1T-sparse            | mk_sparse raw 1T     | map -f raw --output=json @SRC@       | stdout"
    "measure-raw-1T-sparse        | mk_sparse raw 1T     | measure -f raw -O raw @SRC@          | stdout"
    "convert-raw-1G-dense         | mk_dense raw 1G      | convert -f raw -O raw @SRC@ @OUT@    | compare:raw"
    "convert-raw-1G-dense-t-writeback | mk_dense raw 1G  | convert -t writeback -f raw -O raw @SRC@ @OUT@ | compare:raw"
    "convert-raw-1G-dense-t-unsafe | mk_dense raw 1G     | convert -t unsafe -f raw -O raw @SRC@ @OUT@ | compare:raw"
    "convert-raw-1G-zeros-written | mk_zeros raw 1G      | convert -f raw -O raw @SRC@ @OUT@    | compare:raw"
    "convert-raw-1G-mixed         | mk_mixed raw 1G      | convert -f raw -O raw @SRC@ @OUT@    | compare:raw"
    "compare-raw-1G-dense         | mk_dense_pair raw 1G | compare -f raw -F raw @SRC@ @SRC2@   | stdout"
    "convert-raw-1G-dense-C       | mk_dense raw 1G      | convert -C -f raw -O raw @SRC@ @OUT@ | compare:raw"
    "convert-raw-to-qcow2-1G-dense | mk_dense raw 1G     | convert -f raw -O qcow2 @SRC@ @OUT@  | compare:qcow2"
    "convert-qcow2-to-raw-1G-dense | mk_dense qcow2 1G   | convert -f qcow2 -O raw @SRC@ @OUT@  | compare:raw"
    "convert-qcow2-to-raw-1T-sparse | mk_sparse qcow2 1T | convert -f qcow2 -O raw @SRC@ @OUT@  | compare:raw"
    "convert-raw-to-qcow2-c-256M-text | mk_text raw 256M | convert -c -f raw -O qcow2 @SRC@ @OUT@ | compare:qcow2"
    "convert-qcow2c-to-raw-256M-text | mk_text qcow2c 256M | convert -f qcow2 -O raw @SRC@ @OUT@ | compare:raw"
)
# Rows whose -f/-O formats vimg does not have yet (`vimg --features` prints
# formats=...) are skipped and listed as such.

# ---------------------------------------------------------------------------
# Input makers.  $W is the workload's scratch dir; all write $W/src.
# ---------------------------------------------------------------------------
bytes() { numfmt --from=iec "$1"; }

# Raw data in $W/src.raw -> $W/src in format $1 (made by the reference tool,
# so both tools read the very same file).
finish_src() {
    local fmt=$1 name=${2:-src}
    if [[ $fmt == raw ]]; then
        mv "$W/$name.raw" "$W/$name"
    elif [[ $fmt == qcow2c ]]; then
        # a compressed qcow2 source
        "$QEMU_IMG" convert -c -f raw -O qcow2 "$W/$name.raw" "$W/$name"
        rm -f "$W/$name.raw"
    else
        "$QEMU_IMG" convert -f raw -O "$fmt" "$W/$name.raw" "$W/$name"
        rm -f "$W/$name.raw"
    fi
    sync
}

qio() { "$QEMU_IO" -f raw "$@" >/dev/null; }

# ~8 MiB of data in three places of a sparse image (start, middle, end).
mk_sparse() {
    local size
    size=$(bytes "$2")
    truncate -s "$size" "$W/src.raw"
    qio -c "write -P 1 0 4M" \
        -c "write -P 2 $((size / 2)) 2M" \
        -c "write -P 3 $((size - 2 * 1048576)) 2M" "$W/src.raw"
    finish_src "$1"
}

# Non-zero data everywhere, written in 64 MiB requests.
mk_dense_raw() {
    local out=$1 size=$2 off=0 args=() chunk=$((64 * 1048576)) n
    truncate -s "$size" "$out"
    while ((off < size)); do
        n=$((size - off < chunk ? size - off : chunk))
        args+=(-c "write -P 0x5a $off $n")
        off=$((off + n))
    done
    qio "${args[@]}" "$out"
}

mk_dense() {
    mk_dense_raw "$W/src.raw" "$(bytes "$2")"
    finish_src "$1"
}

mk_dense_pair() {
    local size
    size=$(bytes "$2")
    mk_dense_raw "$W/src.raw" "$size"
    mk_dense_raw "$W/src2.raw" "$size"
    finish_src "$1" src
    finish_src "$1" src2
}

# Fully allocated zeros (written, not fallocated: every block is real data).
mk_zeros() {
    local size
    size=$(bytes "$2")
    dd if=/dev/zero of="$W/src.raw" bs=1M count=$((size / 1048576)) conv=fsync status=none
    finish_src "$1"
}

# Text that compresses to about 3/4 (base64 of random bytes): work for the
# compressor that is neither trivial nor hopeless.
mk_text() {
    local size
    size=$(bytes "$2")
    head -c $((size / 4 * 3)) /dev/urandom | base64 -w 0 >"$W/src.raw"
    truncate -s "$size" "$W/src.raw"
    finish_src "$1"
}

# Alternating 1 MiB data / 1 MiB hole.
mk_mixed() {
    local size off=0 args=() mib=1048576
    size=$(bytes "$2")
    truncate -s "$size" "$W/src.raw"
    while ((off < size)); do
        args+=(-c "write -P 0x5a $off $mib")
        off=$((off + 2 * mib))
    done
    qio "${args[@]}" "$W/src.raw"
    finish_src "$1"
}

# ---------------------------------------------------------------------------
usage() {
    sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

die() { echo "bench: $*" >&2; exit 2; }

VIMG="" PATTERN="" REPEATS=3 WARMUPS=1 MARKDOWN=0 LIST=0 CEILINGS=1
while (($#)); do
    case $1 in
    -k) (($# >= 2)) || usage; PATTERN=$2; shift 2 ;;
    -n) (($# >= 2)) || usage; REPEATS=$2; shift 2 ;;
    -w) (($# >= 2)) || usage; WARMUPS=$2; shift 2 ;;
    -m) MARKDOWN=1; shift ;;
    -l) LIST=1; shift ;;
    -N) CEILINGS=0; shift ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [[ -z $VIMG ]] || usage; VIMG=$1; shift ;;
    esac
done

trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

if ((LIST)); then
    for row in "${MATRIX[@]}"; do
        IFS='|' read -r name _ <<<"$row"
        printf '%-34s matrix (default)\n' "$(trim "$name")"
    done
    for row in "${EXTRA[@]}"; do
        IFS='|' read -r name _ <<<"$row"
        printf '%-34s extra (-k)\n' "$(trim "$name")"
    done
    exit 0
fi

[[ -n $VIMG ]] || usage
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || die "-n wants a positive integer, not '$REPEATS'"
[[ $WARMUPS =~ ^[0-9]+$ ]] || die "-w wants a number, not '$WARMUPS'"
[[ -x $VIMG ]] || die "$VIMG: not an executable"
case $VIMG in /*) ;; *) VIMG=$PWD/$VIMG ;; esac
QEMU_IMG=${QEMU_IMG:-/usr/bin/qemu-img}
QEMU_IO=${QEMU_IO:-$(command -v qemu-io || true)}
[[ -x $QEMU_IMG ]] || die "qemu-img not found at $QEMU_IMG"
[[ -n $QEMU_IO && -x $QEMU_IO ]] || die "qemu-io not found (package qemu-utils)"
TIMEOUT=${VIMG_BENCH_TIMEOUT:-600}
BASE=${VIMG_BENCH_TMP:-/tmp/vimg-bench}
GEN=$(cd "$(dirname "$0")" && pwd)/gen.py
SCALE=${VIMG_BENCH_SCALE:-1}
SEED=${VIMG_BENCH_SEED:-1}
[[ $SEED =~ ^[0-9]+$ ]] || die "VIMG_BENCH_SEED wants a number, not '$SEED'"
command -v python3 >/dev/null || die "python3 not found (bench/gen.py makes the inputs)"
gen() { python3 "$GEN" --seed "$SEED" --scale "$SCALE" "$@"; }
GEN_KEY=$(gen key) || die "VIMG_BENCH_SCALE wants a number in (0, 16], not '$SCALE'"

GNU_TIME=""
if [[ -x /usr/bin/time ]] && /usr/bin/time -f %M -o /dev/null true 2>/dev/null; then
    GNU_TIME=/usr/bin/time
else
    echo "bench: GNU time (/usr/bin/time) not found: peak RSS shown as '-'" >&2
fi

DROP=0
if [[ ${VIMG_BENCH_DROP_CACHES:-0} == 1 ]]; then
    if [[ -w /proc/sys/vm/drop_caches ]]; then
        DROP=1
    else
        echo "bench: cannot write /proc/sys/vm/drop_caches: running with a warm cache" >&2
    fi
fi

# The rows to run: the matrix by default, any row matching -k PATTERN.
SELECTED=()
if [[ -z $PATTERN ]]; then
    SELECTED=("${MATRIX[@]}")
else
    for row in "${MATRIX[@]}" "${EXTRA[@]}"; do
        IFS='|' read -r name _ <<<"$row"
        if [[ $(trim "$name") =~ $PATTERN ]]; then
            SELECTED+=("$row")
        fi
    done
fi
((${#SELECTED[@]})) || die "no workload matches '$PATTERN' (see -l)"
is_matrix() { [[ $1 == source:* ]]; }

MADE_BASE=0
[[ -d $BASE ]] || MADE_BASE=1
mkdir -p "$BASE"
SCRATCH=$(mktemp -d "$BASE/run.XXXXXX")
if [[ -n ${VIMG_BENCH_INPUTS:-} ]]; then
    INPUTS=$VIMG_BENCH_INPUTS/$GEN_KEY
else
    INPUTS=$SCRATCH/inputs
fi
CHILD=""
cleanup() {
    # timeout(1) leads its own process group: end it and the tool under it
    [[ -z $CHILD ]] || kill -TERM -- "-$CHILD" 2>/dev/null || true
    [[ -z $CHILD ]] || wait "$CHILD" 2>/dev/null || true
    rm -rf "$SCRATCH"
    ((MADE_BASE == 0)) || rmdir "$BASE" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_us() { local t=$EPOCHREALTIME; echo "${t//[.,]/}"; }

# Run one tool once.  Sets RUN_US, RUN_RSS (KiB or '-'), RUN_RC; stdout and
# stderr go to $W/stdout.$label and $W/stderr.$label.
run_once() {
    local label=$1 bin=$2 t0 t1
    shift 2
    if ((DROP)); then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
    local wrap=(timeout "$TIMEOUT")
    [[ -n $GNU_TIME ]] && wrap+=("$GNU_TIME" -f %M -o "$W/rss.$label")
    t0=$(now_us)
    set +e
    # in the background so that a signal to this script is handled at once
    "${wrap[@]}" "$bin" "$@" <&- >"$W/stdout.$label" 2>"$W/stderr.$label" &
    CHILD=$!
    wait "$CHILD"
    RUN_RC=$?
    CHILD=""
    set -e
    t1=$(now_us)
    RUN_US=$((t1 - t0))
    RUN_RSS=-
    # GNU time writes "Command exited with non-zero status N" before %M
    [[ -n $GNU_TIME && -s $W/rss.$label ]] && RUN_RSS=$(tail -n1 "$W/rss.$label")
    [[ $RUN_RSS =~ ^[0-9]+$ ]] || RUN_RSS=-
}

median_us() { # numbers on the command line
    local sorted n
    mapfile -t sorted < <(printf '%s\n' "$@" | sort -n)
    n=${#sorted[@]}
    if ((n % 2)); then
        echo "${sorted[n / 2]}"
    else
        echo $(((sorted[n / 2 - 1] + sorted[n / 2]) / 2))
    fi
}

secs() { awk -v u="$1" 'BEGIN { printf "%.3f", u / 1e6 }'; }
mib() { if [[ $1 == - ]]; then echo -; else awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; fi; }
alloc_bytes() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }
alloc_mib() { awk -v b="$(alloc_bytes "$1")" 'BEGIN { printf "%.1f", b / 1048576 }'; }
# MB/s (1e6 bytes/s) of $1 bytes in $2 microseconds
mbps() { awk -v b="$1" -v u="$2" 'BEGIN { if (u > 0) printf "%.0f", b / u; else print "-" }'; }

# Bench a private copy of vimg, so that a rebuild during the run (other
# people work in the same tree) cannot swap the binary under us.
VIMG_ORIG=$VIMG
VIMG_SUM=$(sha256sum "$VIMG" | cut -c1-12)
cp "$VIMG" "$SCRATCH/vimg"
if "$SCRATCH/vimg" --version >/dev/null 2>&1; then
    VIMG=$SCRATCH/vimg
fi

# Cost of the wrappers alone, and page the binaries and libraries in.
W=$SCRATCH
"$QEMU_IMG" --version >/dev/null
"$VIMG" --version >/dev/null
h=()
for _ in 1 2 3 4 5; do run_once harness true; h+=("$RUN_US"); done
HARNESS_US=$(median_us "${h[@]}")

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, scratch $BASE" \
     "($(findmnt -n -o FSTYPE -T "$BASE" 2>/dev/null || stat -f -c %T "$BASE")), median of $REPEATS after $WARMUPS warm-up, $( ((DROP)) && echo cold || echo warm) cache," \
     "harness $(secs "$HARNESS_US") s/run"
read -r LOAD1 _ </proc/loadavg
echo "# load average $LOAD1 at start$(awk -v l="$LOAD1" -v n="$(nproc)" \
    'BEGIN { if (l > n / 2) printf " (BUSY MACHINE: times are unreliable)" }')"
echo "# qemu-img: $("$QEMU_IMG" --version | head -n1)"
echo "# vimg:     $VIMG_ORIG ($("$VIMG" --version | head -n1), sha256 $VIMG_SUM...)"
need_inputs=0
for row in "${SELECTED[@]}"; do
    IFS='|' read -r _ _ _ check <<<"$row"
    ! is_matrix "$(trim "$check")" || need_inputs=1
done
if ((need_inputs)); then
    echo "# inputs:   bench/gen.py seed $SEED, scale $SCALE, in $INPUTS${VIMG_BENCH_INPUTS:+ (kept)}"
    gen describe | sed 's/^/#   /'
    # the inputs, at most all of them, and three outputs of the largest
    avail=$(df -P -B1 "$BASE" | awk 'NR == 2 { print $4 }')
    want=$(awk -v s="$SCALE" 'BEGIN { printf "%.0f", s * 24 * 2^30 }')
    ((avail >= want)) || echo "bench: only $((avail >> 20)) MiB free under $BASE, a full matrix at scale $SCALE may want $((want >> 20)) MiB" >&2
fi

# ---------------------------------------------------------------------------
# Machine ceilings: what the hardware gives at best, measured now, so the
# rows can be read against them.  MB/s = 1e6 bytes/s.
# ---------------------------------------------------------------------------
ceiling_dd() { # label bytes dd-args...
    local label=$1 nbytes=$2 t0 t1
    shift 2
    t0=$(now_us)
    dd "$@" status=none
    t1=$(now_us)
    echo "# ceiling: $label: $(mbps "$nbytes" $((t1 - t0))) MB/s"
}
if ((CEILINGS)); then
    ceiling_dd "zero-fill copy (dd if=/dev/zero of=/dev/null bs=1M count=4096)" \
        $((4096 << 20)) if=/dev/zero of=/dev/null bs=1M count=4096
    # as much as the largest matrix output, at least 256 MiB
    pcw=$(awk -v s="$SCALE" 'BEGIN { n = int(2048 * s); print (n < 256 ? 256 : n) }')
    sync
    ceiling_dd "page-cache write (dd bs=1M count=$pcw to a new file in the scratch dir, no sync)" \
        $((pcw << 20)) if=/dev/zero of="$SCRATCH/pcw" bs=1M count="$pcw"
    rm -f "$SCRATCH/pcw"
    sync
    gen ceilings | sed 's/^/# ceiling: /'
    if command -v zstd >/dev/null; then
        for kind in text random; do
            gen sample "$kind" "$SCRATCH/sample.$kind"
            for lvl in 1 3; do
                # zstd -b: single thread, 64 KiB blocks compressed independently
                zstd -q -b"$lvl" -B64KiB -i1 "$SCRATCH/sample.$kind" 2>&1 | tr '\r' '\n' |
                    awk -v k="$kind" -v l="$lvl" '$1 == "-" l && $3 ~ /^\(/ {
                        printf "# ceiling: zstd level %s%s, %s (32 MiB, 64 KiB blocks, x%s): compress %.0f MB/s, decompress %.0f MB/s per core\n",
                            l, (l == 3 ? " (the library default)" : ""), k, substr($3, 2, length($3) - 2), $4, $6 }'
            done
            rm -f "$SCRATCH/sample.$kind"
        done
    else
        echo "# ceiling: zstd: skipped (no zstd CLI and python has no zstd module)"
    fi
fi

COLS=(workload "qemu-img s" "-m16 -W s" "vimg s" "best q/vimg" "qemu RSS MiB" "vimg RSS MiB" "alloc q/v MiB" "check")
ROWS=()
FAILED=0
print_header() {
    if ((MARKDOWN)); then
        local IFS='|'
        echo "|${COLS[*]}|"
        echo "|---|--:|--:|--:|--:|--:|--:|--:|---|"
    else
        printf '%-26s %10s %10s %10s %11s %12s %12s %15s  %s\n' "${COLS[@]}"
    fi
}
print_row() {
    if ((MARKDOWN)); then
        local IFS='|'
        echo "|$*|"
    else
        printf '%-26s %10s %10s %10s %11s %12s %12s %15s  %s\n' "$@"
    fi
}

# the formats a row needs: its -f/-O arguments and its check's formats
row_formats() { # command check
    grep -oE -- '-[fO] [a-z0-9]+' <<<"$1" | cut -d' ' -f2
    case $2 in
    compare:*) echo "${2#compare:}" ;;
    source:*) tr ':' '\n' <<<"${2#source:}" ;;
    esac
}

# Check a matrix row's output $1 (format $2) against the source $3 (format
# $4).  Prints nothing when good, else what is wrong.
check_output() {
    local out=$1 ofmt=$2 src=$3 sfmt=$4 msg rc
    set +e
    msg=$("$QEMU_IMG" compare -f "$sfmt" -F "$ofmt" "$src" "$out" 2>&1)
    rc=$?
    set -e
    if ((rc != 0)) || [[ $msg != "Images are identical." ]]; then
        echo "differs from the source: ${msg//$'\n'/ }" | cut -c1-200
        return
    fi
    if [[ $ofmt == qcow2 ]]; then
        set +e
        msg=$("$QEMU_IMG" check -f qcow2 "$out" 2>&1)
        rc=$?
        set -e
        ((rc == 0)) || echo "qemu-img check exit $rc: $(grep -m1 -iE 'error|leak' <<<"$msg" || true)" | cut -c1-200
    fi
    return 0
}

VIMG_FORMATS=$("$VIMG" --features 2>/dev/null | sed -n 's/^formats=//p')
ran=0
for row in "${SELECTED[@]}"; do
    IFS='|' read -r name setup cmd check <<<"$row"
    name=$(trim "$name") setup=$(trim "$setup") cmd=$(trim "$cmd") check=$(trim "$check")
    missing=""
    for f in $(row_formats "$cmd" "$check"); do
        [[ $f == raw || ",$VIMG_FORMATS," == *",$f,"* ]] || missing=$f
    done
    if [[ -n $missing ]]; then
        echo "bench: $name: skipped (vimg has no $missing yet)" >&2
        ROWS+=("$name|-|-|-|-|-|-|-|skipped: vimg has no $missing yet")
        continue
    fi
    ran=$((ran + 1))
    W=$SCRATCH/$name
    mkdir -p "$W"
    if is_matrix "$check"; then
        TOOLS=(qemu-img qemu-W vimg)
        BINS=("$QEMU_IMG" "$QEMU_IMG" "$VIMG")
        if [[ ! -e $INPUTS/$setup ]]; then
            echo "bench: $name: generating $setup in $INPUTS" >&2
        fi
        SRC=$(gen --dir "$INPUTS" --qemu-img "$QEMU_IMG" --qemu-io "$QEMU_IO" make "$setup")
        sync
    else
        TOOLS=(qemu-img vimg)
        BINS=("$QEMU_IMG" "$VIMG")
        echo "bench: $name: setting up ($setup)" >&2
        read -ra setup_argv <<<"$setup"
        "${setup_argv[@]}"
        SRC=$W/src
    fi
    ntools=${#TOOLS[@]}

    declare -A times=() rss=() rc=() toolfail=()
    status="" fail=""
    # rounds -WARMUPS..-1 are untimed warm-ups; the order rotates so that
    # round 0 starts with qemu-img and no tool always goes first
    for ((r = -WARMUPS; r < REPEATS; r++)); do
        shift_=$(((r % ntools + ntools) % ntools))
        order=()
        for ((i = 0; i < ntools; i++)); do order+=($(((i + shift_) % ntools))); done
        for t in "${order[@]}"; do
            tool=${TOOLS[t]}
            [[ -z ${toolfail[$tool]:-} ]] || continue
            out=$W/out.$tool
            rm -f "$out"
            sync
            read -ra argv <<<"$cmd"
            for i in "${!argv[@]}"; do
                a=${argv[i]}
                a=${a//@SRC@/$SRC}
                a=${a//@SRC2@/$W/src2}
                argv[i]=${a//@OUT@/$out}
            done
            # qemu-img's tuned variant: 16 coroutines, out-of-order writes
            [[ $tool != qemu-W ]] || argv=("${argv[0]}" -m 16 -W "${argv[@]:1}")
            run_once "$tool" "${BINS[t]}" "${argv[@]}"
            rc[$tool]=$RUN_RC
            if [[ $RUN_RSS != - ]] &&
                [[ ${rss[$tool]:--} == - || $RUN_RSS -gt ${rss[$tool]} ]]; then
                rss[$tool]=$RUN_RSS
            fi
            msg=""
            if ((RUN_RC == 124)); then
                msg="$tool timed out after ${TIMEOUT}s"
            elif [[ $check != stdout ]] && ((RUN_RC != 0)); then
                msg="$tool exit $RUN_RC: $(head -n1 "$W/stderr.$tool" | cut -c1-200 || true)"
            fi
            if [[ -n $msg ]]; then
                # the tuned qemu-img is a reference point, not the subject
                if [[ $tool == qemu-W ]]; then
                    toolfail[$tool]=$msg
                    rm -f "$out"
                    continue
                fi
                fail=$msg
                break 2
            fi
            ((r < 0)) || times[$tool]+=" $RUN_US"
            # keep the outputs only from the last round, for the check
            ((r == REPEATS - 1)) || rm -f "$out"
        done
    done

    alloc="-" notes=()
    if [[ -z $fail ]]; then
        case $check in
        source:*)
            IFS=: read -r _ sfmt ofmt <<<"$check"
            for tool in "${TOOLS[@]}"; do
                [[ -z ${toolfail[$tool]:-} ]] || continue
                msg=$(check_output "$W/out.$tool" "$ofmt" "$SRC" "$sfmt")
                [[ -z $msg ]] || {
                    if [[ $tool == qemu-W ]]; then
                        toolfail[$tool]="output $msg"
                    else
                        fail="$tool output $msg"
                        break
                    fi
                }
            done
            status="identical to source"
            [[ $ofmt != qcow2 ]] || status+=", check clean"
            ;;
        compare:*)
            fmt=${check#compare:}
            set +e
            msg=$("$QEMU_IMG" compare -f "$fmt" -F "$fmt" "$W/out.qemu-img" "$W/out.vimg" 2>&1)
            crc=$?
            set -e
            if ((crc != 0)) || [[ $msg != "Images are identical." ]]; then
                fail="outputs differ: ${msg//$'\n'/ }"
            else
                status="identical"
            fi
            ;;
        stdout)
            if [[ ${rc[qemu-img]} != "${rc[vimg]}" ]]; then
                fail="exit status ${rc[qemu-img]} vs ${rc[vimg]}: $(head -n1 "$W/stderr.vimg" | cut -c1-200 || true)"
            elif ! cmp -s "$W/stdout.qemu-img" "$W/stdout.vimg"; then
                fail="stdout differs: $(diff "$W/stdout.qemu-img" "$W/stdout.vimg" | sed -n '2,4p' | tr '\n' ' ' | cut -c1-200 || true)"
            else
                status="same output (exit ${rc[vimg]})"
            fi
            ;;
        *) die "$name: unknown check '$check'" ;;
        esac
        if [[ -z $fail && $check != stdout ]]; then
            # ext4 counts delayed allocation differently before writeback:
            # compare what lands on disk
            sync "$W/out.qemu-img" "$W/out.vimg" 2>/dev/null || sync
            alloc="$(alloc_mib "$W/out.qemu-img")/$(alloc_mib "$W/out.vimg")"
            if (($(alloc_bytes "$W/out.vimg") > $(alloc_bytes "$W/out.qemu-img"))); then
                notes+=("ALLOC>QEMU")
            fi
        fi
    fi
    [[ -z ${toolfail[qemu-W]:-} ]] || notes+=("-m16 -W: ${toolfail[qemu-W]}")

    read -ra tq <<<"${times[qemu-img]:-}"
    read -ra tw <<<"${times[qemu-W]:-}"
    read -ra tv <<<"${times[vimg]:-}"
    if [[ -n $fail ]]; then
        FAILED=1
        for n in "${notes[@]}"; do fail+="; $n"; done
        ROWS+=("$name|FAIL|-|FAIL|-|$(mib "${rss[qemu-img]:--}")|$(mib "${rss[vimg]:--}")|-|FAIL: $fail")
    else
        mq=$(median_us "${tq[@]}")
        mvi=$(median_us "${tv[@]}")
        best=$mq mw="-"
        if ((${#tw[@]})) && [[ -z ${toolfail[qemu-W]:-} ]]; then
            mw=$(median_us "${tw[@]}")
            ((mw >= best)) || best=$mw
            mw=$(secs "$mw")
        elif [[ -n ${toolfail[qemu-W]:-} ]]; then
            mw=err
        fi
        ratio=$(awk -v q="$best" -v v="$mvi" 'BEGIN { if (v > 0) printf "%.2f", q / v; else print "-" }')
        for n in "${notes[@]}"; do status+="; $n"; done
        ROWS+=("$name|$(secs "$mq")|$mw|$(secs "$mvi")|$ratio|$(mib "${rss[qemu-img]}")|$(mib "${rss[vimg]}")|$alloc|$status")
    fi
    runs() { local u out=""; for u in "$@"; do out+=" $(secs "$u")"; done; echo "${out# }"; }
    echo "bench: $name: runs qemu-img [$(runs "${tq[@]}")]$( ((${#tw[@]})) && echo " -m16 -W [$(runs "${tw[@]}")]") vimg [$(runs "${tv[@]}")] s" >&2
    echo "bench: $name: done (${ROWS[-1]})" >&2
    unset times rss rc toolfail
    rm -rf "$W"
done

((ran)) || die "every selected workload was skipped"
read -r LOAD1 _ </proc/loadavg
echo "# load average $LOAD1 at the end"
echo
print_header
for row in "${ROWS[@]}"; do
    IFS='|' read -ra f <<<"$row"
    print_row "${f[@]}"
done
exit "$FAILED"
