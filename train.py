"""Next-token training on prepared shards: from scratch, from a Hugging Face model (dir, hub id or .gguf), or
from one of our checkpoints; on one device or many through torchrun (DDP: NCCL on GPUs, gloo on CPU).

    python train.py --config configs/train_tiny_cpu.yaml
    torchrun --standalone --nproc_per_node 8 train.py --config configs/train_smollm2_135m_fineweb.yaml
    python train.py --config configs/train_smollm2_135m_fineweb.yaml --resume          # continue exactly
    python train.py --eval-only --init-from runs/smollm2_fineweb --data-dir data/fineweb_edu   # perplexity
    python train.py --config configs/sft_smollm2_chat.yaml    # SFT: a --format chat dataset, assistant-only loss

The story: read the config, set up the device and DDP, load the model and its tokenizer, refuse shards that do
not match, restore the training state if resuming, then loop (batches, forward, backward, clip, step, log,
eval, checkpoint) and finish with an eval and a checkpoint. Data order is a pure function of (rank, world
size, step): the loader's whole state is one stream position, saved in every checkpoint, so resume is exact.
A conversation dataset (prepare.py --format chat | instruct) is SFT: whole conversations per row, packed with
block-diagonal attention (PACK) or padded, and the loss and the evals count the assistant's tokens only.
"""
import dataclasses
import json
import math
import os
import time
from typing import Literal, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoints
import losses
import plot
from config import ConfigError, check_at_least, check_fraction, check_positive, configure
from data import (ConversationLoader, ShardError, TokenLoader, check_data_matches_tokenizer, check_token_ids,
                  conversation_val_batches, is_conversation_data, largest_token_id, read_manifest, val_batches)
from hf_interop import load_model, load_tokenizer, tokenizer_source
from model import GPT, GPTConfig
from runtime import autocast, peak_flops, resolve_dtype, say, setup_device, shutdown
from training import (Throughput, changed_settings, guarded_step, lr_at, micro_batches, restore_training_state,
                      save_run_checkpoint, set_lr, window_at)

# ----------------------------------------------------------------------------------------------------------
# Defaults: every one can be set in a YAML file (lower-case key) or on the command line (--name value)

