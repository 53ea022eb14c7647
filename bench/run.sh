#!/usr/bin/env bash
# vimg vs qemu-img, side by side, on the same freshly made workloads.
#
# usage: bench/run.sh PATH_TO_VIMG [-k PATTERN] [-n REPEATS] [-w WARMUPS] [-m] [-l]
#   -k PATTERN  only workloads whose name matches PATTERN (bash ERE; a plain
#               word works as a substring, e.g. -k dense, -k 'map|measure')
#   -n REPEATS  timed runs per tool and workload (default 3; the median is shown)
#   -w WARMUPS  untimed runs per tool before those (default 1)
#   -m          print the result table as Markdown (for docs/performance.md)
#   -l          list the workloads and exit
#
# environment:
#   VIMG_BENCH_TMP          scratch base dir (default /tmp/vimg-bench); a private
#                           subdirectory is made there and removed at the end
#   QEMU_IMG, QEMU_IO       reference tools (default /usr/bin/qemu-img, qemu-io)
#   VIMG_BENCH_TIMEOUT      seconds before one run counts as failed (default 300)
#   VIMG_BENCH_DROP_CACHES  1: sync and drop the page cache before every timed
#                           run (cold cache; needs root).  Default: warm cache,
#                           i.e. the input is in the page cache for both tools.
#
# Method: vimg is copied into the scratch dir first (a rebuild during the run
# cannot swap it).  Each workload's input is made fresh in its own scratch
# directory; each tool runs once untimed (warm-up), then the tools run
# alternately (qemu-img,vimg / vimg,qemu-img / ...) so neither always goes
# first.  Before every run the previous output is removed and `sync` is run,
# so both tools start from the same page cache state (input cached, no dirty
# data).  Wall time is taken with bash's $EPOCHREALTIME around the run; it
# includes the fork/exec cost of the timeout and time wrappers, printed in
# the header as "harness" (tens of ms on a small VM: mind it when reading
# the sub-second rows).  Peak RSS is GNU time's %M, the max over the runs.
# The load average is printed at start and end: on a busy machine the times
# mean little.  Per-run times go to stderr.
# Correctness: for convert workloads the outputs of the last run of each tool
# are compared with `qemu-img compare` (must say identical, else the row is
# FAIL); for the other workloads stdout and exit status must match.
# The script exits 1 if any row FAILed.

# shellcheck disable=SC2317  # the mk_* functions are called through the table
set -euo pipefail
export LC_ALL=C

