#!/usr/bin/env bash
# Regenerates results/bench_cpu_families.jsonl: `varbench bench` of the text-to-image and raster families on an
# idle 2-core CPU (random weights, fp32, 2 warm-up and 10 timed runs), each engine against its reference loop:
# test_infinity (256 px, 8 random prompts), test_llamagen plain and with SJD, LANTERN and ZipAR at their defaults
# (random weights: acceptance on a random model says nothing about a trained one; this measures the machinery).
# Run from the repository root: bash results/bench_cpu_families.sh
set -euo pipefail
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
varbench bench --variant test_infinity --batch 2 --cfg 3 --vs-reference --threads 2 --out "$out/infinity"
varbench bench --variant test_llamagen --batch 4 --cfg 4 --top-k 0 --top-p 1 --vs-reference --threads 2 --out "$out/llamagen"
for method in sjd lantern zipar; do
  varbench bench --variant test_llamagen --accel "$method" --batch 4 --cfg 4 --top-k 0 --top-p 1 --vs-reference \
    --threads 2 --out "$out/llamagen_$method"
done
cat "$out"/infinity/records.jsonl "$out"/llamagen/records.jsonl "$out"/llamagen_sjd/records.jsonl \
    "$out"/llamagen_lantern/records.jsonl "$out"/llamagen_zipar/records.jsonl > results/bench_cpu_families.jsonl
varbench table results/bench_cpu_families.jsonl
