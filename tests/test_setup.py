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
