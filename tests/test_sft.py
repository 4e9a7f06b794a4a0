"""SFT and SFT distillation as a user runs them: prepare.py --format chat | instruct, the packed / padded
conversation batches, the assistant-only loss, CE + LOSS_MULTI * KD with the adaptive weight, train.py and
distill.py phase 2 on conversations, and sample.py --chat on the result."""
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import losses
from conftest import english_like_documents, run_script, torchrun
from data import LOSS, ConversationLoader, conversation_val_batches, load_mask_shard, read_manifest
from model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# one row per skip reason prepare.py counts (conversations.SKIP_REASONS, too_long, and a line that is not JSON)
BAD_ROWS = {
    "missing_field": '{"other": 1}',
    "not_a_list": '{"messages": "hello"}',
    "empty": '{"messages": []}',
    "bad_message": '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
    "unknown_role": '{"messages": [{"role": "alien", "content": "x"}, {"role": "assistant", "content": "y"}]}',
    "empty_content": '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}',
    "no_assistant": '{"messages": [{"role": "user", "content": "x"}]}',
    "too_long": json.dumps({"messages": [{"role": "user", "content": "word " * 400},
                                         {"role": "assistant", "content": "yes"}]}),
    "not_json": "this line is not json",
}


def chat_rows(n, seed=0):
    """Conversations of pseudo-English: some with a system prompt, 1-3 exchanges, role names as datasets spell them."""
    rng = random.Random(seed)
    texts = english_like_documents(5 * n, seed=seed + 11, min_words=3, max_words=9)
    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": texts.pop()}] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 2)):
            messages.append({"role": rng.choice(["user", "human", "User"]), "content": texts.pop()})
            messages.append({"role": rng.choice(["assistant", "bot", "gpt"]), "content": texts.pop()})
        rows.append({"messages": messages})
    return rows


def prepare_chat(tmp_path, model_dir, rows, *extra):
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "data"
    run_script("prepare.py", "--format", "chat", "--dataset", source, "--model", model_dir, "--out-dir", out,
               "--max-length", 160, "--val-fraction", 0.25, *extra)
    return str(out)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, tiny_llama_dir):
    """A chat dataset prepared from 120 good rows with one bad row of each kind spread among them."""
    rows = chat_rows(120)
    for k, line in enumerate(BAD_ROWS.values()):
        rows.insert(7 + 11 * k, line + "\n")
    return prepare_chat(tmp_path_factory.mktemp("chat"), tiny_llama_dir, rows)


def tiny_gpt(seed, **overrides):
    torch.manual_seed(seed)
    fields = dict(vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=64,
                  window=[None, 5, None], max_seq_len=256)
    return GPT(GPTConfig(**{**fields, **overrides})).init_weights(0.1).eval()


# ----------------------------------------------------------------------------------------------------------
# prepare.py --format chat | instruct

def test_prepare_chat_counts_every_skip_reason_and_writes_an_index_aligned_filtered_copy(chat_data, tiny_llama_dir):
    from transformers import AutoTokenizer

    import conversations

    manifest = read_manifest(chat_data)
    info = manifest["conversations"]
    assert info["rows"] == 120 + len(BAD_ROWS)
    assert {k: v for k, v in info["skipped"].items() if v} == {reason: 1 for reason in BAD_ROWS}
    with open(os.path.join(chat_data, "filtered.jsonl")) as f:
        kept = [json.loads(line) for line in f]
    assert len(kept) == 120 == sum(info["kept"].values())
    # each kept row's index is its line in the source, and its messages are that row's, roles normalised
    with open(os.path.join(os.path.dirname(chat_data), "chats.jsonl")) as f:
        source = f.read().splitlines()
    for record in kept:
        original = json.loads(source[record["index"]])["messages"]
        assert [m["content"] for m in record["messages"]] == [m["content"] for m in original]
        assert {m["role"] for m in record["messages"]} <= {"system", "user", "assistant"}
    assert [r["index"] for r in kept] == sorted(r["index"] for r in kept)
    # the shards hold exactly the kept rows of each split, in order, rendered with the template and its mask
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for split in ("train", "val"):
        expected_ids, expected_mask = [], []
        for record in (r for r in kept if r["split"] == split):
            ids, mask = conversations.render_chat(tokenizer, record["messages"])
            expected_ids += ids
            expected_mask += mask
        shards = [s for s in manifest["shards"] if s["split"] == split]
        ids = np.concatenate([np.fromfile(os.path.join(chat_data, s["file"]), np.uint16)[512:] for s in shards])
        flags = np.concatenate([load_mask_shard(os.path.join(chat_data, s["mask"]["file"])) for s in shards])
        assert ids.tolist() == expected_ids
        assert (flags & LOSS).tolist() == expected_mask
        assert manifest["totals"][split]["documents"] == info["kept"][split] > 0
    assert run_script("prepare.py", "--verify", chat_data).returncode == 0


