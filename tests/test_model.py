"""model.py against references nobody here wrote: transformers' Llama, an explicit-mask attention, F.cross_entropy."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import decode_one_by_one, make_tiny_llama, needs_cxx
from hf_interop import from_pretrained, save_pretrained
from losses import head_loss
from model import GPT, GPTConfig, sliding_window_attention

SENTENCE = "The capital of France is Paris, and the river that runs through it is called the Seine."


def hf_logits(path, idx):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("tied,num_kv_heads", [(True, 2), (False, 2), (False, 4), (True, 1)])
def test_logits_match_transformers_llama(tmp_path, tied, num_kv_heads):
    path = make_tiny_llama(tmp_path / "hf", tied=tied, num_kv_heads=num_kv_heads)
    idx = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    model = from_pretrained(path).eval()
    assert model.config.tie_embeddings == tied and model.config.n_kv_head == num_kv_heads
    with torch.no_grad():
        ours = model.logits(idx)
    assert (ours - hf_logits(path, idx)).abs().max().item() <= 1e-4


def test_export_reloads_in_transformers_with_same_logits(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    model = from_pretrained(tiny_llama_dir).eval()
    out = save_pretrained(model, str(tmp_path / "export"), tokenizer_dir=tiny_llama_dir)
    idx = torch.randint(0, 512, (1, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.logits(idx)
    assert (ours - hf_logits(out, idx)).abs().max().item() <= 1e-4
    assert AutoTokenizer.from_pretrained(out)("the river").input_ids  # tokenizer travelled with the weights
    again = from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again.logits(idx), ours)


def test_export_untied_model_round_trips(tmp_path):
    path = make_tiny_llama(tmp_path / "hf", tied=False)
    model = from_pretrained(path).eval()
    out = save_pretrained(model, str(tmp_path / "export"))
    idx = torch.randint(0, 512, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.logits(idx) - hf_logits(out, idx)).abs().max().item() <= 1e-4


def test_sharded_safetensors_load(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "hf", tied=False)
    hf = AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    idx = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = from_pretrained(str(tmp_path / "sharded")).eval().logits(idx)
    assert (ours - hf_logits(path, idx)).abs().max().item() <= 1e-4


def test_real_smollm2_gguf_logits_match_transformers(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    idx = torch.tensor([tokenizer(SENTENCE).input_ids])
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    model = from_pretrained(smollm2_gguf).eval()
    assert model.config.n_layer == 30 and model.config.n_kv_head == 3 and model.config.vocab_size == 49152
    with torch.no_grad():
        expected, ours = hf(idx).logits, model.logits(idx)
    assert (ours - expected).abs().max().item() <= 1e-3
    # and the model is a real language model: it predicts most of the sentence's next tokens in its top 10
    top10 = ours[0, :-1].topk(10, dim=-1).indices
    hits = (top10 == idx[0, 1:, None]).any(-1).float().mean().item()
    assert hits > 0.5


def explicit_mask_attention(q, k, v, window, sink=0):
    T = q.shape[2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    mask = (j <= i) & ((j > i - window) | (j < sink))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("T,window", [(1, 1), (7, 1), (50, 1), (64, 3), (100, 16), (200, 64), (257, 64),
                                      (300, 70), (128, 128), (40, 100), (333, 333)])
def test_sliding_window_equals_explicit_mask(T, window):
    g = torch.Generator().manual_seed(T * 1000 + window)
    q = torch.randn(2, 4, T, 16, generator=g)
    k = torch.randn(2, 2, T, 16, generator=g)
    v = torch.randn(2, 2, T, 16, generator=g)
    ours = sliding_window_attention(q, k, v, window, {})
    torch.testing.assert_close(ours, explicit_mask_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,window,sink", [(1, 1, 1), (5, 2, 4), (50, 8, 1), (64, 16, 4), (65, 64, 4), (100, 16, 4),
                                           (200, 64, 1), (257, 64, 4), (300, 70, 64), (333, 10, 3)])
def test_sliding_window_with_sink_tokens_equals_explicit_mask(T, window, sink):
    """Forward and gradients: every query sees its window and the first `sink` keys, each key once (a sink inside
    the window or inside a query block's pair must not be counted twice)."""
    g = torch.Generator().manual_seed(T * 1000 + window * 10 + sink)
    inputs = [torch.randn(2, h, T, 16, generator=g, requires_grad=True) for h in (4, 2, 2)]
    ours = sliding_window_attention(*inputs, window, {}, sink=sink)
    expected = explicit_mask_attention(*inputs, window, sink)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(ours.shape, generator=g)
    ours_grads = torch.autograd.grad(ours, inputs, grad)
    for a, b in zip(ours_grads, torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sink", [0, 3])
def test_sliding_window_model_equals_explicit_mask_model(sink):
    """A whole sliding-window model vs the same weights run with explicit masks, including W >= T."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, mlp_hidden=96,
                       window=[8, None, 500], max_seq_len=512, sink_tokens=sink)
    model = GPT(config).init_weights().eval()
    idx = torch.randint(0, 256, (2, 150))
    def reference(block, x, cos, sin):
        a = block.attn
        B, T, _ = x.shape
        q, k, v = a.qkv(x).split([a.n_head * a.head_dim, a.n_kv_head * a.head_dim, a.n_kv_head * a.head_dim], -1)
        from model import apply_rope
        q = apply_rope(q.view(B, T, a.n_head, a.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
        y = explicit_mask_attention(q, k, v, a.window or T, sink)
        return a.proj(y.transpose(1, 2).reshape(B, T, -1))

    with torch.no_grad():
        ours = model.logits(idx)
        x = model.embed(idx)
        cos, sin = model.rope(0, idx.shape[1], idx.device)
        for block in model.blocks:
            x = x + reference(block, block.attn_norm(x), cos, sin)
            x = x + block.mlp(block.mlp_norm(x))
        expected = model.lm_head(model.norm(x))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_sliding_window_memory_is_linear_in_sequence_length(monkeypatch):
    """The largest intermediate of a W=64 layer at T=4096 is far below one T x T score matrix."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4096, 16, generator=g)
    k = torch.randn(1, 1, 4096, 16, generator=g)
    v = torch.randn(1, 1, 4096, 16, generator=g)
    real = F.scaled_dot_product_attention
    sizes = []  # B*H*L*S of every score matrix attention was asked for

    def watch(*args, **kwargs):
        B, H, L, S = args[0].shape[0], args[0].shape[1], args[0].shape[2], args[1].shape[2]
        sizes.append(B * H * L * S)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", watch)
    ours = sliding_window_attention(q, k, v, 64, {})
    monkeypatch.undo()
    assert sizes, "sliding_window_attention never called F.scaled_dot_product_attention: nothing was measured"
    assert max(sizes) <= 2 * 4096 * 2 * 64 * 2  # scores touched ~ B*H*T*2S, not T*T = 16.7M per head
    torch.testing.assert_close(ours, explicit_mask_attention(q, k, v, 64), atol=1e-5, rtol=1e-5)


def test_mixed_layers_run_forward_and_backward():
    config = GPTConfig(vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, head_dim=16,
                       mlp_kind=["swiglu", "relu2", "gelu", "silu"], mlp_hidden=[96, 128, 64, 32],
                       window=[None, 4, 16, None], tie_embeddings=False)
    model = GPT(config).init_weights()
    idx = torch.randint(0, 300, (2, 70))
    loss, _, _ = head_loss(model(idx).flatten(0, 1), model.lm_head.weight, idx.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.logits(idx).shape == (2, 70, 300)


def test_chunked_loss_equals_plain_cross_entropy_and_gradients():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, head_dim=16, mlp_hidden=96,
                       tie_embeddings=True)
    model = GPT(config).init_weights()
    idx = torch.randint(0, 1000, (3, 25))
    targets = torch.randint(0, 1000, (3, 25))
    targets[0, :5] = -100
    targets[2, -3:] = -100
    chunked = lambda: head_loss(model(idx).flatten(0, 1), model.lm_head.weight, targets.flatten(), chunk_rows=7)[0]

    loss = chunked()  # many uneven chunks
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = F.cross_entropy(model.logits(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(chunked(), reference.detach(), atol=1e-6, rtol=1e-6)


def test_init_scales_residual_projections_by_depth():
    config = GPTConfig(vocab_size=500, n_layer=8, n_head=4, n_kv_head=4, n_embd=256, head_dim=64, mlp_hidden=512)
    model = GPT(config).init_weights()
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].mlp.down.weight.std().item() - 0.02 / 4) < 0.001
    assert torch.equal(model.norm.weight, torch.ones(256))


# ------------------------------------------------------------------------------------------------------------
# Bad input names what is wrong

def test_missing_path_is_a_named_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        from_pretrained(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "gpt2", "model_type"),
    ("attention_bias", True, "attention_bias"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope scaling"),
    ("hidden_act", "gelu", "hidden_act"),
    ("qk_norm", True, "qk_norm"),
])
def test_unsupported_config_fields_are_refused_by_name(tmp_path, tiny_llama_dir, field, value, message):
    import shutil

    path = tmp_path / "edited"
    shutil.copytree(tiny_llama_dir, path)
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        from_pretrained(str(path))


def test_export_refuses_non_llama_layers_by_index(tmp_path):
    config = GPTConfig(vocab_size=100, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, head_dim=16, mlp_hidden=64,
                       mlp_kind=["swiglu", "relu2", "swiglu"], window=[None, None, 8])
    with pytest.raises(ValueError, match=r"layers \[1, 2\]"):
        save_pretrained(GPT(config), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_bad_gpt_config_values_are_named():
    with pytest.raises(ValueError, match="mlp_kind\\[1\\]"):
        GPTConfig(n_layer=2, mlp_kind=["swiglu", "tanh"])
    with pytest.raises(ValueError, match="window has 3 entries"):
        GPTConfig(n_layer=2, window=[None, 4, 4])
    with pytest.raises(ValueError, match="sink_tokens = 65; expected an int from 0 to 64"):
        GPTConfig(n_layer=2, window=4, sink_tokens=65)
    with pytest.raises(ValueError, match=r"sink_tokens = 4 with block_sparse on layers \[1\]"):
        GPTConfig(n_layer=2, window=16, block_sparse=[None, 2], sink_tokens=4)


def test_swiglu_recompute_matches_plain_autograd():
    from model import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(32, 48)
    x = torch.randn(3, 7, 32, requires_grad=True)
    out = mlp(x)
    out.square().sum().backward()
    ours = (x.grad.clone(), mlp.gate_up.weight.grad.clone(), mlp.down.weight.grad.clone())
    x.grad = None
    mlp.zero_grad()
    gate, up = mlp.gate_up(x).chunk(2, dim=-1)
    reference = mlp.down(F.silu(gate) * up)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-6)
    for a, b in zip(ours, (x.grad, mlp.gate_up.weight.grad, mlp.down.weight.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cpu_matmuls_go_through_onednn_on_this_torch():
    """The CPU path's speed (README Performance) rests on it: a torch build without the op would fall back
    silently."""
    import model

    assert model.CPU_ONEDNN_MATMUL


@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_linear_forward_and_gradients_match_fp64_autograd(shape, weight_trains):
    from model import linear

    torch.manual_seed(0)
    x64, w64 = torch.randn(*shape, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    upstream = torch.randn(*shape[:-1], 40, dtype=torch.float64)
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_(weight_trains)
    x64.requires_grad_(), w64.requires_grad_(weight_trains)
    out, reference = linear(x, w), F.linear(x64, w64)
    (out * upstream.float()).sum().backward()
    (reference * upstream).sum().backward()
    assert out.dtype == torch.float32 and out.grad_fn is not None
    torch.testing.assert_close(out.double(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    assert (w.grad is None) == (not weight_trains)
    if weight_trains:
        torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


def test_matmul_takes_strided_operands_and_keeps_autograd():
    from model import matmul

    torch.manual_seed(0)
    a, b = torch.randn(24, 9).t(), torch.randn(33, 24).t()  # both transposed views
    torch.testing.assert_close(matmul(a, b).double(), a.double() @ b.double(), atol=1e-5, rtol=1e-5)
    a.requires_grad_()  # a graph is needed: torch's own matmul, with its backward
    out = matmul(a, b)
    out.sum().backward()
    torch.testing.assert_close(a.grad, torch.ones(9, 33) @ b.t())


def test_model_gradients_are_the_same_with_and_without_onednn(monkeypatch):
    import model

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=48,
                        mlp_kind=["swiglu", "relu2"])).init_weights()
    idx = torch.randint(0, 96, (2, 12))
    grads = []
    for onednn in (True, False):
        monkeypatch.setattr(model, "CPU_ONEDNN_MATMUL", onednn)
        gpt.zero_grad()
        loss, _, _ = head_loss(gpt(idx).flatten(0, 1), gpt.lm_head.weight, idx.roll(-1, 1).flatten())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in gpt.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


REFERENCE_ACTIVATIONS = {
    "relu2": lambda h: F.relu(h) ** 2,
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / 2 ** 0.5)),  # the exact (erf) GELU, not the tanh one
    "silu": lambda h: h * torch.sigmoid(h),
}


@pytest.mark.parametrize("kind", sorted(REFERENCE_ACTIVATIONS))
def test_plain_mlp_is_down_of_its_named_activation_of_up(kind):
    from model import PlainMLP

    torch.manual_seed(0)
    mlp = PlainMLP(16, 40, kind)
    x = torch.randn(2, 9, 16) * 3  # wide enough that every activation's negative side matters
    with torch.no_grad():
        expected = mlp.down.weight @ REFERENCE_ACTIVATIONS[kind](mlp.up.weight @ x.unsqueeze(-1))
        torch.testing.assert_close(mlp(x), expected.squeeze(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_optimizer_decays_matrices_and_embeddings_but_not_norm_gains(tied):
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8, mlp_hidden=32,
                       mlp_kind=["swiglu", "gelu"], tie_embeddings=tied)
    model = GPT(config)
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # frozen, as distill freezes all but one layer
    model.blocks[1].mlp_norm.weight.requires_grad_(False)
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    decay_of = {}  # parameter id -> the weight decay of every group that holds it
    for group in optimizer.param_groups:
        for p in group["params"]:
            decay_of.setdefault(id(p), []).append(group["weight_decay"])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decay_of, f"frozen {name} is in an optimizer group"
        else:
            expected = 0.0 if name.endswith("norm.weight") else 0.1  # every other parameter is a matrix
            assert decay_of.get(id(p)) == [expected], (name, decay_of.get(id(p)))
    assert len(decay_of) == sum(p.requires_grad for p in model.parameters())  # nothing beyond the model's own


def check_decoding(window, sink, prefill, compiled):
    """A prefill of `prefill` tokens, then one token per call, gives the full forward's logits: a ring-buffer
    layer past its window and a full layer, GQA, B=2."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=48,
                       window=[window, None], max_seq_len=64, sink_tokens=sink)
    model = GPT(config).init_weights(std=0.1).eval()
    idx = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = model.logits(idx)
        decoded, cache = decode_one_by_one(model, idx, prefill, compiled)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    if window:  # the sinks and a ring buffer of W, not the whole sequence
        assert cache.layers[0].k.shape[2] == sink + window


@pytest.mark.parametrize("window,sink,prefill", [(None, 0, 8), (5, 0, 8), (5, 3, 8), (5, 3, 2), (5, 3, 12)])
def test_kv_cache_decoding_matches_full_forward(window, sink, prefill):
    """With sink tokens: a prefill shorter than the sinks, between, and longer than sinks + window."""
    check_decoding(window, sink, prefill, compiled=False)


@needs_cxx
def test_compiled_decoding_matches_full_forward_from_a_cold_and_a_warm_compile_cache(tmp_path):
    """sample.py's compiled one-token step attends through decode_attention's fused sums of products instead of
    SDPA: the same logits too, past the window and with the sinks still filling. Two fresh processes share one
    compile cache, as two runs of sample.py --compile do: the second one's graphs come from the cache, where
    torch 2.13's AOTAutograd cache gave a filling ring buffer the full buffer's graph (wrong logits; sample.py
    turns that cache off)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_model import check_decoding; "
            "check_decoding(5, 0, 8, compiled=True); check_decoding(5, 3, 2, compiled=True)")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile-cache")}
    for run in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{run} compile cache:\n{proc.stderr[-3000:]}"


def test_kv_cache_refuses_multi_token_append_after_prefill():
    config = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, head_dim=8, mlp_hidden=32)
    model = GPT(config).eval()
    cache = model.new_cache(1, 16, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one token per call"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)

