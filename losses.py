"""Losses on the LM head, a chunk of tokens at a time: next-token CE, KD = T^2 * KL(teacher || student) over the
full vocabulary or over the teacher's top-k ids plus a tail bucket, their mix, and the eval numbers.

One routine serves train.py (CE), distill.py phase 2 (CE + KD) and every eval. Each chunk's logits are formed,
turned into the chunk's loss and straight into the gradients for the hidden states and the head weight, then
freed: neither model's (N, vocab) fp32 logits exist at once, in forward or backward, and nothing is recomputed.
"""
import math

import torch
import torch.nn.functional as F

from model import matmul


def default_chunk_rows(vocab_size):
    return max(1, 2 ** 25 // vocab_size)  # ~128 MiB of fp32 logits per chunk


def kl_full(student_logits, teacher_logits, temperature=1.0):
    """Per row: T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the whole vocabulary, in fp32."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_full_and_teacher_probs(student_logits, teacher_logits, temperature=1.0, student_lse=None):
    """kl_full's rows, and the teacher's probabilities p = softmax(teacher / T): the rows' gradient with respect to
    the student logits is T (softmax(student / T) - p), so training builds it without an autograd graph (which
    keeps about ten vocab-wide temporaries per chunk). Overwrites teacher_logits, which must be fp32. `student_lse`:
    logsumexp(student / T) when the caller has it already."""
    s = student_logits if temperature == 1.0 else student_logits / temperature
    log_p = teacher_logits if temperature == 1.0 else teacher_logits.div_(temperature)
    log_p = log_p.sub_(log_p.logsumexp(-1, keepdim=True))
    p = log_p.exp()
    lse = s.logsumexp(-1) if student_lse is None else student_lse
    kl = log_p.sub_(s).add_(lse[:, None]).mul_(p).sum(-1)  # sum p (log p - log q), in place
    return temperature ** 2 * kl, p


def kl_topk(student_logits, teacher_logits, k, temperature=1.0):
    """Per row: T^2 * the exact KL over k+1 buckets, the teacher's top-k ids one by one and everything else as
    one tail bucket (the teacher's tail mass vs the student's tail mass on the same ids). Merging buckets can
    only lose divergence, so 0 <= kl_topk <= kl_full, with equality at k = vocab (the tail is empty)."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    k = min(k, t.shape[-1])
    top_t, ids = t.topk(k, dim=-1)
    lse_t, lse_s = t.logsumexp(-1, keepdim=True), s.logsumexp(-1, keepdim=True)
    log_p = top_t - lse_t  # the teacher's log-probabilities of its top k
    log_q = s.gather(-1, ids) - lse_s  # the student's on the same ids
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if k < t.shape[-1]:  # the tail bucket's masses, from logsumexp over the other ids (exact, no 1 - sum)
        in_top = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, ids, True)
        log_p_tail = t.masked_fill(in_top, float("-inf")).logsumexp(-1) - lse_t.squeeze(-1)
        log_q_tail = s.masked_fill(in_top, float("-inf")).logsumexp(-1) - lse_s.squeeze(-1)
        kl = kl + log_p_tail.exp() * (log_p_tail - log_q_tail)
    return temperature ** 2 * kl


def kl_cached(student_logits, ids, values, temperature=1.0):
    """Per row: kl_topk with the teacher's side read from teacher_cache.py's entries: `ids` (N, k), `values`
    (N, >= k + 1) log-probabilities at T = 1 of those ids, then of the tail bucket. At T = 1 it equals kl_topk on
    the live teacher. At T != 1 the k + 1 bucket log-probs are divided by T and renormalised, i.e. the tail is
    tempered as one token holding all its mass (exact tempering needs every tail id, which a cache does not keep;
    the student's side is exact at any T)."""
    k = ids.shape[-1]
    s = student_logits.float() / temperature
    lse_s = s.logsumexp(-1, keepdim=True)
    log_q = s.gather(-1, ids) - lse_s
    log_p = values[:, :k + 1].float()
    if temperature != 1.0:
        log_p = log_p / temperature
        log_p = log_p - log_p.logsumexp(-1, keepdim=True)
    kl = (log_p[:, :k].exp() * (log_p[:, :k] - log_q)).sum(-1)
    if k < s.shape[-1]:
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, ids, True)
        log_q_tail = s.masked_fill(in_top, float("-inf")).logsumexp(-1) - lse_s.squeeze(-1)
        kl = kl + log_p[:, k].exp() * (log_p[:, k] - log_q_tail)
    return temperature ** 2 * kl