def test_verify_finds_a_flipped_byte_in_a_mask_shard(tmp_path, tiny_llama_dir):
    data = prepare_chat(tmp_path, tiny_llama_dir, chat_rows(30))
    mask = os.path.join(data, read_manifest(data)["shards"][0]["mask"]["file"])
    with open(mask, "r+b") as f:
        f.seek(1024 + 3)
        byte = f.read(1)
        f.seek(1024 + 3)
        f.write(bytes([byte[0] ^ LOSS]))
    proc = run_script("prepare.py", "--verify", data, check=False)
    assert proc.returncode == 1 and f"{mask}: sha256" in proc.stdout


def test_prepare_instruct_rows_from_parquet_with_renamed_columns(tmp_path, tiny_llama_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = english_like_documents(90, seed=4, min_words=3, max_words=15)
    rows = [{"prompt": texts[3 * i], "context": texts[3 * i + 1] if i % 2 else None, "response": texts[3 * i + 2]}
            for i in range(30)]
    rows[5]["response"] = None  # missing_field
    rows[9]["prompt"] = "   "  # empty_content
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "instruct.parquet")
    out = tmp_path / "data"
    run_script("prepare.py", "--format", "instruct", "--dataset", tmp_path / "instruct.parquet", "--model",
               tiny_llama_dir, "--out-dir", out, "--instruction-field", "prompt", "--input-field", "context",
               "--output-field", "response", "--val-fraction", 0.25)
    info = read_manifest(str(out))["conversations"]
    assert {k: v for k, v in info["skipped"].items() if v} == {"missing_field": 1, "empty_content": 1}
    loader = ConversationLoader(str(out), "train", 1, 256, pack=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    x, y, _ = loader.next_batch()
    kept = [json.loads(line) for line in open(out / "filtered.jsonl")]
    first = next(r for r in kept if r["split"] == "train")
    # the targets are the response and the end-of-sequence token, nothing of the prompt
    assert tokenizer.decode(y[y != -100]) == first["output"] + tokenizer.eos_token


# ----------------------------------------------------------------------------------------------------------
# Batches: packed rows, padded rows, what the loss sees

def test_packed_rows_hold_whole_conversations_and_target_only_the_assistant_tokens(chat_data):
    packed = ConversationLoader(chat_data, "train", 2, 160, pack=True)
    padded = ConversationLoader(chat_data, "train", 1, 160, pack=False)
    assert packed.n_rows < padded.n_rows == len(padded.conversations)
    # reading every packed row once gives the conversations, in order, with the same targets as one per row
    conversation = 0
    for row in range(packed.n_rows):
        x, y, segments = packed.rows_batch([row])
        assert x.shape == (1, 160)
        for n in range(int(segments.max()) + 1):
            at = (segments[0] == n).nonzero().squeeze(1)
            px, py, none = padded.rows_batch([conversation])
            assert none is None
            # packed, a conversation's last token is an input too (its target, the next one's first, is masked)
            n_in = px.shape[1]
            assert torch.equal(x[0, at[:n_in]], px[0]) and torch.equal(y[0, at[:n_in]], py[0])
            assert (y[0, at[n_in:]] == -100).all() and len(at) - n_in <= 1
            conversation += 1
        # the padding after the last conversation is segment -1 and is never a target
        assert (y[0, segments[0] == -1] == -100).all()
    assert conversation == len(padded.conversations)


def test_packed_conversations_get_the_logits_each_has_alone():
    """The block-diagonal mask and the restarted positions: nothing leaks between packed conversations, in full
    and sliding-window layers (window 5 < the conversations' lengths)."""
    model = tiny_gpt(0)
    lengths = [9, 14, 6]
    g = torch.Generator().manual_seed(1)
    parts = [torch.randint(0, 512, (1, n), generator=g) for n in lengths]
    packed = torch.cat(parts + [torch.zeros(1, 3, dtype=torch.long)], dim=1)
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)] + [torch.full((1, 3), -1)], dim=1)
    with torch.no_grad():
        together = model.logits(packed, segments=segments)
        start = 0
        for part in parts:
            alone = model.logits(part)
            torch.testing.assert_close(together[:, start:start + part.shape[1]], alone, rtol=1e-5, atol=1e-5)
            start += part.shape[1]
        # and without segments the second conversation does see the first: the test can tell the difference
        plain = model.logits(packed)
    assert (plain[:, lengths[0]:lengths[0] + lengths[1]] - together[:, lengths[0]:lengths[0] + lengths[1]]).abs().max() > 1e-3


