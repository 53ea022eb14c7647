#!/bin/sh
# Runs every libFuzzer target built in BUILD for SECONDS each, on its corpus.
set -eu
BUILD=${1:-build-fuzz}
SECONDS_EACH=${2:-300}
for t in "$BUILD"/fuzz/fuzz_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    echo "== $name ($SECONDS_EACH s)"
    mkdir -p "$BUILD/corpus-$name"
    "$t" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 \
        "$BUILD/corpus-$name" "fuzz/corpus/$name"
done
