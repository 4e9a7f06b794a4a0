"""Generate text from anything the repo reads: a train.py/distill.py checkpoint (.pt or run dir), a Hugging Face
Llama-family dir, a hub id or a .gguf file.

The prompt is prefilled in one pass into a KV cache (full layers keep every position, sliding-window layers a
ring buffer of W), then each new token costs one single-token forward. Only the last position goes through the
LM head. Text streams to stdout as it is decoded; a tokens/s report goes to stderr. --compile runs the decode
step through torch.compile, which fuses the small ops of every layer and calls the kernels from C++: for
SmolLM2-135M on 2 CPU cores, decode is ~1.4x faster (29 -> 41 tokens/s in the README's benchmark), after ~20 s
(kernels cached on disk by an earlier run) to ~100 s (cold) of compiling before the first new token.

    python sample.py runs/d12 --prompt "Once upon a time" --max-new-tokens 200
    python sample.py HuggingFaceTB/SmolLM2-135M-Instruct --chat --prompt "What is the capital of France?" \
        --temperature 0
"""
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Optional

import torch

from config import configure
from conversations import INSTRUCT_PROMPT
from hf_interop import download_snapshot, is_hub_id, load_model, load_tokenizer, tokenizer_source
from runtime import resolve_dtype, setup_device

MODEL: Optional[str] = None  # checkpoint .pt, run dir, HF model dir, hub id or .gguf (the positional argument)
COMPARE: Optional[str] = None  # a second model (e.g. the teacher of a distilled MODEL): the same prompt, settings and seed through it, printed after MODEL's text
PROMPT: Optional[str] = None  # prompt text; without it (and without --prompt-file) the prompt is read from stdin
PROMPT_FILE: Optional[str] = None  # read the prompt from this UTF-8 file instead
CHAT: bool = False  # wrap the prompt as one user turn in the tokenizer's chat template
TEMPLATE: Optional[str] = None  # 'instruct': a plain "### Instruction / ### Response" template (no tokenizer template needed)
MAX_NEW_TOKENS: int = 256  # stop after this many new tokens (or earlier at an EOS id, or at the model's context)
TEMPERATURE: float = 0.8  # 0 = greedy (argmax); higher = more random
TOP_K: int = 0  # keep only the K most likely tokens (0 = off)
TOP_P: float = 1.0  # nucleus sampling: keep the smallest set of tokens whose probability reaches P (1.0 = off)
REPETITION_PENALTY: float = 1.0  # CTRL-style: divide positive / multiply negative logits of already-seen tokens (1.0 = off)
SEED: int = 1337  # sampling seed; the same seed gives the same text on the same device
NUM_SAMPLES: int = 1  # how many independent samples to draw for the prompt, one after the other
DEVICE: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...
DTYPE: str = "auto"  # auto (bf16 on a GPU that has it, fp32 otherwise), float32, bfloat16, float16
COMPILE: bool = False  # torch.compile the 1-token decode step (~1.4x decode on CPU; needs a C++ compiler): costs ~20-100 s once
THREADS: int = 0  # CPU threads for torch (0 = torch's default, one per core); on a busy machine, the number of idle cores


# ----------------------------------------------------------------------------------------------------------
# Sampling

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; out-of-range values are refused (ValueError) when it is made."""
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature = {self.temperature}; expected >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}; expected >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}; expected a value in (0, 1] (1.0 = off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty = {self.repetition_penalty}; expected > 0 (1.0 = off)")

    @property
    def greedy(self):
        return self.temperature == 0 and self.repetition_penalty == 1.0


def check_prompt(prompt_ids, max_seq_len):
    """Refuse (ValueError) a prompt that is empty or leaves no room in the model's context."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty (0 tokens); generation needs at least one token to condition on")
    if len(prompt_ids) >= max_seq_len:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens but the model's context (max_seq_len) is "
                         f"{max_seq_len}; shorten it to at most {max_seq_len - 1} tokens")


