"""losses.evaluate against the same numbers computed from each model's full logits: F.cross_entropy, the KL of
the full log-softmaxes and the fraction of tokens whose argmaxes agree."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import losses
import runtime
from model import GPT, GPTConfig


def tiny_gpt(seed, **overrides):
    fields = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=64,
                  max_seq_len=64)
    fields.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**fields)).init_weights(std=0.1)


def val_batches(n=3, batch_size=2, seq_len=16, vocab_size=96):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, vocab_size, (n, batch_size, seq_len + 1), generator=g)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def reference(student, teacher, batches):
    """The eval numbers from whole (tokens, vocab) logits, over every token of every batch at once."""
    with torch.no_grad():
        ls = torch.cat([student.logits(x).flatten(0, 1) for x, _ in batches])
        lt = torch.cat([teacher.logits(x).flatten(0, 1) for x, _ in batches])
    y = torch.cat([y.flatten() for _, y in batches])
    log_p, log_q = F.log_softmax(lt, -1), F.log_softmax(ls, -1)
    return {"val_ce": F.cross_entropy(ls, y).item(), "teacher_ce": F.cross_entropy(lt, y).item(),
            "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
            "top1_agree": (ls.argmax(-1) == lt.argmax(-1)).float().mean().item()}


@pytest.mark.parametrize("cached_teacher", [False, True])
def test_eval_matches_full_logit_cross_entropy_kl_and_top1_agreement(cached_teacher):
    student = tiny_gpt(0)
    teacher = tiny_gpt(1, n_layer=3, mlp_kind="gelu").eval()
    batches = val_batches()
    expected = reference(student, teacher, batches)
    assert 0 < expected["top1_agree"] < 1 and expected["top1_agree"] != 0.5  # agreement and its complement differ
    assert expected["kl"] > 0.01
    teacher_hidden = losses.teacher_val_hidden(teacher, batches, contextlib.nullcontext()) if cached_teacher else None
    got = losses.evaluate(student, batches, runtime.setup_device("cpu"), contextlib.nullcontext(), chunk_rows=7,
                          teacher=teacher, teacher_hidden=teacher_hidden)  # 7 rows: chunks straddle the batches
    assert set(got) == {"val_ce", "val_ppl", "val_tokens", "teacher_ce", "kl", "top1_agree"}
    assert got["val_tokens"] == sum(y.numel() for _, y in batches)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["val_ppl"] == pytest.approx(math.exp(expected["val_ce"]), rel=1e-5)
    assert student.training  # eval puts the model back in the mode it found it in


def test_eval_without_a_teacher_reports_only_the_models_own_cross_entropy():
    student = tiny_gpt(0).eval()
    batches = val_batches()
    got = losses.evaluate(student, batches, runtime.setup_device("cpu"), contextlib.nullcontext(), chunk_rows=5)
    expected = reference(student, student, batches)
    assert set(got) == {"val_ce", "val_ppl", "val_tokens"}
    assert got["val_ce"] == pytest.approx(expected["val_ce"], rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(expected["val_ce"]), rel=1e-5)
    assert not student.training
