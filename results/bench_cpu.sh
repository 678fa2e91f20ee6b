#!/usr/bin/env bash
# Regenerates results/bench_cpu.jsonl, the records behind the README's "Speed" table: `varbench bench` on an
# idle 2-core CPU (random weights, fp32, the study's speed defaults: 2 warm-up and 10 timed runs), the engine
# against the reference loop. Every line is a record the command wrote (study "bench", with its command line,
# environment and config hash). Run from the repository root: bash results/bench_cpu.sh
set -euo pipefail
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
varbench bench --variant test_var --batch 4 --vs-reference --threads 2 --out "$out/test_var_b4"
varbench bench --depth 6 --vae-ch 32 --batch 4 --vs-reference --threads 2 --out "$out/var_d6_b4"
varbench bench --depth 16 --batch 1 --vs-reference --threads 2 --out "$out/var_d16_b1"
varbench bench --variant test_var --batch 2 --compile --vs-reference --threads 2 --out "$out/test_var_b2_compile"
cat "$out"/test_var_b4/records.jsonl "$out"/var_d6_b4/records.jsonl "$out"/var_d16_b1/records.jsonl \
    "$out"/test_var_b2_compile/records.jsonl > results/bench_cpu.jsonl
varbench table results/bench_cpu.jsonl
