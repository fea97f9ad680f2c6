#!/usr/bin/env bash
# Everything to run when a GPU is lent, in one call, sized for under 8 minutes on one H100/H200:
#   1. the GPU-only tests (compiled Pallas kernels: the Triton and Mosaic GPU bodies against the reference)
#   2. scripts/bench_kernels.py (ours vs XLA, cuDNN and JAX's Pallas kernels, outputs checked before timing)
#   3. scripts/benchmark.py on random-weight llama-2-7b bfloat16: decode batch 1 and 32 at context 512, TTFT at 2048
#   4. scripts/run_sharded.py --tp 1 --compare-unsharded (the shard_map layer's cost at tp=1)
#   5. decode with the layers scanned and unrolled on the default model's shape (smollm2-135m bfloat16, batch 1
#      and 32): the figures that choose model.DEFAULT_LAYOUT["gpu"] (scanned until measured)
#   6. decode of random llama-2-7b with int8, int4 and fp8 weights (jaxinfer.quant, XLA's dequantize fused into
#      the dot), batch 1 and 32 at context 512: bytes per token as held, GB/s and MBU
# Each step has its own time limit and log; one JSON and one markdown summary go under the output directory.
#
#   bash scripts/gpu_check.sh [--out DIR] [--dry-run]      # DIR: default $OUT, else ./gpu-check
#
# --dry-run prints the plan (the commands and their limits) and runs nothing; CI runs it.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-gpu-check}"
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the GPU machine runs the working tree, not an install
export JAXINFER_COMPILATION_CACHE="$out/xla-cache"

# The peaks the figures are divided by: the device's own name when there is one.
gpu=h100
hbm_tbps=3.05  # measured on the H100 (torch copy); the H200's datasheet 4.8, measured ~4.3
if [ "$dry_run" = 0 ] && command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    gpu=h200
    hbm_tbps=4.3
fi

# name | seconds allowed | command
steps=(
    "gpu-tests|100|$python -m pytest -q -p no:cacheprovider tests/test_flash_attention.py tests/test_paged_attention.py -k compiled_on_gpu -rs"
    "bench-kernels|80|$python scripts/bench_kernels.py --gpu $gpu --hbm-tbps $hbm_tbps --json $out/bench_kernels.json"
    "benchmark-llama-2-7b|90|$python scripts/benchmark.py --preset llama-2-7b --dtype bfloat16 --batch 1 32 --context 512 --prompt-len 2048 --steps 32 --iters 3 --gpu $gpu --json $out/benchmark.json"
    "run-sharded-tp1|50|$python scripts/run_sharded.py --preset llama-2-7b --dtype bfloat16 --tp 1 --compare-unsharded --steps 32 --iters 3"
    "layouts-smollm2-135m|70|set -e; for layout in scanned unrolled; do $python scripts/benchmark.py --preset smollm2-135m --dtype bfloat16 --batch 1 32 --context 512 --prompt-len 0 --steps 64 --iters 3 --layout \$layout --gpu $gpu --json $out/layout_\$layout.json; done"
    "quantized-llama-2-7b|90|for q in int8 int4 fp8; do $python scripts/benchmark.py --preset llama-2-7b --dtype bfloat16 --quantize \$q --batch 1 32 --context 512 --prompt-len 0 --steps 16 --iters 2 --gpu $gpu --json $out/quantized_\$q.json; done"
)

if [ "$dry_run" = 1 ]; then
    echo "gpu_check plan (output under $out/, peaks of $gpu, HBM $hbm_tbps TB/s):"
    total=0
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit cmd <<<"$step"
        total=$((total + limit))
        printf '  %-22s <= %4ss  %s\n' "$name" "$limit" "$cmd"
    done
    echo "  at most ${total}s in all"
    exit 0
fi

mkdir -p "$out"
summary_md="$out/summary.md"
rows=()
failed=0
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "jax $($python -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tail -1)"
    echo
    echo "| step | exit | seconds | command |"
    echo "|---|---|---|---|"
} >"$summary_md"
for step in "${steps[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    echo "== $name (limit ${limit}s): $cmd"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$cmd" >"$out/$name.log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - start))
    tail -n 25 "$out/$name.log"
    [ "$rc" = 0 ] || failed=1
    echo "| $name | $rc | $seconds | \`$cmd\` |" >>"$summary_md"
    rows+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $seconds, \"log\": \"$name.log\"}")
done
{
    echo "{\"gpu\": \"$gpu\", \"steps\": ["
    printf '%s\n' "$(IFS=,; echo "${rows[*]}")"
    echo "]}"
} >"$out/summary.json"
cat "$summary_md"
exit "$failed"
