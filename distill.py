"""Distill a Llama-family teacher (default SmolLM2-135M) into a cheaper student: layer by layer, then end to end.

    python distill.py --config configs/distill_smollm2_mlp_half.yaml
    torchrun --standalone --nproc_per_node 8 distill.py --config configs/distill_smollm2_hybrid_window.yaml
    python distill.py --config configs/distill_smollm2_mlp_half.yaml --resume   # continue exactly after a crash

The student starts as a copy of the teacher (embeddings, attention, norms, head) with per-layer changes: MLPs
replaced by a plain MLP of another activation and width whose output projection starts at zero (so the student
starts as "the teacher minus those MLPs"), and/or attention made a sliding window in all but a few layers.

Phase 1, layer-wise rotation. For each layer i of LAYERS, ROTATIONS times, STEPS_PER_LAYER AdamW steps train only
layer i's target: decoder (mlp_norm + MLP), attn (attn_norm + attention) or block (the whole layer). The loss
compares the student's layer i, run on an input latent, with the teacher's hidden state after layer i on the
same latent: MSE on the hidden state after layer i, optionally + COSINE_WEIGHT * (1 - cosine) of the layer's
update to the residual stream. For the decoder target on the teacher's latent that MSE is exactly the MSE of
the student's MLP output against the teacher's. The rest of the network stays the teacher's. The teacher's
hidden states for the phase's NUM_BATCHES batches live in a cache advanced one layer at a time, so a rotation
costs about one teacher forward over those batches; each step runs only layer i's trainable part (a decoder
target's frozen attention sublayer is applied to the cache once per layer, not once per step). LATENT=student
keeps a second cache advanced through the student's distilled layers, so layer i maps the student's own hidden
state to the teacher's after layer i and can correct the error of the layers before it.

Phase 2, logit distillation: loss = ALPHA * KD + (1 - ALPHA) * CE(next token), KD = T^2 * KL(teacher || student)
at temperature T over the full vocabulary, or exactly over k+1 buckets (the teacher's top-k ids plus the tail
mass), computed in chunks of tokens so that neither model's full fp32 logits exist, in forward or backward.

Functions come first (the tests import them); the story is at the bottom: run_phase1, run_phase2, and main(),
which checks the settings, loads the models and runs the phases. The pieces shared with train.py (resume, one
optimizer step with accumulation, checkpoint saves, metrics on resume, settings checks) live in common.py.
"""
import dataclasses
import json
import math
import os
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
from data import TokenLoader, read_manifest, val_batches
from model import GPT, MLP_KINDS, GPTConfig, llama_incompatible_layers

# ----------------------------------------------------------------------------------------------------------
# Defaults: every one can be set in a YAML file (lower-case key) or on the command line (--name value)

TEACHER = "models/smollm2_135m"  # teacher: HF Llama dir, hub id, .gguf, or a checkpoint of ours
INIT_FROM: Optional[str] = None  # start the student from this checkpoint of ours (its layers must line up with the teacher's) instead of a copy of the teacher
DATA_DIR = "data/fineweb_edu"  # shards + manifest.json from prepare.py, made with the teacher's tokenizer
RUN_DIR = "runs/distill"  # holds config.json, metrics.jsonl, tokenizer/, layer_XXX.pt, final.pt, step_XXXXXX.pt
RESUME = False  # continue RUN_DIR exactly from its furthest saved state (phase 1 or 2)
PHASES = "12"  # which phases run: "1" (layer-wise), "2" (logit distillation) or "12" (both, in order)
# the student (ignored when the student comes from a checkpoint: then its own architecture is used)
MLP_KIND = "relu2"  # MLP of the replaced layers: relu2 | gelu | silu | swiglu, or keep (the teacher's MLP)
MLP_HIDDEN: Optional[int] = None  # width of the new MLPs; None = half the teacher's, rounded down to a multiple of 8
MLP_LAYERS: Optional[list[int]] = None  # layers whose MLP is replaced; None = every layer
WINDOW: Optional[int] = None  # sliding-window size W for attention; None = full attention everywhere
FULL_ATTN_LAYERS: list[int] = []  # with WINDOW: layers that keep full attention (a hybrid student)
# phase 1: layer-wise rotation
LAYERS: Optional[list[int]] = None  # layers trained in each rotation, increasing (the cache only moves up); None = every layer
ROTATIONS = 1  # passes over LAYERS; each pass reads NUM_BATCHES new batches
STEPS_PER_LAYER = 200  # optimizer steps per layer per rotation
TARGET_TRAINABLE = "decoder"  # what trains in layer i: decoder (mlp_norm + MLP) | attn (attn_norm + attention) | block
LATENT = "teacher"  # input latent of layer i: teacher (the teacher's trajectory) | student (the student's own; 2x cache)
COSINE_WEIGHT = 0.0  # phase-1 loss = MSE + COSINE_WEIGHT * (1 - cosine of the layer's update to the residual stream)
NUM_BATCHES = 16  # batches per rank held in the phase-1 cache; a layer's steps cycle through them
CACHE_DEVICE = "device"  # where the phase-1 cache lives: device (the accelerator) | cpu (host memory)
LR_LAYER = 1e-3  # phase-1 peak learning rate (a fresh AdamW for each layer)
WARMUP_LAYER = 10  # phase-1 warmup steps at the start of each layer
CHECKPOINT_EVERY_LAYER = 50  # phase 1: save a resumable state every N steps inside a layer (0 = only at its end)
# phase 2: end-to-end logit distillation
ALPHA = 0.5  # loss = ALPHA * KD + (1 - ALPHA) * CE; 0 = CE only, and the teacher is not loaded
TEMPERATURE = 1.0  # KD temperature T: KL between softmax(logits / T), times T^2
TOP_K = 0  # 0 = KL over the full vocabulary; k > 0 = exact KL over the teacher's top-k ids plus one tail bucket
TRAIN_PARAMS = "all"  # phase-2 trainable part: all | blocks (not embeddings/head/final norm) | mlp | attn
MAX_STEPS = 1000  # phase-2 optimizer steps
LR = 3e-4  # phase-2 peak learning rate
MIN_LR_FRAC = 0.1  # the LR decays to MIN_LR_FRAC * LR (both phases)
WARMUP_STEPS = 100  # phase-2 linear warmup
LR_SCHEDULE = "cosine"  # trapezoid, cosine or constant (both phases)
COOLDOWN_FRAC = 0.2  # trapezoid: the last COOLDOWN_FRAC of each layer's steps (phase 1) and of phase 2 decay linearly
GRAD_ACCUM = 1  # phase-2 micro-batches per optimizer step
CHECKPOINT_EVERY = 250  # phase 2: evaluate and save step_XXXXXX.pt every N steps and at the end (0 = only at the end)
KEEP_CHECKPOINTS = 3  # keep the newest K layer_XXX.pt and K step_XXXXXX.pt (0 = keep all)
# both phases
BATCH_SIZE = 8  # sequences per batch per process
SEQ_LEN = 1024  # tokens per sequence
WEIGHT_DECAY = 0.0  # AdamW decay on matrices (never on norm gains)
BETAS: tuple[float, float] = (0.9, 0.95)  # AdamW betas
GRAD_CLIP = 1.0  # clip the global gradient norm to this (0 = no clipping)
EVAL_TOKENS = 65_536  # fixed val tokens: the layer-local val loss and the end-to-end eval at every checkpoint
LOSS_CHUNK = 1024  # tokens per chunk of logits in the KD/CE loss and in eval
SEED = 1337  # seeds the new MLPs' init and the order in which a layer's steps visit the cached batches
DEVICE = "auto"  # auto (cuda if available, else cpu), cpu, cuda; under torchrun each rank takes cuda:LOCAL_RANK
DTYPE = "auto"  # auto (bf16 autocast where the GPU supports it, fp32 otherwise), float32, bfloat16
LOG_EVERY = 10  # print a log line every N steps (metrics.jsonl gets every step)
EXPORT_HF = False  # at the end, export the student to RUN_DIR/hf as a Hugging Face Llama (SwiGLU, full attention only)

