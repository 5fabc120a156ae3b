#!/usr/bin/env bash
# Tokenizer throughput benchmark (not a test): `switcht5-data tokenize` on the real C4 samples in
# ../shared/data with --threads 1 and 2; prints documents/s and MB/s of text (best of REPEAT runs).
#   scripts/bench_tokenize.sh            # BUILD_DIR=build REPEAT=3 THREADS="1 2" to change
set -euo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}
repeat=${REPEAT:-3}
threads_list=${THREADS:-"1 2"}
data=../shared/data
[[ -f $data/spiece.model ]] || { echo "bench_tokenize: $data/spiece.model not found" >&2; exit 2; }
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$build" -j "$(nproc)" --target switcht5-data > /dev/null
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "# $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
printf '%-42s %7s %6s %8s %10s %8s\n' input threads docs seconds docs/s MB/s
for input in "$data/c4/c4-en-train-00000-first1000.json.gz" "$data/c4/olmo/c4-sample.00000-of-00001.json.gz"; do
  for t in $threads_list; do
    best=""
    for _ in $(seq "$repeat"); do
      # Summary: "tokenized 1 files: D documents, ... skipped, S s, R docs/s, M MB/s of text"
      line=$("$build/switcht5-data" tokenize --spm "$data/spiece.model" --input "$input" \
               --output "$out" --threads "$t" --quiet | grep '^tokenized')
      secs=$(sed -E 's/.* ([0-9.]+) s, .*/\1/' <<< "$line")
      if [[ -z $best ]] || awk -v a="$secs" -v b="$(cut -d' ' -f1 <<< "$best")" 'BEGIN{exit !(a<b)}'; then
        best="$secs $(sed -E 's/.*: ([0-9]+) documents.*, ([0-9.]+) docs\/s, ([0-9.]+) MB\/s.*/\1 \2 \3/' <<< "$line")"
      fi
    done
    read -r secs docs rate mbs <<< "$best"
    printf '%-42s %7s %6s %8s %10s %8s\n' "$(basename "$input")" "$t" "$docs" "$secs" "$rate" "$mbs"
  done
done