class ChunkedHeadLoss(torch.autograd.Function):
    """ce_weight * CE + kd_weight * KD of (hidden @ weight.T), means over the target tokens, one chunk of rows at
    a time. With `adaptive` = b > 0 each token's KD is weighted by 1 + b * p_teacher(y) * (1 - p_student(y)) (y
    the target, both at T = 1, no gradient through the weight): more where the teacher is sure of the right
    token and the student is not.

    The gradient with respect to a chunk's logits is built in forward (CE's softmax - onehot and full-vocabulary
    KD's softmax - p_teacher in closed form, top-k and cached KD's through autograd on the logits alone), then
    pushed through the head matmul by hand; backward only scales what forward stored. Returns (loss, mean CE,
    mean weighted KD); the last two are for logging.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, teacher, options):
        ce_weight, kd_weight, adaptive, temperature, top_k, chunk_rows, need_hidden_grad, need_weight_grad = options
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # CE, KD
        need_grad = need_hidden_grad or need_weight_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, ok = hidden[rows], targets[rows], valid[rows]
            logits = matmul(h, weight.t()).float()
            safe_t = t.clamp(min=0)
            log_z = torch.logsumexp(logits, dim=-1)
            sums[0] += ((log_z - logits.gather(1, safe_t[:, None]).squeeze(1)) * ok).sum()
            kd_grad = teacher_p = None
            token_weight = ok.float()
            if kd_weight > 0:
                if adaptive > 0:
                    p_student = (logits.gather(1, safe_t[:, None]).squeeze(1) - log_z).exp()
                    p_teacher = teacher_target_logprob(teacher, rows, safe_t).exp()
                    token_weight = token_weight * (1 + adaptive * p_teacher * (1 - p_student))
                if teacher[0] == "live" and top_k == 0:  # closed form: no autograd graph over vocab-wide rows
                    teacher_logits = live_teacher_logits(teacher, rows)
                    kd, teacher_p = kl_full_and_teacher_probs(logits, teacher_logits, temperature,
                                                              log_z if temperature == 1.0 else None)
                    kd = (kd * token_weight).sum()
                    del teacher_logits
                    if need_grad and temperature != 1.0:  # d(T^2 KL)/d logits = T (q_T - p_T) per row
                        kd_grad = F.softmax(logits / temperature, dim=-1).sub_(teacher_p)
                        kd_grad.mul_((temperature * token_weight)[:, None])
                        teacher_p = None
                else:
                    with torch.enable_grad():
                        student_logits = logits.detach().requires_grad_(need_grad)
                        kd = (teacher_kd(teacher, rows, student_logits, temperature, top_k) * token_weight).sum()
                        if need_grad:
                            (kd_grad,) = torch.autograd.grad(kd, student_logits)
                    del student_logits  # a chunk of vocab-wide rows: freed before g is built
                sums[1] += kd.detach()
            if not need_grad:
                continue
            # d(mean loss)/d logits, over n_valid: ce_weight (q - onehot) on valid rows, q = softmax(logits), plus
            # kd_weight times KD's: w (q - p) in closed form at T = 1 (one shared q), else kd_grad. In place: the
            # logits' buffer becomes g, and no second chunk-sized temporary is made.
            ce_scale = ce_weight * ok.float() / n_valid
            kd_scale = kd_weight * token_weight / n_valid
            g = logits.sub_(log_z[:, None]).exp_()
            g.mul_((ce_scale if teacher_p is None else ce_scale + kd_scale)[:, None])
            if teacher_p is not None:
                g.addcmul_(teacher_p, kd_scale[:, None], value=-1.0)
                del teacher_p
            g[torch.arange(len(t), device=t.device), safe_t] -= ce_scale
            if kd_grad is not None:
                g.add_(kd_grad.mul_(kd_weight / n_valid))
                del kd_grad
            g = g.to(weight.dtype)
            if need_hidden_grad:
                grad_hidden[rows] = matmul(g, weight.to(g.dtype)).to(hidden.dtype)
            if need_weight_grad:
                grad_weight += matmul(g.t(), h.to(g.dtype)).float()
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ce_mean, kd_mean = sums[0] / n_valid, sums[1] / n_valid
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return ce_weight * ce_mean + kd_weight * kd_mean, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
                None, None, None)


def live_teacher_logits(teacher, rows):
    """One chunk's fp32 logits of the live teacher ("live", its hidden states, its head weight)."""
    _, hidden, weight = teacher
    with torch.no_grad():
        return matmul(hidden[rows], weight.t()).float()