# Settings a phase-1 resume may change: they do not touch the cached batches, the schedule or the weights.
# Everything else must match the saved config, or the resumed run could not end where an uninterrupted one would.
_PHASE1_RESUMABLE_CHANGES = ("resume", "run_dir", "log_every", "keep_checkpoints", "export_hf", "phases",
                            "cache_device",  # where the cache lives, not what it holds
                            "alpha", "temperature", "top_k", "train_params", "max_steps", "lr", "warmup_steps",
                            "grad_accum", "checkpoint_every")  # phase 2 only


def say(*args):
    """Print on rank 0 only, above any tqdm bar."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))

# ----------------------------------------------------------------------------------------------------------
# The student

def student_config(teacher_config, mlp_kind="relu2", mlp_hidden=None, mlp_layers=None, window=None,
                   full_attn_layers=()):
    """The teacher's GPTConfig with the per-layer MLP and attention-window changes."""
    n = teacher_config.n_layer
    fields = dataclasses.asdict(teacher_config)
    if mlp_kind != "keep":
        for i in check_layers("mlp_layers", range(n) if mlp_layers is None else mlp_layers, n):
            # half the teacher's width, on a multiple of 8 so the matmuls stay on fast kernel shapes
            fields["mlp_hidden"][i] = mlp_hidden or teacher_config.mlp_hidden[i] // 2 // 8 * 8
            fields["mlp_kind"][i] = mlp_kind
    if window is not None:
        keep_full = set(check_layers("full_attn_layers", full_attn_layers, n))
        fields["window"] = [None if i in keep_full else window for i in range(n)]
    return GPTConfig.from_dict(fields)


def check_layers(name, layers, n_layer):
    layers = list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layer]
    if bad:
        raise common.ConfigError(f"{name} = {layers}: layer(s) {bad} out of range; the teacher has layers "
                                 f"0..{n_layer - 1}")
    if len(set(layers)) != len(layers):
        raise common.ConfigError(f"{name} = {layers} lists a layer twice")
    return layers


def build_student(teacher, config):
    """GPT(config) holding every teacher tensor whose name and shape match; the other (new) MLPs get a fresh
    init with `down` zeroed, so the student starts as the teacher minus those MLPs."""
    student = GPT(config).init_weights()
    teacher_state = teacher.state_dict()
    state = student.state_dict()
    new_mlps = set()
    for name, tensor in state.items():
        source = teacher_state.get(name)
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source)
        elif ".mlp." in name:
            new_mlps.add(int(name.split(".")[1]))
        else:
            raise ValueError(f"student tensor '{name}' {tuple(tensor.shape)} has no teacher tensor of that shape "
                             f"({None if source is None else tuple(source.shape)}); only MLPs may differ")
    for i in sorted(new_mlps):
        torch.nn.init.zeros_(student.blocks[i].mlp.down.weight)
    return student, sorted(new_mlps)


def check_student_matches_teacher(student_config_, teacher_config, source):
    for key in ("n_layer", "n_embd", "vocab_size", "n_head", "n_kv_head", "head_dim"):
        s, t = getattr(student_config_, key), getattr(teacher_config, key)
        if s != t:
            raise SystemExit(f"student '{source}' has {key} = {s} but the teacher '{TEACHER}' has {t}; the "
                             f"student's layers and vocabulary must line up with the teacher's")


def set_trainable(model, modules):
    """requires_grad only for the parameters of `modules`; returns them."""
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def target_modules(block, target):
    """What phase 1 trains in a layer; each sublayer comes with its pre-norm."""
    return {"decoder": [block.mlp_norm, block.mlp], "attn": [block.attn_norm, block.attn], "block": [block]}[target]


# ----------------------------------------------------------------------------------------------------------
# Phase 1: the layer cache

def frozen_part(block, x, cos, sin):
    """A decoder target's fixed prefix, the attention sublayer: computed once per layer, not once per step."""
    return x + block.attn(block.attn_norm(x), cos, sin)


def trainable_part(block, x, cos, sin, target):
    """Layer i from the latent a step starts at to the hidden state after layer i."""
    if target == "decoder":
        return x + block.mlp(block.mlp_norm(x))
    return block(x, cos, sin)


def cache_bytes(num_batches, batch_size, seq_len, n_embd):
    """fp32 bytes of the two (N, B, T, C) buffers a layer needs at once: input latents and teacher targets (with
    LATENT=student the teacher's targets replace its latents in place, so it is two buffers either way)."""
    return 2 * num_batches * batch_size * seq_len * n_embd * 4


