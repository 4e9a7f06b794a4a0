"""Distill a Llama-family teacher (default SmolLM2-135M) into a cheaper student: layer by layer, then end to end.

    python distill.py --config configs/distill_smollm2_mlp_half.yaml
    torchrun --standalone --nproc_per_node 8 distill.py --config configs/distill_smollm2_hybrid_window.yaml
    python distill.py --config configs/distill_smollm2_mlp_half.yaml --resume   # continue exactly after a crash
    python distill.py --config C --phases cache --teacher-cache DIR   # the teacher's top-k, once (teacher_cache.py)
    python distill.py --config C --phases select --window 64          # rank layers for full attention by KL

The student is a copy of the teacher (embeddings, attention, norms, head) with per-layer changes: MLPs of another
kind or width, and/or sliding-window attention in all but a few layers. A new MLP starts as those of the teacher's
neurons that a least-squares fit uses best (or the most important ones, NEURON_SELECT) with a down projection fit
by least squares, layer by layer on the student's own trajectory, so each fit also corrects the error of the
pruned layers below it (MLP_INIT=prune, REFIT_DOWN; see student.py), or with its down projection at zero, the
student being "the teacher minus those MLPs" (MLP_INIT=zero).

Phase 1, layer-wise rotation. For each layer i of LAYERS, ROTATIONS times, STEPS_PER_LAYER AdamW steps train only
layer i's target (decoder: mlp_norm + MLP, attn: attn_norm + attention, or block) to map an input latent to the
teacher's hidden state after layer i: MSE, divided by the mean square of the teacher's update under
LAYER_LOSS=nmse (one scale in every layer, massive activations or not), + COSINE_WEIGHT * (1 - cosine) of the
update. The rest of the network stays the teacher's. The teacher's hidden states for NUM_BATCHES batches live in
a cache moved up one layer at a time (layer_cache.py), so a rotation costs about one teacher forward; with
LATENT=student a second cache follows the student's own distilled layers, so layer i learns from the student's
own latent and can correct the layers before it.

Phase 2, logit distillation: loss = ALPHA * KD + (1 - ALPHA) * CE(next token), or CE + LOSS_MULTI * KD, with
KD = T^2 * KL(teacher || student) over the full vocabulary or exactly over the teacher's top-k ids plus the
tail, a chunk of tokens at a time (KD_ADAPTIVE weights it per token). On a conversation dataset (prepare.py
--format chat | instruct) phase 2 is SFT distillation: whole conversations, CE and KD on the assistant's tokens
only; phase 1 reads the same shards as one plain token stream.

The story reads top to bottom: settings, main() (check, load, phase 1, phase 2, save), then the pieces of each
phase. Beside it: student.py builds the student, layer_cache.py holds phase 1's cache and layer loss, losses.py
the chunked CE/KD/eval, training.py the guarded optimizer step and resume that train.py uses too.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import time
import types
from typing import Literal, Optional, Union

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import losses
import plot
import teacher_cache
from config import ConfigError, check_at_least, check_fraction, check_positive, configure
from data import (ConversationLoader, TokenLoader, check_data_matches_tokenizer, conversation_val_batches,
                  is_conversation_data, val_batches)
from hf_interop import (llama_incompatible_layers, llama_incompatible_options, load_model, load_tokenizer,
                        model_width, save_pretrained, tokenizer_source)
from layer_cache import LayerCache, batch_index, check_cache_fits, layer_loss, trainable_part
from model import GPT, MLP_KINDS
from runtime import autocast, resolve_dtype, say, setup_device, shutdown
from student import check_layers, init_new_mlps, layer_target, load_student, phase2_target, set_trainable
from training import (Throughput, all_reduce_gradients, changed_settings, guarded_step, load_optimizer_state, lr_at,
                      micro_batches, restore_training_state, save_run_checkpoint, set_lr, steps_in_budget)

# ----------------------------------------------------------------------------------------------------------
# Defaults: every one can be set in a YAML file (lower-case key) or on the command line (--name value)

TEACHER: str = "models/smollm2_135m"  # teacher: HF Llama dir, hub id, .gguf, or a checkpoint of ours
INIT_FROM: Optional[str] = None  # start the student from this checkpoint of ours (its layers must line up with the teacher's) instead of a copy of the teacher
DATA_DIR: str = "data/fineweb_edu"  # shards + manifest.json from prepare.py, made with the teacher's tokenizer
RUN_DIR: str = "runs/distill"  # holds config.json, metrics.jsonl, tokenizer/, layer_XXX.pt, final.pt, step_XXXXXX.pt
RESUME: bool = False  # continue RUN_DIR exactly from its furthest saved state (phase 1 or 2)
PHASES: Literal["1", "2", "12", "cache", "select"] = "12"  # which phases run: "1" (layer-wise), "2" (logit distillation), "12" (both, in order), "cache" (only write TEACHER_CACHE) or "select" (only rank layers for full attention)
# the student (ignored when the student comes from a checkpoint: then its own architecture is used)
MLP_KIND: Literal[*MLP_KINDS, "keep"] = "relu2"  # MLP of the replaced layers: relu2 | gelu | silu | swiglu, or keep (the teacher's MLP)
MLP_HIDDEN: Union[int, list[int], None] = None  # width of the new MLPs: one int, or one per layer of MLP_LAYERS (in its order); None = half the teacher's, rounded down to a multiple of 8
MLP_LAYERS: Optional[list[int]] = None  # layers whose MLP is replaced; None = every layer
MLP_INIT: Literal["prune", "zero"] = "prune"  # new MLPs start as: prune (the teacher's most important neurons) | zero (down = 0: the teacher minus its MLPs)
NEURON_SELECT: Literal["importance", "lsq"] = "lsq"  # with prune: which teacher neurons to keep: lsq (greedy least-squares elimination, then the exact fit; needs REFIT_DOWN) | importance (mean |act| x down-column norm)
REFIT_DOWN: bool = True  # with prune: refit each new MLP's down projection by least squares, layer by layer on the student's own trajectory, so its hidden state after the layer matches the teacher's
REFIT_RIDGE: float = 1e-3  # ridge of those least-squares fits (and of NEURON_SELECT=lsq), relative to the mean diagonal of A^T A: more fits the fit tokens less and held-out text better (README)
WINDOW: Optional[int] = None  # sliding-window size W for attention; None = full attention everywhere
SINK_TOKENS: int = 0  # with WINDOW: windowed layers also see the first SINK_TOKENS positions (attention sinks); 0 = the window alone
FULL_ATTN_LAYERS: Union[list[int], str] = []  # with WINDOW: layers that keep full attention (a hybrid student), or "auto:N": the top N of SELECTION
# choosing those layers by KL (PHASES=select): each candidate kept full, all others windowed, ranked by val KL
SELECT_LAYERS: Optional[list[int]] = None  # candidates; None = every windowed layer
SELECT_STEPS: int = 0  # phase-2 steps per candidate before its KL is measured; 0 = none (the proxy: KL right away)
SELECTION: Optional[str] = None  # a selection.json (written by PHASES=select) that FULL_ATTN_LAYERS "auto:N" reads
# phase 1: layer-wise rotation
LAYERS: Optional[list[int]] = None  # layers trained in each rotation, increasing (the cache only moves up); None = every layer (with MLP_KIND keep and a WINDOW: every windowed layer)
ROTATIONS: int = 1  # passes over LAYERS; each pass reads NUM_BATCHES new batches
STEPS_PER_LAYER: int = 200  # optimizer steps per layer per rotation
TARGET_TRAINABLE: Literal["decoder", "attn", "attn_out", "block"] = "decoder"  # what trains in layer i: decoder (mlp_norm + MLP) | attn (attn_norm + attention, to the teacher's hidden state after the layer) | attn_out (attn_norm + attention, to the teacher's attention output on the same input) | block
LATENT: Literal["teacher", "student"] = "teacher"  # input latent of layer i: teacher (the teacher's trajectory) | student (the student's own; 2x cache)
LAYER_LOSS: Literal["mse", "nmse"] = "nmse"  # phase-1 loss: mse | nmse (MSE / mean square of the teacher's update: one scale in every layer)
COSINE_WEIGHT: float = 0.0  # phase-1 loss = MSE + COSINE_WEIGHT * (1 - cosine of the layer's update to the residual stream)
NUM_BATCHES: int = 16  # batches per rank held in the phase-1 cache; a layer's steps cycle through them
CACHE_DEVICE: Literal["device", "cpu"] = "device"  # where the phase-1 cache lives: device (the accelerator) | cpu (host memory)
LR_LAYER: float = 1e-3  # phase-1 peak learning rate (a fresh AdamW for each layer)
LR_ATTN_LAYER: Optional[float] = None  # phase-1 peak LR of attention (attn_norm + attention); None = LR_LAYER
WARMUP_LAYER: int = 10  # phase-1 warmup steps at the start of each layer
CHECKPOINT_EVERY_LAYER: int = 50  # phase 1: save a resumable state every N steps inside a layer (0 = only at its end)
EVAL_EVERY_LAYERS: int = 0  # phase 1: end-to-end eval after every N layers (0 = only after the last layer of each rotation)
# phase 2: end-to-end logit distillation
ALPHA: float = 0.5  # loss = ALPHA * KD + (1 - ALPHA) * CE; 0 = CE only, and the teacher is not loaded
LOSS_MULTI: Optional[float] = None  # set: loss = CE + LOSS_MULTI * KD instead (the SFT-distillation form; ALPHA unused)
KD_ADAPTIVE: float = 0.0  # b: each token's KD is weighted by 1 + b * p_teacher(y) * (1 - p_student(y)), y its target
PACK: bool = True  # conversation data: pack whole conversations into each row (attention kept inside each) or pad one per row
TEMPERATURE: float = 1.0  # KD temperature T: KL between softmax(logits / T), times T^2
TOP_K: int = 0  # 0 = KL over the full vocabulary; k > 0 = exact KL over the teacher's top-k ids plus one tail bucket
TRAIN_PARAMS: Literal["all", "blocks", "mlp", "attn"] = "all"  # phase-2 trainable part: all | blocks (not embeddings/head/final norm) | mlp | attn
MAX_STEPS: int = 1000  # phase-2 optimizer steps
LR: float = 3e-4  # phase-2 peak learning rate
LR_ATTN: Optional[float] = None  # phase-2 peak LR of attention (attn_norm + attention); None = LR
TARGET_TOKENS: Optional[int] = None  # phase-2 token budget: sets MAX_STEPS to ceil(TARGET_TOKENS / tokens per step)
BUDGET_MINUTES: Optional[float] = None  # wall-clock budget of the whole run: after its warmup, phase 2 ends at the last step that fits at the recent step time (MAX_STEPS at most)
MIN_LR_FRAC: float = 0.1  # the LR decays to MIN_LR_FRAC * LR (both phases)
WARMUP_STEPS: int = 100  # phase-2 linear warmup
LR_SCHEDULE: Literal["trapezoid", "cosine", "constant"] = "cosine"  # trapezoid, cosine or constant (both phases)
COOLDOWN_FRAC: float = 0.2  # trapezoid: the last COOLDOWN_FRAC of each layer's steps (phase 1) and of phase 2 decay linearly
GRAD_ACCUM: int = 1  # phase-2 micro-batches per optimizer step
# the teacher cache (teacher_cache.py): its top-k per token written once, then read by phase 2 instead of a teacher
TEACHER_CACHE: Optional[str] = None  # cache dir: --phases cache writes it; phase 2 then reads it and runs no teacher
CACHE_K: int = 32  # writing: ids kept per token, the rest is one tail bucket (why 32: README)
CACHE_DTYPE: Literal["float16", "bfloat16", "float32"] = "float16"  # writing: storage of the log-probabilities
CACHE_FROM: Optional[int] = None  # writing: train tokens read before phase 2 starts (stream order: its first offset); None = where phase 1 ends
CACHE_SHARD_TOKENS: int = 1_048_576  # writing: tokens per cache shard (rounded down to whole windows)
CHECKPOINT_EVERY: int = 250  # phase 2: evaluate and save step_XXXXXX.pt every N steps and at the end (0 = only at the end)
KEEP_CHECKPOINTS: int = 3  # keep the newest K layer_XXX.pt and K step_XXXXXX.pt (0 = keep all)
# both phases
BATCH_SIZE: int = 8  # sequences per batch per process
SEQ_LEN: int = 1024  # tokens per sequence
WEIGHT_DECAY: float = 0.0  # AdamW decay on matrices (never on norm gains)
BETAS: tuple[float, float] = (0.9, 0.95)  # AdamW betas
GRAD_CLIP: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
EVAL_TOKENS: int = 65_536  # fixed val tokens: the layer-local val loss and the end-to-end eval at every checkpoint
LOSS_CHUNK: int = 1024  # tokens per chunk of logits in the KD/CE loss and in eval
SEED: int = 1337  # seeds the new MLPs' init, the order in which a layer's steps visit the cached batches, and DATA_ORDER shuffled
DATA_ORDER: Literal["stream", "shuffled"] = "stream"  # train windows: stream (the shards in order: a web corpus is shuffled already) | shuffled (rounds of windows in a random order each epoch: a corpus stored book after book)
DEVICE: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda; under torchrun each rank takes cuda:LOCAL_RANK
DTYPE: str = "auto"  # auto (bf16 autocast where the GPU supports it, fp32 otherwise), float32, bfloat16
LOG_EVERY: int = 10  # print a log line every N steps (metrics.jsonl gets every step)
PLOT: bool = True  # redraw RUN_DIR/loss.png (plot.py) at each end-to-end eval, when matplotlib is installed
EXPORT_HF: bool = False  # at the end, export the student to RUN_DIR/hf as a Hugging Face Llama (SwiGLU, full attention only)

# Settings a phase-1 resume may change: they do not touch the cached batches, the schedule or the weights.
# Everything else must match the saved config, or the resumed run could not end where an uninterrupted one would.
PHASE1_RESUMABLE_CHANGES = ("resume", "run_dir", "log_every", "keep_checkpoints", "export_hf", "phases", "plot",
                             "teacher_cache", "cache_k", "cache_dtype", "cache_from", "cache_shard_tokens",
                             "cache_device", "eval_every_layers",  # where the cache lives, when evals run
                             "alpha", "temperature", "top_k", "train_params", "max_steps", "lr", "warmup_steps",
                             "loss_multi", "kd_adaptive", "pack",
                             "lr_attn", "target_tokens", "budget_minutes",
                             "grad_accum", "checkpoint_every")  # phase 2 only


@dataclasses.dataclass
class Run:
    """What every part of a distillation run needs: its settings, where it runs, the models, where it writes."""
    s: types.SimpleNamespace  # the effective settings, lower-case names (s.steps_per_layer)
    config: dict  # the same settings as a dict: saved with every checkpoint
    env: types.SimpleNamespace  # device, rank, world size (runtime.setup_device)
    ctx: object  # autocast context (a no-op in fp32)
    metrics: checkpoints.MetricsLog
    tokenizer_src: str
    teacher: Optional[torch.nn.Module]  # None for a CE-only phase 2 whose student already exists
    student: torch.nn.Module
    teacher_val: Optional[list] = None  # the teacher's final hidden states of the val windows, computed once
    cache: Optional[teacher_cache.TeacherCache] = None  # phase 2's teacher, read from disk (TEACHER_CACHE)
    cache_val: Optional[list] = None  # the cache's (ids, values) of this rank's val windows
    evals: list = dataclasses.field(default_factory=list)  # this process's end-to-end evals, in order
    started: float = 0.0  # time.perf_counter() when main() began: BUDGET_MINUTES counts from here


# ----------------------------------------------------------------------------------------------------------
# The story

def main(argv=None):
    t0 = time.perf_counter()
    s, config = read_settings(argv)
    env = setup_device(s.device)
    dtype = resolve_dtype(s.dtype, env.device_type)
    if dtype == torch.float16:
        raise ConfigError("dtype = float16 needs loss scaling, which distill.py does not do; use bfloat16")
    ctx = autocast(env.device_type, dtype)
    torch.manual_seed(s.seed)
    if s.target_tokens is not None:  # the phase-2 budget in tokens: the step count follows from the batch shape
        s.max_steps = config["max_steps"] = math.ceil(s.target_tokens / (s.batch_size * s.seq_len * s.grad_accum
                                                                         * env.world_size))
    if s.phases == "cache":
        check_data_kind(s)
        teacher_cache.write_for_run(s, env, ctx)
        shutdown(env)
        return

    # ---- Where this run starts: a phase-2 step, a phase-1 state, phase 1's final.pt, INIT_FROM or the teacher
    if env.is_master:  # one writer per run dir; under torchrun rank 0 writes for all
        checkpoints.claim_run_dir(s.run_dir)
    check_data_kind(s)  # after the lock: a second writer is told so before anything about its data
    selecting = s.phases == "select"  # its progress is RUN_DIR/selection.json, not checkpoints
    start = checkpoints.distill_start(s.run_dir, s.phases, s.resume and not selecting, s.init_from)
    cache_device = phase1_cache_device(s, env)
    width = model_width(s.teacher)
    if start.run1 and width is not None:  # a cache that will not fit is refused before anything is loaded
        check_cache_fits(s, width, cache_device, env)

    # ---- The teacher (not loaded at all for a CE-only phase 2 whose student already exists), its tokenizer
    teacher = teacher_checkpoint = None
    if start.run1 or (start.run2 and uses_kd(s) and not s.teacher_cache) or start.path is None or selecting:
        teacher, teacher_checkpoint = load_model(s.teacher)
        teacher.to(env.device).eval().requires_grad_(False)
        if start.run1 and width is None:  # a hub id or .gguf: its width is known only now
            check_cache_fits(s, teacher.config.n_embd, cache_device, env)
    tokenizer_src = tokenizer_source(s.teacher, teacher_checkpoint) if teacher is not None else \
        tokenizer_source(start.path, checkpoints.checkpoint_meta(start.path))  # TEACHER may not exist here
    tokenizer = load_tokenizer(tokenizer_src)
    cache = teacher_cache.open_for_run(s, teacher) if start.run2 and s.teacher_cache else None

    # ---- The student, and what can be refused now that its architecture is known
    student, start_checkpoint, new_mlps = load_student(s, start.path, teacher)
    if s.seq_len > student.config.max_seq_len:  # a long-context stage: RoPE's tables extend to any length
        say(f"seq_len {s.seq_len} is beyond the student's max_seq_len {student.config.max_seq_len}: its checkpoints "
            f"will record max_seq_len {s.seq_len}")
        student.config.max_seq_len = s.seq_len
    student.to(env.device)
    layers = phase1_layers(s, student.config)
    check_data_matches_tokenizer(s.data_dir, tokenizer, student.config.vocab_size)
    describe_models(s, teacher, student, env, dtype)
    if new_mlps and s.mlp_init == "prune":
        init_new_mlps(s, student, teacher, new_mlps, env, cache_device)

    # ---- Run dir: effective config, tokenizer copy, metrics (only rank 0 writes)
    metrics = checkpoints.MetricsLog(s.run_dir, enabled=False)
    if env.is_master:
        # on resume the records after the state we continue from are about to be redone
        resumed = {"phase": start_checkpoint.get("phase", 1), "step": start_checkpoint.get("step", 0)} \
            if start_checkpoint is not None and s.resume else None
        metrics = checkpoints.start_run_dir(s.run_dir, {**config, "world_size": env.world_size, "student_config":
                                                        dataclasses.asdict(student.config)}, tokenizer, resumed)
    run = Run(s, config, env, ctx, metrics, tokenizer_src, teacher, student, cache=cache, started=t0)
    if teacher is not None:  # the teacher's side of every eval, computed once
        run.teacher_val = losses.teacher_val_hidden(teacher, val_windows(run), ctx)

    if selecting:
        select_full_attention(run)
        shutdown(env)
        return

    # ---- Phase 1, then phase 2 reading on from where phase 1's batches ended
    loader_state = None
    if start_checkpoint is not None and start_checkpoint.get("phase") == 1:
        loader_state = start_checkpoint.get("loader")
    if start.run1:
        loader_state = run_phase1(run, layers, start_checkpoint if start.phase1_path else None, start.phase1_path)
    if start.run2:
        if cache is not None:  # phase 2 reads the teacher from disk: the live one (if phase 1 needed it) goes
            run.teacher = run.teacher_val = None
            run.cache_val = teacher_cache.val_entries(cache, s, env)
        run_phase2(run, start_checkpoint if start.phase2_path else None, start.phase2_path, loader_state)

    if s.export_hf and env.is_master:
        out = save_pretrained(student, os.path.join(s.run_dir, "hf"), os.path.join(s.run_dir, "tokenizer"))
        say(f"exported the student as a Hugging Face Llama: {out}")
    summarize(run, time.perf_counter() - t0)
    say(f"done: {s.run_dir}")
    shutdown(env)


# ----------------------------------------------------------------------------------------------------------
# Settings, and where a run starts

def read_settings(argv=None):
    """The effective settings (defaults < YAML < command line) as a namespace and as a dict, checked."""
    config = configure(dict(globals()), argv)  # a copy: the module's defaults stay as they are
    s = types.SimpleNamespace(**config)
    check_settings(s)
    return s, config


def check_settings(s):
    """Settings that can be refused before anything is loaded."""
    check_at_least(vars(s), 1, ("rotations", "steps_per_layer", "num_batches", "max_steps", "grad_accum",
                                "batch_size", "seq_len", "eval_tokens", "loss_chunk", "log_every"))
    check_at_least(vars(s), 1, ("cache_k", "cache_shard_tokens"))
    if s.cache_from is not None and (s.cache_from < 0 or s.cache_from % s.seq_len):
        raise ConfigError(f"cache_from = {s.cache_from}; expected a stream offset >= 0 that is a multiple of seq_len "
                          f"({s.seq_len}): TokenLoader's rows start there")
    if s.data_order == "shuffled":  # the permutations are drawn from (seed, epoch)
        check_at_least(vars(s), 0, ("seed",))
    check_at_least(vars(s), 0, ("top_k", "warmup_layer", "warmup_steps", "checkpoint_every",
                                "checkpoint_every_layer", "keep_checkpoints", "eval_every_layers"))
    check_at_least(vars(s), 0.0, ("weight_decay", "grad_clip", "cosine_weight"))
    check_positive(vars(s), ("lr", "lr_layer", "temperature", "refit_ridge"))
    check_positive(vars(s), [k for k in ("lr_attn", "lr_attn_layer", "target_tokens", "budget_minutes")
                             if getattr(s, k) is not None])
    check_fraction(vars(s), ("alpha", "cooldown_frac", "min_lr_frac", "betas"))
    check_at_least(vars(s), 0.0, ("kd_adaptive",) if s.loss_multi is None else ("kd_adaptive", "loss_multi"))
    s.conversations = False  # whether DATA_DIR holds conversations: main() reads its manifest (check_data_kind)
    widths = s.mlp_hidden if isinstance(s.mlp_hidden, list) else [s.mlp_hidden]
    if s.mlp_hidden == [] or any(w is not None and w < 1 for w in widths):
        raise ConfigError(f"mlp_hidden = {s.mlp_hidden}; expected a positive int, a list of them (one per layer of "
                          f"mlp_layers) or none")
    if s.window is not None and s.window < 1:
        raise ConfigError(f"window = {s.window}; expected a positive int or none")
    if not 0 <= s.sink_tokens <= 64:  # GPTConfig refuses it too, but only after the teacher is loaded
        raise ConfigError(f"sink_tokens = {s.sink_tokens}; expected an int from 0 to 64")
    if s.mlp_init == "prune" and s.neuron_select == "lsq" and not s.refit_down:
        raise ConfigError("neuron_select = lsq chooses the neurons that the least-squares refit fits best; it needs "
                          "refit_down = true (or neuron_select = importance)")
    if isinstance(s.full_attn_layers, str):
        s.full_attn_layers = full_attn_from_selection(s)
    if s.init_from and s.resume:
        raise ConfigError(f"resume and init_from ({s.init_from!r}) both given: --resume continues run_dir "
                          f"'{s.run_dir}' from its own state; drop one of them")


def check_data_kind(s):
    """A conversation dataset (prepare.py --format chat | instruct) makes phase 2 SFT distillation: assistant
    tokens only, whole conversations per row. What reads plain token windows refuses it."""
    s.conversations = is_conversation_data(s.data_dir)
    if s.conversations and (s.teacher_cache or s.phases in ("cache", "select")):
        raise ConfigError(f"'{s.data_dir}' holds conversations (SFT data); the teacher cache and --phases select "
                          f"read plain token windows: use them with a --format text dataset")
    if s.conversations and s.data_order != "stream":
        raise ConfigError(f"'{s.data_dir}' holds conversations (SFT data), read whole and in order; data_order = "
                          f"{s.data_order} shuffles plain token windows: leave it at stream")


def uses_kd(s):
    """Whether phase 2's loss has a KD term, and so needs the teacher (live or cached)."""
    return (s.loss_multi if s.loss_multi is not None else s.alpha) > 0