INIT_FROM: Optional[str] = None  # HF dir, hub id, .gguf, our checkpoint .pt or run dir; None = scratch (MODEL_CONFIG)
MODEL_CONFIG: dict = {}  # from-scratch GPTConfig fields; unset: model.py defaults, vocab_size: len(tokenizer), x64
TOKENIZER: Optional[str] = None  # tokenizer (HF dir, hub id, .gguf); needed from scratch, else None = the model's own
RUN_DIR: str = "runs/train"  # holds config.json, metrics.jsonl, tokenizer/ and step_XXXXXX.pt checkpoints
DATA_DIR: str = "data/fineweb_edu"  # shards and manifest.json written by prepare.py
RESUME: bool = False  # continue RUN_DIR's latest checkpoint exactly: weights, optimizer, step, data position, RNG
IGNORE_PRIOR_SCHEDULE: bool = False  # INIT_FROM a checkpoint: take its weights only; step, optimizer, data start fresh
EVAL_ONLY: bool = False  # evaluate INIT_FROM (or, with --resume, RUN_DIR's latest) on EVAL_TOKENS val tokens and exit
BATCH_SIZE: int = 8  # sequences (rows) per micro-batch per process
PACK: bool = True  # conversation data: pack whole conversations into each row (attention kept inside each) or pad one per row
SEQ_LEN: int = 1024  # tokens per sequence
GRAD_ACCUM: int = 1  # micro-batches per optimizer step; tokens per step = BATCH_SIZE * SEQ_LEN * GRAD_ACCUM * world size
MAX_STEPS: int = 1000  # optimizer steps in the whole run (ignored when TARGET_TOKENS is set)
TARGET_TOKENS: Optional[int] = None  # train on this many tokens: max_steps = ceil(TARGET_TOKENS / tokens per step)
LR: float = 3e-4  # peak learning rate
LR_ATTN: Optional[float] = None  # peak learning rate of attention (attn_norm + attention); None = LR
OPTIMIZER: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest at the LRs below (muon.py)
MATRIX_LR: float = 0.02  # muon: peak LR of the blocks' 2-D matrices (Muon)
EMBED_LR: float = 0.01  # muon: peak LR of the token embedding (and value embeddings; the head too when tied) (AdamW)
HEAD_LR: float = 0.004  # muon: peak LR of an untied LM head (AdamW)
SCALAR_LR: float = 0.01  # muon: peak LR of norm gains and the model's scalar gates (AdamW, no decay)
MUON_MOMENTUM: float = 0.95  # muon: Nesterov momentum of the matrices' updates
WINDOW_SCHEDULE: Optional[tuple[int, int]] = None  # (start, end): the windowed layers' window grows linearly over the run, in steps of 64
MIN_LR_FRAC: float = 0.0  # the LR decays to MIN_LR_FRAC * LR at the end of the cooldown / cosine
WARMUP_STEPS: int = 100  # linear warmup from LR / WARMUP_STEPS to LR
LR_SCHEDULE: Literal["trapezoid", "cosine", "constant"] = "trapezoid"  # trapezoid (warmup, constant, linear cooldown), cosine, or constant
COOLDOWN_FRAC: float = 0.2  # trapezoid: the last COOLDOWN_FRAC of the steps decay linearly
WEIGHT_DECAY: float = 0.1  # AdamW decay on matrices and embeddings (never on norm gains)
BETAS: tuple[float, float] = (0.9, 0.95)  # AdamW betas
GRAD_CLIP: float = 1.0  # clip the global gradient norm to this (0 = no clipping; the norm is still logged)
EVAL_EVERY: int = 250  # val loss every N steps, at step 0 of a fresh run and at the end (0 = only at the end)
EVAL_TOKENS: int = 1_048_576  # val tokens per evaluation; the same tokens for any world size
CHECKPOINT_EVERY: int = 500  # save a checkpoint every N steps and at the end (0 = only at the end)
KEEP_CHECKPOINTS: int = 3  # keep the newest K checkpoints in RUN_DIR (0 = keep all)
SEED: int = 1337  # seeds the from-scratch init (and torch's RNG, saved in checkpoints) and DATA_ORDER shuffled
DATA_ORDER: Literal["stream", "shuffled"] = "stream"  # train windows: stream (the shards in order: a web corpus is shuffled already) | shuffled (rounds of windows in a random order each epoch: a corpus stored book after book)
COMPILE: bool = False  # torch.compile the model (worth it on GPUs; the first steps are slow while it compiles)
DEVICE: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda; under torchrun each rank takes cuda:LOCAL_RANK
DTYPE: str = "auto"  # auto (bf16 autocast where the GPU supports it, fp32 otherwise), float32, bfloat16
LOG_EVERY: int = 10  # print a log line every N steps (metrics.jsonl gets every step)
PLOT: bool = True  # redraw RUN_DIR/loss.png (plot.py) at each eval, when matplotlib is installed
WANDB_PROJECT: Optional[str] = None  # also log to this W&B project when wandb is installed and WANDB_API_KEY set

config = configure(globals())

# ----------------------------------------------------------------------------------------------------------
# Check the settings before anything slow happens

check_at_least(globals(), 1, ("BATCH_SIZE", "SEQ_LEN", "GRAD_ACCUM", "EVAL_TOKENS", "LOG_EVERY"))
if DATA_ORDER == "shuffled":  # the permutations are drawn from (seed, epoch)
    check_at_least(globals(), 0, ("SEED",))
check_at_least(globals(), 0, ("MAX_STEPS", "WARMUP_STEPS", "EVAL_EVERY", "CHECKPOINT_EVERY", "KEEP_CHECKPOINTS"))
check_at_least(globals(), 0.0, ("WEIGHT_DECAY", "GRAD_CLIP"))
check_positive(globals(), ("LR",) if LR_ATTN is None else ("LR", "LR_ATTN"))
check_positive(globals(), ("MATRIX_LR", "EMBED_LR", "HEAD_LR", "SCALAR_LR"))
check_fraction(globals(), ("MUON_MOMENTUM",))
if WINDOW_SCHEDULE is not None and not 1 <= WINDOW_SCHEDULE[0] <= WINDOW_SCHEDULE[1]:
    raise ConfigError(f"window_schedule = {WINDOW_SCHEDULE}; expected (start, end) with 1 <= start <= end")