def val_windows_per_rank(data_dir, batch_size, seq_len, eval_tokens, world_size):
    """How many val windows (the most on any rank) data.val_batches yields, from the manifest alone."""
    val_total = sum(s["ntok"] for s in read_manifest(data_dir)["shards"] if s["split"] == "val")
    n_windows = max(0, (min(eval_tokens, val_total) - 1) // (batch_size * seq_len))
    return -(-n_windows // world_size)


def model_width(source):
    """n_embd of a checkpoint or run dir of ours, or of a local HF dir, read from metadata without loading any
    weights; None for a hub id or a .gguf (then the cache is checked right after the teacher is loaded)."""
    path = source
    if os.path.isdir(source):
        path = common.newest_run_checkpoint(source)
        if path is None:  # an HF dir
            config_path = os.path.join(source, "config.json")
            if not os.path.exists(config_path):
                return None
            with open(config_path, encoding="utf-8") as f:
                return json.load(f).get("hidden_size")
    if str(path).endswith(".pt") and os.path.exists(os.path.splitext(path)[0] + ".json"):
        return checkpoint_meta(path)["model_config"]["n_embd"]
    return None


def check_cache_fits(n_embd, cache_device, env):
    """Refuse, before any work, a phase-1 cache that will not fit (leaving 20% for the models and activations).
    The size is arithmetic: train and val caches of 2 x (N, B, T, C) fp32 each, per rank."""
    val_n = val_windows_per_rank(DATA_DIR, BATCH_SIZE, SEQ_LEN, EVAL_TOKENS, env.world_size)
    need = cache_bytes(NUM_BATCHES, BATCH_SIZE, SEQ_LEN, n_embd) + cache_bytes(val_n, BATCH_SIZE, SEQ_LEN, n_embd)
    if str(cache_device).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(cache_device)
        where = f"GPU {cache_device}"
    else:
        import psutil

        free = psutil.virtual_memory().available
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # every rank on this host keeps its own cache here
        where = "host memory"
    if need > 0.8 * free:
        raise SystemExit(f"the phase-1 cache needs {need / 2**30:.2f} GiB of {where}, but only {free / 2**30:.2f} "
                         f"GiB is free (the cache may take 80%); lower num_batches ({NUM_BATCHES}), batch_size "
                         f"({BATCH_SIZE}), seq_len ({SEQ_LEN}) or eval_tokens ({EVAL_TOKENS}), or set "
                         f"cache_device to {'cpu' if where != 'host memory' else 'device'}")
    say(f"phase-1 cache: 2 x ({NUM_BATCHES}, {BATCH_SIZE}, {SEQ_LEN}, {n_embd}) fp32 per rank for train + "
        f"2 x ({val_n}, {BATCH_SIZE}, {SEQ_LEN}, {n_embd}) for val = {need / 2**30:.3f} GiB of {where} "
        f"(latent: {LATENT})")


def empty_like_host(t):
    """torch.empty_like that keeps a host buffer pinned: .to(cuda, non_blocking=True) from pageable memory
    would be a synchronous copy."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, pin_memory=t.is_pinned())


@torch.no_grad()
def map_batches(fn, latents, out, device, ctx):
    """out[n] = fn(latents[n]) for every cached batch n, one batch at a time; out may be latents (in place)."""
    for n in range(latents.shape[0]):
        with ctx:
            y = fn(latents[n].to(device, non_blocking=True))
        out[n].copy_(y.float())
    return out


@torch.no_grad()
def start_cache(teacher, tokens, with_student, cache_device):
    """The latent entering layer 0 (the embeddings) for every batch; a second copy for LATENT=student. In host
    memory next to a GPU the cache is pinned, so batches stream to the GPU asynchronously."""
    device = teacher.embed.weight.device
    pin = str(cache_device) == "cpu" and str(device).startswith("cuda")
    B, T = tokens[0].shape
    h = torch.empty((len(tokens), B, T, teacher.config.n_embd), dtype=torch.float32, device=cache_device,
                    pin_memory=pin)
    for n, x in enumerate(tokens):
        h[n].copy_(teacher.embed(x.to(device)).float())
    student_h = empty_like_host(h).copy_(h) if with_student else None
    return {"layer": 0, "teacher": h, "student": student_h}


def advance_cache(cache, teacher, student, layer, ctx):
    """Move the cache to the latent entering `layer`: the teacher's latent through the teacher's blocks, the
    student's through the student's. Each block runs once per batch, so a rotation costs one forward."""
    device = teacher.embed.weight.device
    T = cache["teacher"].shape[2]
    while cache["layer"] < layer:
        j = cache["layer"]
        cos, sin = teacher.rope(0, T, device)
        map_batches(lambda x: teacher.blocks[j](x, cos, sin), cache["teacher"], cache["teacher"], device, ctx)
        if cache["student"] is not None:
            cos, sin = student.rope(0, T, device)
            map_batches(lambda x: student.blocks[j](x, cos, sin), cache["student"], cache["student"], device, ctx)
        cache["layer"] = j + 1


def layer_io(cache, teacher, student, layer, target, ctx):
    """(inputs, targets) for training `layer`: the latent a step starts from, and the teacher's hidden state
    after the layer. Two (N, B, T, C) buffers: with the teacher's latent, h_i and a new h_{i+1}; with the
    student's, the teacher's latent moves to h_{i+1} in place and the student's s_i is the input."""
    assert cache["layer"] == layer, f"cache is at layer {cache['layer']}, not {layer}"
    device = teacher.embed.weight.device
    T = cache["teacher"].shape[2]
    cos, sin = teacher.rope(0, T, device)
    teacher_block = lambda x: teacher.blocks[layer](x, cos, sin)
    if cache["student"] is None:
        targets = map_batches(teacher_block, cache["teacher"], empty_like_host(cache["teacher"]), device, ctx)
        inputs = cache["teacher"]
    else:
        targets = map_batches(teacher_block, cache["teacher"], cache["teacher"], device, ctx)
        inputs = cache["student"]
    if target == "decoder":  # the attention sublayer stays fixed, so apply it once here (in place: h_i is not needed again)
        cos, sin = student.rope(0, T, device)
        map_batches(lambda x: frozen_part(student.blocks[layer], x, cos, sin), inputs, inputs, device, ctx)
    return inputs, targets


def finish_layer(cache, student, layer, inputs, targets, target, ctx):
    """After training `layer`: the cache holds the latents entering layer + 1."""
    if cache["student"] is None:
        cache["teacher"] = targets
    else:  # the student's latent goes through the layer as trained
        device = student.embed.weight.device
        cos, sin = student.rope(0, inputs.shape[2], device)
        map_batches(lambda x: trainable_part(student.blocks[layer], x, cos, sin, target), inputs, inputs, device,
                    ctx)
    cache["layer"] = layer + 1


def layer_loss(out, target, base, cosine_weight=0.0):
    """MSE between the student's and the teacher's hidden state after the layer (equal to the MSE of the
    layer's updates out - base and target - base), plus cosine_weight * (1 - cosine) of those updates: the
    residual stream itself would make any cosine close to 1."""
    update, target_update = out - base, target - base
    loss = F.mse_loss(update, target_update)
    if cosine_weight:
        loss = loss + cosine_weight * (1 - F.cosine_similarity(update, target_update, dim=-1)).mean()
    return loss


def batch_index(seed, rotation, layer, step, num_batches):
    """The cached batch that step `step` of `layer` uses: a fresh permutation per pass over the cache, a pure
    function of its arguments, so a resumed run visits the same batches in the same order."""
    epoch, k = divmod(step, num_batches)
    generator = torch.Generator().manual_seed((((seed * 1_000_003 + rotation) * 1_000_003 + layer) * 1_000_003
                                               + epoch) % 2**63)
    return int(torch.randperm(num_batches, generator=generator)[k])


def sync_gradients(params, env):
    """Average the trainable gradients over ranks in one flat all-reduce (phase 1 trains a few tensors, no DDP)."""
    if not env.ddp:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def layer_step(block, optimizer, params, x, y, lr, target, cos, sin, ctx, env, cosine_weight=0.0, grad_clip=0.0):
    """One phase-1 optimizer step of layer `block` on one cached batch; returns the loss (a tensor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with ctx:
        out = trainable_part(block, x, cos, sin, target)
    loss = layer_loss(out.float(), y, x, cosine_weight)
    loss.backward()
    sync_gradients(params, env)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def layer_val_loss(block, inputs, targets, target, cos, sin, env, ctx, cosine_weight=0.0):
    """The phase-1 loss of `block` averaged over the cached val batches of every rank."""
    device = block.mlp.down.weight.device
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for n in range(inputs.shape[0]):
        x, y = inputs[n].to(device), targets[n].to(device)
        with ctx:
            out = trainable_part(block, x, cos, sin, target)
        total[0] += layer_loss(out.float(), y, x, cosine_weight).double()
        total[1] += 1
    if env.ddp:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------
# Phase 2: KD and CE on logits, a chunk of tokens at a time

def kl_full(student_logits, teacher_logits, temperature=1.0):
    """Per row: T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the whole vocabulary, in fp32."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1)


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


class ChunkedDistillLoss(torch.autograd.Function):
    """Mean over tokens of alpha * KD + (1 - alpha) * CE, logits formed one chunk of rows at a time.

    Each chunk's student logits (and, without grad, the teacher's) are made, turned into the chunk's loss and,
    where needed, straight into its gradients for the hidden states and the head weight, then freed. So neither
    model's (N, vocab) fp32 logits ever exist, in forward or in backward, and nothing is recomputed: backward
    only scales the gradients forward stored (model.ChunkedCrossEntropy's approach, with any loss per chunk).
    Returns (loss, mean CE, mean KD); the last two are for logging.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, alpha, temperature, top_k,
                chunk_rows, need_hidden_grad, need_weight_grad):
        valid = targets != -100
        n_valid = valid.sum().clamp(min=1)
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # CE, KD
        grad_hidden = torch.zeros_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(need_hidden_grad)
                w = weight.detach().requires_grad_(need_weight_grad)
                logits = (h @ w.t()).float()
                ce = F.cross_entropy(logits, targets[rows], ignore_index=-100, reduction="sum")
                kd = torch.zeros((), device=hidden.device)
                if alpha > 0:
                    with torch.no_grad():
                        teacher_logits = (teacher_hidden[rows] @ teacher_weight.t()).float()
                    per_row = (kl_full(logits, teacher_logits, temperature) if top_k == 0
                               else kl_topk(logits, teacher_logits, top_k, temperature))
                    kd = (per_row * valid[rows]).sum()
                wanted = [t for t, need in ((h, need_hidden_grad), (w, need_weight_grad)) if need]
                if wanted:
                    grads = list(torch.autograd.grad((alpha * kd + (1 - alpha) * ce) / n_valid, wanted))
                    if need_hidden_grad:
                        grad_hidden[rows] = grads.pop(0).to(hidden.dtype)
                    if need_weight_grad:
                        grad_weight += grads.pop(0).float()
            sums += torch.stack([ce.detach(), kd.detach()])
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        ce_mean, kd_mean = sums[0] / n_valid, sums[1] / n_valid
        ctx.mark_non_differentiable(ce_mean, kd_mean)
        return alpha * kd_mean + (1 - alpha) * ce_mean, ce_mean, kd_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
                None, None, None, None, None, None, None, None, None)


def distill_loss(hidden, weight, teacher_hidden, teacher_weight, targets, alpha, temperature=1.0, top_k=0,
                 chunk_rows=1024):
    """(loss, ce, kd) for student hidden states (N, C) with head weight (V, C), the teacher's likewise (unused
    when alpha = 0), and next-token targets (N,) with -100 ignored. KD = T^2 * KL(teacher || student)."""
    # autograd.Function.forward runs with grad disabled, so which gradients to build is decided here
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    return ChunkedDistillLoss.apply(hidden, weight, teacher_hidden, teacher_weight, targets, float(alpha),
                                    float(temperature), int(top_k), int(chunk_rows), need_h, need_w)


@torch.no_grad()
def teacher_val_hidden(teacher, batches, ctx):
    """The teacher's final normed hidden states (B*T, C) for each val window, computed once per run: every
    eval then only applies the head, instead of a teacher forward per layer (30x a rotation for SmolLM2).
    Memory per rank: EVAL_TOKENS / world size x n_embd x 4 bytes in fp32 (2 in bf16), e.g. 65,536 tokens x 576
    = 151 MB (SmolLM2-135M, fp32), on the device."""
    hidden = []
    for x, _ in batches:
        with ctx:
            hidden.append(teacher(x, return_hidden=True).flatten(0, 1))
    return hidden


@torch.no_grad()
def evaluate_student(student, batches, env, ctx, chunk_rows=1024, teacher=None, teacher_hidden=None):
    """On fixed val tokens: the student's CE and perplexity and, with a teacher, its CE, KL(teacher || student)
    and top-1 agreement. The teacher's hidden states come from `teacher_hidden` (teacher_val_hidden of the same
    batches) when given, else from a teacher forward. Sums over tokens and ranks, so the numbers are the same for
    any world size."""
    was_training = student.training
    student.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)  # student CE, teacher CE, KL, agree, tokens
    for n, (x, y) in enumerate(batches):
        with ctx:
            hs = student(x, return_hidden=True).flatten(0, 1)
            ht = None
            if teacher is not None:
                ht = teacher_hidden[n] if teacher_hidden is not None else teacher(x, return_hidden=True).flatten(0, 1)
        y = y.reshape(-1)
        for start in range(0, len(y), chunk_rows):
            rows = slice(start, start + chunk_rows)
            with ctx:
                ls = (hs[rows] @ student.lm_head.weight.t()).float()
            sums[0] += F.cross_entropy(ls, y[rows], reduction="sum").double()
            sums[4] += len(y[rows])
            if teacher is not None:
                with ctx:
                    lt = (ht[rows] @ teacher.lm_head.weight.t()).float()
                sums[1] += F.cross_entropy(lt, y[rows], reduction="sum").double()
                sums[2] += kl_full(ls, lt).sum().double()
                sums[3] += (ls.argmax(-1) == lt.argmax(-1)).sum().double()
    if env.ddp:
        torch.distributed.all_reduce(sums)
    student.train(was_training)
    n = sums[4].clamp(min=1)
    ce = (sums[0] / n).item()
    result = {"val_ce": ce, "val_ppl": math.exp(ce)}
    if teacher is not None:
        result.update(teacher_ce=(sums[1] / n).item(), kl=(sums[2] / n).item(), top1_agree=(sums[3] / n).item())
    return result


def eval_line(where, result):
    line = f"eval | {where} | student ce {result['val_ce']:.4f} ppl {result['val_ppl']:.2f}"
    if "kl" in result:
        line += (f" | teacher ce {result['teacher_ce']:.4f} | kl {result['kl']:.4f} | "
                 f"top-1 agree {100 * result['top1_agree']:.1f}%")
    return line


# ----------------------------------------------------------------------------------------------------------
# Run-dir state: what a resumed run continues from

def checkpoint_meta(path):
    with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
        return json.load(f)


def phase1_resume_path(run_dir):
    """The furthest phase-1 state: the rolling mid-layer state or the newest layer checkpoint, whichever is
    later by (rotation, position in LAYERS, step)."""
    found = []
    for path in [os.path.join(run_dir, "phase1_state.pt")] + common.complete_checkpoints(run_dir, "layer_")[-1:]:
        if os.path.exists(path) and os.path.exists(os.path.splitext(path)[0] + ".json"):
            p = checkpoint_meta(path)["progress"]
            found.append(((p["rotation"], p["position"], p["step"]), path))
    return max(found)[1] if found else None


def run_dir_checkpoints(run_dir):
    names = ("phase1_state.pt", "final.pt")
    return ([os.path.join(run_dir, n) for n in names if os.path.exists(os.path.join(run_dir, n))]
            + common.complete_checkpoints(run_dir, "layer_") + common.complete_checkpoints(run_dir, "step_"))


# ----------------------------------------------------------------------------------------------------------
# Pieces of the story

def val_windows(env, vocab_size):
    """The fixed val windows of this rank: the same tokens on every eval and for any world size."""
    return val_batches(DATA_DIR, BATCH_SIZE, SEQ_LEN, EVAL_TOKENS, env.rank, env.world_size, env.device, vocab_size)


def save_student(path, student, entries, config, tokenizer_src, env, prefix=None):
    """A checkpoint of the student, its config and the run's; `entries` hold the phase's own state."""
    common.save_run_checkpoint(path, student, {
        "model_config": dataclasses.asdict(student.config), "config": config, "tokenizer": tokenizer_src,
        "teacher": TEACHER, "world_size": env.world_size, "rng": common.rng_state(), **entries},
        env, KEEP_CHECKPOINTS, prefix)


def run_phase1(student, teacher, teacher_val, layers, checkpoint, resume_path, config, env, ctx, metrics,
               tokenizer_src):
    """Layer-wise rotation over a cache of hidden states; returns the loader state where phase 2 reads on."""
    vocab_size = student.config.vocab_size
    cache_device = env.device if CACHE_DEVICE == "device" else "cpu"
    loader = TokenLoader(DATA_DIR, "train", BATCH_SIZE, SEQ_LEN, env.rank, env.world_size, "cpu", vocab_size)
    val_tokens = [x.cpu() for x, _ in val_windows(env, vocab_size)]
    rotation = position = step = total_steps = 0
    optimizer_state = None
    if resume_path is not None:
        check_phase1_settings(checkpoint, config, env, resume_path)
        progress = checkpoint["progress"]
        rotation, position, step = progress["rotation"], progress["position"], progress["step"]
        total_steps = checkpoint["step"]
        loader.load_state_dict(checkpoint["loader"])  # where this rotation's batches start
        optimizer_state = checkpoint.get("optimizer")
        common.set_rng_state(checkpoint["rng"])
        if step == STEPS_PER_LAYER:  # a finished layer: go on with the next one
            position, step, optimizer_state = position + 1, 0, None
        if position == len(layers):  # a finished rotation: skip past its batches
            rotation, position = rotation + 1, 0
            for _ in range(NUM_BATCHES):
                loader.next_batch()
        say(f"resuming phase 1 from {resume_path}: rotation {rotation}, layer position {position}, step {step}")
    if rotation == 0 and position == 0 and step == 0:
        result = evaluate_student(student, val_windows(env, vocab_size), env, ctx, LOSS_CHUNK, teacher, teacher_val)
        say(eval_line("phase 1 start (undistilled student)", result))
        metrics.write(phase=1, step=0, event="eval", layer=None, **result)

    tokens_per_step = BATCH_SIZE * SEQ_LEN * env.world_size
    cos, sin = student.rope(0, SEQ_LEN, env.device)
    for r in range(rotation, ROTATIONS):
        rotation_loader = loader.state_dict()
        train_tokens = [loader.next_batch()[0] for _ in range(NUM_BATCHES)]
        train_cache = start_cache(teacher, train_tokens, LATENT == "student", cache_device)
        val_cache = start_cache(teacher, val_tokens, LATENT == "student", cache_device)
        for pos in range(position if r == rotation else 0, len(layers)):
            i = layers[pos]
            t0 = time.perf_counter()
            for cache in (train_cache, val_cache):
                advance_cache(cache, teacher, student, i, ctx)
            inputs, targets = layer_io(train_cache, teacher, student, i, TARGET_TRAINABLE, ctx)
            val_inputs, val_targets = layer_io(val_cache, teacher, student, i, TARGET_TRAINABLE, ctx)
            block = student.blocks[i]
            params = set_trainable(student, target_modules(block, TARGET_TRAINABLE))
            optimizer = student.configure_optimizer(LR_LAYER, WEIGHT_DECAY, BETAS, env.device_type)
            first = step if (r, pos) == (rotation, position) else 0
            val_before = None
            if first > 0:
                common.load_optimizer_state(optimizer, optimizer_state, resume_path, "start a new --run-dir",
                                            BETAS, WEIGHT_DECAY)
            else:
                val_before = layer_val_loss(block, val_inputs, val_targets, TARGET_TRAINABLE, cos, sin, env, ctx,
                                            COSINE_WEIGHT)
            say(f"rotation {r} layer {i}: cache ready in {time.perf_counter() - t0:.2f}s"
                + (f" | val loss before {val_before:.6f}" if val_before is not None else ""))
            bar = tqdm(range(first, STEPS_PER_LAYER), disable=not env.is_master, desc=f"rot {r} layer {i}",
                       unit="step", dynamic_ncols=True, leave=False)
            t_last = window_start = time.perf_counter()
            for s in bar:
                b = batch_index(SEED, r, i, s, NUM_BATCHES)
                x = inputs[b].to(env.device, non_blocking=True)
                y = targets[b].to(env.device, non_blocking=True)
                lr = common.lr_at(s, STEPS_PER_LAYER, LR_LAYER, WARMUP_LAYER, LR_SCHEDULE, COOLDOWN_FRAC, MIN_LR_FRAC)
                loss = layer_step(block, optimizer, params, x, y, lr, TARGET_TRAINABLE, cos, sin, ctx, env,
                                  COSINE_WEIGHT, GRAD_CLIP)
                total_steps += 1
                loss_value = common.all_reduce_mean(loss.item(), env)
                now = time.perf_counter()
                metrics.write(phase=1, step=total_steps, rotation=r, layer=i, layer_step=s + 1, loss=loss_value,
                              lr=lr, tokens_per_s=tokens_per_step / (now - t_last))
                t_last = now
                if (s + 1) % LOG_EVERY == 0:
                    rate = LOG_EVERY * tokens_per_step / (now - window_start)
                    say(f"rotation {r} layer {i} step {s + 1}/{STEPS_PER_LAYER} | loss {loss_value:.6f} | "
                        f"lr {lr:.2e} | {rate:,.0f} tok/s")
                    window_start = now
                if CHECKPOINT_EVERY_LAYER and (s + 1) % CHECKPOINT_EVERY_LAYER == 0 and s + 1 < STEPS_PER_LAYER:
                    save_student(os.path.join(RUN_DIR, "phase1_state.pt"), student,
                                 {"phase": 1, "step": total_steps, "optimizer": optimizer.state_dict(),
                                  "loader": rotation_loader,
                                  "progress": {"rotation": r, "position": pos, "layer": i, "step": s + 1}},
                                 config, tokenizer_src, env)
                    t_last = window_start = time.perf_counter()
            bar.close()
            val_after = layer_val_loss(block, val_inputs, val_targets, TARGET_TRAINABLE, cos, sin, env, ctx,
                                       COSINE_WEIGHT)
            finish_layer(train_cache, student, i, inputs, targets, TARGET_TRAINABLE, ctx)
            finish_layer(val_cache, student, i, val_inputs, val_targets, TARGET_TRAINABLE, ctx)
            del inputs, targets, val_inputs, val_targets
            student.requires_grad_(False)
            result = evaluate_student(student, val_windows(env, vocab_size), env, ctx, LOSS_CHUNK, teacher,
                                      teacher_val)
            say(f"rotation {r} layer {i}: val loss {val_after:.6f}"
                + (f" (from {val_before:.6f})" if val_before is not None else ""))
            say(eval_line(f"phase 1 rotation {r} layer {i}", result))
            metrics.write(phase=1, step=total_steps, event="layer_done", rotation=r, layer=i,
                          val_loss_before=val_before, val_loss_after=val_after, **result)
            save_student(os.path.join(RUN_DIR, f"layer_{r * len(layers) + pos:03d}.pt"), student,
                         {"phase": 1, "step": total_steps, "loader": rotation_loader, "eval": result,
                          "progress": {"rotation": r, "position": pos, "layer": i, "step": STEPS_PER_LAYER}},
                         config, tokenizer_src, env, prefix="layer_")
        del train_cache, val_cache
    # phase 2 reads on from where phase 1's batches ended
    final_path = os.path.join(RUN_DIR, "final.pt")
    save_student(final_path, student, {"phase": 1, "step": total_steps, "loader": loader.state_dict(),
                                       "progress": {"rotation": ROTATIONS, "position": 0, "layer": None, "step": 0}},
                 config, tokenizer_src, env)
    say(f"phase 1 done: {final_path}")
    return loader.state_dict()


def run_phase2(student, teacher, teacher_val, checkpoint, resume_path, loader_state, config, env, ctx, metrics,
               tokenizer_src):
    """End-to-end logit distillation: ALPHA * KD + (1 - ALPHA) * CE, the teacher frozen (CE only: none)."""
    vocab_size = student.config.vocab_size
    # CE only (alpha = 0): the teacher plays no part in the loss; it was not even loaded unless phase 1 ran in
    # this process, and then it still serves the eval
    kd_teacher = teacher if ALPHA > 0 else None
    student.train()
    trainable = {"all": [student], "blocks": list(student.blocks), "mlp": [b.mlp for b in student.blocks],
                 "attn": [b.attn for b in student.blocks]}[TRAIN_PARAMS]
    params = set_trainable(student, trainable)
    optimizer = student.configure_optimizer(LR, WEIGHT_DECAY, BETAS, env.device_type)
    loader = TokenLoader(DATA_DIR, "train", BATCH_SIZE, SEQ_LEN, env.rank, env.world_size, env.device, vocab_size)
    step = 0
    if resume_path is not None:
        step = common.restore_training_state(checkpoint, optimizer, loader, resume_path, "keep train_params as "
                                             "it was saved, or start a new --run-dir", BETAS, WEIGHT_DECAY)
        changed = common.changed_settings(checkpoint.get("config", {}), config, ignore=("resume", "run_dir", "alpha"))
        if changed or checkpoint.get("world_size", env.world_size) != env.world_size:
            say(f"note: settings changed since {resume_path} (saved, now): {changed}"
                + (f", world size {checkpoint['world_size']} -> {env.world_size}"
                   if checkpoint.get("world_size", env.world_size) != env.world_size else ""))
        if checkpoint["alpha"] != ALPHA:
            say(f"switch: alpha {checkpoint['alpha']} -> {ALPHA} at phase-2 step {step} "
                f"({'KD joins CE' if checkpoint['alpha'] == 0 else 'the KD/CE mix changes'})")
            metrics.write(phase=2, step=step, event="alpha_switch", alpha_before=checkpoint["alpha"], alpha=ALPHA)
        say(f"resuming phase 2 from {resume_path} at step {step}")
    elif loader_state is not None:
        loader.load_state_dict(loader_state)
    model = DDP(student, device_ids=[env.local_rank] if env.device_type == "cuda" else None) if env.ddp else student
    tokens_per_step = BATCH_SIZE * SEQ_LEN * GRAD_ACCUM * env.world_size
    say(f"phase 2: steps {step} -> {MAX_STEPS} | alpha {ALPHA} | T {TEMPERATURE} | "
        f"{'top-' + str(TOP_K) if TOP_K else 'full-vocab'} KL | trainable {TRAIN_PARAMS} "
        f"({sum(p.numel() for p in params) / 1e6:.2f}M) | {tokens_per_step:,} tokens/step")
    bar = tqdm(total=MAX_STEPS, initial=step, disable=not env.is_master, desc="phase 2", unit="step",
               dynamic_ncols=True)
    t_last = window_start = time.perf_counter()
    window_steps = 0
    epoch = loader.epoch  # passes over the train stream so far; it wraps at the end
    while step < MAX_STEPS:
        lr = common.lr_at(step, MAX_STEPS, LR, WARMUP_STEPS, LR_SCHEDULE, COOLDOWN_FRAC, MIN_LR_FRAC)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(3, device=env.device)  # loss, CE, KD
        for x, y, sync in common.micro_batches(model, loader, GRAD_ACCUM, env):
            with sync:
                with ctx:
                    hidden = model(x, return_hidden=True).flatten(0, 1)
                    teacher_hidden = None
                    if kd_teacher is not None:
                        with torch.no_grad():
                            teacher_hidden = kd_teacher(x, return_hidden=True).flatten(0, 1)
                    loss, ce, kd = distill_loss(hidden, student.lm_head.weight, teacher_hidden,
                                                None if kd_teacher is None else kd_teacher.lm_head.weight,
                                                y.reshape(-1), ALPHA, TEMPERATURE, TOP_K, LOSS_CHUNK)
                (loss / GRAD_ACCUM).backward()
            sums += torch.stack([loss.detach(), ce, kd]) / GRAD_ACCUM
        (loss_value, ce_value, kd_value), norm_value = common.clip_and_step(optimizer, params, GRAD_CLIP, sums, env,
                                                                            RUN_DIR, step)
        step += 1
        now = time.perf_counter()
        metrics.write(phase=2, step=step, loss=loss_value, ce=ce_value, kd=kd_value if ALPHA > 0 else None,
                      lr=lr, grad_norm=norm_value, alpha=ALPHA, tokens_per_s=tokens_per_step / (now - t_last),
                      epoch=loader.epoch)
        t_last = now
        bar.update(1)
        window_steps += 1
        if loader.epoch != epoch:
            epoch = loader.epoch
            say(f"phase 2 step {step}: the train stream wrapped around; epoch {epoch} begins")
        if step % LOG_EVERY == 0 or step == MAX_STEPS:
            rate = window_steps * tokens_per_step / (now - window_start)
            say(f"phase 2 step {step} | epoch {loader.epoch} | loss {loss_value:.4f} | ce {ce_value:.4f}"
                + (f" | kd {kd_value:.4f}" if ALPHA > 0 else "") + f" | lr {lr:.2e} | grad norm "
                f"{norm_value:.3f} | {rate:,.0f} tok/s")
            window_start, window_steps = now, 0
        if (CHECKPOINT_EVERY > 0 and step % CHECKPOINT_EVERY == 0) or step == MAX_STEPS:
            result = evaluate_student(student, val_windows(env, vocab_size), env, ctx, LOSS_CHUNK, teacher,
                                      teacher_val)
            say(eval_line(f"phase 2 step {step}", result))
            metrics.write(phase=2, step=step, event="eval", **result)
            save_student(os.path.join(RUN_DIR, f"step_{step:06d}.pt"), student,
                         {"phase": 2, "step": step, "alpha": ALPHA, "optimizer": optimizer.state_dict(),
                          "loader": loader.state_dict(), "eval": result}, config, tokenizer_src, env, prefix="step_")
            t_last = window_start = time.perf_counter()
            window_steps = 0
    bar.close()


# ----------------------------------------------------------------------------------------------------------
# The story

def main():
    config = common.configure(globals())
    check_settings()

    env = common.setup_device(DEVICE)
    dtype = common.resolve_dtype(DTYPE, env.device_type)
    if dtype == torch.float16:
        raise common.ConfigError("dtype = float16 needs loss scaling, which distill.py does not do; use bfloat16")
    ctx = common.autocast(env.device_type, dtype)
    if env.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(SEED)

    # ---- Where this run starts: a phase-2 step, a phase-1 state, phase 1's final.pt, INIT_FROM or the teacher
    existing = run_dir_checkpoints(RUN_DIR)
    if existing and not RESUME:
        raise SystemExit(f"run dir '{RUN_DIR}' already holds checkpoints ({existing[-1]}); pass --resume to "
                         f"continue it, or choose a new --run-dir")
    if RESUME and not existing:
        raise SystemExit(f"--resume: run dir '{RUN_DIR}' holds no complete checkpoint; nothing to resume")
    final_path = os.path.join(RUN_DIR, "final.pt")
    phase1_done = os.path.exists(final_path) and os.path.exists(os.path.splitext(final_path)[0] + ".json")
    phase2_path = common.latest_checkpoint(RUN_DIR, "step_") if RESUME else None
    phase1_path = phase1_resume_path(RUN_DIR) if RESUME and not phase1_done and phase2_path is None else None
    run1 = "1" in PHASES and not phase1_done and phase2_path is None
    run2 = "2" in PHASES
    start_path = phase2_path or phase1_path or (final_path if phase1_done else None) or INIT_FROM
    cache_device = env.device if CACHE_DEVICE == "device" else "cpu"
    width = model_width(TEACHER)
    if run1 and width is not None:  # a cache that will not fit is refused before anything is loaded
        check_cache_fits(width, cache_device, env)

    # ---- The teacher (not loaded at all for a CE-only phase 2 whose student already exists), its tokenizer
    need_teacher = run1 or (run2 and ALPHA > 0) or start_path is None
    teacher = teacher_checkpoint = None
    if need_teacher:
        teacher, teacher_checkpoint = common.load_model(TEACHER)
        teacher.to(env.device).eval().requires_grad_(False)
        if run1 and width is None:  # a hub id or .gguf: its width is known only now
            check_cache_fits(teacher.config.n_embd, cache_device, env)
    tokenizer_src = common.tokenizer_source(TEACHER, teacher_checkpoint)
    tokenizer = common.load_tokenizer(tokenizer_src)

    # ---- The student
    if start_path is not None:
        student, start_checkpoint = common.load_model(start_path)
        if teacher is not None:
            check_student_matches_teacher(student.config, teacher.config, start_path)
        say(f"student: from {start_path} (its architecture; mlp_kind/mlp_hidden/window settings are not used)")
    else:
        start_checkpoint = None
        student, new_mlps = build_student(teacher, student_config(teacher.config, MLP_KIND, MLP_HIDDEN, MLP_LAYERS,
                                                                  WINDOW, FULL_ATTN_LAYERS))
        say(f"student: copy of {TEACHER} with new MLPs in layers {new_mlps} (down projection zero-initialised)")
    student.to(env.device)
    sc, vocab_size = student.config, student.config.vocab_size
    layers = check_layers("layers", LAYERS if LAYERS is not None else range(sc.n_layer), sc.n_layer)
    if layers != sorted(layers):  # the cache only moves forward: one pass over the layers is one teacher forward
        raise common.ConfigError(f"layers = {layers}; expected increasing layer indices (a rotation goes up the "
                                 f"network once, advancing the cache)")
    if EXPORT_HF and llama_incompatible_layers(sc):
        raise common.ConfigError(f"export_hf: layers {llama_incompatible_layers(sc)} are not SwiGLU with full "
                                 f"attention and one width, so the student cannot be a Hugging Face Llama; "
                                 f"drop --export-hf (its checkpoints load in sample.py as they are)")
    common.check_data_matches_tokenizer(DATA_DIR, tokenizer, vocab_size)
    n_params = lambda m: f"{m.num_params() / 1e6:.2f}M"
    say(f"teacher {TEACHER}: {n_params(teacher) if teacher is not None else 'not loaded (alpha = 0)'} | student: "
        f"{n_params(student)} | mlp {sorted(set(zip(sc.mlp_kind, sc.mlp_hidden)))} | window {sc.window} | "
        f"device {env.device} x{env.world_size} | {str(dtype).replace('torch.', '')}")

    # ---- Run dir: effective config, tokenizer copy, metrics (only rank 0 writes)
    metrics = common.MetricsLog(RUN_DIR, enabled=env.is_master)
    if env.is_master:
        common.atomic_write_text(json.dumps({**config, "world_size": env.world_size,
                                             "student_config": dataclasses.asdict(sc)}, indent=2) + "\n",
                                 os.path.join(RUN_DIR, "config.json"))
        common.save_tokenizer_copy(tokenizer, RUN_DIR)
        # on resume the records after the state we continue from are about to be redone; a fresh start drops
        # what a run that crashed before its first checkpoint left behind
        resumed = start_checkpoint is not None and RESUME
        common.trim_metrics(metrics.path, {"phase": start_checkpoint.get("phase", 1),
                                           "step": start_checkpoint.get("step", 0)} if resumed else None)

    # the teacher's side of every eval, computed once
    teacher_val = teacher_val_hidden(teacher, val_windows(env, vocab_size), ctx) if teacher is not None else None

    loader_state = None  # where phase 2's data starts: after phase 1's batches
    if start_checkpoint is not None and start_checkpoint.get("phase") == 1:
        loader_state = start_checkpoint.get("loader")
    if run1:
        loader_state = run_phase1(student, teacher, teacher_val, layers, start_checkpoint, phase1_path, config, env,
                                  ctx, metrics, tokenizer_src)
    if run2:
        run_phase2(student, teacher, teacher_val, start_checkpoint if phase2_path else None, phase2_path,
                   loader_state, config, env, ctx, metrics, tokenizer_src)

    if EXPORT_HF and env.is_master:
        out = student.save_pretrained(os.path.join(RUN_DIR, "hf"), tokenizer_dir=os.path.join(RUN_DIR, "tokenizer"))
        say(f"exported the student as a Hugging Face Llama: {out}")
    say(f"done: {RUN_DIR}")
    if env.ddp and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_settings():
    """Settings that can be refused before anything is loaded."""
    choices = {"PHASES": ("1", "2", "12"), "TARGET_TRAINABLE": ("decoder", "attn", "block"),
               "LATENT": ("teacher", "student"), "CACHE_DEVICE": ("device", "cpu"), "MLP_KIND": MLP_KINDS + ("keep",),
               "TRAIN_PARAMS": ("all", "blocks", "mlp", "attn"), "LR_SCHEDULE": ("trapezoid", "cosine", "constant")}
    for name, allowed in choices.items():
        if globals()[name] not in allowed:
            raise common.ConfigError(f"{name.lower()} = {globals()[name]!r}; expected one of {', '.join(allowed)}")
    common.check_at_least(globals(), 1, ("ROTATIONS", "STEPS_PER_LAYER", "NUM_BATCHES", "MAX_STEPS", "GRAD_ACCUM",
                                         "BATCH_SIZE", "SEQ_LEN", "EVAL_TOKENS", "LOSS_CHUNK", "LOG_EVERY"))
    common.check_at_least(globals(), 0, ("TOP_K", "WARMUP_LAYER", "WARMUP_STEPS", "CHECKPOINT_EVERY",
                                         "CHECKPOINT_EVERY_LAYER", "KEEP_CHECKPOINTS"))
    if not 0 <= ALPHA <= 1:
        raise common.ConfigError(f"alpha = {ALPHA}; expected a value in [0, 1]")
    if TEMPERATURE <= 0:
        raise common.ConfigError(f"temperature = {TEMPERATURE}; expected > 0")
    if not 0 <= COOLDOWN_FRAC <= 1:
        raise common.ConfigError(f"cooldown_frac = {COOLDOWN_FRAC}; expected a value in [0, 1]")
    if MLP_HIDDEN is not None and MLP_HIDDEN < 1:
        raise common.ConfigError(f"mlp_hidden = {MLP_HIDDEN}; expected a positive int or none")
    if WINDOW is not None and WINDOW < 1:
        raise common.ConfigError(f"window = {WINDOW}; expected a positive int or none")
    if INIT_FROM and RESUME:
        raise common.ConfigError(f"resume and init_from ({INIT_FROM!r}) both given: --resume continues run_dir "
                                 f"'{RUN_DIR}' from its own state; drop one of them")


def check_phase1_settings(checkpoint, config, env, path):
    """Phase 1 resumes exactly only with the settings it was saved with (_PHASE1_RESUMABLE_CHANGES aside)."""
    changed = common.changed_settings(checkpoint.get("config", {}), config, ignore=_PHASE1_RESUMABLE_CHANGES)
    if checkpoint.get("world_size", env.world_size) != env.world_size:
        changed["world_size"] = (checkpoint.get("world_size"), env.world_size)
    if changed:
        raise SystemExit(f"cannot resume phase 1 from '{path}': settings changed since it was saved "
                         f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); resuming with "
                         f"them could not end where the saved run would, so use the saved values or start a new "
                         f"--run-dir")


if __name__ == "__main__":
    main()