# ----------------------------------------------------------------------------------------------------------
# The student

def phase1_cache_device(s, env):
    return env.device if s.cache_device == "device" else "cpu"


def phase1_layers(s, config):
    """LAYERS checked against the student (and EXPORT_HF against its architecture)."""
    default = range(config.n_layer)
    if s.mlp_kind == "keep" and s.window is not None:  # only attention changed: a full layer is the teacher's own
        default = [i for i, w in enumerate(config.window) if w is not None]
    layers = check_layers("layers", s.layers if s.layers is not None else default, config.n_layer)
    if layers != sorted(layers):  # the cache only moves forward: one pass over the layers is one teacher forward
        raise ConfigError(f"layers = {layers}; expected increasing layer indices (a rotation goes up the network "
                          f"once, advancing the cache)")
    options = llama_incompatible_options(config)
    if options:  # phase 1's layer cache writes each block's residual update itself, without gates or skips
        raise ConfigError(f"the student has model options on ({options}); distill.py's students are Llama blocks "
                          f"(train such models with train.py)")
    if s.export_hf and llama_incompatible_layers(config):
        raise ConfigError(f"export_hf: layers {llama_incompatible_layers(config)} are not SwiGLU with full "
                          f"attention, so the student cannot be a Hugging Face Llama; drop "
                          f"--export-hf (its checkpoints load in sample.py as they are)")
    return layers