def teacher_target_logprob(teacher, rows, targets):
    """The teacher's log-probability (T = 1) of each row's target token: from its logits, or the cache's."""
    kind, a, b = teacher
    if kind == "cache":
        return b[rows][:, -1].float()  # teacher_cache.py stores it last in each entry's values
    teacher_logits = live_teacher_logits(teacher, rows)
    return teacher_logits.gather(1, targets[:, None]).squeeze(1) - teacher_logits.logsumexp(-1)


def teacher_kd(teacher, rows, student_logits, temperature, top_k):
    """Per-row top-k KD of one chunk against the live teacher ("live", its hidden states, its head weight), whose
    logits are formed here a chunk at a time, or KD against cached entries ("cache", ids, values). (Full-vocab KD
    against the live teacher has a closed-form gradient: ChunkedHeadLoss.)"""
    kind, a, b = teacher
    if kind == "cache":
        return kl_cached(student_logits, a[rows], b[rows], temperature)
    return kl_topk(student_logits, live_teacher_logits(teacher, rows), top_k, temperature)


def head_loss(hidden, weight, targets, *, teacher=None, teacher_entries=None, alpha=0.0, loss_multi=None,
              adaptive=0.0, temperature=1.0, top_k=0, chunk_rows=1024):
    """(loss, ce, kd) for hidden states (N, C), head weight (V, C) and next-token targets (N,), -100 ignored
    (SFT: every token but the assistant's). loss = alpha * KD + (1 - alpha) * CE, or with `loss_multi` set
    CE + loss_multi * KD; KD = T^2 * KL(teacher || student) over the full vocabulary (top_k = 0) or top-k + tail
    (a cache: its k + tail, kl_cached), per token weighted by 1 + adaptive * p_teacher(y) * (1 - p_student(y))
    (ChunkedHeadLoss). The teacher is `teacher` = (teacher_hidden, teacher_weight) or `teacher_entries` =
    (ids, values) from a teacher cache."""
    ce_weight, kd_weight = (1.0, float(loss_multi)) if loss_multi is not None else (1.0 - alpha, float(alpha))
    if kd_weight > 0 and teacher is None and teacher_entries is None:
        raise ValueError(f"a KD weight of {kd_weight} mixes in KD, which needs the teacher's hidden states and head "
                         f"weight or its cached entries")
    source = ("cache", *teacher_entries) if teacher_entries is not None else \
        ("live", *teacher) if teacher is not None else None
    # autograd.Function.forward runs with grad disabled, so which gradients to build is decided here
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    options = (ce_weight, kd_weight, float(adaptive), float(temperature), int(top_k), int(chunk_rows), need_h,
               need_w)
    return ChunkedHeadLoss.apply(hidden, weight, targets, source, options)


