"""Distillation phase 1: the cache of hidden states that a layer-wise rotation trains on, and the layer loss.

For N cached batches the cache holds the latent entering one layer at a time, as (N, B, T, C) fp32 buffers, and
moves up the network one layer per call, so a whole rotation costs about one teacher forward over the batches.
With latent "student" it keeps a second buffer advanced through the student's trained layers, so layer i learns
to map the student's own hidden state to the teacher's after layer i (and can correct the layers before it).
"""
import os

import psutil
import torch
import torch.nn.functional as F

from data import read_manifest
from runtime import all_reduce_sum, say


def frozen_part(block, x, cos, sin):
    """A decoder target's fixed prefix, the attention sublayer: computed once per layer, not once per step."""
    return x + block.attn(block.attn_norm(x), cos, sin)


def trainable_part(block, x, cos, sin, target):
    """Layer i from the latent a step starts at to what its loss compares: the hidden state after layer i, or
    for an attn_out target the residual stream after the attention sublayer alone (the loss against the same
    for the teacher's attention is then exactly the MSE of the two attention outputs)."""
    if target == "decoder":
        return x + block.mlp(block.mlp_norm(x))
    if target == "attn_out":
        return frozen_part(block, x, cos, sin)
    return block(x, cos, sin)


def layer_loss(out, target, base, cosine_weight=0.0, energy=1.0):
    """MSE between the student's and the teacher's hidden state after the layer (equal to the MSE of the
    layer's updates out - base and target - base) divided by `energy` (1, or the mean square of the teacher's
    update: a normalised MSE, on the same scale in every layer whatever the size of its activations), plus
    cosine_weight * (1 - cosine) of those updates: the residual stream itself would make any cosine close to 1."""
    update, target_update = out - base, target - base
    loss = F.mse_loss(update, target_update) / energy
    if cosine_weight:
        loss = loss + cosine_weight * (1 - F.cosine_similarity(update, target_update, dim=-1)).mean()
    return loss


def cache_bytes(num_batches, batch_size, seq_len, n_embd, buffers=2):
    """fp32 bytes of the (N, B, T, C) buffers a layer needs at once: input latents and teacher targets, and for
    an attn_out target also the teacher's latent entering the next layer."""
    return buffers * num_batches * batch_size * seq_len * n_embd * 4