check_fraction(globals(), ("COOLDOWN_FRAC", "MIN_LR_FRAC", "BETAS"))
if TARGET_TOKENS is not None and TARGET_TOKENS < 1:
    raise ConfigError(f"target_tokens = {TARGET_TOKENS}; expected a positive int or none")
if RESUME and INIT_FROM:
    raise ConfigError(f"resume and init_from ({INIT_FROM!r}) both given: --resume continues run_dir "
                             f"'{RUN_DIR}' from its own latest checkpoint; drop one of them")
if IGNORE_PRIOR_SCHEDULE and RESUME:
    raise ConfigError("ignore_prior_schedule with resume: to keep only the weights of a run, start a new "
                             f"run dir with --init-from {RUN_DIR} --ignore-prior-schedule")
if EVAL_ONLY and not (INIT_FROM or RESUME):
    raise ConfigError("eval_only needs a model: --init-from PATH (checkpoint, run dir, HF dir, hub id, "
                             ".gguf) or --resume to evaluate run_dir's latest checkpoint")

# ----------------------------------------------------------------------------------------------------------
# Device, precision, DDP

env = setup_device(DEVICE)
master = env.is_master
dtype = resolve_dtype(DTYPE, env.device_type)
if dtype == torch.float16:
    raise ConfigError("dtype = float16 needs loss scaling, which train.py does not do; use bfloat16 or float32")
ctx = autocast(env.device_type, dtype)
torch.manual_seed(SEED)


# ----------------------------------------------------------------------------------------------------------
# The model, its tokenizer, and where training starts from

if env.is_master and not EVAL_ONLY:  # one writer per run dir; under torchrun rank 0 writes for all
    checkpoints.claim_run_dir(RUN_DIR)
existing = checkpoints.newest_checkpoint(RUN_DIR, "step_")
if existing and not RESUME and not EVAL_ONLY:
    raise SystemExit(f"run dir '{RUN_DIR}' already holds checkpoints ({existing}); "
                     f"pass --resume to continue it, or choose a new --run-dir")

checkpoint = None  # the checkpoint we start from, if any
if RESUME:
    path = checkpoints.newest_checkpoint(RUN_DIR, "step_")
    if path is None:
        raise SystemExit(f"--resume: run dir '{RUN_DIR}' has no complete checkpoint (step_XXXXXX.pt with its "
                         f".json); nothing to resume")
    model, checkpoint = load_model(path)
    tokenizer_src = TOKENIZER or tokenizer_source(path, checkpoint)
    start_source = path
elif INIT_FROM:
    model, checkpoint = load_model(INIT_FROM)
    tokenizer_src = TOKENIZER or tokenizer_source(INIT_FROM, checkpoint)
    start_source = INIT_FROM
else:
    if not TOKENIZER:
        manifest_source = read_manifest(DATA_DIR)["tokenizer"]["source"]
        raise SystemExit(f"a from-scratch run needs --tokenizer (the shards in '{DATA_DIR}' were made with "
                         f"'{manifest_source}')")
    tokenizer_src = TOKENIZER
    start_source = "scratch"
tokenizer = load_tokenizer(tokenizer_src)
if checkpoint is None and not INIT_FROM:
    model_fields = dict(MODEL_CONFIG)
    # a multiple of 64 keeps the embedding and LM-head matmuls on fast kernel shapes
    model_fields.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    try:
        model = GPT(GPTConfig.from_dict(model_fields)).init_weights()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model_config {MODEL_CONFIG!r}: {e}")
elif MODEL_CONFIG:
    say(f"note: model_config is ignored, the architecture comes from {start_source}")
model_config = model.config
vocab_size = model_config.vocab_size

# Refuse data made with another tokenizer, or holding ids the embedding does not have, before step 0.
check_data_matches_tokenizer(DATA_DIR, tokenizer, vocab_size)
manifest = read_manifest(DATA_DIR)
conversations = is_conversation_data(DATA_DIR)  # SFT: assistant-only loss on whole conversations
if conversations and DATA_ORDER != "stream":
    raise ConfigError(f"'{DATA_DIR}' holds conversations (SFT data), read whole and in order; data_order = "
                      f"{DATA_ORDER} shuffles plain token windows: leave it at stream")