def next_token(logits, seen, sampling, generator):
    """logits (B, V) fp32 of the last position -> next ids (B, 1). `seen` (B, V) bool marks tokens already in
    the sequence, for the repetition penalty. The order (penalty, temperature, top-k, top-p) is transformers'."""
    top_k, top_p, penalty = sampling.top_k, sampling.top_p, sampling.repetition_penalty
    if penalty != 1.0:
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / sampling.temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the most likely one always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def generate(model, prompt_ids, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             eos_ids=(), generator=None, dtype=None, compile=False):
    """An iterator of new token ids (ints) for one prompt (a list of ids), stopping after an EOS id (which is
    yielded) or after max_new_tokens, or where the model's context ends. The prompt is prefilled into the KV
    cache in one forward; then one token per call.

    compile=True decodes with the torch.compiled step (the prefill stays eager); the first call compiles.

    Raises ValueError right here, before any token, for a sampling argument out of range or a prompt that is
    empty or does not fit the model's context.
    """
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    check_prompt(prompt_ids, model.config.max_seq_len)
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    return decode_tokens(model, prompt_ids, max_new_tokens, sampling, eos_ids, generator=generator,
                         dtype=dtype or model.embed.weight.dtype, compile=compile)


def decode_step(model, idx, cache, greedy=False):
    """idx (B, T) through the model into the cache -> fp32 logits (B, V) of the last position only, or with
    greedy, their argmax ids (B, 1): compiled, the argmax is one vectorised kernel, where ATen's takes ~0.1 ms."""
    hidden = model(idx, cache)[:, -1]
    logits = model.lm_head(hidden).float()
    return logits.argmax(dim=-1, keepdim=True) if greedy else logits


# dynamic=True: the cache length grows every step, and a graph specialised to one length would recompile each
# token. Compiling is lazy, on the first call; prefill (T > 1, once per prompt) stays eager. cpp_wrapper: the graph
# calls its ~250 kernels and matmuls from C++ rather than Python (~1 ms a token on CPU).
compiled_decode_step = torch.compile(decode_step, dynamic=True, options={"cpp_wrapper": True})
# Before each call dynamo checks ~5,000 guards on the model, its modules and the cache. With recursive dict tags,
# a module subtree whose __dict__s are unchanged since the last call passes as a whole: ~0.3 ms less per token.
torch._dynamo.config.use_recursive_dict_tags_for_guards = True
# Off: the AOTAutograd cache keys a compiled graph without the shape guards dynamo recorded while tracing it
# (pytorch/pytorch#194001). On a warm cache (a later run) the decode graph of a full ring buffer came back for a
# cache still filling: wrong logits, seen in the compiled sink test of tests/test_model.py on torch 2.13. The
# inductor FX graph cache stays on, so a warm start still skips building the kernels.
torch._functorch.config.enable_autograd_cache = False


@torch.inference_mode()
def decode_tokens(model, prompt_ids, max_new_tokens, sampling, eos_ids, *, generator, dtype, compile=False):
    """generate's loop, for arguments it has checked."""
    if max_new_tokens <= 0:
        return
    device = model.embed.weight.device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens, device, dtype)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[0, idx[0]] = True
    eos = set(eos_ids)
    greedy = sampling.greedy
    step = decode_step  # the prefill
    for _ in range(max_new_tokens):
        out = step(model, idx, cache, greedy)
        step = compiled_decode_step if compile else decode_step
        idx = out if greedy else next_token(out, seen, sampling, generator)
        token = idx.item()
        yield token
        if token in eos:
            return
        if seen is not None:
            seen[0, token] = True


# ----------------------------------------------------------------------------------------------------------
# Prompt, tokenizer and streaming text

