"""A Llama-family GPT in one file: RMSNorm, RoPE, grouped-query attention with one fused QKV projection and
optional per-layer sliding windows, SwiGLU or plain MLPs per layer, and a KV cache for generation.

The forward pass returns the final normed hidden states; `logits` applies the LM head. Losses live in
losses.py, which applies the head a chunk of tokens at a time so the whole batch's fp32 logits never exist.
Loading and exporting Hugging Face / GGUF weights lives in hf_interop.py."""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

MLP_KINDS = ("swiglu", "relu2", "gelu", "silu")


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

    def __post_init__(self):
        for name in ("mlp_kind", "mlp_hidden", "window"):
            value = getattr(self, name)
            value = list(value) if isinstance(value, (list, tuple)) else [value] * self.n_layer
            if len(value) != self.n_layer:
                raise ValueError(f"GPTConfig.{name} has {len(value)} entries but n_layer = {self.n_layer}")
            setattr(self, name, value)
        for i, (kind, hidden, window) in enumerate(zip(self.mlp_kind, self.mlp_hidden, self.window)):
            if kind not in MLP_KINDS:
                raise ValueError(f"GPTConfig.mlp_kind[{i}] = {kind!r}; expected one of {MLP_KINDS}")
            if not isinstance(hidden, int) or hidden <= 0:
                raise ValueError(f"GPTConfig.mlp_hidden[{i}] = {hidden!r}; expected a positive int")
            if window is not None and (not isinstance(window, int) or window < 1):
                raise ValueError(f"GPTConfig.window[{i}] = {window!r}; expected None or an int >= 1")
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


def sliding_window_attention(q, k, v, window, mask_cache):
    """Causal attention where each query sees the last `window` keys, in blocks so memory is O(T * block).

    Queries are cut into blocks of S >= window; block b only needs keys from blocks b-1 and b, so every
    block shares one (S, 2S) mask, built once per shape and device.
    """
    B, H, T, D = q.shape
    block = max(window, 64)
    if T <= block:  # one block: the band mask alone (its last T columns relative to an empty previous block)
        key = (T, window, q.device)
        if key not in mask_cache:
            mask_cache[key] = band_mask(T, window, q.device)[:, T:]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_cache[key], enable_gqa=True)
    key = (block, window, q.device)
    if key not in mask_cache:
        mask_cache[key] = band_mask(block, window, q.device)
    mask = mask_cache[key]
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
    # block 0 has no previous block: its mask is the right half of the band
    first = F.scaled_dot_product_attention(qb[:, 0], kb[:, :, 0], vb[:, :, 0], attn_mask=mask[:, block:],
                                           enable_gqa=True)
    rest = F.scaled_dot_product_attention(qb[:, 1:].reshape(-1, H, block, D),
                                          k_pairs.reshape(-1, Hkv, 2 * block, D),
                                          v_pairs.reshape(-1, Hkv, 2 * block, D), attn_mask=mask, enable_gqa=True)
    out = torch.cat((first.unsqueeze(1), rest.view(B, n_blocks - 1, H, block, D)), dim=1)
    return out.transpose(1, 2).reshape(B, H, n_blocks * block, D)[:, :, :T]


def segment_positions(segments):
    """(B, T) position of each token within its segment (a packed conversation): RoPE restarts at 0 in each."""
    t = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(starts, t, 0).cummax(dim=1).values


def segment_mask(segments, window):
    """(B, 1, T, T) bool: query t sees key s iff both are in the same segment, s <= t and t - s < window (None:
    no window). Dense, O(T^2) per row: packed batches are SFT's short rows, not long-context training."""
    t = torch.arange(segments.shape[1], device=segments.device)
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed = allowed & (t[:, None] - t[None, :] < window)
    return ((segments[:, :, None] == segments[:, None, :]) & allowed).unsqueeze(1)


def decode_attention(q, k, v):
    """One query position (B, H, 1, D) against every cached key/value (B, Hkv, S, D), no mask needed."""
    if not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    # Compiled, the same softmax(q k^T / sqrt(D)) v as sums of products fuses into one small kernel; a library
    # attention call (torch.compile maps matmul-softmax-matmul onto one) costs twice as long for one query.
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    q = q.view(B, Hkv, H // Hkv, 1, D).float()
    weights = ((q * k.unsqueeze(2)).sum(-1) * D ** -0.5).softmax(-1)  # (B, Hkv, H/Hkv, S)
    return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2).to(v.dtype).view(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, config, window):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = window
        self.qkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.mask_cache = {}

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2), cos, sin)
        # a contiguous v lets the fused qkv output be freed: attention's backward would otherwise keep it alive
        v = v.contiguous().view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None and cache.pos > 0:  # decoding one token against the cached keys
            k, v = cache.append(k, v)
            y = decode_attention(q, k, v)
        else:
            if cache is not None:  # prefill: attend as usual, then keep what later tokens will need
                cache.append(k, v)
            if mask is not None:  # packed conversations: segment_mask, this layer's window included
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            elif self.window is None or self.window >= T:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = sliding_window_attention(q, k, v, self.window, self.mask_cache)
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
        return F.linear(F.silu(gate) * up, weight)  # under autocast this runs in the autocast dtype

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weight = ctx.saved_tensors
        gate, up = gate_up.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        h = (silu * up).to(gate_up.dtype)
        grad_out = grad_out.to(gate_up.dtype)
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        grad_h = (grad_out @ weight.to(gate_up.dtype)).float()
        grad_gate = grad_h * up * sig * (1 + gate * (1 - sig))
        return torch.cat((grad_gate, grad_h * silu), dim=-1).to(gate_up.dtype), grad_weight.to(weight.dtype)