def describe_models(s, teacher, student, env, dtype):
    c = student.config
    size = lambda m: f"{m.num_params() / 1e6:.2f}M"
    say(f"teacher {s.teacher}: {size(teacher) if teacher is not None else 'not loaded (alpha = 0)'} | student: "
        f"{size(student)} | mlp {sorted(set(zip(c.mlp_kind, c.mlp_hidden)))} | window {c.window}"
        f"{f' + {c.sink_tokens} sink tokens' if c.sink_tokens else ''} | "
        f"device {env.device} x{env.world_size} | {str(dtype).replace('torch.', '')}")


# ----------------------------------------------------------------------------------------------------------
# Evals and saves, the same in both phases

def val_windows(run, plain=False):
    """The fixed val windows of this rank: the same tokens on every eval and for any world size. Conversation
    data gives its val conversations (x, y, segments), except with `plain` (phase 1's token stream)."""
    s, env = run.s, run.env
    if s.conversations and not plain:
        return conversation_val_batches(s.data_dir, s.batch_size, s.seq_len, s.eval_tokens, env.rank,
                                        env.world_size, pack=s.pack, device=env.device,
                                        vocab_size=run.student.config.vocab_size)
    return val_batches(s.data_dir, s.batch_size, s.seq_len, s.eval_tokens, env.rank, env.world_size,
                       device=env.device, vocab_size=run.student.config.vocab_size)