def read_prompt(prompt, prompt_file):
    if prompt is not None and prompt_file is not None:
        raise SystemExit("give either --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is not None:
        if not os.path.exists(prompt_file):
            raise SystemExit(f"--prompt-file '{prompt_file}' does not exist")
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise SystemExit(f"--prompt-file '{prompt_file}' is not UTF-8 text (byte {e.start}: {e.reason}); "
                             f"save it as UTF-8")
    else:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        text = sys.stdin.read()
    # editors and `echo` end the text with a newline the user did not mean as part of the prompt
    return text[:-1] if text.endswith("\n") else text


def format_prompt(tokenizer, prompt, chat, template, tokenizer_from):
    """The prompt as token ids: raw, in the tokenizer's chat template (--chat), or in the instruct template."""
    if template is not None:
        if template != "instruct":
            raise SystemExit(f"--template '{template}' is unknown; expected 'instruct' (or --chat for the "
                             f"tokenizer's own chat template)")
        # the Alpaca-style format many instruction-tuned base models saw, and prepare.py --format instruct writes
        text = INSTRUCT_PROMPT.format(instruction=prompt)
        return tokenizer.encode(text, add_special_tokens=True)
    if chat:
        if not tokenizer.chat_template:
            raise SystemExit(f"the tokenizer from '{tokenizer_from}' has no chat template; "
                             f"use --template instruct for a plain '### Instruction / ### Response' prompt")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)  # the template already holds BOS if it wants one
    if prompt == "":  # unconditional sampling starts from the document boundary the model was trained on
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise SystemExit(f"the prompt is empty and the tokenizer from '{tokenizer_from}' has neither a BOS "
                             f"nor an EOS token to start from; give a --prompt")
        return [start]
    return tokenizer.encode(prompt, add_special_tokens=True)


def generation_config_dir(source):
    """The local dir that may hold a generation_config.json for `source`, or None (a .gguf, a checkpoint)."""
    if os.path.isdir(source):
        return source
    if is_hub_id(source):
        return download_snapshot(source)  # already cached by from_pretrained / the tokenizer
    return None


def eos_token_ids(tokenizer, sources):
    """The tokenizer's EOS id plus every eos_token_id (int or list) of a generation_config.json in `sources`."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for source in sources:
        folder = generation_config_dir(source)
        path = os.path.join(folder, "generation_config.json") if folder else None
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


class TextStream:
    """Turns token ids into printable text as they arrive. Decoding the tail from a few tokens back (not one
    token alone) keeps SentencePiece spaces right, and text ending in an unfinished UTF-8 character waits."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.tokens, self.prefix_offset, self.read_offset = [], 0, 0

    def put(self, token):
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.out.write(text[len(prefix):])
            self.out.flush()
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def end(self):
        text = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        if len(text) > len(prefix):
            self.out.write(text[len(prefix):])
        self.out.write("\n")
        self.out.flush()


# ----------------------------------------------------------------------------------------------------------
# The script

def check_settings():
    """The numbers a user gives, refused before the model loads. generate refuses bad sampling values too, but a
    ValueError from inside it is a bug that keeps its traceback."""
    if NUM_SAMPLES < 1 or MAX_NEW_TOKENS < 1:
        raise SystemExit(f"num_samples = {NUM_SAMPLES}, max_new_tokens = {MAX_NEW_TOKENS}; both must be >= 1")
    if THREADS < 0:
        raise SystemExit(f"threads = {THREADS}; expected >= 0 (0 = torch's default)")
    try:
        Sampling(TEMPERATURE, TOP_K, TOP_P, REPETITION_PENALTY)
    except ValueError as e:
        raise SystemExit(f"sample.py: {e}")


