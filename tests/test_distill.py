"""distill.py: the student, the phase-1 cache and rotation, the chunked KD losses, resume, DDP and bad input.

Unit tests build tiny random GPTs in-process; the end-to-end tests run distill.py like a user on a tiny random
HF Llama teacher (3 layers, hidden 64) and shards written with data.write_shard from the teacher's tokenizer.
"""
import dataclasses
import json
import os
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, english_like_documents, make_tiny_llama, run_script, torchrun, write_token_dataset
from model import GPT, GPTConfig

import checkpoints
import distill
import layer_cache
import losses
import runtime
import student as student_module
import training
from layer_cache import LayerCache

ENV = {"OMP_NUM_THREADS": "1"}  # two processes of torchrun on two cores: no oversubscription
TINY = ["--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "1024",
        "--num-batches", "4", "--log-every", "1000", "--loss-chunk", "48"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models on a shared 2-core box


def tiny_gpt(seed=0, **overrides):
    fields = dict(vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=64,
                  max_seq_len=64)
    fields.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**fields)).init_weights(std=0.1).eval()


def env1():
    return runtime.setup_device("cpu")


def hidden_states(model, x):
    """The hidden state entering every layer, and after the last, by running the blocks one by one."""
    cos, sin = model.rope(0, x.shape[1], x.device)
    h, out = model.embed(x), []
    for block in model.blocks:
        out.append(h)
        h = block(h, cos, sin)
    return out + [h]


# ----------------------------------------------------------------------------------------------------------
# KD losses

def test_topk_kl_with_k_equal_to_vocab_equals_full_kl_and_smaller_k_bounds_it_from_below():
    torch.manual_seed(0)
    s, t = torch.randn(16, 50) * 3, torch.randn(16, 50) * 3
    for temperature in (1.0, 2.0):
        full = losses.kl_full(s, t, temperature)
        torch.testing.assert_close(losses.kl_topk(s, t, 50, temperature), full, rtol=1e-5, atol=1e-6)
        previous = torch.zeros(16)
        for k in (1, 5, 20, 49):  # coarser buckets lose divergence: 0 <= KL_k <= KL_k' <= KL_full for k < k'
            topk = losses.kl_topk(s, t, k, temperature)
            assert (topk >= previous - 1e-5).all() and (topk <= full + 1e-5).all()
            previous = topk
    # one row by hand: teacher top-2 buckets plus the tail, against the student's masses on the same ids
    p, q = F.softmax(t[0], -1), F.softmax(s[0], -1)
    ids = p.topk(2).indices
    P = torch.cat([p[ids], (1 - p[ids].sum()).view(1)])
    Q = torch.cat([q[ids], (1 - q[ids].sum()).view(1)])
    torch.testing.assert_close(losses.kl_topk(s[:1], t[:1], 2)[0], (P * (P / Q).log()).sum(), rtol=1e-4, atol=1e-6)


def test_kl_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    torch.manual_seed(1)
    t = torch.randn(8, 40)
    for kl in (lambda a, b: losses.kl_full(a, b, 2.0), lambda a, b: losses.kl_topk(a, b, 7, 2.0)):
        assert kl(t, t).abs().max() < 1e-5
        assert (kl(t + torch.randn(8, 40), t) > 0).all()
    # full KL matches torch's own, with the T^2 scaling
    s = torch.randn(8, 40)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1) * 4
    torch.testing.assert_close(losses.kl_full(s, t, 2.0), ref, rtol=1e-5, atol=1e-6)