val_available = sum(s["ntok"] for s in manifest["shards"] if s["split"] == "val")
if not conversations and min(EVAL_TOKENS, val_available) < BATCH_SIZE * SEQ_LEN + 1:  # refused now, not at an eval
    raise ConfigError(f"eval_tokens = {EVAL_TOKENS} and '{DATA_DIR}' has {val_available} val tokens, but one "
                             f"eval window is batch_size x seq_len + 1 = {BATCH_SIZE * SEQ_LEN + 1} tokens")
# Every shard is read once now, each rank its share: a bad header or an id the model lacks stops the run before
# step 0, not at an eval after hours of training (and the train loader need not scan its shards again)
for split in ("val",) if EVAL_ONLY else ("train", "val"):
    try:
        largest_id = torch.tensor(largest_token_id(DATA_DIR, split, env.rank, env.world_size), device=env.device)
        if env.ddp:
            torch.distributed.all_reduce(largest_id, op=torch.distributed.ReduceOp.MAX)
        check_token_ids(f"'{DATA_DIR}' ({split} split)", int(largest_id), vocab_size)
    except ShardError as e:
        raise SystemExit(str(e))

if SEQ_LEN > model.config.max_seq_len:  # a long-context stage: RoPE's tables extend to any length (no scaling)
    say(f"seq_len {SEQ_LEN} is beyond the model's max_seq_len {model.config.max_seq_len}: positions past it are "
        f"new to its full-attention layers; its checkpoints will record max_seq_len {SEQ_LEN}")
    model.config.max_seq_len = SEQ_LEN
model.to(env.device)
raw_model = model  # the plain module: what is saved, clipped and evaluated
chunk_rows = losses.default_chunk_rows(vocab_size)  # the LM head runs on this many tokens at a time


def evaluate(eval_model):
    """Mean val loss over the first EVAL_TOKENS val tokens (conversations: over their assistant tokens) and the
    number of tokens it counted; the same windows for any world size."""
    batch_source = conversation_val_batches if conversations else val_batches
    options = {"pack": PACK} if conversations else {}
    batches = batch_source(DATA_DIR, BATCH_SIZE, SEQ_LEN, EVAL_TOKENS, env.rank, env.world_size, device=env.device,
                           vocab_size=vocab_size, **options)
    result = losses.evaluate(eval_model, batches, env, ctx, chunk_rows=chunk_rows)
    return result["val_ce"], result["val_tokens"]


if EVAL_ONLY:
    t0 = time.perf_counter()
    val_loss, val_tokens = evaluate(raw_model)
    if master:
        print("eval_only: " + json.dumps({"model": start_source, "val_loss": val_loss, "val_ppl": math.exp(val_loss),
                                          "val_tokens": val_tokens, "seconds": round(time.perf_counter() - t0, 2)}))
    shutdown(env)
    raise SystemExit(0)

# ----------------------------------------------------------------------------------------------------------
# Optimizer, schedule length, and the training state we continue from

tokens_per_step = BATCH_SIZE * SEQ_LEN * GRAD_ACCUM * env.world_size
max_steps = math.ceil(TARGET_TOKENS / tokens_per_step) if TARGET_TOKENS is not None else MAX_STEPS
config["max_steps"] = max_steps  # what the schedule actually uses, saved with the run
muon_lrs = {"matrix": MATRIX_LR, "embed": EMBED_LR, "head": HEAD_LR, "scalar": SCALAR_LR,
            "momentum": MUON_MOMENTUM} if OPTIMIZER == "muon" else None
optimizer = raw_model.configure_optimizer(LR, WEIGHT_DECAY, BETAS, env.device_type, LR_ATTN, muon=muon_lrs)
windowed = [i for i, w in enumerate(model_config.window) if w is not None]
if WINDOW_SCHEDULE is not None and not windowed:
    raise ConfigError(f"window_schedule = {WINDOW_SCHEDULE}, but no layer of the model has a sliding window to grow")
# every train shard was scanned for ids >= vocab_size before step 0, so the loader need not scan them again
if conversations:
    loader = ConversationLoader(DATA_DIR, "train", BATCH_SIZE, SEQ_LEN, pack=PACK, rank=env.rank,
                                world_size=env.world_size, device=env.device)
else:
    loader = TokenLoader(DATA_DIR, "train", BATCH_SIZE, SEQ_LEN, rank=env.rank, world_size=env.world_size,
                         device=env.device, order=DATA_ORDER, seed=SEED, grad_accum=GRAD_ACCUM)