def main():
    # stdout carries only the generated text (so it can be piped); the effective config goes to stderr
    wants_help = any(a in ("-h", "--help") for a in sys.argv[1:])
    with contextlib.redirect_stdout(sys.stdout if wants_help else sys.stderr):
        configure(globals(), positional=("MODEL",))
    if MODEL is None:
        raise SystemExit("usage: python sample.py MODEL [--prompt TEXT | --prompt-file F | stdin] [--chat] ...; "
                         "MODEL is a checkpoint .pt, a run dir, an HF model dir, a hub id or a .gguf file")
    check_settings()
    if THREADS:  # decode is dozens of tiny ops per layer; threads that wait on a busy core stall every one of them
        torch.set_num_threads(THREADS)
    prompt = read_prompt(PROMPT, PROMPT_FILE)
    env = setup_device(DEVICE)
    dtype = resolve_dtype(DTYPE, env.device_type)
    compiler = os.environ.get("CXX", "g++")
    if COMPILE and env.device_type == "cpu" and shutil.which(compiler) is None:
        raise SystemExit(f"--compile on CPU needs a C++ compiler for torch.compile's kernels; '{compiler}' (from "
                         f"$CXX, default g++) is not on PATH: install g++ or run without --compile")

    for source in [MODEL] + ([COMPARE] if COMPARE else []):
        if COMPARE:  # the two models' texts one after the other, each under its name
            print(f"========== {source}", flush=True)
        sample_from(source, prompt, env, dtype)


def sample_from(source, prompt, env, dtype):
    """Load `source` and print NUM_SAMPLES continuations of `prompt`, the generator seeded afresh with SEED."""
    t0 = time.perf_counter()
    try:
        model, checkpoint = load_model(source)
        tok_source = tokenizer_source(source, checkpoint)
        tokenizer = load_tokenizer(tok_source)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"sample.py: cannot load '{source}': {e}")
    model.to(device=env.device, dtype=dtype).eval()
    print(f"loaded {source} ({model.num_params() / 1e6:.1f}M params, tokenizer from {tok_source}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    prompt_ids = format_prompt(tokenizer, prompt, CHAT, TEMPLATE, tok_source)
    eos_ids = eos_token_ids(tokenizer, [source] if checkpoint is None else [tok_source])
    generator = torch.Generator(device=env.device).manual_seed(SEED)
    room = model.config.max_seq_len - len(prompt_ids)  # generate stops where the model's context ends
    try:  # the prompt's length, checked for the user (generate refuses it too, as a ValueError)
        check_prompt(prompt_ids, model.config.max_seq_len)
    except ValueError as e:
        raise SystemExit(f"sample.py: {e}")
    if COMPILE and room > 1:  # compile now, so that the tokens/s below measure decoding, not compiling
        t0 = time.perf_counter()
        for _ in generate(model, prompt_ids, 2, dtype=dtype, compile=True):
            pass
        print(f"compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    for i in range(NUM_SAMPLES):
        tokens = generate(model, prompt_ids, MAX_NEW_TOKENS, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P,
                          repetition_penalty=REPETITION_PENALTY, eos_ids=eos_ids, generator=generator, dtype=dtype,
                          compile=COMPILE)
        if i == 0 and MAX_NEW_TOKENS > room:  # said once
            print(f"note: generating at most {room} tokens, where the model's context of "
                  f"{model.config.max_seq_len} ends", file=sys.stderr)
        if NUM_SAMPLES > 1:
            print(f"---------- sample {i + 1}/{NUM_SAMPLES}", flush=True)
        stream_sample(tokens, tokenizer, eos_ids, len(prompt_ids))


def stream_sample(tokens, tokenizer, eos_ids, prompt_len):
    """Print the text of `tokens` (an iterator) as it is decoded, then its speed on stderr."""
    stream = TextStream(tokenizer, sys.stdout)
    n, start = 0, time.perf_counter()
    first = None
    for token in tokens:
        if first is None:
            first = time.perf_counter()
        n += 1
        if token not in eos_ids:  # the end-of-turn marker ends the text, it is not part of it
            stream.put(token)
    stream.end()
    end = time.perf_counter()
    decode_tps = (n - 1) / (end - first) if n > 1 else float("nan")
    print(f"[{n} tokens in {end - start:.2f} s: prefill {prompt_len} tokens in {first - start:.3f} s "
          f"({prompt_len / (first - start):.0f} tokens/s), decode {decode_tps:.1f} tokens/s]", file=sys.stderr)

if __name__ == "__main__":
    main()