def evaluate_student(run, where, phase, step, **record):
    """End-to-end eval on the val windows (with the teacher: its CE, the KL and top-1 agreement): printed,
    written to metrics.jsonl with `record` and the seconds it took, and drawn into RUN_DIR/loss.png (PLOT)."""
    t0 = time.perf_counter()
    result = losses.evaluate(run.student, val_windows(run), run.env, run.ctx, chunk_rows=run.s.loss_chunk,
                             teacher=run.teacher, teacher_hidden=run.teacher_val, teacher_entries=run.cache_val)
    if run.cache_val is not None:  # not the full-vocabulary KL of the other evals: said in the log and metrics
        result["kl_kind"] = f"top-{run.cache.k} + tail, from the teacher cache"
    result["eval_seconds"] = time.perf_counter() - t0
    say(losses.eval_line(where, result))
    run.evals.append(result)
    run.metrics.write(phase=phase, step=step, event="eval", **record, **result)
    if run.s.plot and run.env.is_master:
        plot.refresh(run.s.run_dir)
    return result


def summarize(run, seconds):
    """The run in one line: sizes, and the first and last end-to-end evals of this process."""
    if not run.evals:
        return
    first, last = run.evals[0], run.evals[-1]
    change = lambda key, fmt: f"{format(first[key], fmt)} -> {format(last[key], fmt)}"
    teacher = f"{run.teacher.num_params() / 1e6:.1f}M params" if run.teacher is not None else \
        f"cache {run.s.teacher_cache}" if run.cache is not None else "not loaded"
    say(f"summary: teacher {teacher}, student {run.student.num_params() / 1e6:.1f}M | student val CE "
        f"{change('val_ce', '.3f')}" + (f" (teacher {last['teacher_ce']:.3f}) | KL {change('kl', '.3f')} | top-1 "
                                        f"agreement {change('top1_agree', '.1%')}" if "kl" in last else "")
        + f" | {seconds / 60:.1f} min")