step = 0  # optimizer steps done; the LR schedule and the checkpoint names count these
continue_schedule = checkpoint is not None and not IGNORE_PRIOR_SCHEDULE
if continue_schedule:
    step = restore_training_state(checkpoint, optimizer, loader, start_source, "pass --ignore-prior-schedule "
                                  "to start a new schedule from its weights")
    prior = checkpoint.get("config", {})
    changed = changed_settings(prior, config, ignore=("resume", "init_from", "run_dir", "eval_only"))
    saved_world = checkpoint.get("world_size", env.world_size)
    if changed or saved_world != env.world_size:
        say(f"note: settings changed since {start_source} (saved, now): {changed}"
            + (f", world size {saved_world} -> {env.world_size}" if saved_world != env.world_size else ""))

if COMPILE:
    model = torch.compile(model)
eval_model = model  # compiled (if asked) but not DDP-wrapped: eval must not take part in gradient syncs
if env.ddp:
    model = DDP(model, device_ids=[env.local_rank] if env.device_type == "cuda" else None)

# ----------------------------------------------------------------------------------------------------------
# Run dir: effective config, tokenizer copy, metrics (only rank 0 writes)

metrics = checkpoints.MetricsLog(RUN_DIR, enabled=False)
if master:
    # on resume the records after the checkpoint's step are about to be redone; a fresh run drops what a run
    # that never reached a checkpoint left behind
    metrics = checkpoints.start_run_dir(RUN_DIR, {**config, "world_size": env.world_size,
                                                  "tokens_per_step": tokens_per_step,
                                                  "model_config": dataclasses.asdict(model_config)},
                                        tokenizer, {"step": step} if RESUME else None)

wandb_run = None
if master and WANDB_PROJECT:
    try:
        import wandb
    except ImportError:
        wandb = None
        say(f"note: wandb_project = {WANDB_PROJECT!r} but wandb is not installed; logging to metrics.jsonl only")
    if wandb is not None and not os.environ.get("WANDB_API_KEY"):
        say(f"note: wandb_project = {WANDB_PROJECT!r} but WANDB_API_KEY is not set; logging to metrics.jsonl only")
    elif wandb is not None:
        wandb_run = wandb.init(project=WANDB_PROJECT, name=os.path.basename(os.path.abspath(RUN_DIR)), config=config)


def log(**record):
    metrics.write(**record)
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])