def check_cache_fits(s, n_embd, cache_device, env):
    """Refuse, before any work, a phase-1 cache that will not fit (leaving 20% for the models and activations).
    The size is arithmetic: train and val caches of 2 x (N, B, T, C) fp32 each, per rank, for distill.py's
    settings `s` (num_batches, batch_size, seq_len, eval_tokens, data_dir)."""
    val_total = sum(shard["ntok"] for shard in read_manifest(s.data_dir)["shards"] if shard["split"] == "val")
    val_n = -(-max(0, (min(s.eval_tokens, val_total) - 1) // (s.batch_size * s.seq_len)) // env.world_size)
    buffers = 3 if s.target_trainable == "attn_out" else 2
    need = cache_bytes(s.num_batches, s.batch_size, s.seq_len, n_embd, buffers) + \
        cache_bytes(val_n, s.batch_size, s.seq_len, n_embd, buffers)
    if str(cache_device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(cache_device)
        where = f"GPU {cache_device}"
    else:
        free = psutil.virtual_memory().available
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # every rank on this host keeps its own cache here
        where = "host memory"
    if need > 0.8 * free:
        raise SystemExit(f"the phase-1 cache needs {need / 2**30:.2f} GiB of {where}, but only {free / 2**30:.2f} "
                         f"GiB is free (the cache may take 80%); lower num_batches ({s.num_batches}), batch_size "
                         f"({s.batch_size}), seq_len ({s.seq_len}) or eval_tokens ({s.eval_tokens}), or set "
                         f"cache_device to {'cpu' if where != 'host memory' else 'device'}")
    say(f"phase-1 cache: {buffers} x ({s.num_batches}, {s.batch_size}, {s.seq_len}, {n_embd}) fp32 per rank for "
        f"train + {buffers} x ({val_n}, {s.batch_size}, {s.seq_len}, {n_embd}) for val = {need / 2**30:.3f} GiB of "
        f"{where} (latent: {s.latent})")


def batch_index(seed, rotation, layer, step, num_batches):
    """The cached batch that step `step` of `layer` uses: a fresh permutation per pass over the cache, a pure
    function of its arguments, so a resumed run visits the same batches in the same order."""
    epoch, k = divmod(step, num_batches)
    generator = torch.Generator().manual_seed((((seed * 1_000_003 + rotation) * 1_000_003 + layer) * 1_000_003
                                               + epoch) % 2**63)
    return int(torch.randperm(num_batches, generator=generator)[k])


def empty_like_host(t):
    """torch.empty_like that keeps a host buffer pinned: .to(cuda, non_blocking=True) from pageable memory
    would be a synchronous copy."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())


class LayerCache:
    """Hidden states of N batches at one layer boundary, for the teacher (and the student, with latent
    "student"), moved up the network by `begin_layer` / `end_layer`.

    `teacher_latent` is the teacher's hidden state entering layer `layer`; begin_layer(i) moves it past layer i,
    so it is the target of every step of layer i and, at end_layer, already the cache entering layer i + 1.
    `targets` is what layer i's steps compare with: teacher_latent, or for an attn_out target (a third buffer)
    the inputs plus the teacher's attention output on those same inputs.
    `inputs` is what a step of layer i starts from (after the frozen attention sublayer for a decoder target):
    the teacher's h_i in a buffer of its own, or with latent "student" the student's own latent. Two buffers at a
    time either way.
    """

    @torch.no_grad()
    def __init__(self, teacher, student, tokens, cache_device, ctx, *, latent="teacher", target="decoder",
                 loss="mse"):
        self.teacher, self.student, self.ctx, self.target, self.loss = teacher, student, ctx, target, loss
        self.device = teacher.embed.weight.device
        pin = str(cache_device) == "cpu" and str(self.device).startswith("cuda")  # streams to the GPU async
        B, T = tokens[0].shape
        self.cos, self.sin = teacher.rope(0, T, self.device)
        self.teacher_latent = torch.empty((len(tokens), B, T, teacher.config.n_embd), dtype=torch.float32,
                                   device=cache_device, pin_memory=pin)
        for n, x in enumerate(tokens):
            self.teacher_latent[n].copy_(teacher.embed(x.to(self.device)).float())
        # with latent "student" the student's latent starts as the same embeddings and moves on by itself
        self.student_latent = None
        if latent == "student":
            self.student_latent = empty_like_host(self.teacher_latent).copy_(self.teacher_latent)
        self.layer = 0  # the layer whose input latents the cache holds
        self.inputs = self.targets = None
        self.loss_energy = 1.0  # the current layer's loss divides by this: 1 (mse) or the teacher's energy (nmse)

    @torch.no_grad()
    def map(self, fn, latents, out):
        """out[n] = fn(latents[n]) for every cached batch n, one at a time; out may be latents (in place)."""
        for n in range(latents.shape[0]):
            with self.ctx:
                y = fn(latents[n].to(self.device, non_blocking=True))
            out[n].copy_(y.float())
        return out

    def advance(self, layer):
        """Move to the latents entering `layer` (each model through its own blocks, once per batch)."""
        assert self.inputs is None, "advance between layers, not inside one"
        while self.layer < layer:
            j = self.layer
            self.map(lambda x: self.teacher.blocks[j](x, self.cos, self.sin), self.teacher_latent,
                     self.teacher_latent)
            if self.student_latent is not None:
                self.map(lambda x: self.student.blocks[j](x, self.cos, self.sin), self.student_latent,
                         self.student_latent)
            self.layer = j + 1

    def begin_layer(self, layer, env):
        """Advance to `layer` and return (inputs, targets) for training it."""
        self.advance(layer)
        teacher_block = lambda x: self.teacher.blocks[layer](x, self.cos, self.sin)
        if self.student_latent is None:
            self.inputs = self.teacher_latent
            self.teacher_latent = self.map(teacher_block, self.inputs, empty_like_host(self.inputs))
        else:
            self.map(teacher_block, self.teacher_latent, self.teacher_latent)
            self.inputs = self.student_latent
        self.targets = self.teacher_latent
        if self.target == "attn_out":  # the teacher's attention on the very inputs the student's sees
            teacher_attention = lambda x: frozen_part(self.teacher.blocks[layer], x, self.cos, self.sin)
            self.targets = self.map(teacher_attention, self.inputs, empty_like_host(self.inputs))
        if self.target == "decoder":  # the attention sublayer stays fixed: apply it once, in place
            block = self.student.blocks[layer]
            self.map(lambda x: frozen_part(block, x, self.cos, self.sin), self.inputs, self.inputs)
        self.loss_energy = self.energy(env) if self.loss == "nmse" else 1.0
        return self.inputs, self.targets

    def end_layer(self):
        """After training the layer: the cache holds the latents entering the next one."""
        if self.student_latent is not None:  # the student's latent goes through the layer as trained
            block = self.student.blocks[self.layer]
            through = (lambda x: block(x, self.cos, self.sin)) if self.target == "attn_out" else \
                (lambda x: trainable_part(block, x, self.cos, self.sin, self.target))
            self.map(through, self.inputs, self.inputs)
        self.inputs = self.targets = None  # with the teacher's latent, h_i is not needed again
        self.layer += 1

    @torch.no_grad()
    def energy(self, env):
        """The mean square of the teacher's update in the current layer (its MLP output for a decoder target on
        the teacher's latent), over this cache's batches on every rank."""
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        for n in range(self.inputs.shape[0]):
            x, y = self.inputs[n].to(self.device), self.targets[n].to(self.device)
            total += torch.stack([(y - x).double().square().mean(), torch.ones((), dtype=torch.float64,
                                                                                  device=env.device)])
        all_reduce_sum([total], env)
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def val_stats(self, env, cosine_weight=0.0):
        """(layer loss, R^2) of the current layer over this cache's batches on every rank. R^2 = 1 - MSE / the
        teacher update's mean square: the share of the teacher's sublayer output the student reproduces. The
        loss divides by this cache's own energy under nmse, so the val loss is 1 - R^2 there."""
        block = self.student.blocks[self.layer]
        total = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, MSE, teacher energy, batches
        for n in range(self.inputs.shape[0]):
            x, y = self.inputs[n].to(self.device), self.targets[n].to(self.device)
            with self.ctx:
                out = trainable_part(block, x, self.cos, self.sin, self.target).float()
            total += torch.stack([layer_loss(out, y, x, cosine_weight, self.loss_energy), F.mse_loss(out, y),
                                  (y - x).square().mean(), torch.ones((), device=y.device)]).double()
        all_reduce_sum([total], env)
        return (total[0] / total[3]).item(), (1 - total[1] / total[2]).item()