def save_student(run, name, entries, prefix=None):
    """A checkpoint of the student, its config and the run's; `entries` hold the phase's own state."""
    save_run_checkpoint(os.path.join(run.s.run_dir, name), run.student, {
        "model_config": dataclasses.asdict(run.student.config), "config": run.config, "tokenizer": run.tokenizer_src,
        "teacher": run.s.teacher, "world_size": run.env.world_size, "rng": checkpoints.rng_state(), **entries},
        run.env, run.s.keep_checkpoints, prefix)


# ----------------------------------------------------------------------------------------------------------
# Phase 1: layer-wise rotation over a cache of hidden states

def run_phase1(run, layers, checkpoint, resume_path):
    """ROTATIONS passes over LAYERS, each on NUM_BATCHES new batches; returns the loader state where phase 2
    reads on."""
    s, env, t0 = run.s, run.env, time.perf_counter()
    loader = TokenLoader(s.data_dir, "train", s.batch_size, s.seq_len, rank=env.rank, world_size=env.world_size,
                         vocab_size=run.student.config.vocab_size, order=s.data_order, seed=s.seed)  # host: feeds the cache
    val_tokens = [x.cpu() for x, _ in val_windows(run, plain=True)]
    progress, total_steps, optimizer_state = {"rotation": 0, "position": 0, "step": 0}, 0, None
    window = s.batch_size * s.seq_len * env.world_size
    say(f"phase 1 budget: {s.rotations} rotation(s) x {s.num_batches} batches x {window:,} tokens = "
        f"{s.rotations * s.num_batches * window:,} tokens through the teacher (once per rotation); "
        f"{s.rotations * len(layers) * s.steps_per_layer:,} layer steps x {window:,} tokens through layer "
        f"{'targets' if s.target_trainable != 'block' else 'blocks'} ({s.target_trainable})")
    if resume_path is not None:
        progress, total_steps, optimizer_state = resume_phase1(run, checkpoint, resume_path, loader, len(layers))
    else:
        evaluate_student(run, "phase 1 start (undistilled student)", 1, 0, layer=None)
    for r in range(progress["rotation"], s.rotations):
        rotation_loader = loader.state_dict()  # a checkpoint inside this rotation re-reads its batches from here
        train_tokens = [loader.next_batch()[0] for _ in range(s.num_batches)]
        caches = [LayerCache(run.teacher, run.student, tokens, phase1_cache_device(s, env),
                             run.ctx, latent=s.latent, target=s.target_trainable, loss=s.layer_loss)
                  for tokens in (train_tokens, val_tokens)]
        first = progress["position"] if r == progress["rotation"] else 0
        for pos in range(first, len(layers)):
            step = progress["step"] if (r, pos) == (progress["rotation"], progress["position"]) else 0
            where = {"rotation": r, "position": pos, "layer": layers[pos], "step": step}
            total_steps = train_layer(run, caches, where, rotation_loader, total_steps,
                                      optimizer_state if step > 0 else None)
            evaluated = pos == len(layers) - 1 or (s.eval_every_layers and (pos + 1) % s.eval_every_layers == 0)
            result = None
            if evaluated:  # an end-to-end eval costs many layers' training on a small budget: every N layers only
                result = evaluate_student(run, f"phase 1 rotation {r} layer {layers[pos]}", 1, total_steps,
                                          rotation=r, layer=layers[pos])
            save_student(run, f"layer_{r * len(layers) + pos:03d}.pt",
                         {"phase": 1, "step": total_steps, "loader": rotation_loader, "eval": result,
                          "progress": {**where, "step": s.steps_per_layer}}, prefix="layer_")
        del caches
    save_student(run, "final.pt", {"phase": 1, "step": total_steps, "loader": loader.state_dict(),
                                   "progress": {"rotation": s.rotations, "position": 0, "layer": None, "step": 0}})
    run.metrics.write(phase=1, step=total_steps, event="phase1_done", seconds=time.perf_counter() - t0)
    say(f"phase 1 done in {time.perf_counter() - t0:.0f}s: {os.path.join(s.run_dir, 'final.pt')}")
    return loader.state_dict()


def resume_phase1(run, checkpoint, path, loader, n_layers):
    """Continue phase 1 from a saved state: (progress, total steps, optimizer state of a half-trained layer)."""
    check_phase1_settings(run, checkpoint, path)
    progress = dict(checkpoint["progress"])
    optimizer_state = checkpoint.get("optimizer")
    loader.load_state_dict(checkpoint["loader"])  # where this rotation's batches start
    checkpoints.set_rng_state(checkpoint["rng"])
    if progress["step"] == run.s.steps_per_layer:  # a finished layer: go on with the next one
        progress.update(position=progress["position"] + 1, step=0)
        optimizer_state = None
    if progress["position"] == n_layers:  # a finished rotation: skip past its batches
        progress.update(rotation=progress["rotation"] + 1, position=0)
        for _ in range(run.s.num_batches):
            loader.next_batch()
    say(f"resuming phase 1 from {path}: rotation {progress['rotation']}, layer position {progress['position']}, "
        f"step {progress['step']}")
    return progress, int(checkpoint["step"]), optimizer_state


def check_phase1_settings(run, checkpoint, path):
    """Phase 1 resumes exactly only with the settings it was saved with (PHASE1_RESUMABLE_CHANGES aside)."""
    changed = changed_settings(checkpoint.get("config", {}), run.config, ignore=PHASE1_RESUMABLE_CHANGES)
    if checkpoint.get("world_size", run.env.world_size) != run.env.world_size:
        changed["world_size"] = (checkpoint.get("world_size"), run.env.world_size)
    if changed:
        raise SystemExit(f"cannot resume phase 1 from '{path}': settings changed since it was saved "
                         f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}); resuming with "
                         f"them could not end where the saved run would, so use the saved values or start a new "
                         f"--run-dir")