def test_assistant_only_loss_is_cross_entropy_over_the_masked_positions_only():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)
    masked = targets.clone()
    masked[torch.rand(40, generator=g) < 0.6] = -100
    loss, ce, _ = losses.head_loss(hidden, weight, masked, chunk_rows=7)
    loss.backward()
    keep = masked != -100
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = F.cross_entropy((h2 @ w2.t())[keep], targets[keep])
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ce, expected.detach())
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def kd_reference(hs, ws, ht, wt, targets, temperature, adaptive):
    """Per valid token: KD = T^2 KL(teacher || student) at T, weighted by 1 + b p_t(y) (1 - p_s(y)) at T = 1."""
    ls, lt = hs @ ws.t(), ht @ wt.t()
    log_p, log_q = F.log_softmax(lt / temperature, -1), F.log_softmax(ls / temperature, -1)
    kd = temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)
    safe = targets.clamp(min=0)
    p_t = F.softmax(lt, -1).gather(1, safe[:, None]).squeeze(1)
    p_s = F.softmax(ls, -1).gather(1, safe[:, None]).squeeze(1).detach()
    weight = 1 + adaptive * p_t * (1 - p_s)
    keep = targets != -100
    ce = F.cross_entropy(ls[keep], targets[keep])
    return ce, (weight * kd)[keep].mean()


@pytest.mark.parametrize("form", ["alpha", "multi"])
@pytest.mark.parametrize("adaptive", [0.0, 2.0])
def test_loss_forms_and_adaptive_kd_weight_match_their_definitions(form, adaptive):
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    ht, wt = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (30,), generator=g)
    targets[::4] = -100
    options = {"alpha": 0.3} if form == "alpha" else {"loss_multi": 2.5}
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, ce, kd = losses.head_loss(h1, w1, targets, teacher=(ht, wt), temperature=2.0, adaptive=adaptive,
                                    chunk_rows=7, **options)
    loss.backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref_ce, ref_kd = kd_reference(h2, w2, ht, wt, targets, 2.0, adaptive)
    expected = 0.7 * ref_ce + 0.3 * ref_kd if form == "alpha" else ref_ce + 2.5 * ref_kd
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_adaptive_weight_on_a_hand_made_case():
    """Two tokens, vocab 2, logits chosen so the probabilities are round numbers: the teacher gives the target
    0.8 at token 0 and 0.5 at token 1, the student 0.2 and 0.5. With b = 1 the weights are 1 + 0.8 * 0.8 = 1.64
    and 1 + 0.5 * 0.5 = 1.25."""
    logit = lambda p: math.log(p / (1 - p))
    ht = torch.tensor([[logit(0.8)], [0.0]])
    hs = torch.tensor([[logit(0.2)], [0.0]])
    w = torch.tensor([[1.0], [0.0]])  # logits (z, 0): p(class 0) = sigmoid(z)
    targets = torch.tensor([0, 0])
    _, _, kd_plain = losses.head_loss(hs, w, targets, teacher=(ht, w), loss_multi=1.0)
    _, _, kd_weighted = losses.head_loss(hs, w, targets, teacher=(ht, w), loss_multi=1.0, adaptive=1.0)
    kl = 0.8 * math.log(0.8 / 0.2) + 0.2 * math.log(0.2 / 0.8)  # token 1: teacher and student agree, KL 0
    assert kd_plain.item() == pytest.approx(kl / 2, rel=1e-5)
    assert kd_weighted.item() == pytest.approx(1.64 * kl / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# train.py and distill.py on conversations

SFT_RUN = {"device": "cpu", "dtype": "float32", "batch_size": 2, "seq_len": 160, "grad_accum": 2, "max_steps": 6,
           "lr": 2e-3, "warmup_steps": 1, "eval_every": 3, "eval_tokens": 2000, "checkpoint_every": 3,
           "keep_checkpoints": 0, "log_every": 1}


def write_config(path, **overrides):
    with open(path, "w") as f:
        yaml.safe_dump({**SFT_RUN, **overrides}, f)
    return str(path)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, chat_data, tiny_llama_dir):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    config = write_config(tmp_path_factory.mktemp("sft_config") / "sft.yaml")
    proc = run_script("train.py", "--config", config, "--init-from", tiny_llama_dir, "--data-dir", chat_data,
                      "--run-dir", run_dir)
    assert "loss on the assistant's tokens only" in proc.stdout
    return str(run_dir), config