@torch.no_grad()
def teacher_val_hidden(teacher, batches, ctx):
    """The teacher's final normed hidden states (B*T, C) for each val window, computed once per run: every
    eval then only applies the head, instead of a teacher forward (for distill, per layer: 30x a rotation for
    SmolLM2). Memory per rank: eval tokens / world size x n_embd x 4 bytes in fp32 (2 in bf16), e.g. 65,536
    tokens x 576 = 151 MB (SmolLM2-135M, fp32), on the device."""
    hidden = []
    for x, _, *segments in batches:  # conversation batches carry segments (data.py)
        with ctx:
            hidden.append(teacher(x, segments=segments[0] if segments else None).flatten(0, 1))
    return hidden


@torch.no_grad()
def evaluate(model, batches, env, ctx, *, chunk_rows=1024, teacher=None, teacher_hidden=None, teacher_entries=None):
    """On fixed val tokens: the model's CE and perplexity and, with a teacher, the teacher's CE,
    KL(teacher || model) and top-1 agreement (how often both argmaxes are the same token). The teacher's hidden
    states come from `teacher_hidden` (teacher_val_hidden of the same batches) when given, else from a teacher
    forward. With `teacher_entries` (per batch, (ids, values) of a teacher cache) instead of a teacher, the KL
    is over the cache's k ids + tail (kl_cached: a lower bound of the full KL) and the teacher's CE is the stored
    log-prob of each target. Sums over tokens and ranks, so the numbers are the same for any world size."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)  # CE, teacher CE, KL, agree, tokens
    for n, (x, y, *segments) in enumerate(batches):  # conversation batches carry segments (data.py)
        segments = segments[0] if segments else None
        with ctx:
            hs = model(x, segments=segments).flatten(0, 1)
            ht = None
            if teacher is not None:
                ht = teacher_hidden[n] if teacher_hidden is not None else \
                    teacher(x, segments=segments).flatten(0, 1)
        y = y.reshape(-1)
        for start in range(0, len(y), chunk_rows):
            rows = slice(start, start + chunk_rows)
            ok = y[rows] != -100  # SFT data: only the assistant's tokens count
            with ctx:
                ls = matmul(hs[rows], model.lm_head.weight.t()).float()
            sums[0] += F.cross_entropy(ls, y[rows], reduction="sum").double()
            sums[4] += ok.sum()
            if teacher is not None:
                with ctx:
                    lt = matmul(ht[rows], teacher.lm_head.weight.t()).float()
                sums[1] += F.cross_entropy(lt, y[rows], reduction="sum").double()
                sums[3] += ((ls.argmax(-1) == lt.argmax(-1)) & ok).sum().double()
                sums[2] += (kl_full_and_teacher_probs(ls, lt)[0] * ok).sum().double()  # overwrites lt
            elif teacher_entries is not None:
                ids, values = (t[rows] for t in teacher_entries[n])
                sums[1] -= (values[:, -1] * ok).sum().double()
                sums[2] += (kl_cached(ls, ids, values) * ok).sum().double()
                sums[3] += ((ls.argmax(-1) == ids[:, 0]) & ok).sum().double()
    if env.ddp:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    n = sums[4].clamp(min=1)
    ce = (sums[0] / n).item()
    result = {"val_ce": ce, "val_ppl": math.exp(ce), "val_tokens": int(sums[4].item())}
    if teacher is not None or teacher_entries is not None:
        result.update(teacher_ce=(sums[1] / n).item(), kl=(sums[2] / n).item(), top1_agree=(sums[3] / n).item())
    return result


def eval_line(where, result):
    line = f"eval | {where} | student ce {result['val_ce']:.4f} ppl {result['val_ppl']:.2f}"
    if "kl" in result:
        kind = f" ({result['kl_kind']})" if "kl_kind" in result else ""
        line += (f" | teacher ce {result['teacher_ce']:.4f} | kl{kind} {result['kl']:.4f} | "
                 f"top-1 agree {100 * result['top1_agree']:.1f}%")
    return line