def train_layer(run, caches, where, rotation_loader, total_steps, optimizer_state):
    """STEPS_PER_LAYER steps (from where["step"]) that train only layer where["layer"]'s target, with the
    layer-local val loss and R^2 before and after. Returns the run's total phase-1 steps."""
    s, env, student = run.s, run.env, run.student
    train_cache, val_cache = caches
    i, r = where["layer"], where["rotation"]
    t0 = time.perf_counter()
    for cache in caches:
        cache.begin_layer(i, env)
    set_trainable(student, layer_target(student.blocks[i], s.target_trainable))
    optimizer = student.configure_optimizer(s.lr_layer, s.weight_decay, s.betas, env.device_type, s.lr_attn_layer)
    before = (None, None)
    if optimizer_state is not None:
        load_optimizer_state(optimizer, optimizer_state, "the phase-1 state", "start a new --run-dir")
    else:
        before = val_cache.val_stats(env, s.cosine_weight)
    say(f"rotation {r} layer {i}: cache ready in {time.perf_counter() - t0:.2f}s"
        + (f" | val loss before {before[0]:.6f}, R^2 {before[1]:.4f}" if before[0] is not None else ""))
    total_steps = layer_steps(run, train_cache, optimizer, where, rotation_loader, total_steps)
    after = val_cache.val_stats(env, s.cosine_weight)
    for cache in caches:
        cache.end_layer()
    student.requires_grad_(False)
    say(f"rotation {r} layer {i}: val loss {after[0]:.6f}, R^2 {after[1]:.4f}"
        + (f" (from {before[0]:.6f}, R^2 {before[1]:.4f})" if before[0] is not None else ""))
    run.metrics.write(phase=1, step=total_steps, event="layer_done", rotation=r, layer=i, val_loss_before=before[0],
                      val_loss_after=after[0], r2_before=before[1], r2_after=after[1])
    return total_steps


def layer_steps(run, cache, optimizer, where, rotation_loader, total_steps):
    """The optimizer steps of one layer on its cached batches, saving phase1_state.pt every
    CHECKPOINT_EVERY_LAYER steps. Returns the run's total phase-1 steps."""
    s, env = run.s, run.env
    r, i = where["rotation"], where["layer"]
    tokens_per_step = s.batch_size * s.seq_len * env.world_size
    bar = tqdm(range(where["step"], s.steps_per_layer), disable=not env.is_master, desc=f"rot {r} layer {i}",
               unit="step", dynamic_ncols=True, leave=False)
    throughput = Throughput(tokens_per_step)
    for step in bar:
        lr = lr_at(step, s.steps_per_layer, s.lr_layer, s.warmup_layer, schedule=s.lr_schedule,
                   cooldown_frac=s.cooldown_frac, min_lr_frac=s.min_lr_frac)
        loss = layer_step(run, cache, optimizer, batch_index(s.seed, r, i, step, s.num_batches), lr, total_steps)
        total_steps += 1
        run.metrics.write(phase=1, step=total_steps, rotation=r, layer=i, layer_step=step + 1, loss=loss, lr=lr,
                          tokens_per_s=throughput.step()[1])
        if (step + 1) % s.log_every == 0:
            say(f"rotation {r} layer {i} step {step + 1}/{s.steps_per_layer} | loss {loss:.6f} | lr {lr:.2e} | "
                f"{throughput.window_rate():,.0f} tok/s")
        if s.checkpoint_every_layer and (step + 1) % s.checkpoint_every_layer == 0 and step + 1 < s.steps_per_layer:
            save_student(run, "phase1_state.pt", {"phase": 1, "step": total_steps, "loader": rotation_loader,
                                                  "optimizer": optimizer.state_dict(),
                                                  "progress": {**where, "step": step + 1}})
            throughput.pause()
    bar.close()
    return total_steps


def layer_step(run, cache, optimizer, b, lr, step):
    """One phase-1 optimizer step of the cache's current layer on cached batch `b`, through the same guarded
    step as phase 2 and train.py (a NaN/inf stops the run before the weights change). Returns the loss."""
    device = run.env.device
    x = cache.inputs[b].to(device, non_blocking=True)
    y = cache.targets[b].to(device, non_blocking=True)
    set_lr(optimizer, lr)
    with run.ctx:
        out = trainable_part(run.student.blocks[cache.layer], x, cache.cos, cache.sin, cache.target)
    loss = layer_loss(out.float(), y, x, run.s.cosine_weight, cache.loss_energy)
    loss.backward()
    all_reduce_gradients([p for group in optimizer.param_groups for p in group["params"]], run.env)
    (loss_value,), _ = guarded_step(optimizer, loss.detach().view(1), run.env, run.s.grad_clip, run.s.run_dir, step)
    return loss_value


# ----------------------------------------------------------------------------------------------------------
# Phase 2: end-to-end logit distillation

