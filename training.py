"""The optimizer step shared by train.py and both phases of distill.py: the LR schedule, micro-batches under
DDP, the guarded step (clip, average losses over ranks, stop on NaN/inf before the weights change), the
guarded save, restoring the optimizer/loader/RNG state of a checkpoint for an exact resume, and the tokens/s
that the logs report."""
import contextlib
import math
import os
import time

import torch

from checkpoints import newest_checkpoint, prune_checkpoints, save_checkpoint, set_rng_state
from runtime import shutdown


def lr_at(step, max_steps, lr, warmup_steps, *, schedule="trapezoid", cooldown_frac=0.2, min_lr_frac=0.0):
    """Learning rate at optimizer step `step` (0-based).

    trapezoid: linear warmup -> constant -> linear cooldown over the last `cooldown_frac` of the run;
    cosine: linear warmup -> cosine decay to min_lr_frac * lr at max_steps; constant: warmup then flat.
    """
    min_lr = lr * min_lr_frac
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "trapezoid":
        cooldown_steps = int(cooldown_frac * max_steps)
        cooldown_start = max_steps - cooldown_steps
        if cooldown_steps <= 0 or step < cooldown_start:
            return lr
        frac = (step - cooldown_start) / cooldown_steps
        return min_lr + (lr - min_lr) * (1.0 - frac)
    if schedule == "cosine":
        decay_steps = max(1, max_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule '{schedule}'; expected trapezoid, cosine or constant")


def steps_in_budget(step, max_steps, budget_seconds, elapsed_seconds, step_seconds, reserve_seconds=0.0):
    """The step a run should end at to finish within `budget_seconds`: `elapsed_seconds` spent by the end of
    step `step`, `step_seconds` per step from here, `reserve_seconds` kept for what follows the last step. Never
    past `max_steps`, never before `step` (a spent budget ends the run now)."""
    steps_that_fit = math.floor((budget_seconds - elapsed_seconds - reserve_seconds) / step_seconds)
    return max(step, min(max_steps, step + steps_that_fit))


def window_at(step, max_steps, start, end, granularity=64):
    """The attention window at optimizer step `step` (0-based) under a linear schedule from `start` to `end`,
    rounded down to a multiple of `granularity` (at least `start`): few distinct windows, so few mask shapes
    and torch.compile graphs. The last step gets `end`."""
    if max_steps <= 1 or step >= max_steps - 1:
        return end
    window = start + (end - start) * step / (max_steps - 1)
    return max(start, int(window) // granularity * granularity)


def set_lr(optimizer, lr):
    """The schedule's `lr` for this step, times each group's "lr_scale" (model.configure_optimizer: attention's
    own peak LR, LR_ATTN, relative to LR)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def micro_batches(model, loader, grad_accum, env):
    """(x, y, segments, sync) for each micro-batch of one optimizer step; segments is None except for packed
    conversations (data.ConversationLoader). Run forward and backward inside `with sync:`: under DDP the
    gradients are all-reduced once, in the last micro-batch's backward."""
    for micro in range(grad_accum):
        x, y, *segments = loader.next_batch()
        yield (x, y, segments[0] if segments else None,
               model.no_sync() if env.ddp and micro < grad_accum - 1 else contextlib.nullcontext())


def all_reduce_gradients(params, env):
    """Average the gradients of `params` over ranks in one flat all-reduce (for a few tensors trained without
    a DDP wrapper, as in distill phase 1)."""
    if not env.ddp:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def stop_non_finite(what, run_dir, env):
    """End the run (every rank) on a NaN/inf, saving nothing: the last good checkpoint stays the latest."""
    latest = newest_checkpoint(run_dir)
    phase1_state = os.path.join(run_dir, "phase1_state.pt")
    if os.path.exists(os.path.splitext(phase1_state)[0] + ".json"):
        latest = f"{latest} (and distill's rolling state {phase1_state})" if latest else phase1_state
    shutdown(env)
    raise SystemExit(f"stopping: {what}. Nothing was saved for this step; the latest good checkpoint is "
                     f"{latest or '(none yet)'}. Lower the learning rate, raise the warmup or check --grad-clip, "
                     f"then resume from it with --resume (or start a new --run-dir).")


def guarded_step(optimizer, losses, env, grad_clip, run_dir, step):
    """Finish optimizer step `step` (0-based): clip the gradients (0 = only measure their norm), average
    `losses` (this rank's mean losses, a 1-d tensor) over ranks, stop on a non-finite loss or norm before the
    weights change, then step. Returns (the losses as floats, the grad norm)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if env.ddp:  # the mean over ranks of each rank's mean: for text (equal token counts) the global mean
        torch.distributed.all_reduce(losses)
        losses = losses / env.world_size
    *values, norm = torch.cat([losses.float(), grad_norm.float().view(1)]).tolist()
    if not (all(math.isfinite(v) for v in values) and math.isfinite(norm)):
        stop_non_finite(f"non-finite loss {values[0]} / grad norm {norm} at step {step + 1}; the optimizer step "
                        f"was not taken", run_dir, env)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, norm


def save_run_checkpoint(path, model, entries, env, keep=0, prefix=None):
    """Rank 0 saves {"model": weights, **entries} (entries holds "step") and keeps the newest `keep` of
    `prefix`. Every rank checks the weights first, so a diverged model never becomes the latest checkpoint."""
    finite = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all()
    if not finite:
        stop_non_finite(f"the weights hold NaN/inf after step {entries['step']}", os.path.dirname(path), env)
    if env.is_master:
        save_checkpoint(path, {"model": model.state_dict(), **entries})
        if prefix:
            prune_checkpoints(os.path.dirname(path), keep, prefix)
    if env.ddp:
        torch.distributed.barrier()  # nobody runs ahead while rank 0 writes, so a crash loses at most this save


def changed_settings(prior, config, ignore):
    """{key: (saved, now)} for every config key whose value differs from the saved config `prior`, except
    `ignore` and the keys the saved config does not have."""
    return {k: (prior[k], v) for k, v in config.items() if k in prior and k not in ignore and prior[k] != v}


def load_optimizer_state(optimizer, state, source, hint):
    """Restore a saved optimizer state (moments and step counts), with a clear error when it does not fit this
    optimizer's groups. The saved groups carry the hyperparameters of the run that saved them; the optimizer as
    built now (this run's betas and weight decay, per group) wins."""
    current = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:  # e.g. a checkpoint that trained other parameters
        raise SystemExit(f"checkpoint '{source}': its optimizer state does not fit this model's parameter groups "
                         f"({e}); {hint}")
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)


def restore_training_state(checkpoint, optimizer, loader, source, hint):
    """Continue exactly from a resumable checkpoint: optimizer, data position and RNG; returns its step."""
    for key in ("optimizer", "loader", "rng", "step"):
        if key not in checkpoint:
            raise SystemExit(f"checkpoint '{source}' has no '{key}' entry, so training cannot continue from it; "
                             f"{hint}")
    load_optimizer_state(optimizer, checkpoint["optimizer"], source, hint)
    loader.load_state_dict(checkpoint["loader"])
    set_rng_state(checkpoint["rng"])
    return int(checkpoint["step"])


class Throughput:
    """Tokens/s of each step and of the steps since the last log line, with evals and saves left out."""

    def __init__(self, tokens_per_step):
        self.tokens_per_step = tokens_per_step
        self.pause()

    def pause(self):
        """After an eval or a save: the time since the last step was not training, so it is not counted."""
        self.last = self.window_start = time.perf_counter()
        self.window_steps = 0

    def step(self):
        """Call after each optimizer step; returns (its seconds, its tokens/s)."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.window_steps += 1
        return seconds, self.tokens_per_step / seconds

    def window_rate(self):
        """Tokens/s over the steps since the last call (or pause); the next window starts now."""
        now = time.perf_counter()
        rate = self.window_steps * self.tokens_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_steps = now, 0
        return rate