def torch_kl(student_logits, teacher_logits, temperature):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)) per row, by torch's own kl_div."""
    return F.kl_div(F.log_softmax(student_logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                    log_target=True, reduction="none").sum(-1) * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_closed_form_kl_and_teacher_probs_match_torch_at_a_real_vocab_size(temperature):
    # SmolLM2's vocabulary and logits of its scale (std ~3, a few top logits ~20), in fp32 against torch's kl_div
    # in fp64: a sum over 49k terms is where fp32 error shows (a batched dot here was off by 1.3e-3 at T = 1; torch's
    # own fp32 kl_div by 3e-4; the in-place elementwise form by 1e-5)
    torch.manual_seed(3)
    t = torch.randn(6, 49152) * 3 + 2
    s = t + torch.randn(6, 49152) * 0.8
    t[:, :5] += 15.0
    s[:, 3:8] += 14.0
    kl, p = losses.kl_full_and_teacher_probs(s, t.clone(), temperature)
    torch.testing.assert_close(kl.double(), torch_kl(s.double(), t.double(), temperature), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.double(), F.softmax(t.double() / temperature, -1), rtol=1e-4, atol=1e-7)
    assert (kl > 0.05).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # the full-vocab KD gradient has a closed form at each
@pytest.mark.parametrize("alpha,top_k", [(0.0, 0), (0.5, 0), (1.0, 0), (0.7, 5)])
def test_chunked_distill_loss_equals_the_unchunked_loss_and_gradients(alpha, top_k, temperature):
    torch.manual_seed(2)
    N, C, V = 37, 16, 50
    hidden = torch.randn(N, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(N, C), torch.randn(V, C)
    targets = torch.randint(0, V, (N,))
    targets[3] = -100  # ignored in both CE and KD
    loss, ce, kd = losses.head_loss(hidden, weight, targets, teacher=(teacher_hidden, teacher_weight), alpha=alpha,
                                    temperature=temperature, top_k=top_k, chunk_rows=8)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits, teacher_logits = hidden @ weight.t(), teacher_hidden @ teacher_weight.t()
    valid = targets != -100
    ref_ce = F.cross_entropy(logits, targets, ignore_index=-100)
    per_row = (torch_kl(logits, teacher_logits, temperature) if top_k == 0
               else losses.kl_topk(logits, teacher_logits, top_k, temperature))
    ref_kd = per_row[valid].mean()
    ref = alpha * ref_kd + (1 - alpha) * ref_ce
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(ce, ref_ce.detach())
    torch.testing.assert_close(kd, ref_kd.detach() if alpha > 0 else torch.tensor(0.0))
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)


# ----------------------------------------------------------------------------------------------------------
# Student and phase-1 cache

def test_student_starts_as_the_teacher_minus_its_replaced_mlps():
    teacher = tiny_gpt()
    config = student_module.student_config(teacher.config, "relu2", None, [0, 2], window=16, full_attn_layers=[1],
                                           sink_tokens=2)
    assert config.mlp_kind == ["relu2", "swiglu", "relu2"] and config.mlp_hidden == [32, 64, 32]
    assert config.window == [16, None, 16] and config.sink_tokens == 2
    student, new_mlps = student_module.build_student(teacher, config)
    assert new_mlps == [0, 2]
    # the same function as the teacher whose MLPs 0 and 2 output nothing (with the student's windows and sinks)
    reference = GPT(GPTConfig.from_dict({**teacher.config.__dict__, "window": [16, None, 16],
                                         "sink_tokens": 2})).eval()
    reference.load_state_dict(teacher.state_dict())
    for i in new_mlps:
        reference.blocks[i].mlp.down.weight.data.zero_()
    x = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(student(x), reference(x))
    with pytest.raises(SystemExit, match="out of range"):
        student_module.student_config(teacher.config, mlp_layers=[3])
    # per-layer widths: one per layer of mlp_layers, in its order
    config = student_module.student_config(teacher.config, "swiglu", [40, 24], [2, 0])
    assert config.mlp_hidden == [24, 64, 40] and config.mlp_kind == ["swiglu"] * 3
    with pytest.raises(SystemExit, match="mlp_hidden lists 2 widths but there are 3 new MLPs"):
        student_module.student_config(teacher.config, "swiglu", [40, 24])


@pytest.mark.parametrize("latent", ["teacher", "student"])
@pytest.mark.parametrize("target", ["decoder", "block"])
def test_cached_latent_entering_each_layer_is_the_models_own_hidden_state(latent, target):
    teacher = tiny_gpt(0)
    student, _ = student_module.build_student(teacher, student_module.student_config(teacher.config, "relu2"))
    torch.manual_seed(5)
    for block in student.blocks:  # a student that differs from the teacher everywhere
        block.mlp.down.weight.data.normal_(0, 0.1)
    tokens = [torch.randint(0, 96, (2, 24)) for _ in range(3)]
    ctx = torch.autocast("cpu", enabled=False)
    cache = LayerCache(teacher, student, tokens, "cpu", ctx, latent=latent, target=target)
    with torch.no_grad():
        teacher_h = [hidden_states(teacher, x) for x in tokens]
        student_h = [hidden_states(student, x) for x in tokens]
    for i in range(3):
        cache.advance(i)
        for n in range(3):
            torch.testing.assert_close(cache.teacher_latent[n], teacher_h[n][i], rtol=1e-5, atol=1e-5)
            if latent == "student":
                torch.testing.assert_close(cache.student_latent[n], student_h[n][i], rtol=1e-5, atol=1e-5)
        inputs, targets = cache.begin_layer(i, env1())
        cos, sin = student.rope(0, 24, "cpu")
        for n in range(3):
            torch.testing.assert_close(targets[n], teacher_h[n][i + 1], rtol=1e-5, atol=1e-5)
            with torch.no_grad():  # a step's forward from the cached input is the student's layer i
                out = layer_cache.trainable_part(student.blocks[i], inputs[n], cos, sin, target)
            own_input = teacher_h[n][i] if latent == "teacher" else student_h[n][i]
            with torch.no_grad():
                torch.testing.assert_close(out, student.blocks[i](own_input, cos, sin), rtol=1e-5, atol=1e-5)
        cache.end_layer()
    assert cache.layer == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs a GPU")
def test_a_host_cache_beside_a_gpu_stays_pinned_in_every_buffer():
    teacher, student = tiny_gpt(0).cuda(), tiny_gpt(1).cuda()
    tokens = [torch.randint(0, 96, (2, 16)) for _ in range(2)]
    ctx = runtime.autocast("cuda", torch.float32)
    for latent in ("teacher", "student"):
        cache = LayerCache(teacher, student, tokens, "cpu", ctx, latent=latent, target="decoder")
        inputs, targets = cache.begin_layer(0, runtime.setup_device("cuda"))
        assert cache.teacher_latent.is_pinned() and inputs.is_pinned() and targets.is_pinned(), latent


@pytest.mark.parametrize("target", ["decoder", "attn", "attn_out", "block"])
def test_while_layer_i_trains_only_its_target_parameters_change(target):
    teacher = tiny_gpt(0)
    window = 4 if target == "attn_out" else None  # attention that differs from the teacher's: something to learn
    student, _ = student_module.build_student(teacher, student_module.student_config(teacher.config, "relu2",
                                                                                     window=window))
    ctx = torch.autocast("cpu", enabled=False)
    tokens = [torch.randint(0, 96, (2, 24)) for _ in range(2)]
    cache = LayerCache(teacher, student, tokens, "cpu", ctx, target=target)
    cache.begin_layer(1, env1())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    student_module.set_trainable(student, student_module.layer_target(student.blocks[1], target))
    optimizer = student.configure_optimizer(1e-2, 0.0, (0.9, 0.95), "cpu")
    run = distill.Run(distill.read_settings(["--grad-clip", "1.0", "--run-dir", "unused"])[0], {}, env1(), ctx,
                      checkpoints.MetricsLog("unused", enabled=False), "", teacher, student)
    losses = [distill.layer_step(run, cache, optimizer, 0, 1e-3, step) for step in range(4)]
    attention = ("blocks.1.attn_norm.", "blocks.1.attn.")
    prefix = {"decoder": ("blocks.1.mlp_norm.", "blocks.1.mlp."), "attn": attention, "attn_out": attention,
              "block": ("blocks.1.",)}[target]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith(prefix)}
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("latent", ["teacher", "student"])
def test_attn_out_loss_is_the_mse_of_the_two_attention_outputs_on_the_same_input(latent):
    """Computed directly with the modules: the student's attention sublayer and the teacher's, both on the latent
    entering layer i (the teacher's, or the student's own), against the cache's layer loss; and after the layer
    the cache moves on through the whole block."""
    teacher = tiny_gpt(0)
    config = student_module.student_config(teacher.config, "keep", window=4)  # windowed attention everywhere
    student, _ = student_module.build_student(teacher, config)
    torch.manual_seed(3)
    for block in student.blocks:  # and attention weights that differ from the teacher's
        block.attn.proj.weight.data.add_(0.05 * torch.randn_like(block.attn.proj.weight))
    tokens = [torch.randint(0, 96, (2, 24)) for _ in range(2)]
    cache = LayerCache(teacher, student, tokens, "cpu", torch.autocast("cpu", enabled=False), latent=latent,
                       target="attn_out")
    cos, sin = student.rope(0, 24, "cpu")
    with torch.no_grad():
        entering = [hidden_states(teacher if latent == "teacher" else student, x) for x in tokens]
    for i in range(3):
        inputs, targets = cache.begin_layer(i, env1())
        for n in range(2):
            x = entering[n][i]
            with torch.no_grad():
                s_out = student.blocks[i].attn(student.blocks[i].attn_norm(x), cos, sin)
                t_out = teacher.blocks[i].attn(teacher.blocks[i].attn_norm(x), cos, sin)
                out = layer_cache.trainable_part(student.blocks[i], inputs[n], cos, sin, "attn_out")
            loss = layer_cache.layer_loss(out, targets[n], inputs[n])
            torch.testing.assert_close(loss, F.mse_loss(s_out, t_out), rtol=1e-4, atol=1e-7)
            assert loss > 0
        cache.end_layer()
    with torch.no_grad():  # the teacher's latent went on through the teacher's blocks, not its attention alone
        torch.testing.assert_close(cache.teacher_latent[0], hidden_states(teacher, tokens[0])[3], rtol=1e-5,
                                   atol=1e-5)