def run_phase2(run, checkpoint, resume_path, loader_state):
    """ALPHA * KD + (1 - ALPHA) * CE for MAX_STEPS steps, the teacher frozen (CE only: none)."""
    s, env, student = run.s, run.env, run.student
    student.train()
    params = set_trainable(student, phase2_target(student, s.train_params))
    optimizer = student.configure_optimizer(s.lr, s.weight_decay, s.betas, env.device_type, s.lr_attn)
    if s.conversations:  # SFT: phase 1's plain token stream says nothing about where its rows are
        loader = ConversationLoader(s.data_dir, "train", s.batch_size, s.seq_len, pack=s.pack, rank=env.rank,
                                    world_size=env.world_size, device=env.device,
                                    vocab_size=student.config.vocab_size)
        loader_state = None
    else:
        loader = TokenLoader(s.data_dir, "train", s.batch_size, s.seq_len, rank=env.rank, world_size=env.world_size,
                             device=env.device, vocab_size=student.config.vocab_size, order=s.data_order, seed=s.seed,
                             grad_accum=s.grad_accum)
    step = 0
    if resume_path is not None:
        step = resume_phase2(run, checkpoint, resume_path, optimizer, loader)
    elif loader_state is not None:  # phase 1's position (tokens read), whatever order phase 1 read in
        loader.load_state_dict({**loader_state, "order": s.data_order, "seed": s.seed})
    else:  # a student no phase 1 evaluated: the start of the curve, as train.py evaluates its step 0
        evaluate_student(run, "phase 2 start (undistilled student)", 2, 0)
    # BUDGET_MINUTES: after the warmup (whose LRs do not depend on MAX_STEPS) every step re-fits the horizon to the
    # time left at the recent step time, since this machine's speed drifts by 40% within a run; a resumed run
    # starts from the horizon and the time its checkpoint saved
    budget = None
    if s.budget_minutes is not None:
        budget = types.SimpleNamespace(cap=s.max_steps, from_step=max(s.warmup_steps, 4), recent=[], said=None,
                                       spent_before=checkpoint.get("budget_elapsed", 0.0) if resume_path else 0.0)
        if resume_path is not None and checkpoint.get("budget_steps") is not None:
            s.max_steps = run.config["max_steps"] = checkpoint["budget_steps"]
    first_step = step
    model = DDP(student, device_ids=[env.local_rank] if env.device_type == "cuda" else None) if env.ddp else student
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * env.world_size
    if run.cache is not None and uses_kd(s):  # refused now, not at the step that would read past it
        first, end = loader.span(s.max_steps - step)
        run.cache.check_covers("train", first, end, f"; write one for this phase 2 with --phases cache and the same "
                               f"settings (--cache-from {loader.position})")
    form = f"alpha {s.alpha}" if s.loss_multi is None else f"loss = CE + {s.loss_multi} x KD"
    form += f" | kd_adaptive {s.kd_adaptive}" if s.kd_adaptive else ""
    if s.conversations:
        form += (f" | SFT: {len(loader.conversations):,} conversations in {loader.n_rows:,} rows "
                 f"({'packed' if s.pack else 'padded'}), assistant tokens only")
    say(f"phase 2: steps {step} -> {s.max_steps} | {form} | T {s.temperature} | "
        f"{'top-' + str(s.top_k) if s.top_k else 'full-vocab'} KL | trainable {s.train_params} "
        f"({sum(p.numel() for p in params) / 1e6:.2f}M) | {tokens_per_step:,} tokens/step")
    bar = tqdm(total=s.max_steps, initial=step, disable=not env.is_master, desc="phase 2", unit="step",
               dynamic_ncols=True)
    throughput, epoch = Throughput(tokens_per_step), loader.epoch  # passes over the train stream so far; it wraps
    while step < s.max_steps:
        lr = lr_at(step, s.max_steps, s.lr, s.warmup_steps, schedule=s.lr_schedule, cooldown_frac=s.cooldown_frac,
                   min_lr_frac=s.min_lr_frac)
        set_lr(optimizer, lr)
        sums = torch.zeros(3, device=env.device)  # loss, CE, KD
        for x, y, segments, sync in micro_batches(model, loader, s.grad_accum, env):
            with sync:
                loss, ce, kd = phase2_loss(run, model, x, y, segments, getattr(loader, "last_start", None))
                (loss / s.grad_accum).backward()
            sums += torch.stack([loss.detach(), ce, kd]) / s.grad_accum
        (loss, ce, kd), norm = guarded_step(optimizer, sums, env, s.grad_clip, s.run_dir, step)
        step += 1
        seconds, rate = throughput.step()
        run.metrics.write(phase=2, step=step, loss=loss, ce=ce, kd=kd if uses_kd(s) else None, lr=lr,
                          grad_norm=norm, alpha=s.alpha, tokens_per_s=rate, epoch=loader.epoch)
        bar.update(1)
        if budget is not None and step > first_step + 1:  # the process's first step pays for allocations
            budget.recent = (budget.recent + [seconds])[-20:]
            if step >= budget.from_step and len(budget.recent) >= 3:
                fit_budget(run, budget, step, tokens_per_step)
                bar.total = s.max_steps
        if loader.epoch != epoch:
            epoch = loader.epoch
            say(f"phase 2 step {step}: the train stream wrapped around; epoch {epoch} begins")
        if step % s.log_every == 0 or step == s.max_steps:
            say(f"phase 2 step {step} | epoch {loader.epoch} | loss {loss:.4f} | ce {ce:.4f}"
                + (f" | kd {kd:.4f}" if uses_kd(s) else "") + f" | lr {lr:.2e} | grad norm {norm:.3f} | "
                f"{throughput.window_rate():,.0f} tok/s")
        if (s.checkpoint_every > 0 and step % s.checkpoint_every == 0) or step == s.max_steps:
            result = evaluate_student(run, f"phase 2 step {step}", 2, step)
            save_student(run, f"step_{step:06d}.pt", {"phase": 2, "step": step, "alpha": s.alpha, "eval": result,
                                                      "optimizer": optimizer.state_dict(),
                                                      "loader": loader.state_dict(),
                                                      **budget_entries(run, budget)}, prefix="step_")
            throughput.pause()
    bar.close()


def fit_budget(run, budget, step, tokens_per_step):
    """BUDGET_MINUTES: end phase 2 at the last step that fits in the time left at the mean time of the recent
    steps, keeping time for the final eval and save (as long as the latest eval took) and for the evals of the
    CHECKPOINT_EVERY saves on the way; MAX_STEPS at most. Every rank takes the slowest rank's times, so all of
    them stop at the same step. Said in the log when the horizon is first set and when it moves by 5%."""
    s, env = run.s, run.env
    eval_seconds = run.evals[-1]["eval_seconds"] if run.evals else 0.0
    times = [budget.spent_before + time.perf_counter() - run.started, sum(budget.recent) / len(budget.recent),
             eval_seconds]
    if env.ddp:
        times = torch.tensor(times, dtype=torch.float64, device=env.device)
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
        times = times.tolist()
    elapsed, step_seconds, eval_seconds = times
    per_step = step_seconds + (eval_seconds / s.checkpoint_every if s.checkpoint_every > 0 else 0.0)
    s.max_steps = run.config["max_steps"] = steps_in_budget(step, budget.cap, 60 * s.budget_minutes, elapsed,
                                                             per_step, reserve_seconds=eval_seconds)
    if budget.said is None or abs(s.max_steps - budget.said) > 0.05 * budget.said:
        say(f"time budget {s.budget_minutes:g} min: {elapsed / 60:.1f} min spent by phase-2 step {step}, "
            f"{step_seconds:.2f} s/step lately, {eval_seconds:.0f} s kept for the final eval: phase 2 ends at step "
            f"{s.max_steps} of MAX_STEPS {budget.cap} ({s.max_steps * tokens_per_step:,} tokens)")
        run.metrics.write(phase=2, step=step, event="budget", budget_minutes=s.budget_minutes,
                          elapsed_seconds=elapsed, step_seconds=step_seconds, eval_seconds=eval_seconds,
                          max_steps=s.max_steps, cap=budget.cap)
        budget.said = s.max_steps


def budget_entries(run, budget):
    """What a phase-2 checkpoint keeps of BUDGET_MINUTES: the horizon so far and the run's time spent by now."""
    if budget is None:
        return {}
    return {"budget_steps": run.s.max_steps, "budget_elapsed": budget.spent_before + time.perf_counter() - run.started}


def phase2_loss(run, model, x, y, segments, offset):
    """(loss, ce, kd) of one micro-batch (the window at train stream `offset`, or packed conversations with
    their `segments`): the student's hidden states through `model` (DDP-wrapped or not), the teacher's without
    grad or its cached entries, both heads applied a chunk of tokens at a time."""
    s = run.s
    teacher = entries = None
    if uses_kd(s) and run.cache is not None:
        entries = teacher_cache.narrow_entries(*run.cache.entries("train", offset, x.numel(), run.env.device),
                                               s.top_k or run.cache.k)
    with run.ctx:
        hidden = model(x, segments=segments).flatten(0, 1)
        if uses_kd(s) and run.cache is None:
            with torch.no_grad():
                teacher = (run.teacher(x, segments=segments).flatten(0, 1), run.teacher.lm_head.weight)
        return losses.head_loss(hidden, run.student.lm_head.weight, y.reshape(-1), teacher=teacher,
                                teacher_entries=entries, alpha=s.alpha, loss_multi=s.loss_multi,
                                adaptive=s.kd_adaptive, temperature=s.temperature, top_k=s.top_k,
                                chunk_rows=s.loss_chunk)


# ----------------------------------------------------------------------------------------------------------
# KL-guided choice of the layers that keep full attention (PHASES=select)