# ---------------------------------------------------------------------------
# Workloads: name | setup | command | check
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
# flushes the output) while vimg flushes a new target unless -t unsafe is
# given; the -t writeback rows (both flush) and -t unsafe rows (neither
# does) compare the copy engines at equal durability.
# ---------------------------------------------------------------------------
WORKLOADS=(
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
    sed -n '2,10s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

die() { echo "bench: $*" >&2; exit 2; }

VIMG="" PATTERN="" REPEATS=3 WARMUPS=1 MARKDOWN=0 LIST=0
while (($#)); do
    case $1 in
    -k) (($# >= 2)) || usage; PATTERN=$2; shift 2 ;;
    -n) (($# >= 2)) || usage; REPEATS=$2; shift 2 ;;
    -w) (($# >= 2)) || usage; WARMUPS=$2; shift 2 ;;
    -m) MARKDOWN=1; shift ;;
    -l) LIST=1; shift ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) [[ -z $VIMG ]] || usage; VIMG=$1; shift ;;
    esac
done

trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }

if ((LIST)); then
    for row in "${WORKLOADS[@]}"; do
        IFS='|' read -r name _ <<<"$row"
        trim "$name"; echo
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
TIMEOUT=${VIMG_BENCH_TIMEOUT:-300}
BASE=${VIMG_BENCH_TMP:-/tmp/vimg-bench}

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

MADE_BASE=0
[[ -d $BASE ]] || MADE_BASE=1
mkdir -p "$BASE"
SCRATCH=$(mktemp -d "$BASE/run.XXXXXX")
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
alloc_mib() { awk -v b="$(stat -c %b "$1")" -v s="$(stat -c %B "$1")" \
    'BEGIN { printf "%.1f", b * s / 1048576 }'; }

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

COLS=(workload "qemu-img s" "vimg s" "qemu/vimg" "qemu RSS MiB" "vimg RSS MiB" "check")
ROWS=()
FAILED=0
print_header() {
    if ((MARKDOWN)); then
        local IFS='|'
        echo "|${COLS[*]}|"
        echo "|---|--:|--:|--:|--:|--:|---|"
    else
        printf '%-34s %11s %11s %10s %13s %13s  %s\n' "${COLS[@]}"
    fi
}
print_row() {
    if ((MARKDOWN)); then
        local IFS='|'
        echo "|$*|"
    else
        printf '%-34s %11s %11s %10s %13s %13s  %s\n' "$@"
    fi
}

TOOLS=(qemu-img vimg)
BINS=("$QEMU_IMG" "$VIMG")
VIMG_FORMATS=$("$VIMG" --features 2>/dev/null | sed -n 's/^formats=//p')
ran=0
for row in "${WORKLOADS[@]}"; do
    IFS='|' read -r name setup cmd check <<<"$row"
    name=$(trim "$name") setup=$(trim "$setup") cmd=$(trim "$cmd") check=$(trim "$check")
    [[ -z $PATTERN || $name =~ $PATTERN ]] || continue
    missing=""
    for f in $(grep -oE -- '-[fO] [a-z0-9]+' <<<"$cmd" | cut -d' ' -f2) \
             ${check#compare:}; do
        [[ $f == raw || $f == stdout || ",$VIMG_FORMATS," == *",$f,"* ]] || missing=$f
    done
    if [[ -n $missing ]]; then
        echo "bench: $name: skipped (vimg has no $missing yet)" >&2
        ROWS+=("$name|-|-|-|-|-|skipped: vimg has no $missing yet")
        continue
    fi
    ran=$((ran + 1))
    echo "bench: $name: setting up ($setup)" >&2
    W=$SCRATCH/$name
    mkdir -p "$W"
    read -ra setup_argv <<<"$setup"
    "${setup_argv[@]}"

    declare -A times=() rss=() rc=()
    status="" fail=""
    # rounds -WARMUPS..-1 are untimed warm-ups; the order alternates so
    # that round 0 starts with qemu-img and neither tool always goes first
    for ((r = -WARMUPS; r < REPEATS; r++)); do
        order=(0 1)
        (((r + 2 * WARMUPS) % 2 == 0)) || order=(1 0)
        for t in "${order[@]}"; do
            tool=${TOOLS[t]}
            out=$W/out.$tool
            rm -f "$out"
            sync
            read -ra argv <<<"$cmd"
            for i in "${!argv[@]}"; do
                a=${argv[i]}
                a=${a//@SRC@/$W/src}
                a=${a//@SRC2@/$W/src2}
                argv[i]=${a//@OUT@/$out}
            done
            run_once "$tool" "${BINS[t]}" "${argv[@]}"
            ((r < 0)) || times[$tool]+=" $RUN_US"
            rc[$tool]=$RUN_RC
            if [[ $RUN_RSS != - ]] &&
                [[ ${rss[$tool]:--} == - || $RUN_RSS -gt ${rss[$tool]} ]]; then
                rss[$tool]=$RUN_RSS
            fi
            if ((RUN_RC == 124)); then
                fail="$tool timed out after ${TIMEOUT}s"
            elif [[ $check == compare:* ]] && ((RUN_RC != 0)); then
                fail="$tool exit $RUN_RC: $(head -n1 "$W/stderr.$tool" | cut -c1-200 || true)"
            fi
            [[ -z $fail ]] || break 2
            # keep the outputs only from the last round, for the check
            ((r == REPEATS - 1)) || rm -f "$out"
        done
    done

    if [[ -z $fail ]]; then
        case $check in
        compare:*)
            fmt=${check#compare:}
            set +e
            msg=$("$QEMU_IMG" compare -f "$fmt" -F "$fmt" "$W/out.qemu-img" "$W/out.vimg" 2>&1)
            crc=$?
            set -e
            if ((crc != 0)) || [[ $msg != "Images are identical." ]]; then
                fail="outputs differ: ${msg//$'\n'/ }"
            else
                status="identical; out alloc $(alloc_mib "$W/out.qemu-img")/$(alloc_mib "$W/out.vimg") MiB"
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
    fi

    read -ra tq <<<"${times[qemu-img]:-}"
    read -ra tv <<<"${times[vimg]:-}"
    if [[ -n $fail ]]; then
        FAILED=1
        ROWS+=("$name|FAIL|FAIL|-|$(mib "${rss[qemu-img]:--}")|$(mib "${rss[vimg]:--}")|FAIL: $fail")
    else
        mq=$(median_us "${tq[@]}")
        mvi=$(median_us "${tv[@]}")
        ratio=$(awk -v q="$mq" -v v="$mvi" 'BEGIN { if (v > 0) printf "%.2f", q / v; else print "-" }')
        ROWS+=("$name|$(secs "$mq")|$(secs "$mvi")|$ratio|$(mib "${rss[qemu-img]}")|$(mib "${rss[vimg]}")|$status")
    fi
    runs() { local u out=""; for u in "$@"; do out+=" $(secs "$u")"; done; echo "${out# }"; }
    echo "bench: $name: runs qemu-img [$(runs "${tq[@]}")] vimg [$(runs "${tv[@]}")] s" >&2
    echo "bench: $name: done (${ROWS[-1]})" >&2
    unset times rss rc
    rm -rf "$W"
done

((ran)) || die "no workload matches '$PATTERN' (see -l)"
read -r LOAD1 _ </proc/loadavg
echo "# load average $LOAD1 at the end"
echo
print_header
for row in "${ROWS[@]}"; do
    IFS='|' read -ra f <<<"$row"
    print_row "${f[@]}"
done
exit "$FAILED"
