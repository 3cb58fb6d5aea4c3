#!/usr/bin/env bash
# The one-GPU check, under 8 minutes on one H100 or H200 (nothing in the CPU suite uses it):
#   1. `supercluster health local`: bf16 GEMM TFLOP/s, HBM bandwidth, host<->device copies
#   2. the planner's prediction for a ~1B Llama (llama-1b) at seq 4096: bf16, FSDP (full
#      sharding; on one rank it shards over a single device), compile, selective recompute
#   3. that plan, emitted as a config and trained for 50 steps, printing MFU
#   4. predicted and measured step time and MFU side by side
#
#   bash bench/gpu.sh            # from the repository root, with supercluster installed
#   PYTHON=/path/to/python bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
sc() { "$PYTHON" -m supercluster.cli.main "$@"; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
case "$name" in
  *H200*) gpu=h200 ;;
  *H100*) gpu=h100 ;;
  *) echo "bench/gpu.sh is sized for one H100 or H200, found: $name" >&2; exit 2 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export SUPERCLUSTER_HOME="$work/home"  # caches and health records of this check only
echo "== $name ($gpu), $(date -u +%FT%TZ), work in $work"

echo "== 1/3 health local"
timeout 180 sc health local --no-record || echo "(health exited $?: see above)"

echo "== 2/3 plan: llama-1b, 1 x $gpu, seq 4096, 16 sequences per step"
# Random token ids: MFU does not depend on the text, and no tokenizer has to be trained first.
"$PYTHON" -c "import numpy as np, sys; np.random.default_rng(0).integers(0, 32000, 8_000_000, dtype=np.uint16).tofile(sys.argv[1])" "$work/tokens.bin"
sc plan llama-1b --gpus 1 --gpu "$gpu" --seq-len 4096 --global-batch 16 --microbatch 4 \
   --sharding full --recompute selective --top 1 --steps 50 --run-dir "$work/run" \
   --emit-config "$work/gpu.toml" --json > "$work/plan.json"
cat >> "$work/gpu.toml" <<EOF

[data]
path = "$work/tokens.bin"
EOF

echo "== 3/3 train: 50 steps, bf16, compile"
timeout 360 sc train "$work/gpu.toml" --set train.precision=bf16 --set train.compile=true \
   --set train.eval_every=0 --set train.checkpoint_every=0 --set train.warmup_steps=5 \
   --no-sample --json | tail -n 1 > "$work/summary.json"

"$PYTHON" - "$work/plan.json" "$work/summary.json" "$work/run/metrics.jsonl" <<'EOF'
import json, statistics, sys
plan = json.load(open(sys.argv[1]))["plans"][0]
run = json.load(open(sys.argv[2]))
steps = [json.loads(line) for line in open(sys.argv[3]) if line.strip()][10:]  # after compile and warm-up
mfu = statistics.median(s["mfu"] for s in steps)
step = statistics.median(s["step_time_s"] for s in steps)
print(f"layout: {run['layout']}  (peak: {run['peak_source']}, {run['precision']})")
print(f"{'':12}{'predicted':>12}{'measured':>12}")
print(f"{'step s':12}{plan['step_time_s']:>12.3f}{step:>12.3f}")
print(f"{'MFU':12}{100 * plan['mfu']:>11.1f}%{100 * mfu:>11.1f}%")
print(f"{'memory GiB':12}{plan['memory_gib_per_gpu']:>12.1f}{run['mem_gib']:>12.1f}")
print(f"measured/predicted step time: {step / plan['step_time_s']:.2f}; goal: MFU >= 45%")
EOF