def select_full_attention(run):
    """For each candidate layer j, the student with j's attention full and every other candidate windowed, all
    from the same start, scored by its end-to-end val KL: right away (SELECT_STEPS = 0, the proxy) or after
    SELECT_STEPS phase-2 steps (a sub-run in RUN_DIR/select/layer_JJ). RUN_DIR/selection.json is rewritten after
    each candidate, so a killed selection resumes (--resume) without redoing finished ones; its ranking, lowest
    KL first, is what FULL_ATTN_LAYERS "auto:N" reads."""
    s, env, base = run.s, run.env, run.student
    windowed = [i for i, w in enumerate(base.config.window) if w is not None]
    if not windowed:
        raise ConfigError("phases = select ranks windowed layers for full attention: set --window W")
    candidates = check_layers("select_layers", s.select_layers if s.select_layers is not None else windowed,
                              base.config.n_layer)
    path = os.path.join(s.run_dir, "selection.json")
    settings = {k: run.config[k] for k in ("teacher", "init_from", "data_dir", "window", "sink_tokens",
                                           "full_attn_layers", "mlp_kind", "mlp_hidden", "select_steps",
                                           "eval_tokens", "batch_size", "seq_len", "alpha", "lr", "lr_attn", "top_k",
                                           "temperature")}
    record = {"settings": settings, "baseline": None, "candidates": {}, "ranking": []}
    if os.path.exists(path):
        if not s.resume:
            raise SystemExit(f"'{path}' exists: pass --resume to continue that selection, or choose a new --run-dir")
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        changed = {k: (record["settings"].get(k), v) for k, v in settings.items() if record["settings"].get(k) != v}
        if changed:
            raise SystemExit(f"cannot resume the selection in '{path}': settings changed ({changed})")
    if record["baseline"] is None:
        record["baseline"] = evaluate_student(run, "select: every candidate windowed", "select", 0)
    for j in candidates:
        if str(j) in record["candidates"]:
            say(f"select: layer {j} already measured (kl {record['candidates'][str(j)]['kl']:.4f})")
            continue
        result = measure_candidate(run, j)
        record["candidates"][str(j)] = {"kl": result["kl"], "val_ce": result["val_ce"],
                                        "kl_gain": record["baseline"]["kl"] - result["kl"]}
        record["ranking"] = sorted((int(k) for k in record["candidates"]),
                                   key=lambda k: record["candidates"][str(k)]["kl"])
        if env.is_master:
            checkpoints.atomic_write_text(json.dumps(checkpoints.json_safe(record), indent=2) + "\n", path)
    say(f"select: full attention in one layer, the others windowed (W={s.window}), "
        f"{'after ' + str(s.select_steps) + ' phase-2 steps' if s.select_steps else 'no training (proxy)'}; "
        f"baseline kl {record['baseline']['kl']:.4f}\n  rank | layer | kl     | kl gain | val ce\n" + "\n".join(
            f"  {n + 1:4d} | {j:5d} | {record['candidates'][str(j)]['kl']:.4f} | "
            f"{record['candidates'][str(j)]['kl_gain']:7.4f} | {record['candidates'][str(j)]['val_ce']:.4f}"
            for n, j in enumerate(record["ranking"])) + f"\n{path}: use --full-attn-layers auto:N --selection {path}")


def measure_candidate(run, layer):
    """The end-to-end eval of the student with `layer`'s attention full (same weights), after SELECT_STEPS
    phase-2 steps in its own sub-run dir when that is > 0 (a finished one is read back, not redone)."""
    s, base = run.s, run.student
    windows = list(base.config.window)
    windows[layer] = None
    candidate = GPT(dataclasses.replace(base.config, window=windows)).to(run.env.device)
    candidate.load_state_dict(base.state_dict())
    if s.select_steps == 0:
        sub = dataclasses.replace(run, student=candidate, evals=[])
        return evaluate_student(sub, f"select: layer {layer} full", "select", 0, layer=layer)
    sub_dir = os.path.join(s.run_dir, "select", f"layer_{layer:02d}")
    done = os.path.join(sub_dir, f"step_{s.select_steps:06d}.pt")
    if checkpoints.is_complete(done):
        return checkpoints.checkpoint_meta(done)["eval"]
    if run.env.is_master:
        shutil.rmtree(sub_dir, ignore_errors=True)  # a candidate killed midway starts over
        os.makedirs(sub_dir)
    settings = types.SimpleNamespace(**{**vars(s), "run_dir": sub_dir, "max_steps": s.select_steps,
                                        "checkpoint_every": 0, "keep_checkpoints": 1, "plot": False})
    metrics = checkpoints.MetricsLog(sub_dir, enabled=run.env.is_master)
    sub = dataclasses.replace(run, s=settings, student=candidate, metrics=metrics, evals=[])
    say(f"select: layer {layer} full, {s.select_steps} phase-2 steps in {sub_dir}")
    run_phase2(sub, None, None, None)
    return sub.evals[-1]


def full_attn_from_selection(s):
    """FULL_ATTN_LAYERS "auto:N": the N layers ranked best in SELECTION (lowest KL when kept full)."""
    match = re.fullmatch(r"auto:(\d+)", s.full_attn_layers)
    if match is None:
        raise ConfigError(f"full_attn_layers = {s.full_attn_layers!r}; expected a list of layers or auto:N")
    if not s.selection or not os.path.exists(s.selection):
        raise ConfigError(f"full_attn_layers = {s.full_attn_layers}: needs --selection FILE, a selection.json "
                          f"written by --phases select (got {s.selection!r})")
    with open(s.selection, encoding="utf-8") as f:
        ranking = json.load(f)["ranking"]
    n = int(match.group(1))
    if n > len(ranking):
        raise ConfigError(f"full_attn_layers = auto:{n}, but '{s.selection}' ranks only {len(ranking)} layers")
    chosen = sorted(ranking[:n])
    say(f"full_attn_layers auto:{n} -> {chosen} (the top {n} of {s.selection})")
    return chosen


def resume_phase2(run, checkpoint, path, optimizer, loader):
    """Continue phase 2 exactly from a step checkpoint; say what changed since. Returns its step."""
    step = restore_training_state(checkpoint, optimizer, loader, path, "keep train_params as it was saved, or "
                                  "start a new --run-dir")
    changed = changed_settings(checkpoint.get("config", {}), run.config, ignore=("resume", "run_dir", "alpha") + (
        ("max_steps",) if run.s.budget_minutes is not None else ()))  # a budget's horizon: run_phase2 restores it
    saved_world = checkpoint.get("world_size", run.env.world_size)
    if changed or saved_world != run.env.world_size:
        say(f"note: settings changed since {path} (saved, now): {changed}"
            + (f", world size {saved_world} -> {run.env.world_size}" if saved_world != run.env.world_size else ""))
    if checkpoint["alpha"] != run.s.alpha:
        say(f"switch: alpha {checkpoint['alpha']} -> {run.s.alpha} at phase-2 step {step} "
            f"({'KD joins CE' if checkpoint['alpha'] == 0 else 'the KD/CE mix changes'})")
        run.metrics.write(phase=2, step=step, event="alpha_switch", alpha_before=checkpoint["alpha"],
                          alpha=run.s.alpha)
    say(f"resuming phase 2 from {path} at step {step}")
    return step


if __name__ == "__main__":
    main()
