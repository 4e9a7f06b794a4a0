"""prepare.py end to end on local files, offline: formats, splits, budgets, refusals, --verify, resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, english_like_documents, run_script
from data import load_shard, read_manifest, tokenizer_fingerprint


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return str(path)


def prepare(tokenizer_dir, dataset, out_dir, *args, check=True):
    return run_script("prepare.py", "--model", tokenizer_dir, "--dataset", dataset, "--out-dir", out_dir, *args,
                      check=check)


def split_documents(out_dir, split, separator_id=0):
    """The split's token stream cut back into documents (each starts with the separator)."""
    manifest = read_manifest(out_dir)
    stream = np.concatenate([load_shard(os.path.join(out_dir, s["file"])) for s in manifest["shards"]
                             if s["split"] == split])
    assert stream[0] == separator_id
    starts = np.flatnonzero(stream == separator_id).tolist() + [len(stream)]
    return [stream[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]


def shard_bytes(out_dir):
    return {name: open(os.path.join(out_dir, name), "rb").read() for name in sorted(os.listdir(out_dir))
            if name.endswith(".bin")}


def check_documents_round_trip(out_dir, docs, tokenizer_dir):
    """Every document is in exactly one split, in source order, tokenized as the HF tokenizer does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = {}
    for doc in docs:
        encoded.setdefault(tuple(tok(doc, add_special_tokens=False)["input_ids"]), doc)
    found = {}
    for split in ("train", "val"):
        found[split] = [encoded[tuple(ids)] for ids in split_documents(out_dir, split)]
        order = [docs.index(d) for d in found[split]]
        assert order == sorted(order), f"{split} documents are out of source order"
    assert not set(found["train"]) & set(found["val"]), "a document is in both splits"
    return found


def test_prepare_jsonl_end_to_end(bpe_tokenizer_dir, tmp_path):
    docs = english_like_documents(600, seed=5)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = str(tmp_path / "out")
    proc = prepare(bpe_tokenizer_dir, data, out, "--train-bytes", 10**8, "--val-bytes", 10**8, "--shard-tokens", 3000,
                   "--workers", 2)
    assert "ran out after 600 documents" in proc.stdout
    manifest = read_manifest(out)
    found = check_documents_round_trip(out, docs, bpe_tokenizer_dir)
    assert sorted(found["train"] + found["val"]) == sorted(docs)  # the whole source, nothing lost
    assert 0 < len(found["val"]) < len(found["train"])
    from transformers import AutoTokenizer
    tokenizer = manifest["tokenizer"]
    assert tokenizer["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(bpe_tokenizer_dir))
    assert (tokenizer["separator_id"], tokenizer["separator_token"], tokenizer["vocab_size"]) == (0, "<|endoftext|>", 512)
    for split in ("train", "val"):
        shards = [s for s in manifest["shards"] if s["split"] == split]
        assert all(s["ntok"] == 3000 for s in shards[:-1]) and 0 < shards[-1]["ntok"] <= 3000
        assert manifest["totals"][split]["tokens"] == sum(s["ntok"] for s in shards)
        assert manifest["totals"][split]["documents"] == len(found[split])
        assert manifest["totals"][split]["text_bytes"] == sum(len(d.encode()) for d in found[split])
    assert manifest["source"]["files"][0]["path"] == os.path.abspath(data)
    assert manifest["source_exhausted"] is True
    assert sorted(os.listdir(out)) == sorted([".lock", "manifest.json"] + [s["file"] for s in manifest["shards"]])


def test_prepare_parquet_through_datasets_streaming_stops_at_the_byte_budget(bpe_tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = english_like_documents(900, seed=6)
    files = []
    for i, part in enumerate((docs[:300], docs[300:600], docs[600:])):
        files.append(str(tmp_path / f"part_{i}.parquet"))
        pq.write_table(pa.table({"content": part, "n": list(range(len(part)))}), files[-1], row_group_size=64)
    out = str(tmp_path / "out")
    budget_train, budget_val = 120_000, 9_000
    proc = prepare(bpe_tokenizer_dir, str(tmp_path / "part_*.parquet"), out, "--text-field", "content",
                   "--train-bytes", budget_train, "--val-bytes", budget_val, "--shard-tokens", 5000,
                   "--docs-per-batch", 50, "--workers", 1)
    assert "ran out" not in proc.stdout
    manifest = read_manifest(out)
    assert [f["path"] for f in manifest["source"]["files"]] == files  # the glob, expanded in sorted order
    found = check_documents_round_trip(out, docs, bpe_tokenizer_dir)
    for split, budget in (("train", budget_train), ("val", budget_val)):
        sizes = [len(d.encode()) for d in found[split]]
        assert sum(sizes) >= budget > sum(sizes[:-1])  # the document that crosses the budget is the last one
    assert manifest["source_exhausted"] is False


def test_prepare_txt_splits_documents_at_blank_lines(bpe_tokenizer_dir, tmp_path):
    docs = english_like_documents(200, seed=7)
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    prepare(bpe_tokenizer_dir, str(path), out, "--shard-tokens", 4000, "--workers", 1)
    # the datasets text builder drops the blank line between paragraphs and keeps the file's last newline
    found = check_documents_round_trip(out, docs[:-1] + [docs[-1] + "\n"], bpe_tokenizer_dir)
    assert len(found["train"]) + len(found["val"]) == len(docs)


def test_rerun_of_a_finished_prepare_does_nothing_and_says_so(bpe_tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", english_like_documents(150, seed=8))
    out = str(tmp_path / "out")
    prepare(bpe_tokenizer_dir, data, out, "--shard-tokens", 2000)
    mtimes = lambda: {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n != ".lock"}
    before = mtimes()  # every file but the writer lock, which each run takes
    proc = prepare(bpe_tokenizer_dir, data, out, "--shard-tokens", 2000)
    assert "is already prepared" in proc.stdout and "nothing to do" in proc.stdout
    assert mtimes() == before
    proc = prepare(bpe_tokenizer_dir, data, out, "--shard-tokens", 3000, check=False)
    assert proc.returncode != 0 and "shard_tokens: 2000 -> 3000" in proc.stderr and "--force" in proc.stderr
    prepare(bpe_tokenizer_dir, data, out, "--shard-tokens", 3000, "--force")
    assert read_manifest(out)["options"]["shard_tokens"] == 3000


def test_smoke_test_fills_in_only_the_sizes_not_set_explicitly_and_prints_the_config_that_runs(bpe_tokenizer_dir,
                                                                                                  tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", english_like_documents(150, seed=9))
    out = str(tmp_path / "out")
    proc = prepare(bpe_tokenizer_dir, data, out, "--smoke-test", "--train-bytes", 5000, "--shard-tokens", 300,
                   "--workers", 1)
    manifest = read_manifest(out)
    # the explicit train budget, shard size and out dir win; the val budget is the smoke test's (512 KiB)
    assert manifest["budgets"] == {"train_bytes": 5000, "val_bytes": 512 * 2**10}
    assert manifest["options"]["shard_tokens"] == 300 and manifest["options"]["smoke_test"] is True
    assert proc.stdout.count("config for prepare.py:") == 1
    for line in ("train_bytes = 5000", f"val_bytes = {512 * 2**10}", "shard_tokens = 300", f"out_dir = {out!r}"):
        assert f"  {line}\n" in proc.stdout


def test_verify_catches_a_flipped_byte_and_a_missing_shard(bpe_tokenizer_dir, tmp_path, capsys):
    import prepare as prepare_module  # verify works in-process too, not only as `prepare.py --verify`

    data = write_jsonl(tmp_path / "docs.jsonl", english_like_documents(200, seed=9))
    out = str(tmp_path / "out")
    prepare(bpe_tokenizer_dir, data, out, "--shard-tokens", 2000)
    assert prepare_module.verify(out) == 0
    assert "match manifest.json" in capsys.readouterr().out
    victim = os.path.join(out, "train_000001.bin")
    with open(victim, "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0x01]))
    assert prepare_module.verify(out) == 1
    printed = capsys.readouterr().out
    assert f"MISMATCH {victim}: sha256" in printed and "1 of" in printed
    os.remove(os.path.join(out, "val_000000.bin"))
    proc = run_script("prepare.py", "--verify", out, check=False)
    assert proc.returncode == 1 and "val_000000.bin: missing" in proc.stdout and "2 of" in proc.stdout


def test_network_retries_back_off_then_give_up_naming_the_last_error(monkeypatch, capsys):
    import prepare as prepare_module

    waits = []
    monkeypatch.setattr(prepare_module.time, "sleep", waits.append)
    failures = iter([OSError("reset"), TimeoutError("slow")])

    def flaky():
        error = next(failures, None)
        if error:
            raise error
        return "ok"

    assert prepare_module.with_retries("downloading x", flaky) == "ok"
    assert waits == [1, 2] and "downloading x failed (TimeoutError: slow); retrying in 2 s" in capsys.readouterr().out
    def down():
        raise OSError("down")

    waits.clear()
    with pytest.raises(SystemExit, match="downloading x failed 8 times; last error: OSError: down"):
        prepare_module.with_retries("downloading x", down)
    assert waits == [1, 2, 4, 8, 16, 32, 60]  # NETWORK_RETRIES = 8 tries, 7 waits, capped at 60 s


def hub_http_error(status):
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    return HfHubHTTPError(f"{status}", response=httpx.Response(status, request=httpx.Request("GET", "https://hub")))


def test_only_errors_a_network_or_hub_hiccup_can_cause_are_transient():
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.utils import httpx

    import prepare as prepare_module

    transient = [OSError("reset"), ConnectionError("refused"), TimeoutError("slow"), httpx.ConnectError("dns"),
                 httpx.ReadTimeout("slow"), hub_http_error(503), hub_http_error(429), hub_http_error(408)]
    not_transient = [TypeError("bug"), ValueError("bug"), KeyError("text"), hub_http_error(404),
                     hub_http_error(401), DatasetNotFoundError("no such dataset")]
    assert [e for e in transient if not prepare_module.is_transient(e)] == []
    assert [e for e in not_transient if prepare_module.is_transient(e)] == []


def test_an_error_that_is_not_transient_is_raised_at_once_without_waiting(monkeypatch):
    import prepare as prepare_module

    waits = []
    monkeypatch.setattr(prepare_module.time, "sleep", waits.append)
    calls = []

    def buggy():
        calls.append(1)
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError, match="unsupported operand"):
        prepare_module.with_retries("downloading x", buggy)
    assert calls == [1] and waits == []


class FlakyStream:
    """A stand-in for a streaming hub dataset whose reads raise the queued errors, then yield one batch."""

    def __init__(self, errors):
        self.errors = errors

    def iter(self, batch_size):
        if self.errors:
            raise self.errors.pop(0)
        yield {"text": ["a document"]}

    def state_dict(self):
        return {"position": 0}


def test_a_hub_stream_read_retries_a_transient_error_and_raises_any_other_at_once(monkeypatch):
    import prepare as prepare_module

    waits = []
    monkeypatch.setattr(prepare_module.time, "sleep", waits.append)
    errors = []
    monkeypatch.setattr(prepare_module, "open_dataset", lambda source, state: FlakyStream(errors))
    source = {"kind": "hub", "dataset": "org/corpus", "text_field": "text"}
    errors.append(ConnectionError("reset by peer"))
    assert list(prepare_module.read_batches(source, None, 0)) == [({"position": 0}, 0, ["a document"])]
    assert waits == [1]
    waits.clear()
    errors.append(ValueError("bug"))
    with pytest.raises(ValueError, match="bug"):
        list(prepare_module.read_batches(source, None, 0))
    assert waits == []


def test_importing_prepare_does_not_import_torch():
    # every tokenizer worker process re-imports prepare.py (spawn); torch would cost each ~1.5 s and ~150 MB
    code = "import sys, prepare; assert 'torch' not in sys.modules, 'importing prepare.py imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_prepare_refuses_a_text_field_that_does_not_exist(bpe_tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", english_like_documents(20), field="body")
    proc = prepare(bpe_tokenizer_dir, data, str(tmp_path / "out"), check=False)
    assert proc.returncode != 0
    assert "text field 'text' not found" in proc.stderr and "'body'" in proc.stderr
    assert "Exception ignored" not in proc.stderr  # the tokenizer pool was shut down, not left to the collector


def test_prepare_refuses_an_empty_source(bpe_tokenizer_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    proc = prepare(bpe_tokenizer_dir, str(tmp_path / "empty.jsonl"), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "empty.jsonl is empty" in proc.stderr
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "", ""])
    proc = prepare(bpe_tokenizer_dir, blank, str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "has no non-empty documents" in proc.stderr
    proc = prepare(bpe_tokenizer_dir, str(tmp_path / "nothing_*.jsonl"), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "matches no file" in proc.stderr


def test_prepare_refuses_a_budget_larger_than_the_free_disk(bpe_tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", english_like_documents(20))
    proc = prepare(bpe_tokenizer_dir, data, str(tmp_path / "out"), "--train-bytes", 2**60, check=False)
    assert proc.returncode != 0 and "GiB free" in proc.stderr and "--train-bytes" in proc.stderr


def test_prepare_refuses_a_vocab_that_does_not_fit_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp_path / "big_tok")
    data = write_jsonl(tmp_path / "docs.jsonl", ["w1 w2 w69999"] * 10)
    proc = prepare(str(tmp_path / "big_tok"), data, str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "has 70001 ids" in proc.stderr and "65536" in proc.stderr


def test_killed_prepare_resumes_to_byte_identical_shards(bpe_tokenizer_dir, tmp_path):
    """A real SIGKILL, twice, mid-run; the rerun (with another worker count) matches an uninterrupted run."""
    docs = english_like_documents(6000, seed=11)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    args = ["--train-bytes", 10**8, "--val-bytes", 10**8, "--shard-tokens", 1500, "--docs-per-batch", 64]
    reference = str(tmp_path / "reference")
    prepare(bpe_tokenizer_dir, data, reference, *args, "--workers", 2)

    out = str(tmp_path / "resumed")
    kills = 0
    for min_shards in (8, 40):
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "prepare.py"), "--model", bpe_tokenizer_dir,
                                 "--dataset", data, "--out-dir", out, *map(str, args), "--workers", "1"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            progress = os.path.join(out, "prepare_progress.json")
            if os.path.exists(progress) and len(json.load(open(progress))["shards"]) >= min_shards:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if proc.poll() is None or not os.path.exists(os.path.join(out, "manifest.json")):
            assert proc.returncode == -signal.SIGKILL
    assert kills >= 1, "prepare finished before it could be killed; the test needs more data"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    proc = prepare(bpe_tokenizer_dir, data, out, *args, "--workers", 1)
    assert "resuming:" in proc.stdout
    assert shard_bytes(out) == shard_bytes(reference)
    assert read_manifest(out)["shards"] == read_manifest(reference)["shards"]
    assert not [n for n in os.listdir(out) if ".tmp." in n or n.endswith(".partial") or "progress" in n]


def test_prepare_converts_a_gguf_model_and_uses_its_separator(smollm2_gguf, tmp_path):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "docs.jsonl", english_like_documents(60, seed=12))
    model_dir, out = str(tmp_path / "models" / "smollm2"), str(tmp_path / "out")
    run_script("prepare.py", "--model", smollm2_gguf, "--model-dir", model_dir, "--dataset", data, "--out-dir", out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "prepare_source.json"} <= set(os.listdir(model_dir))
    tokenizer = read_manifest(out)["tokenizer"]
    assert (tokenizer["separator_id"], tokenizer["separator_token"], tokenizer["vocab_size"]) == (0, "<|endoftext|>",
                                                                                                 49152)
    folder, name = os.path.split(smollm2_gguf)
    assert tokenizer["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    assert tokenizer["fingerprint"] == tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir))
    assert "match manifest.json" in run_script("prepare.py", "--verify", out).stdout
