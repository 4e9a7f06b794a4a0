"""A Llama-family GPT in one file: RMSNorm, RoPE, grouped-query attention with one fused QKV projection and
optional per-layer sliding windows (with attention sinks if asked), SwiGLU or plain MLPs per layer, and a KV
cache for generation.

The forward pass returns the final normed hidden states; `logits` applies the LM head. Losses live in
losses.py, which applies the head a chunk of tokens at a time so the whole batch's fp32 logits never exist.
Loading and exporting Hugging Face / GGUF weights lives in hf_interop.py."""
import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

MLP_KINDS = ("swiglu", "relu2", "gelu", "silu")

# fp32 matmuls on CPU go through oneDNN (shipped inside torch), which picks its kernels by the CPU's instruction
# set; torch's default CPU BLAS (MKL, in the x86 wheels) takes an AVX2-only path on AMD CPUs. On this repo's
# 2-core AVX-512 EPYC the model's matmuls ran ~2x faster through oneDNN, equal to fp32 rounding (README,
# bench/bench_cpu_matmul.py). CPU_ONEDNN_MATMUL=0 in the environment (or False here) keeps torch's default.
CPU_ONEDNN_MATMUL = (os.environ.get("CPU_ONEDNN_MATMUL", "1") != "0" and torch.backends.mkldnn.is_available()
                     and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_applies(*tensors):
    """Whether a matmul of `tensors` goes through oneDNN: fp32 CPU tensors, not under autocast or torch.compile
    (which keep torch's own path)."""
    return (CPU_ONEDNN_MATMUL and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def matmul(a, b):
    """a @ b, through oneDNN where `onednn_applies` and no autograd graph is needed (`linear` carries its own
    backward); anything else through torch's `@`."""
    if (onednn_applies(a, b) and a.dim() >= 2 and b.dim() == 2 and a.numel() and b.numel()
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")  # strided views are fine
    return a @ b


class OneDNNLinear(torch.autograd.Function):
    """x @ weight.T with its two backward matmuls through `matmul`; weight's gradient only when it trains."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = matmul(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = matmul(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_weight


def linear(x, weight):
    """F.linear without bias, through oneDNN where `onednn_applies`."""
    if onednn_applies(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return OneDNNLinear.apply(x, weight)
        return matmul(x, weight.t())
    return F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear (no bias here) whose forward is `linear`: the same parameters and state-dict keys."""

    def forward(self, x):
        return linear(x, self.weight) if self.bias is None else super().forward(x)


@dataclass
class GPTConfig:
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    # Per layer: a single value applies to every layer; a list gives one value per layer.
    mlp_kind: object = "swiglu"  # swiglu (gate and up fused) | relu2 | gelu | silu (plain two-layer MLP)
    mlp_hidden: object = 1536  # hidden width of the MLP
    window: object = None  # None = full causal attention; W = token t attends to t-W+1..t
    # Options from the public speedruns (modded-nanogpt), all off by default: off, the model is exactly a Llama.
    # The parameters they add are 0-d scalars named *_gate, and the value-embedding tables "value_embeds.N.weight"
    # (vocab x n_kv_head*head_dim): an optimizer can route them by those names (scalars to AdamW, tables as
    # embeddings). Each starts where it changes nothing: gates on the residual at 1, skip and value gates at 0.
    residual_gates: bool = False  # x = a*x + b*sublayer(norm(x)) per sublayer, learned scalars a and b
    skip_connections: bool = False  # U-Net: block n_layer-1-i first adds skip_gate * the output of block i
    value_embeds: int = 0  # tables j = 0..value_embeds-1; layers j and n_layer-1-j add value_gate * table[idx] to v
    block_sparse: object = None  # per layer: None, or S: a windowed layer also sees summary keys (see `attends`)
    sink_tokens: int = 0  # windowed layers also see the first sink_tokens positions: attention sinks (see `attends`)

    def __post_init__(self):
        for name in ("mlp_kind", "mlp_hidden", "window", "block_sparse"):
            value = getattr(self, name)
            value = list(value) if isinstance(value, (list, tuple)) else [value] * self.n_layer
            if len(value) != self.n_layer:
                raise ValueError(f"GPTConfig.{name} has {len(value)} entries but n_layer = {self.n_layer}")
            setattr(self, name, value)
        for i, (kind, hidden, window, sparse) in enumerate(zip(self.mlp_kind, self.mlp_hidden, self.window,
                                                                self.block_sparse)):
            if kind not in MLP_KINDS:
                raise ValueError(f"GPTConfig.mlp_kind[{i}] = {kind!r}; expected one of {MLP_KINDS}")
            if not isinstance(hidden, int) or hidden <= 0:
                raise ValueError(f"GPTConfig.mlp_hidden[{i}] = {hidden!r}; expected a positive int")
            if window is not None and (not isinstance(window, int) or window < 1):
                raise ValueError(f"GPTConfig.window[{i}] = {window!r}; expected None or an int >= 1")
            if sparse is not None and (window is None or not isinstance(sparse, int) or
                                       not 1 <= sparse <= max(window, 64)):
                raise ValueError(f"GPTConfig.block_sparse[{i}] = {sparse!r} with window[{i}] = {window!r}; expected "
                                 f"None, or an int from 1 to max(window, 64) on a layer that has a window")
        if not isinstance(self.sink_tokens, int) or not 0 <= self.sink_tokens <= 64:
            raise ValueError(f"GPTConfig.sink_tokens = {self.sink_tokens!r}; expected an int from 0 to 64")
        sparse_layers = [i for i, sparse in enumerate(self.block_sparse) if sparse]
        if self.sink_tokens and sparse_layers:
            raise ValueError(f"GPTConfig.sink_tokens = {self.sink_tokens} with block_sparse on layers {sparse_layers}: "
                             f"a block-sparse layer already sees the first tokens of every block; use one or the other")
        if not isinstance(self.value_embeds, int) or not 0 <= self.value_embeds <= (self.n_layer + 1) // 2:
            raise ValueError(f"GPTConfig.value_embeds = {self.value_embeds!r}; expected an int from 0 to "
                             f"{(self.n_layer + 1) // 2} (table j serves layers j and n_layer-1-j)")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head = {self.n_head} is not a multiple of n_kv_head = {self.n_kv_head}")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------
# Building blocks

def rope_tables(seq_len, head_dim, theta, device):
    """cos/sin of shape (seq_len, head_dim) in fp32, Hugging Face's rotate-half layout (freqs repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def band_mask(block, window, device):
    """(block, 2*block) bool: query i of a block sees key j of [previous block, this block] iff within W."""
    i = torch.arange(block, device=device)[:, None]
    j = torch.arange(2 * block, device=device)[None, :]
    return (j <= block + i) & (j > block + i - window)


def attends(q_pos, k_pos, window, sparse=None, sink=0):
    """The attention pattern as one rule on positions (tensors that broadcast, or ints): query q sees key k iff
    k <= q and q - k < window (None: no window) or k < sink, or, on a block-sparse layer, k is one of the first
    `sparse` tokens of a block of max(window, 64) tokens that ends before q's block starts. Those periodic
    summary keys reach the whole context at sparse / block of the cost of full attention. Sink keys are there
    because trained softmax attention parks the weight it does not need on the first token (StreamingLLM, Xiao
    et al. 2023): a window that drops that token moves the weight onto real tokens instead."""
    seen = k_pos <= q_pos
    if window is not None:
        seen = seen & ((q_pos - k_pos < window) | (k_pos < sink))
    if sparse:
        block = max(window, 64)
        seen = seen | ((k_pos % block < sparse) & (k_pos // block < q_pos // block))
    return seen


def extra_key_positions(block, sparse, sink, n_blocks, device):
    """Positions of the keys every query block b >= 1 gets besides its pair [block b-1, block b]: the first
    `sparse` keys of blocks 0..n_blocks-3 (block-sparse), or the `sink` first keys."""
    if sink:
        return torch.arange(sink, device=device)
    starts = torch.arange(n_blocks - 2, device=device).repeat_interleave(sparse) * block
    return starts + torch.arange(sparse, device=device).repeat(n_blocks - 2)


def pair_mask(block, window, sparse, sink, n_blocks, device):
    """(n_blocks-1, S, 2S + extra keys) bool for query blocks 1.., whose keys are [previous block, this block,
    extra_key_positions]. Block b takes an extra key only if it lies before its pair (before position
    (b-1)*S): one already in the pair would be attended twice and weigh twice."""
    b = torch.arange(1, n_blocks, device=device)[:, None, None]
    q_pos = b * block + torch.arange(block, device=device)[:, None]
    pair = (b - 1) * block + torch.arange(2 * block, device=device)
    extra = extra_key_positions(block, sparse, sink, n_blocks, device)
    return torch.cat((attends(q_pos, pair, window, sparse, sink),
                      attends(q_pos, extra, window, sparse, sink) & (extra < (b - 1) * block)), dim=-1)


def sliding_window_attention(q, k, v, window, mask_cache, sparse=None, sink=0):
    """Causal attention where each query sees the last `window` keys, in blocks so memory is O(T * block).

    Queries are cut into blocks of S >= window; block b only needs keys from blocks b-1 and b, so every
    block shares one (S, 2S) mask, built once per shape and device. With `sparse` (block-sparse layers, see
    `attends`) every block b also gets the summary keys of the blocks before it: S x (2S + T*sparse/S) scores
    per block, and one mask per (batch, length), never a T x T one. With `sink` every block also gets the
    first `sink` keys: S x (2S + sink) scores.
    """
    B, H, T, D = q.shape
    block = max(window, 64)
    if T <= block:  # one block: the pattern over its own positions
        key = (T, window, sink, q.device)
        if key not in mask_cache:
            pos = torch.arange(T, device=q.device)
            mask_cache[key] = attends(pos[:, None], pos[None], window, sink=sink)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_cache[key], enable_gqa=True)
    key = (block, window, q.device)
    if key not in mask_cache:
        mask_cache[key] = band_mask(block, window, q.device)
    mask = mask_cache[key]
    key = (block, window, sink, "block 0", q.device)
    if key not in mask_cache:  # block 0 has no previous block, and holds the sinks
        pos = torch.arange(block, device=q.device)
        mask_cache[key] = attends(pos[:, None], pos[None], window, sink=sink)
    first_mask = mask_cache[key]
    n_blocks = -(-T // block)
    pad = n_blocks * block - T  # padded keys sit after every real query, so causality already hides them
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    Hkv = k.shape[1]
    qb = q.view(B, H, n_blocks, block, D).transpose(1, 2)  # (B, nb, H, S, D)
    kb = k.view(B, Hkv, n_blocks, block, D)
    vb = v.view(B, Hkv, n_blocks, block, D)
    k_pairs = torch.cat((kb[:, :, :-1], kb[:, :, 1:]), dim=3).transpose(1, 2)  # (B, nb-1, Hkv, 2S, D)
    v_pairs = torch.cat((vb[:, :, :-1], vb[:, :, 1:]), dim=3).transpose(1, 2)
    rest_mask = mask
    if sparse or sink:  # every pair gets the extra keys (summary or sink), masked per query block
        key = (block, window, sparse, sink, n_blocks, B, q.device)
        if key not in mask_cache:  # repeated over the batch: a 4-D mask keeps the fused attention kernels
            mask_cache[key] = pair_mask(block, window, sparse, sink, n_blocks, q.device).repeat(B, 1, 1)[:, None]
        rest_mask = mask_cache[key]
        extra = extra_key_positions(block, sparse, sink, n_blocks, q.device)
        extra_keys = lambda t: t[:, :, extra].unsqueeze(1).expand(-1, n_blocks - 1, -1, -1, -1)
        k_pairs = torch.cat((k_pairs, extra_keys(k)), dim=3)
        v_pairs = torch.cat((v_pairs, extra_keys(v)), dim=3)
    first = F.scaled_dot_product_attention(qb[:, 0], kb[:, :, 0], vb[:, :, 0], attn_mask=first_mask,
                                           enable_gqa=True)
    n_keys = k_pairs.shape[3]
    rest = F.scaled_dot_product_attention(qb[:, 1:].reshape(-1, H, block, D),
                                          k_pairs.reshape(-1, Hkv, n_keys, D),
                                          v_pairs.reshape(-1, Hkv, n_keys, D), attn_mask=rest_mask, enable_gqa=True)
    out = torch.cat((first.unsqueeze(1), rest.view(B, n_blocks - 1, H, block, D)), dim=1)
    return out.transpose(1, 2).reshape(B, H, n_blocks * block, D)[:, :, :T]


def segment_positions(segments):
    """(B, T) position of each token within its segment (a packed conversation): RoPE restarts at 0 in each."""
    t = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


def segment_mask(segments, positions, window, sparse=None, sink=0):
    """(B, 1, T, T) bool: query t sees key s iff both are in the same segment and `attends` says so for their
    `positions` within it (so a segment's sinks are its own first tokens). Dense, O(T^2) per row: packed
    batches are SFT's short rows, not long-context training."""
    seen = attends(positions[:, :, None], positions[:, None, :], window, sparse, sink)
    return ((segments[:, :, None] == segments[:, None, :]) & seen).unsqueeze(1)


def decode_attention(q, k, v, mask=None):
    """One query position (B, H, 1, D) against every cached key/value (B, Hkv, S, D); a (1, S) bool `mask` only
    for block-sparse layers, whose cache holds every position (a ring buffer holds exactly what a window sees)."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    # Compiled, the same softmax(q k^T / sqrt(D)) v as sums of products fuses into one small kernel; a library
    # attention call (torch.compile maps matmul-softmax-matmul onto one) costs twice as long for one query.
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    q = q.view(B, Hkv, H // Hkv, 1, D).float()
    scores = (q * k.unsqueeze(2)).sum(-1) * D ** -0.5  # (B, Hkv, H/Hkv, S)
    weights = (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2).to(v.dtype).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, config, window, sparse=None, value_embed=False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window, self.sparse, self.sink = window, sparse, config.sink_tokens
        if value_embed:  # from 0: the value embedding enters as the gate learns, so at init v is unchanged
            self.value_gate = nn.Parameter(torch.zeros(()))
        self.qkv = Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.mask_cache = {}

    def forward(self, x, cos, sin, cache=None, mask=None, ve=None):
        """`ve` (B, T, n_kv_head*head_dim): this layer's value embedding of the tokens, or None."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2), cos, sin)
        # a contiguous v lets the fused qkv output be freed: attention's backward would otherwise keep it alive
        v = v.contiguous().view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if ve is not None:
            v = v + (self.value_gate * ve.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)).to(v.dtype)
        if cache is not None and cache.pos > 0:  # decoding one token against the cached keys
            k, v = cache.append(k, v, self.sink)
            # a block-sparse layer caches every position: the new query's row of the forward's mask picks its keys
            seen = attends(k.shape[2] - 1, torch.arange(k.shape[2], device=k.device)[None], self.window,
                           self.sparse) if self.sparse else None
            y = decode_attention(q, k, v, seen)
        else:
            if cache is not None:  # prefill: attend as usual, then keep what later tokens will need
                cache.append(k, v, self.sink)
            if mask is not None:  # packed conversations: segment_mask, this layer's pattern included
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            elif self.window is None or self.window >= T:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = sliding_window_attention(q, k, v, self.window, self.mask_cache, self.sparse, self.sink)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) that saves only the gate|up projection for backward.

    Plain autograd would also keep silu(gate) and the product (each half as big again) for every layer;
    recomputing them in backward is a few elementwise ops and cuts the MLP's activation memory in half.
    """

    @staticmethod
    def forward(ctx, gate_up, weight):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        return linear(F.silu(gate) * up, weight)  # under autocast this runs in the autocast dtype

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        h = (silu * up).to(gate_up.dtype)
        grad_out = grad_out.to(gate_up.dtype)
        grad_weight = matmul(grad_out.reshape(-1, grad_out.shape[-1]).t(), h.reshape(-1, h.shape[-1]))
        grad_h = matmul(grad_out, weight.to(gate_up.dtype)).float()
        grad_gate = grad_h * up * sig * (1 + gate * (1 - sig))
        return torch.cat((grad_gate, grad_h * silu), dim=-1).to(gate_up.dtype), grad_weight.to(weight.dtype)


class SwiGLU(nn.Module):
    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_up = Linear(n_embd, 2 * hidden, bias=False)  # one matmul for gate and up
        self.down = Linear(hidden, n_embd, bias=False)

    def hidden(self, x):
        """The activations `down` reads: silu(gate) * up."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x):
        if not torch.is_grad_enabled():  # inference: nothing to save, so skip the autograd.Function overhead
            return self.down(self.hidden(x))
        return SwiGLUDown.apply(self.gate_up(x), self.down.weight)


class PlainMLP(nn.Module):
    def __init__(self, n_embd, hidden, activation):
        super().__init__()
        self.up = Linear(n_embd, hidden, bias=False)
        self.down = Linear(hidden, n_embd, bias=False)
        self.activation = activation

    def hidden(self, x):
        """The activations `down` reads."""
        h = self.up(x)
        if self.activation == "relu2":
            return F.relu(h).square()
        if self.activation == "gelu":
            return F.gelu(h)
        return F.silu(h)

    def forward(self, x):
        return self.down(self.hidden(x))


def make_mlp(n_embd, kind, hidden):
    return SwiGLU(n_embd, hidden) if kind == "swiglu" else PlainMLP(n_embd, hidden, kind)


def value_embed_table(config, layer):
    """The value-embedding table of a layer, or None: table j serves layers j and n_layer-1-j (as the speedrun
    pairs early and late layers), so the middle layers have none unless value_embeds reaches them."""
    j = min(layer, config.n_layer - 1 - layer)
    return j if j < config.value_embeds else None


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.attn = Attention(config, config.window[layer], config.block_sparse[layer],
                              value_embed_table(config, layer) is not None)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.mlp = make_mlp(config.n_embd, config.mlp_kind[layer], config.mlp_hidden[layer])
        self.gated = config.residual_gates
        if self.gated:  # x = a*x + b*sublayer(norm(x)); at 1 (exact in floating point) the plain residual
            for name in ("attn_residual_gate", "attn_branch_gate", "mlp_residual_gate", "mlp_branch_gate"):
                setattr(self, name, nn.Parameter(torch.ones(())))
        if config.skip_connections and layer >= config.n_layer - config.n_layer // 2:  # GPT.forward adds the skip
            self.skip_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x, cos, sin, cache=None, mask=None, ve=None):
        B, T, C = x.shape
        # The residual stream runs as (B*T, C) rows. Same math; but under torch.compile a norm output of shape
        # (1, 1, C) reaches the next matmul as a stride-0 (1, C) view, which the matmul copies first: two copies
        # per layer per decoded token.
        x = x.reshape(B * T, C)
        h = self.attn(self.attn_norm(x).view(B, T, C), cos, sin, cache, mask, ve).view(B * T, C)
        x = self.attn_residual_gate * x + self.attn_branch_gate * h if self.gated else x + h
        h = self.mlp(self.mlp_norm(x))
        x = self.mlp_residual_gate * x + self.mlp_branch_gate * h if self.gated else x + h
        return x.view(B, T, C)


# ----------------------------------------------------------------------------------------------------------
# KV cache for generation

class KVCache:
    """Per-layer keys/values: a buffer of max_len for full attention and block-sparse layers; for the other
    sliding layers the sink_tokens first positions in fixed slots, then a ring buffer of W for the rest.

    Keys are cached after RoPE, so a ring buffer's slot order does not matter to attention.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        self.pos = 0  # tokens seen so far
        self.layers = []
        for window, sparse in zip(config.window, config.block_sparse):
            ring = window is not None and sparse is None  # block-sparse layers reach back to position 0
            sink = config.sink_tokens if ring else 0
            size = min(sink + window, max_len) if ring else max_len
            shape = (batch_size, config.n_kv_head, size, config.head_dim)
            self.layers.append(LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                                          torch.zeros(shape, device=device, dtype=dtype), ring))

    def advance(self, n):
        self.pos += n


class LayerCache:
    def __init__(self, parent, k, v, ring):
        self.parent, self.k, self.v, self.ring = parent, k, v, ring

    @property
    def pos(self):
        return self.parent.pos

    def append(self, k, v, sink=0):
        """Store k, v (B, Hkv, T, D) for positions pos..pos+T-1; return every cached key/value to attend to.
        `sink`: the layer's sink tokens, which a ring buffer keeps in its first slots; passed by the layer, an
        nn.Module int that torch.compile treats as a constant."""
        T, size, pos = k.shape[2], self.k.shape[2], self.parent.pos
        if not self.ring:
            if pos + T > size:
                raise ValueError(f"KV cache holds {size} positions; cannot add {T} more at position {pos}")
            self.k[:, :, pos:pos + T] = k
            self.v[:, :, pos:pos + T] = v
            return self.k[:, :, :pos + T], self.v[:, :, :pos + T]
        # Later tokens need the sinks and the last W of the others, which is all the buffer holds: position p
        # lives in slot p if p < sink, else in the ring after them. Whatever it holds, a query may see.
        ring = max(size - sink, 1)
        if pos < sink:
            end = min(pos + T, sink)
            self.k[:, :, pos:end] = k[:, :, :end - pos]
            self.v[:, :, pos:end] = v[:, :, :end - pos]
        start = max(pos + T - ring, sink, pos)  # a prefill longer than the window only needs its last W keys later
        if start < pos + T:
            slots = sink + (torch.arange(start, pos + T, device=k.device) - sink) % ring
            self.k[:, :, slots] = k[:, :, start - pos:]
            self.v[:, :, slots] = v[:, :, start - pos:]
        filled = min(pos + T, size)
        return self.k[:, :, :filled], self.v[:, :, :filled]


# ----------------------------------------------------------------------------------------------------------
# The model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Zeros until init_weights, and registered last: a seed gives the plain model's weights plus the options'.
        self.value_embeds = nn.ModuleList(nn.Embedding.from_pretrained(
            torch.zeros(config.vocab_size, config.n_kv_head * config.head_dim), freeze=False)
            for _ in range(config.value_embeds))
        self.rope_cache = {}  # computed, never saved: device -> (cos, sin) for the longest length asked so far

    def init_weights(self, std=0.02):
        """From-scratch init: N(0, std), residual projections scaled by depth so the residual stream
        does not grow with the number of layers; norms and residual gates start at one, skip and value gates
        at zero (the options start as the plain model)."""
        for name, p in self.named_parameters():
            if name.endswith(("norm.weight", "residual_gate", "branch_gate")):
                nn.init.ones_(p)
            elif name.endswith(("skip_gate", "value_gate")):
                nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)
        return self

    def rope(self, start, length, device):
        end = start + length
        cached = self.rope_cache.get(device)
        if cached is None or cached[0].shape[0] < end:
            size = max(end, min(self.config.max_seq_len, 4096))
            self.rope_cache[device] = rope_tables(size, self.config.head_dim, self.config.rope_theta, device)
        cos, sin = self.rope_cache[device]
        return cos[start:end], sin[start:end]

    def forward(self, idx, cache=None, segments=None):
        """idx (B, T) -> the final normed hidden states (B, T, n_embd). Callers apply the LM head: `logits`
        for generation, losses.py in chunks of tokens for training and eval. `segments` (B, T) ints mark the
        packed conversations of each row: attention stays inside a segment and positions restart in each."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start > 0 and T > 1:  # decoding attends to every cached key without a mask: one new token only
            raise ValueError(f"KV cache holds {start} positions: after the prefill, feed one token per call "
                             f"(got {T}); for a longer continuation start a new cache and prefill it all")
        cos, sin = self.rope(start, T, idx.device)
        masks = {}
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed conversations) are for training and eval; generation with a KV "
                                 "cache takes one sequence per row")
            positions = segment_positions(segments)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, head_dim)
            masks = {p: segment_mask(segments, positions, *p) for p in set(self.attention_patterns())}  # once
        x = self.embed(idx)
        values = [table(idx) for table in self.value_embeds]
        n, skips = len(self.blocks), []  # U-Net: the first n//2 outputs, taken back last-in first-out
        for i, (block, pattern) in enumerate(zip(self.blocks, self.attention_patterns())):
            if self.config.skip_connections and i >= n - n // 2:
                x = x + block.skip_gate * skips.pop()
            j = value_embed_table(self.config, i)
            x = block(x, cos, sin, cache.layers[i] if cache is not None else None, masks.get(pattern),
                      values[j] if j is not None else None)
            if self.config.skip_connections and i < n // 2:
                skips.append(x)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def attention_patterns(self):
        return [(w, s, self.config.sink_tokens) for w, s in zip(self.config.window, self.config.block_sparse)]

    def set_windows(self, window):
        """Change the layers' windows at runtime (a window schedule): one value or one per layer, checked as
        GPTConfig.window is. Masks are cached per window; KV caches made before keep their sizes, so make new
        ones; under torch.compile each new window is one recompilation."""
        self.config.window = replace(self.config, window=window).window
        for block, w in zip(self.blocks, self.config.window):
            block.attn.window = w

    def logits(self, idx, cache=None, segments=None):
        """idx (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self(idx, cache, segments))

    def new_cache(self, batch_size, max_len, device, dtype):
        return KVCache(self.config, batch_size, max_len, device, dtype)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        tables = self.embed.weight.numel() + sum(t.weight.numel() for t in self.value_embeds)  # lookups, no matmul
        return n - tables if exclude_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight of every matmul, plus attention scores and values."""
        c = self.config
        matmul_params = self.num_params(exclude_embedding=True)
        if c.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        context = sum(min(w or seq_len, seq_len) + (s * seq_len / max(w, 64) if s else 0)  # + summary keys
                      + (2 * min(c.sink_tokens, seq_len) if w else 0)  # + sink keys, seen by every query
                      for w, s in zip(c.window, c.block_sparse)) / 2  # average keys per query, causal
        return 6 * matmul_params + 12 * c.n_head * c.head_dim * context

    def configure_optimizer(self, lr, weight_decay, betas, device_type, attn_lr=None, muon=None):
        """AdamW; matrices and embeddings decay, norm gains do not. With `attn_lr` (not None and not lr) the
        attention sublayers (attn_norm + attn) get groups of their own at that peak LR: every group carries
        "lr_scale" = its peak LR / lr, which training.set_lr applies at each step, so one schedule drives both.
        The fused kernel (CPU and GPU) is faster and needs no temporaries the size of the model.

        With `muon` = {"matrix", "embed", "head", "scalar": peak LRs, "momentum"}: muon.Muon, Muon on the blocks'
        2-D matrices and AdamW on the token embedding and value tables, an untied head, and every scalar (norm
        gains and the *_gate scalars, no decay), each group at its own peak LR (lr_scale = its LR / lr)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        if muon is not None:
            return self.muon_optimizer(trainable, lr, weight_decay, betas, muon)
        attention = set()
        if attn_lr is not None and attn_lr != lr:
            attention = {id(p) for b in self.blocks for m in (b.attn_norm, b.attn) for p in m.parameters()}
        groups = []
        for scale, members in ((1.0, [p for p in trainable if id(p) not in attention]),
                               (attn_lr / lr if attention else None, [p for p in trainable if id(p) in attention])):
            if scale is None:
                continue
            groups += [{"params": [p for p in members if p.dim() >= 2], "weight_decay": weight_decay,
                        "lr_scale": scale},
                       {"params": [p for p in members if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))

    def muon_optimizer(self, trainable, lr, weight_decay, betas, muon):
        from muon import Muon  # only runs that ask for it need the module

        wanted = {id(p) for p in trainable}
        blocks = {id(p) for p in self.blocks.parameters()}
        tables = [self.embed.weight] + [t.weight for t in self.value_embeds]
        head = [] if self.config.tie_embeddings else [self.lm_head.weight]
        roles = (("matrix", [p for p in trainable if id(p) in blocks and p.dim() == 2], weight_decay, True),
                 ("embed", [p for p in tables if id(p) in wanted], weight_decay, False),
                 ("head", [p for p in head if id(p) in wanted], weight_decay, False),
                 ("scalar", [p for p in trainable if p.dim() < 2], 0.0, False))
        groups = [{"params": params, "weight_decay": decay, "use_muon": use_muon, "lr_scale": muon[role] / lr,
                   "role": role} for role, params, decay, use_muon in roles if params]
        routed = sum(len(g["params"]) for g in groups)
        if routed != len(trainable):  # a new kind of parameter must be given a role, not silently left out
            raise ValueError(f"configure_optimizer(muon): {len(trainable) - routed} trainable parameters have no "
                             f"role (matrix, embed, head, scalar)")
        return Muon(groups, lr=lr, momentum=muon["momentum"], betas=betas)