def test_sft_lowers_the_assistant_loss_and_resumes_exactly(tmp_path, sft_run, chat_data, tiny_llama_dir):
    run_dir, config = sft_run
    straight = records(run_dir)
    losses_by_step = {r["step"]: r["loss"] for r in straight if "loss" in r}
    evals = {r["step"]: r["val_loss"] for r in straight if "val_loss" in r}
    assert evals[6] < evals[0] - 0.05
    # killed after step 3's checkpoint: the resumed run ends where the uninterrupted one did, bit for bit
    half = tmp_path / "half"
    run_script("train.py", "--config", config, "--init-from", tiny_llama_dir, "--data-dir", chat_data,
               "--run-dir", half, "--max-steps", 6, "--checkpoint-every", 3)
    os.remove(half / "step_000006.pt")
    os.remove(half / "step_000006.json")
    run_script("train.py", "--config", config, "--data-dir", chat_data, "--run-dir", half, "--resume")
    resumed = {r["step"]: r["loss"] for r in records(half) if "loss" in r}
    assert resumed == losses_by_step
    a = torch.load(os.path.join(run_dir, "step_000006.pt"), weights_only=True)["model"]
    b = torch.load(half / "step_000006.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_two_processes_equal_one(tmp_path, sft_run, chat_data, tiny_llama_dir):
    import subprocess

    from conftest import REPO

    run_dir, config = sft_run
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run(torchrun("train.py", 2, "--config", config, "--init-from", tiny_llama_dir, "--data-dir",
                                   chat_data, "--run-dir", ddp_dir, "--grad-accum", 1),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}
    ddp = {r["step"]: r["loss"] for r in records(ddp_dir) if "loss" in r}
    assert sorted(ddp) == list(range(1, 7))
    assert ddp == pytest.approx(single, abs=1e-5)
    single_evals = {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}
    ddp_evals = {r["step"]: r["val_loss"] for r in records(ddp_dir) if "val_loss" in r}
    assert ddp_evals == pytest.approx(single_evals, abs=1e-5)


def test_packed_and_padded_evals_count_the_same_assistant_tokens_and_loss(chat_data, tiny_llama_dir):
    results = []
    for pack in ("true", "false"):
        proc = run_script("train.py", "--eval-only", "--init-from", tiny_llama_dir, "--data-dir", chat_data,
                          "--device", "cpu", "--batch-size", 3, "--seq-len", 160, "--eval-tokens", 100_000,
                          "--pack", pack)
        line = next(l for l in proc.stdout.splitlines() if l.startswith("eval_only: "))
        results.append(json.loads(line[len("eval_only: "):]))
    packed, padded = results
    manifest = read_manifest(chat_data)
    # every val conversation, every assistant token (the first token of a conversation is never a target)
    assert packed["val_tokens"] == padded["val_tokens"] == manifest["totals"]["val"]["target_tokens"]
    assert packed["val_loss"] == pytest.approx(padded["val_loss"], abs=1e-5)


def test_sft_distillation_phase2_with_loss_multi_adaptive_and_top_k(tmp_path, chat_data, tiny_llama_dir):
    run_dir = tmp_path / "distill"
    proc = run_script("distill.py", "--teacher", tiny_llama_dir, "--data-dir", chat_data, "--run-dir", run_dir,
                      "--phases", "2", "--mlp-kind", "relu2", "--mlp-hidden", 32, "--device", "cpu", "--dtype",
                      "float32", "--batch-size", 2, "--seq-len", 160, "--max-steps", 8, "--lr", 1e-3,
                      "--warmup-steps", 1, "--loss-multi", 1.5, "--kd-adaptive", 1.0, "--top-k", 8,
                      "--checkpoint-every", 4, "--eval-tokens", 100_000, "--num-batches", 2, "--log-every", 1)
    assert "loss = CE + 1.5 x KD" in proc.stdout and "assistant tokens only" in proc.stdout
    rows = records(run_dir)
    steps = [r for r in rows if r.get("phase") == 2 and "loss" in r]
    assert len(steps) == 8 and all(r["kd"] > 0 for r in steps)
    for r in steps:  # the logged parts make up the loss in the CE + LOSS_MULTI * KD form
        assert r["loss"] == pytest.approx(r["ce"] + 1.5 * r["kd"], rel=1e-4)
    evals = [r for r in rows if r.get("event") == "eval"]
    # the objective falls on the assistant tokens of the val conversations (the random tiny teacher is worse
    # than uniform, so CE and KD pull apart here; the README's benchmark shows KL falling with a real teacher)
    objective = [e["val_ce"] + 1.5 * e["kl"] for e in evals]
    assert objective[-1] < objective[0] - 0.1
    # and the counts are the assistant tokens, the same as train.py's eval counts
    assert evals[-1]["val_tokens"] == read_manifest(chat_data)["totals"]["val"]["target_tokens"]


def test_a_model_after_sft_still_answers_through_sample_chat(sft_run):
    run_dir, _ = sft_run
    proc = run_script("sample.py", run_dir, "--chat", "--prompt", "Where is the river?", "--max-new-tokens", 12,
                      "--temperature", 0, "--device", "cpu")
    assert proc.returncode == 0 and proc.stdout.strip()


def test_conversations_longer_than_a_row_are_refused_with_the_fix(chat_data):
    with pytest.raises(ValueError, match=r"longer than seq_len \+ 1 = 33 tokens .* --max-length 33"):
        ConversationLoader(chat_data, "train", 2, 32)


def test_conversation_val_batches_do_not_depend_on_the_world_size(chat_data):
    one = list(conversation_val_batches(chat_data, 2, 160, 1500))
    two = [list(conversation_val_batches(chat_data, 2, 160, 1500, rank=r, world_size=2)) for r in (0, 1)]
    interleaved = [b for pair in zip(two[0], two[1] + [None]) for b in pair if b is not None]
    assert len(one) == len(interleaved) > 1
    for a, b in zip(one, interleaved):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_the_shipped_sft_configs_parse_with_the_model_given_on_the_command_line():
    import distill
    from config import configure
    from conftest import REPO
    from test_train import train_constants

    config = configure(train_constants(), argv=["--config", os.path.join(REPO, "configs", "sft_smollm2_chat.yaml"),
                                                "--init-from", "models/smollm2_135m_instruct"])
    assert config["pack"] and config["seq_len"] == 1024
    settings, _ = distill.read_settings(["--config", os.path.join(REPO, "configs", "distill_smollm2_sft.yaml")])
    assert settings.loss_multi == 1.0 and settings.kd_adaptive == 1.0 and settings.phases == "2"


def test_sft_distillation_resumes_exactly(tmp_path, chat_data, tiny_llama_dir):
    args = ["--teacher", tiny_llama_dir, "--data-dir", chat_data, "--phases", "2", "--mlp-kind", "relu2",
            "--mlp-hidden", 32, "--device", "cpu", "--dtype", "float32", "--batch-size", 2, "--seq-len", 160,
            "--lr", 1e-3, "--warmup-steps", 1, "--loss-multi", 1.5, "--kd-adaptive", 1.0, "--checkpoint-every", 3,
            "--keep-checkpoints", 0, "--eval-tokens", 2000, "--num-batches", 2]
    straight, half = tmp_path / "straight", tmp_path / "half"
    run_script("distill.py", *args, "--run-dir", straight, "--max-steps", 6)
    shutil.copytree(straight, half)
    os.remove(half / "step_000006.json")  # the last save "crashed" before its mark: resume from step 3
    run_script("distill.py", *args, "--run-dir", half, "--max-steps", 6, "--resume")
    steps = lambda d: {r["step"]: (r["loss"], r["kd"]) for r in records(d) if r.get("phase") == 2 and "loss" in r}
    assert steps(half) == steps(straight) and sorted(steps(straight)) == list(range(1, 7))
    a = torch.load(straight / "step_000006.pt", weights_only=True)["model"]
    b = torch.load(half / "step_000006.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_teacher_cache_and_a_shuffled_order_are_refused_on_conversation_data(tmp_path, chat_data,
                                                                                  tiny_llama_dir):
    proc = run_script("distill.py", "--teacher", tiny_llama_dir, "--data-dir", chat_data, "--run-dir",
                      tmp_path / "run", "--phases", "cache", "--teacher-cache", tmp_path / "cache", "--device", "cpu",
                      check=False)
    assert proc.returncode != 0 and "holds conversations (SFT data)" in proc.stderr + proc.stdout
    assert not os.path.exists(tmp_path / "cache")
    for script, model in (("distill.py", "--teacher"), ("train.py", "--init-from")):
        proc = run_script(script, model, tiny_llama_dir, "--data-dir", chat_data, "--run-dir", tmp_path / script,
                          "--device", "cpu", "--data-order", "shuffled", check=False)
        assert proc.returncode != 0 and "data_order = shuffled shuffles plain token windows" in proc.stderr, script
        assert not os.path.exists(tmp_path / script / "metrics.jsonl"), script