class SwiGLU(nn.Module):
    def __init__(self, n_embd, hidden):
        super().__init__()
        self.gate_up = nn.Linear(n_embd, 2 * hidden, bias=False)  # one matmul for gate and up
        self.down = nn.Linear(hidden, n_embd, bias=False)

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
        self.up = nn.Linear(n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)
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


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.attn = Attention(config, config.window[layer])
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.mlp = make_mlp(config.n_embd, config.mlp_kind[layer], config.mlp_hidden[layer])

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, C = x.shape
        # The residual stream runs as (B*T, C) rows. Same math; but under torch.compile a norm output of shape
        # (1, 1, C) reaches the next matmul as a stride-0 (1, C) view, which the matmul copies first: two copies
        # per layer per decoded token.
        x = x.reshape(B * T, C)
        x = x + self.attn(self.attn_norm(x).view(B, T, C), cos, sin, cache, mask).view(B * T, C)
        x = x + self.mlp(self.mlp_norm(x))
        return x.view(B, T, C)


# ----------------------------------------------------------------------------------------------------------
# KV cache for generation

class KVCache:
    """Per-layer keys/values: a buffer of max_len for full attention, a ring buffer of W for sliding layers.

    Keys are cached after RoPE, so a ring buffer's slot order does not matter to attention.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        self.pos = 0  # tokens seen so far
        self.layers = []
        for window in config.window:
            size = max_len if window is None else min(window, max_len)
            shape = (batch_size, config.n_kv_head, size, config.head_dim)
            self.layers.append(LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                                          torch.zeros(shape, device=device, dtype=dtype), window is not None))

    def advance(self, n):
        self.pos += n


class LayerCache:
    def __init__(self, parent, k, v, ring):
        self.parent, self.k, self.v, self.ring = parent, k, v, ring

    @property
    def pos(self):
        return self.parent.pos

    def append(self, k, v):
        """Store k, v (B, Hkv, T, D) for positions pos..pos+T-1; return every cached key/value to attend to."""
        T, size, pos = k.shape[2], self.k.shape[2], self.parent.pos
        if not self.ring:
            if pos + T > size:
                raise ValueError(f"KV cache holds {size} positions; cannot add {T} more at position {pos}")
            self.k[:, :, pos:pos + T] = k
            self.v[:, :, pos:pos + T] = v
            return self.k[:, :, :pos + T], self.v[:, :, :pos + T]
        keep = min(T, size)  # a prefill longer than the window only needs its last W keys later
        slots = torch.arange(pos + T - keep, pos + T, device=k.device) % size
        self.k[:, :, slots] = k[:, :, T - keep:]
        self.v[:, :, slots] = v[:, :, T - keep:]
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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope_cache = {}  # computed, never saved: device -> (cos, sin) for the longest length asked so far

    def init_weights(self, std=0.02):
        """From-scratch init: N(0, std), residual projections scaled by depth so the residual stream
        does not grow with the number of layers; norms start at one."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
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
            masks = {w: segment_mask(segments, w) for w in set(self.config.window)}  # built once per forward
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.layers[i] if cache is not None else None,
                      masks.get(self.config.window[i]))
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def logits(self, idx, cache=None, segments=None):
        """idx (B, T) -> logits (B, T, vocab)."""
        return self.lm_head(self(idx, cache, segments))

    def new_cache(self, batch_size, max_len, device, dtype):
        return KVCache(self.config, batch_size, max_len, device, dtype)

    def num_params(self, exclude_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per weight of every matmul, plus attention scores and values."""
        c = self.config
        matmul_params = self.num_params(exclude_embedding=True)
        if c.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        context = sum(min(w or seq_len, seq_len) for w in c.window) / 2  # average keys per query, causal
        return 6 * matmul_params + 12 * c.n_head * c.head_dim * context

    def configure_optimizer(self, lr, weight_decay, betas, device_type, attn_lr=None):
        """AdamW; matrices and embeddings decay, norm gains do not. With `attn_lr` (not None and not lr) the
        attention sublayers (attn_norm + attn) get groups of their own at that peak LR: every group carries
        "lr_scale" = its peak LR / lr, which training.set_lr applies at each step, so one schedule drives both.
        The fused kernel (CPU and GPU) is faster and needs no temporaries the size of the model."""
        trainable = [p for p in self.parameters() if p.requires_grad]
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