def log_eval(step, val_loss):
    say(f"step {step} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
    log(step=step, val_loss=val_loss, val_ppl=math.exp(val_loss))
    if PLOT and master:
        plot.refresh(RUN_DIR)


def save(step):
    """A resumable checkpoint (every rank first checks that the weights are finite)."""
    save_run_checkpoint(
        os.path.join(RUN_DIR, f"step_{step:06d}.pt"), raw_model,
        {"model_config": dataclasses.asdict(model_config), "config": config, "step": step, "tokenizer": tokenizer_src,
         "optimizer": optimizer.state_dict(), "loader": loader.state_dict(), "rng": checkpoints.rng_state(),
         "world_size": env.world_size, "tokens": step * tokens_per_step},
        env, KEEP_CHECKPOINTS, "step_")


# ----------------------------------------------------------------------------------------------------------
# Training loop

flops_per_token = raw_model.flops_per_token(SEQ_LEN)
# the known peaks are bf16 dense FLOP/s; for other precisions, or an unknown device, no MFU beats a wrong one
peak = peak_flops(env.device) if dtype == torch.bfloat16 else None
say(f"model: {start_source} | {raw_model.num_params() / 1e6:.2f}M params | vocab {vocab_size} | "
    f"device {env.device} x{env.world_size} | {str(dtype).replace('torch.', '')}")
say(f"tokens per step: {tokens_per_step:,} = batch {BATCH_SIZE} x seq {SEQ_LEN} x accum {GRAD_ACCUM} x world "
    f"{env.world_size} | steps {step} -> {max_steps} | {max_steps * tokens_per_step:,} tokens in total")
if conversations:
    say(f"SFT: {len(loader.conversations):,} train conversations in {loader.n_rows:,} rows "
        f"({'packed' if PACK else 'padded, one per row'}); loss on the assistant's tokens only")

val_loss = None
if step == 0 and EVAL_EVERY > 0 and max_steps > 0:
    val_loss, _ = evaluate(eval_model)
    log_eval(0, val_loss)

progress = tqdm(total=max_steps, initial=step, disable=not master, desc="train", unit="step", dynamic_ncols=True)
throughput, last_saved = Throughput(tokens_per_step), None
epoch = loader.epoch  # passes over the train stream so far; it wraps at the end
while step < max_steps:
    lr = lr_at(step, max_steps, LR, WARMUP_STEPS, schedule=LR_SCHEDULE, cooldown_frac=COOLDOWN_FRAC,
               min_lr_frac=MIN_LR_FRAC)
    set_lr(optimizer, lr)
    if WINDOW_SCHEDULE is not None:  # a pure function of the step, like the LR: resume and restarts follow it
        window = window_at(step, max_steps, *WINDOW_SCHEDULE)
        raw_model.set_windows([window if i in windowed else None for i in range(model_config.n_layer)])
    # Micro-step k of rank r reads loader window (step * GRAD_ACCUM + k) * world + r (shuffled: window k * world + r
    # of the step's round), so one process with GRAD_ACCUM = 2 sees exactly the tokens two processes with
    # GRAD_ACCUM = 1 see at the same step.
    loss_sum = torch.zeros((), device=env.device)
    targets = torch.zeros((), device=env.device)  # tokens the loss counted (SFT: the assistant's)
    for x, y, segments, sync in micro_batches(model, loader, GRAD_ACCUM, env):
        with sync:
            with ctx:
                hidden = model(x, segments=segments).flatten(0, 1)
                loss, _, _ = losses.head_loss(hidden, raw_model.lm_head.weight, y.reshape(-1), chunk_rows=chunk_rows)
            (loss / GRAD_ACCUM).backward()
        loss_sum += loss.detach()
        targets += (y != -100).sum()
    (loss_value, rank_targets), norm_value = guarded_step(optimizer, torch.stack([loss_sum / GRAD_ACCUM, targets]),
                                                          env, GRAD_CLIP, RUN_DIR, step)
    step += 1

    dt, tokens_per_s = throughput.step()
    target_tokens = round(rank_targets * env.world_size)  # guarded_step averaged the counts over ranks
    mfu = flops_per_token * tokens_per_s / (peak * env.world_size) if peak else None
    log(step=step, loss=loss_value, lr=lr, grad_norm=norm_value, tokens=step * tokens_per_step, dt=dt,
        tokens_per_s=tokens_per_s, mfu=mfu, epoch=loader.epoch, target_tokens=target_tokens,
        target_tokens_per_s=target_tokens / dt if dt else None)
    if loader.epoch != epoch:
        epoch = loader.epoch
        say(f"step {step}: the train stream wrapped around; epoch {epoch} begins")
    progress.update(1)
    if step % LOG_EVERY == 0 or step == max_steps:
        rate = throughput.window_rate()
        mfu_text = f" | mfu {100 * rate * flops_per_token / (peak * env.world_size):.1f}%" if peak else ""
        sft_text = f" | {target_tokens / dt:,.0f} assistant tok/s this step" if conversations and dt else ""
        say(f"step {step} | epoch {loader.epoch} | loss {loss_value:.4f} | lr {lr:.3e} | grad norm "
            f"{norm_value:.3f} | {rate:,.0f} tok/s{mfu_text}{sft_text}")
    paused = False
    if (CHECKPOINT_EVERY > 0 and step % CHECKPOINT_EVERY == 0) or step == max_steps:
        save(step)  # before the eval: an eval that fails loses no training
        last_saved, paused = step, True
    if (EVAL_EVERY > 0 and step % EVAL_EVERY == 0) or step == max_steps:
        val_loss, _ = evaluate(eval_model)
        log_eval(step, val_loss)
        paused = True
    if paused:  # evals and saves are not training time: leave them out of the tokens/s that follow
        throughput.pause()
progress.close()

if last_saved is None:
    say(f"nothing to do: {start_source} is already at step {step}, max_steps is {max_steps}")
else:
    say(f"done: step {step}, val loss {val_loss:.4f}, checkpoint {checkpoints.newest_checkpoint(RUN_DIR, 'step_')}")
if wandb_run is not None:
    wandb_run.finish()
shutdown(env)