def test_attention_gets_its_own_learning_rate_in_both_phases_and_after_a_resume(teacher_dir, data_dir, tmp_path):
    """LR_ATTN / LR_ATTN_LAYER: the attention groups step at their own peak LR under the same schedule; a resumed
    run's groups take this run's LRs (the saved ones do not leak back)."""
    model = tiny_gpt()
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu", attn_lr=5e-3)
    training.set_lr(optimizer, 2e-4)  # somewhere on the schedule
    attention = {id(p) for b in model.blocks for m in (b.attn_norm, b.attn) for p in m.parameters()}
    for group in optimizer.param_groups:
        inside = {id(p) in attention for p in group["params"]}
        assert len(inside) <= 1
        assert group["lr"] == pytest.approx(1e-3 if inside == {True} else 2e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert len(model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu").param_groups) == 2  # no split: as before
    run = str(tmp_path / "run")
    args = distill_args(teacher_dir, data_dir, run, "--phases", "2", "--max-steps", "4", "--checkpoint-every", "2",
                        "--lr", "1e-3", "--lr-attn", "4e-3", "--warmup-steps", "0", "--lr-schedule", "constant")
    run_here(*args)
    saved = torch.load(os.path.join(run, "step_000002.pt"), weights_only=True)["optimizer"]["param_groups"]
    assert sorted({round(g["lr"], 9) for g in saved}) == [1e-3, 4e-3]
    os.remove(os.path.join(run, "step_000004.json"))  # resume from step 2 with another attention LR
    captured = {}
    real_step = distill.guarded_step

    def recording(optimizer, *a, **k):
        captured["lrs"] = sorted({round(g["lr"], 9) for g in optimizer.param_groups})
        return real_step(optimizer, *a, **k)

    distill.guarded_step = recording
    try:
        run_here(*args[:-6], "--lr-attn", "2e-3", "--warmup-steps", "0", "--lr-schedule", "constant", "--resume")
    finally:
        distill.guarded_step = real_step
    assert captured["lrs"] == [1e-3, 2e-3]


def test_target_tokens_sets_the_phase2_steps_and_phase1_states_its_budget(teacher_dir, data_dir, tmp_path, capsys):
    run = str(tmp_path / "run")
    run_here(*distill_args(teacher_dir, data_dir, run, "--layers", "[1]", "--steps-per-layer", "2",
                           "--target-tokens", "300", "--checkpoint-every", "0"))  # 300 / 128 per step -> 3 steps
    out = capsys.readouterr().out
    assert "phase 1 budget: 1 rotation(s) x 4 batches x 128 tokens = 512 tokens through the teacher" in out
    assert "2 layer steps x 128 tokens" in out
    assert "phase 2: steps 0 -> 3" in out and os.path.exists(os.path.join(run, "step_000003.pt"))


def test_a_time_budget_ends_phase2_at_the_steps_that_fit_and_records_them(teacher_dir, data_dir, tmp_path):
    run, budget = str(tmp_path / "run"), 0.2  # minutes
    started = time.perf_counter()
    run_here(*distill_args(teacher_dir, data_dir, run, "--phases", "2", "--max-steps", "100000", "--warmup-steps", "5",
                           "--checkpoint-every", "0", "--budget-minutes", budget))
    seconds = time.perf_counter() - started
    fit = [r for r in records(run) if r.get("event") == "budget"]  # set after the warmup, said again as it moves
    assert fit[0]["step"] == 5 and fit[0]["step_seconds"] > 0 and fit[0]["max_steps"] < 100000
    steps = [r["step"] for r in records(run) if r["phase"] == 2 and "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] < 100000
    saved = torch.load(os.path.join(run, f"step_{steps[-1]:06d}.pt"), weights_only=True)
    assert saved["budget_steps"] == steps[-1] and saved["config"]["max_steps"] == steps[-1]
    assert 0 < saved["budget_elapsed"] < seconds
    assert steps[-1] == 5 or seconds < 60 * budget * 1.25, seconds  # it ran on until its budget, not past it


def test_a_resumed_time_budgeted_run_keeps_its_horizon_its_time_and_its_weights(teacher_dir, data_dir, tmp_path,
                                                                                 monkeypatch):
    args = ["--phases", "2", "--max-steps", "20", "--warmup-steps", "4", "--checkpoint-every", "2",
            "--keep-checkpoints", "0", "--budget-minutes", "30"]
    seen = []  # (step, time spent) each time the horizon is fitted, always to step 12 here

    def horizon(step, max_steps, budget_seconds, elapsed_seconds, *a, **k):
        seen.append((step, elapsed_seconds))
        return 12

    monkeypatch.setattr(distill, "steps_in_budget", horizon)
    run_here(*distill_args(teacher_dir, data_dir, str(tmp_path / "straight"), *args))
    assert [step for step, _ in seen] == list(range(4, 13))  # from the end of the warmup, every step
    assert [r["max_steps"] for r in records(str(tmp_path / "straight")) if r.get("event") == "budget"] == [12]
    resumed = distill_args(teacher_dir, data_dir, str(tmp_path / "resumed"), *args)
    # in step 7; the last checkpoint is step 6, saved after the horizon was set at step 4
    run_until_crash(monkeypatch, resumed, "phase2_loss", after_calls=6)
    saved = torch.load(tmp_path / "resumed" / "step_000006.pt", weights_only=True)
    assert saved["budget_steps"] == 12 and saved["budget_elapsed"] > 0
    seen.clear()
    run_here(*resumed, "--resume")
    assert not os.path.exists(tmp_path / "resumed" / "step_000013.pt")
    # timed again once 3 steps after the resume's first are measured; the time spent before the crash still counts
    assert [step for step, _ in seen] == [10, 11, 12] and seen[0][1] > saved["budget_elapsed"]
    a, b = (torch.load(tmp_path / run / "step_000012.pt", weights_only=True) for run in ("straight", "resumed"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_batch_order_is_a_pure_function_that_visits_every_cached_batch_once_per_pass():
    order = [layer_cache.batch_index(7, 1, 3, s, 5) for s in range(10)]
    assert order == [layer_cache.batch_index(7, 1, 3, s, 5) for s in range(10)]
    assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))
    assert order != [layer_cache.batch_index(7, 1, 4, s, 5) for s in range(10)]


def test_the_shipped_configs_are_valid_for_distill(tmp_path):
    for name in ("distill_smollm2_mlp_half.yaml", "distill_smollm2_hybrid_window.yaml"):
        settings, _ = distill.read_settings(["--config", os.path.join(REPO, "configs", name)])
        assert settings.teacher == "models/smollm2_135m"
    assert settings.window == 256 and settings.full_attn_layers == [0, 10, 20, 29]


# ----------------------------------------------------------------------------------------------------------
# distill.py end to end, on a tiny random Llama teacher and tiny shards

def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def distill_args(teacher_dir, data_dir, run_dir, *extra):
    return ["--teacher", teacher_dir, "--data-dir", data_dir, "--run-dir", run_dir, *TINY, *extra]


def run_here(*args):
    """distill.main() in this process, as `python distill.py ARGS` would run it (saves a subprocess start-up)."""
    distill.main([str(a) for a in args])


def run_until_crash(monkeypatch, args, function, after_calls):
    """run_here(ARGS) with distill.FUNCTION (phase2_loss, layer_step) raising on its call after_calls + 1: a crash
    mid-step, after whatever checkpoints came before it. The real function is back afterwards."""
    calls, real = [0], getattr(distill, function)

    def crashing(*a, **k):
        calls[0] += 1
        if calls[0] > after_calls:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(distill, function, crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_here(*args)
    monkeypatch.setattr(distill, function, real)


def test_phase1_lowers_each_layer_loss_and_the_kl_and_phase2_lowers_the_kl_further(teacher_dir, data_dir, tmp_path):
    run = str(tmp_path / "run")
    run_script("distill.py", *distill_args(teacher_dir, data_dir, run, "--num-batches", "16", "--steps-per-layer", "100",
                                           "--lr-layer", "3e-3", "--max-steps", "60", "--alpha", "1.0", "--lr", "5e-4",
                                           "--warmup-steps", "5", "--checkpoint-every", "30", "--mlp-init", "zero",
                                           "--layer-loss", "mse"), env=ENV)
    log = records(run)
    start, end = [r for r in log if r["phase"] == 1 and r.get("event") == "eval"]  # only before and after phase 1
    assert start["layer"] is None and end["layer"] == 2
    layers = [r for r in log if r.get("event") == "layer_done"]
    assert [r["layer"] for r in layers] == [0, 1, 2]
    for r in layers:
        assert r["val_loss_after"] < 0.85 * r["val_loss_before"], r
        assert r["r2_before"] < r["r2_after"] <= 1, r  # zero-init MLPs explain none of the teacher's: R^2 starts at 0
        assert abs(r["r2_before"]) < 1e-6, r
    after_phase1 = end["kl"]
    assert after_phase1 < 0.8 * start["kl"], (start["kl"], after_phase1)
    phase2 = [r for r in log if r["phase"] == 2 and r.get("event") == "eval"]
    assert [r["step"] for r in phase2] == [30, 60]
    assert phase2[-1]["kl"] < 0.95 * after_phase1, (after_phase1, phase2[-1]["kl"])
    for key in ("val_ce", "val_ppl", "teacher_ce", "kl", "top1_agree"):
        assert key in phase2[-1]
    names = sorted(os.listdir(run))
    for name in ("layer_000.pt", "layer_001.pt", "layer_002.pt", "final.pt", "step_000030.pt", "step_000060.pt",
                 "config.json", "tokenizer"):
        assert name in names
    # layer checkpoints: layer 1's training changed only layer 1's MLP; later MLPs are still the zero-init ones
    s0, s1 = (torch.load(os.path.join(run, f"layer_00{i}.pt"), weights_only=True)["model"] for i in (0, 1))
    assert {k for k in s0 if not torch.equal(s0[k], s1[k])} == {k for k in s0 if k.startswith(("blocks.1.mlp_norm",
                                                                                               "blocks.1.mlp."))}
    assert s0["blocks.2.mlp.down.weight"].abs().max() == 0
    # any student checkpoint samples
    run_script("sample.py", os.path.join(run, "final.pt"), "--prompt", "The river", "--max-new-tokens", "5",
               "--device", "cpu", env=ENV)


@pytest.mark.parametrize("crash_after,resumes_at", [(25, (1, 0, 3)), (21, (1, 0, 0))])
def test_resume_mid_rotation_ends_with_the_same_weights_as_an_uninterrupted_run(teacher_dir, data_dir, tmp_path,
                                                                                   monkeypatch, capsys, crash_after,
                                                                                   resumes_at):
    """Crashed mid-layer (25 steps: rotation 1's first layer saved at its step 3) or right after a finished layer
    (21: the layer checkpoint is newer than the rolling state), with the default prune init and nmse loss."""
    common_args = ["--phases", "1", "--steps-per-layer", "10", "--checkpoint-every-layer", "3", "--latent", "student",
                   "--target-trainable", "block", "--rotations", "2", "--layers", "[0, 2]", "--mlp-hidden", "40"]
    straight = str(tmp_path / "straight")
    run_here(*distill_args(teacher_dir, data_dir, straight, *common_args))
    resumed = str(tmp_path / "resumed")
    args = distill_args(teacher_dir, data_dir, resumed, *common_args)
    run_until_crash(monkeypatch, args, "layer_step", after_calls=crash_after)
    assert not os.path.exists(os.path.join(resumed, "final.pt"))
    capsys.readouterr()
    run_here(*args, "--resume")
    rotation, position, step = resumes_at
    assert f"rotation {rotation}, layer position {position}, step {step}" in capsys.readouterr().out
    a = torch.load(os.path.join(straight, "final.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed, "final.pt"), weights_only=True)
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["loader"] == b["loader"]


@pytest.mark.parametrize("order", ["stream", "shuffled"])
def test_phase2_resumes_after_a_crash_with_the_same_weights_as_an_uninterrupted_run(teacher_dir, data_dir, tmp_path,
                                                                                    monkeypatch, order):
    args = ["--phases", "2", "--max-steps", "10", "--checkpoint-every", "4", "--top-k", "16", "--grad-accum", "2",
            "--data-order", order]
    run_here(*distill_args(teacher_dir, data_dir, str(tmp_path / "straight"), *args))
    resumed = distill_args(teacher_dir, data_dir, str(tmp_path / "resumed"), *args)
    # in step 7 (two micro-batches a step); the last checkpoint is step 4
    run_until_crash(monkeypatch, resumed, "phase2_loss", after_calls=13)
    run_here(*resumed, "--resume")
    a, b = (torch.load(tmp_path / run / "step_000010.pt", weights_only=True) for run in ("straight", "resumed"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["loader"] == b["loader"] and a["loader"]["order"] == order
    phase2 = [r["step"] for r in records(str(tmp_path / "resumed")) if r["phase"] == 2 and "loss" in r]
    assert phase2 == list(range(1, 11))  # the records of the lost steps 5-6 were dropped and redone
    assert all(r["epoch"] == 0 for r in records(str(tmp_path / "resumed")) if r["phase"] == 2 and "loss" in r)


def test_resuming_phase1_with_a_changed_setting_names_it(teacher_dir, data_dir, tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:  # left by a run that crashed before a checkpoint
        f.write(json.dumps({"phase": 1, "step": 99, "loss": 1.0}) + "\n")
    args = distill_args(teacher_dir, data_dir, run, "--phases", "1", "--steps-per-layer", "2", "--layers", "[0, 1]")
    run_here(*args)
    assert not any(r["step"] == 99 for r in records(run))  # a fresh start does not append to stale records
    for suffix in (".pt", ".json"):  # as if the run had crashed after layer 1's checkpoint
        os.remove(os.path.join(run, "final" + suffix))
    with pytest.raises(SystemExit, match=r"settings changed since it was saved \(lr_layer: 0.001 -> 0.005\)"):
        run_here(*args, "--resume", "--lr-layer", "5e-3")
    run_here(*args, "--resume", "--log-every", "7")  # a setting that does not change the result may change
    assert os.path.exists(os.path.join(run, "final.pt"))


def test_cached_teacher_val_states_give_the_same_eval_as_running_the_teacher():
    teacher, student = tiny_gpt(0), tiny_gpt(1)
    torch.manual_seed(2)
    batches = [(torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))) for _ in range(3)]
    ctx = runtime.autocast("cpu", torch.float32)
    cached = losses.teacher_val_hidden(teacher, batches, ctx)
    a = losses.evaluate(student, batches, env1(), ctx, chunk_rows=10, teacher=teacher, teacher_hidden=cached)
    b = losses.evaluate(student, batches, env1(), ctx, chunk_rows=10, teacher=teacher)
    assert a == b and set(a) == {"val_ce", "val_ppl", "val_tokens", "teacher_ce", "kl", "top1_agree"} and a["kl"] > 0


def test_ce_only_run_loads_no_teacher_and_resumes_with_kd_logging_the_switch(teacher_dir, data_dir, tmp_path,
                                                                              capsys):
    run = str(tmp_path / "run")
    base = distill_args(teacher_dir, data_dir, run, "--phases", "2", "--checkpoint-every", "5")
    run_here(*base, "--steps-per-layer", "5", "--phases", "1")
    capsys.readouterr()
    run_here(*base, "--alpha", "0", "--max-steps", "5", "--resume")
    assert "not loaded (alpha = 0)" in capsys.readouterr().out
    run_here(*base, "--alpha", "0.5", "--max-steps", "10", "--resume")
    assert "switch: alpha 0.0 -> 0.5 at phase-2 step 5" in capsys.readouterr().out
    log = records(run)
    switch = [r for r in log if r.get("event") == "alpha_switch"]
    assert switch == [{"phase": 2, "step": 5, "event": "alpha_switch", "alpha_before": 0.0, "alpha": 0.5}]
    steps = [r for r in log if r["phase"] == 2 and "loss" in r]
    assert [r["kd"] is None for r in steps] == [True] * 5 + [False] * 5


def test_two_torchrun_processes_train_the_same_weights_as_one_process_with_twice_the_batch(teacher_dir, data_dir,
                                                                                              tmp_path):
    """Loader windows are B*T tokens apart and rank r takes windows r, r+W, ...: ranks 0 and 1 with batch B read
    rows 0..B-1 and B..2B-1 of the window one process with batch 2B reads. Their mean losses average to its
    mean loss and DDP / the phase-1 all-reduce average the gradients, so only float rounding may differ."""
    args = ["--steps-per-layer", "6", "--max-steps", "4", "--checkpoint-every", "4", "--num-batches", "2",
            "--top-k", "8", "--grad-clip", "0.5"]
    one = str(tmp_path / "one")
    run_here(*distill_args(teacher_dir, data_dir, one, *args, "--batch-size", "8"))
    two = str(tmp_path / "two")
    cmd = torchrun("distill.py", 2, *distill_args(teacher_dir, data_dir, two, *args, "--batch-size", "4"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.load(open(os.path.join(two, "step_000004.json")))["world_size"] == 2
    for name in ("final.pt", "step_000004.pt"):
        a, b = (torch.load(os.path.join(run, name), weights_only=True)["model"] for run in (one, two))
        moved = torch.load(os.path.join(one, "layer_000.pt"), weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
        assert any(not torch.equal(moved[k], a[k]) for k in a)  # the comparison covers trained weights


def test_two_torchrun_processes_under_a_time_budget_stop_at_the_same_step(teacher_dir, data_dir, tmp_path):
    """Each rank re-fits the horizon from its own clock; the all-reduce of their times makes it one horizon, or
    a rank would wait for the other's next step forever (the timeout below)."""
    run = str(tmp_path / "two")
    cmd = torchrun("distill.py", 2, *distill_args(teacher_dir, data_dir, run, "--phases", "2", "--max-steps", "100000",
                                                  "--warmup-steps", "4", "--checkpoint-every", "0",
                                                  "--budget-minutes", "0.2"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [r["step"] for r in records(run) if r["phase"] == 2 and "loss" in r]
    assert [r for r in records(run) if r.get("event") == "budget"] and 4 <= steps[-1] < 100000
    assert json.load(open(os.path.join(run, f"step_{steps[-1]:06d}.json")))["world_size"] == 2


def test_bad_input_is_refused_before_any_work(teacher_dir, data_dir, tmp_path, bpe_tokenizer_dir, monkeypatch):
    def fails(*extra, data=data_dir):
        run = str(tmp_path / "run")
        with pytest.raises(SystemExit) as error:
            run_here(*distill_args(teacher_dir, data, run, *extra))
        assert not os.path.exists(os.path.join(run, "metrics.jsonl"))
        return str(error.value)

    assert "layer(s) [3] out of range" in fails("--layers", "[0, 3]")
    assert "expected increasing layer indices" in fails("--layers", "[2, 0]")
    with monkeypatch.context() as m:  # the cache size is arithmetic: refused before any model is loaded
        m.setattr(distill, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
        message = fails("--num-batches", "100000000")
    assert "the phase-1 cache needs" in message and "GiB of host memory" in message
    # a student whose width does not line up with the teacher's
    wide = make_tiny_llama(tmp_path / "wide", bpe_tokenizer_dir, hidden_size=96)
    other, _ = distill.load_model(wide)
    path = str(tmp_path / "other.pt")
    checkpoints.save_checkpoint(path, {"model": other.state_dict(), "model_config": dataclasses.asdict(other.config),
                                       "step": 0, "tokenizer": wide})
    assert "n_embd = 96 but the teacher" in fails("--init-from", path)
    # shards made with another tokenizer than the teacher's
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(english_like_documents(50, seed=9), trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other_tok = str(tmp_path / "other_tok")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(other_tok)
    other_data = write_token_dataset(tmp_path / "other_data", other_tok, n_docs=40, val_tokens=1000)
    assert "re-run prepare.py with this model's tokenizer" in fails(data=other_data)
    assert "it needs refit_down = true" in fails("--neuron-select", "lsq", "--refit-down", "false")
    assert "sink_tokens = 65; expected an int from 0 to 64" in fails("--window", "4", "--sink-tokens", "65")
    assert "mlp_hidden = [16, 0]; expected a positive int" in fails("--mlp-hidden", "[16, 0]")
    assert "mlp_hidden lists 2 widths but there are 3 new MLPs" in fails("--mlp-hidden", "[16, 24]")


def test_per_layer_widths_build_initialise_and_export_the_student_the_recipe_describes(teacher_dir, data_dir, tmp_path):
    """Layer 1 keeps the teacher's MLP; 0 and 2 get their own widths, pruned from the teacher's neurons."""
    run = str(tmp_path / "run")
    run_here(*distill_args(teacher_dir, data_dir, run, "--mlp-kind", "swiglu", "--mlp-layers", "[2, 0]",
                           "--mlp-hidden", "[120, 40]", "--phases", "2", "--max-steps", "1",
                           "--checkpoint-every", "1", "--export-hf"))
    student, _ = distill.load_model(os.path.join(run, "step_000001.pt"))
    teacher, _ = distill.load_model(teacher_dir)
    assert student.config.mlp_hidden == [40, 160, 120]
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["student_config"]["mlp_hidden"] == [40, 160, 120]
    # the pruned layers hold teacher neurons: each student gate row is (one phase-2 step away from) a distinct
    # one of the teacher's, far nearer to it than to any other
    for i, width in ((0, 40), (2, 120)):
        distance = torch.cdist(student.blocks[i].mlp.gate_up.weight[:width], teacher.blocks[i].mlp.gate_up.weight[:160])
        nearest = distance.topk(2, dim=1, largest=False)
        assert (nearest.values[:, 0] < 0.25 * nearest.values[:, 1]).all()
        assert len(set(nearest.indices[:, 0].tolist())) == width
    # exported as a Llama, each MLP zero-padded to the widest (160): the same logits in transformers
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf"), dtype=torch.float32).eval()
    assert exported.config.intermediate_size == 160
    idx = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, student.eval().logits(idx), atol=1e-4, rtol=1e-4)


def test_a_swiglu_student_exports_to_hugging_face_with_the_same_logits(teacher_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = str(tmp_path / "run")
    run_here(*distill_args(teacher_dir, data_dir, run, "--mlp-kind", "swiglu", "--steps-per-layer", "2",
                           "--max-steps", "2", "--checkpoint-every", "2", "--export-hf"))
    student, _ = distill.load_model(os.path.join(run, "step_000002.pt"))
    assert student.config.mlp_kind == ["swiglu"] * 3 and student.config.mlp_hidden[0] == 80  # half of 160
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf"), dtype=torch.float32).eval()
    idx = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, student.eval().logits(idx), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# KL-guided choice of full-attention layers

def test_selection_ranks_by_measured_kl_resumes_without_redoing_candidates_and_auto_n_reads_it(
        teacher_dir, data_dir, tmp_path, monkeypatch, capsys):
    run = str(tmp_path / "select")
    args = distill_args(teacher_dir, data_dir, run, "--phases", "select", "--window", "4", "--mlp-kind", "keep")
    measured, real = [], distill.measure_candidate

    def killed_after_one(r, layer):
        if measured:
            raise RuntimeError("killed")
        measured.append(layer)
        return real(r, layer)

    monkeypatch.setattr(distill, "measure_candidate", killed_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        run_here(*args)
    monkeypatch.setattr(distill, "measure_candidate", lambda r, layer: measured.append(layer) or real(r, layer))
    with pytest.raises(SystemExit, match="pass --resume"):
        run_here(*args)
    run_here(*args, "--resume")
    assert measured == [0, 1, 2]  # layer 0 once, before the kill; then only the others
    selection = json.load(open(os.path.join(run, "selection.json")))
    kls = {int(j): c["kl"] for j, c in selection["candidates"].items()}
    assert selection["ranking"] == sorted(kls, key=kls.get) and len(set(kls.values())) == 3
    assert all(kl < selection["baseline"]["kl"] for kl in kls.values())  # full attention anywhere helps
    assert "rank | layer | kl" in capsys.readouterr().out
    hybrid = str(tmp_path / "hybrid")
    run_here(*distill_args(teacher_dir, data_dir, hybrid, "--window", "4", "--mlp-kind", "keep",
                           "--full-attn-layers", "auto:2", "--selection", os.path.join(run, "selection.json"),
                           "--phases", "2", "--max-steps", "1"))
    windows = json.load(open(os.path.join(hybrid, "step_000001.json")))["model_config"]["window"]
    assert [i for i, w in enumerate(windows) if w is None] == sorted(selection["ranking"][:2])
    with pytest.raises(SystemExit, match="ranks only 3 layers"):
        run_here(*distill_args(teacher_dir, data_dir, str(tmp_path / "x"), "--window", "4", "--full-attn-layers",
                               "auto:5", "--selection", os.path.join(run, "selection.json")))


def test_selection_with_phase2_steps_trains_each_candidate_in_its_own_sub_run(teacher_dir, data_dir, tmp_path):
    run = str(tmp_path / "select")
    run_here(*distill_args(teacher_dir, data_dir, run, "--phases", "select", "--window", "4", "--mlp-kind", "keep",
                           "--select-steps", "2", "--select-layers", "[0, 2]", "--alpha", "1.0", "--lr", "1e-3",
                           "--sink-tokens", "2"))
    selection = json.load(open(os.path.join(run, "selection.json")))
    assert sorted(selection["candidates"]) == ["0", "2"] and selection["settings"]["sink_tokens"] == 2
    for j in (0, 2):
        mark = json.load(open(os.path.join(run, "select", f"layer_{j:02d}", "step_000002.json")))
        assert mark["eval"]["kl"] == pytest.approx(selection["candidates"][str(j)]["kl"])
        assert mark["model_config"]["window"][j] is None and mark["model_config"]["window"][1] == 4
        assert mark["model_config"]["sink_tokens"] == 2


def test_phase1_trains_only_the_windowed_layers_when_attention_is_all_that_changed():
    teacher = tiny_gpt()
    settings = lambda *a: distill.read_settings(["--run-dir", "unused", *a])[0]
    hybrid = student_module.student_config(teacher.config, "keep", window=4, full_attn_layers=[1])
    assert distill.phase1_layers(settings("--mlp-kind", "keep", "--window", "4"), hybrid) == [0, 2]
    halved = student_module.student_config(teacher.config, "relu2", window=4, full_attn_layers=[1])
    assert distill.phase1_layers(settings("--window", "4"), halved) == [0, 1, 2]  # new MLPs everywhere


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                                         if f.startswith("distill_") and f.endswith(".yaml")))
def test_every_shipped_distill_config_passes_distills_own_checks(monkeypatch, name):
    monkeypatch.chdir(REPO)  # configs name their files (a selection ranking) relative to the repo root
    settings, _ = distill.read_settings(["--config", os.path.join("configs", name)])
    if name in ("distill_smollm2_cpu_30min.yaml", "distill_smollm2_seed_cpu_30min.yaml"):  # timed as budgets (README)
        assert settings.budget_minutes is not None and settings.budget_minutes <= 30


def test_the_hybrid_cpu_recipe_takes_its_full_layers_from_the_shipped_ranking(monkeypatch):
    monkeypatch.chdir(REPO)  # the config names the ranking relative to the repo root
    settings, _ = distill.read_settings(["--config", "configs/distill_smollm2_hybrid_cpu_30min.yaml"])
    selection = json.load(open(settings.selection))
    assert settings.full_attn_layers == sorted(selection["ranking"][:4]) and settings.window == 64
    # the ranking was measured on the student the recipe builds: the same window and sinks
    assert (selection["settings"]["window"], selection["settings"]["sink_tokens"]) == (64, settings.sink_tokens)
    assert sum(1 for i in range(30) if i not in settings.full_attn_layers) >= 26
    assert settings.mlp_kind == "keep" and settings.target_trainable == "attn_out"
