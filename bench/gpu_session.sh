#!/usr/bin/env bash
# Issue 8's GPU checks as one prepared command, sized for a lent GPU machine (the device tool): one
# call of at most 10 minutes, inside a lease of 15 minutes that also pays for the machine's start.
#
# Here, before the call (liger-kernel, the fused linear cross-entropy, is not in the device image;
# .whl/ is git-ignored and travels only when carried), then a dry run of the script's flow on CPU
# (--quick sizes, small shapes, results under /tmp; a minute or two):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
#   bash bench/gpu_session.sh --dry-run
# Then one device call:  run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# Steps, most important first, each bounded by what is left of SESSION_BUDGET_S, everything written
# under $OUT as it is measured (the log; the results JSON after every training row), so a call cut
# off at its limit still brings back what ran:
#   1. bench/train_throughput.py --device cuda: baseline, sage-ft bf16 (token-budget micro-batches),
#      + torch_compile, sample-count micro-batches, fp32 (docs/benchmarks.md, "On a GPU");
#   2. bench/saved_activations.py on the Qwen2-0.5B shape (the memory estimator's largest term).
# The numbers go into docs/benchmarks.md by hand, after reading them.
set -u
cd "$(dirname "$0")/.."
device=cuda throughput_args=() activation_args=(--shape qwen2-0.5b --seq 1024)
if [ "${1:-}" = "--dry-run" ]; then
  device=cpu throughput_args=(--quick --no-monitoring) activation_args=(--shape small --seq 128)
fi
OUT=${OUT:-/tmp/sage_ft_gpu_session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SAGE_FT_BENCH_RESULTS=$OUT \
  SAGE_FT_BENCH_HOME=${SAGE_FT_BENCH_HOME:-/tmp/sage_ft_bench}
started=$SECONDS
budget=${SESSION_BUDGET_S:-560}
left() { echo $((budget - (SECONDS - started))); }

if [ "$device" = cuda ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl/ carried: liger-kernel is missing, so sage-ft trains without the fused cross-entropy"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 - <<'EOF'
import importlib.metadata as md
for pkg in ("torch", "triton", "transformers", "peft", "accelerate", "liger-kernel"):
    try:
        print(f"{pkg} {md.version(pkg)}")
    except md.PackageNotFoundError:
        print(f"{pkg} MISSING")
EOF

# 1. Training throughput; leaves 60 s for step 2.
timeout --signal=TERM --kill-after=10 $(($(left) - 60)) \
  python3 bench/train_throughput.py --device "$device" "${throughput_args[@]}"
echo "train_throughput: rc=$? at $((SECONDS - started)) s"

# 2. Saved activations against the memory estimator.
if [ "$(left)" -gt 20 ]; then
  timeout --signal=TERM --kill-after=5 $(($(left) - 5)) \
    python3 bench/saved_activations.py --device "$device" "${activation_args[@]}"
  echo "saved_activations: rc=$? at $((SECONDS - started)) s"
fi
echo "session: $((SECONDS - started)) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
