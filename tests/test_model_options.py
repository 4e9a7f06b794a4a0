"""model.py's speedrun options (residual gates, U-Net skips, value embeddings, block-sparse attention, window
schedules; sink tokens in packed rows) against references: the model of the commit before them, explicit T x T
masks, the full forward."""
import importlib.util
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, decode_one_by_one, needs_cxx
from hf_interop import save_pretrained
from model import GPT, GPTConfig, apply_rope, sliding_window_attention

BEFORE_OPTIONS = "eb6cf20"  # the last commit whose model.py had none of the options: "today's model"
SHAPE = dict(vocab_size=96, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=48,
             window=[16, None, 8, None], max_seq_len=512)
OFF = {"residual_gates": False, "skip_connections": False, "value_embeds": 0, "block_sparse": None}
GATED = {"residual_gates": True, "skip_connections": True, "value_embeds": 2}  # identity at init
NEW_PARAMS = {  # option -> the names of the parameters it adds to a SHAPE model
    "residual_gates": {f"blocks.{i}.{s}_{r}_gate" for i in range(4) for s in ("attn", "mlp")
                       for r in ("residual", "branch")},
    "skip_connections": {"blocks.2.skip_gate", "blocks.3.skip_gate"},
    "value_embeds": {"value_embeds.0.weight", "value_embeds.1.weight", "blocks.0.attn.value_gate",
                     "blocks.3.attn.value_gate", "blocks.1.attn.value_gate", "blocks.2.attn.value_gate"},
}


def seeded(config, gpt=GPT):
    torch.manual_seed(0)
    return gpt(config).init_weights(std=0.1).eval()


@pytest.fixture(scope="module")
def model_before_options(tmp_path_factory):
    """model.py as of BEFORE_OPTIONS, imported under another name from git (the work tree is not touched)."""
    shown = subprocess.run(["git", "-C", REPO, "show", f"{BEFORE_OPTIONS}:model.py"], capture_output=True)
    if shown.returncode != 0:
        pytest.skip(f"commit {BEFORE_OPTIONS} is not in this clone (shallow?); the bitwise check needs it")
    path = tmp_path_factory.mktemp("before") / "model_before_options.py"
    path.write_bytes(shown.stdout)
    spec = importlib.util.spec_from_file_location("model_before_options", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("off", [{}, *({k: v} for k, v in OFF.items()), OFF])
def test_options_off_is_the_model_before_them_bit_for_bit(model_before_options, off):
    """Same parameters, same weights from the same seed, same logits: blockwise windows (T > 64), full layers,
    and packed conversations (segment_mask now goes through `attends`)."""
    before = seeded(model_before_options.GPTConfig(**SHAPE), model_before_options.GPT)
    ours = seeded(GPTConfig(**SHAPE, **off))
    assert list(ours.state_dict()) == list(before.state_dict())
    for name, tensor in before.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    idx = torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(1))
    segments = torch.cat((torch.zeros(2, 90, dtype=torch.long), torch.ones(2, 57, dtype=torch.long),
                          torch.full((2, 3), -1)), dim=1)
    with torch.no_grad():
        assert torch.equal(ours.logits(idx), before.logits(idx))
        assert torch.equal(ours.logits(idx, segments=segments), before.logits(idx, segments=segments))
    assert ours.flops_per_token(150) == before.flops_per_token(150)


@pytest.mark.parametrize("option", sorted(GATED))
def test_gated_option_starts_as_the_plain_model_and_learns(option):
    """At init the option changes nothing (gates 1, skip and value gates 0); once its gates move the logits
    change, and a backward reaches every parameter it adds."""
    plain = seeded(GPTConfig(**SHAPE))
    model = seeded(GPTConfig(**SHAPE, **{option: GATED[option]}))
    state, plain_state = model.state_dict(), plain.state_dict()
    assert set(state) - set(plain_state) == NEW_PARAMS[option] and set(plain_state) <= set(state)
    for name, tensor in plain_state.items():  # a seed gives the plain weights: new parameters draw last
        assert torch.equal(state[name], tensor), name
    added = {n: p for n, p in model.named_parameters() if n in NEW_PARAMS[option]}
    for name, p in added.items():  # scalars for the optimizer's scalar group, or tables
        assert (p.dim() == 0 and name.endswith("_gate")) or (name.startswith("value_embeds.") and p.shape == (96, 16))
    idx = torch.randint(0, 96, (2, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.logits(idx), plain.logits(idx))
        for name, p in added.items():
            if p.dim() == 0:
                p.fill_(0.5)
        moved = model.logits(idx)
    assert (moved - plain.logits(idx)).abs().max().item() > 1e-3
    F.cross_entropy(model.logits(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    for name, p in added.items():
        assert p.grad is not None and p.grad.abs().sum().item() > 0, f"{name} got no gradient"
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all((id(p) in no_decay) == (p.dim() == 0) for p in added.values())


def explicit_block_sparse_mask(T, window, sparse):
    """The T x T pattern straight from its definition: the last `window` positions, plus the first `sparse`
    positions of every block of max(window, 64) that lies wholly before the query's block."""
    block = max(window, 64)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        mask[t, max(0, t - window + 1):t + 1] = True
        for start in range(0, (t // block) * block, block):
            mask[t, start:start + sparse] = True
    return mask


def explicit_attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("T,window,sparse", [(40, 16, 4), (64, 16, 4), (128, 16, 4), (192, 16, 4), (300, 16, 4),
                                             (517, 8, 1), (256, 64, 64), (333, 100, 7), (129, 70, 70)])
def test_block_sparse_attention_equals_explicit_mask(T, window, sparse):
    """Shorter than a block, exact blocks, ragged; GQA; sparse from one key to the whole block."""
    g = torch.Generator().manual_seed(T + window + sparse)
    q, k, v = torch.randn(2, 4, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8,
                                                                                                      generator=g)
    ours = sliding_window_attention(q, k, v, window, {}, sparse)
    expected = explicit_attention(q, k, v, explicit_block_sparse_mask(T, window, sparse))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    if T > 2 * max(window, 64):  # there are summary keys beyond the previous block: the pattern is not a window
        assert not torch.allclose(ours, sliding_window_attention(q, k, v, window, {}), atol=1e-3)


def test_block_sparse_attention_memory_is_not_a_t_by_t_mask(monkeypatch):
    T, real = 1024, F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, T, 8, generator=g), torch.randn(1, 1, T, 8, generator=g), torch.randn(1, 1, T, 8,
                                                                                                      generator=g)
    masks, scores = [], []  # elements of every mask and score matrix attention was asked for

    def watch(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask.numel() if attn_mask is not None else 0)
        scores.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", watch)
    ours = sliding_window_attention(q, k, v, 64, {}, 4)
    monkeypatch.undo()
    assert scores, "F.scaled_dot_product_attention was never called: nothing was measured"
    assert max(masks) < T * T / 4 and max(scores) < 2 * T * T / 4  # 15 blocks x 64 x (128 + 56 summary keys)
    torch.testing.assert_close(ours, explicit_attention(q, k, v, explicit_block_sparse_mask(T, 64, 4)),
                               atol=1e-5, rtol=1e-5)


def all_options_model():
    config = GPTConfig(**{**SHAPE, "window": [16, None, 8, 64]}, residual_gates=True, skip_connections=True,
                       value_embeds=2, block_sparse=[3, None, None, 5])
    model = seeded(config)
    with torch.no_grad():  # gates away from identity, so every option acts
        for name, p in model.named_parameters():
            if p.dim() == 0:
                p.copy_(0.5 + torch.rand(()))
    return model


def test_every_option_computes_its_documented_formula():
    """Five layers, every option on, written out by hand: block 4 adds skip 0 and block 3 skip 1 (block 2, the
    middle, none); table 0 feeds layers 0 and 4, table 1 layers 1 and 3; a*x + b*sublayer; explicit T x T masks."""
    config = GPTConfig(**{**SHAPE, "n_layer": 5, "window": [16, None, 8, 64, None]}, residual_gates=True,
                       skip_connections=True, value_embeds=2, block_sparse=[3, None, None, 5, None])
    model = seeded(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 0:
                p.copy_(0.5 + torch.rand(()))
    idx = torch.randint(0, 96, (2, 200), generator=torch.Generator().manual_seed(6))
    T, table_of, skip_from = idx.shape[1], {0: 0, 4: 0, 1: 1, 3: 1}, {4: 0, 3: 1}
    masks = [torch.ones(T, T, dtype=torch.bool).tril(), explicit_block_sparse_mask(T, 16, 3),
             explicit_block_sparse_mask(T, 8, 0), explicit_block_sparse_mask(T, 64, 5)]
    mask_of = {0: masks[1], 1: masks[0], 2: masks[2], 3: masks[3], 4: masks[0]}
    with torch.no_grad():
        x, saved = model.embed(idx), {}
        cos, sin = model.rope(0, T, "cpu")
        for i, block in enumerate(model.blocks):
            if i in skip_from:
                x = x + block.skip_gate * saved[skip_from[i]]
            a = block.attn
            q, k, v = a.qkv(block.attn_norm(x)).split([32, 16, 16], dim=-1)
            q = apply_rope(q.view(2, T, 4, 8).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(2, T, 2, 8).transpose(1, 2), cos, sin)
            v = (v + a.value_gate * model.value_embeds[table_of[i]](idx)) if i in table_of else v
            y = explicit_attention(q, k, v.view(2, T, 2, 8).transpose(1, 2), mask_of[i])
            x = block.attn_residual_gate * x + block.attn_branch_gate * a.proj(y.transpose(1, 2).reshape(2, T, 32))
            x = block.mlp_residual_gate * x + block.mlp_branch_gate * block.mlp(block.mlp_norm(x))
            if i < 2:
                saved[i] = x
        expected = model.lm_head(model.norm(x))
        torch.testing.assert_close(model.logits(idx), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_cxx)])
def test_kv_cache_decoding_with_every_option_equals_full_forward(compiled):
    """Prefill then one token at a time past two blocks (block-sparse layers see summary keys, their cache holds
    every position; the plain windowed layer keeps its ring buffer); compiled, decode_attention's masked sums."""
    model = all_options_model()
    idx = torch.randint(0, 96, (2, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.logits(idx)
        decoded, cache = decode_one_by_one(model, idx, 20, compiled)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)
    assert [layer.k.shape[2] for layer in cache.layers] == [150, 150, 8, 150]


def sink_tokens_model():
    return seeded(GPTConfig(**{**SHAPE, "window": [16, None, 8, 64]}, sink_tokens=2))


@pytest.mark.parametrize("make_model", [all_options_model, sink_tokens_model])
def test_packed_conversations_with_block_sparse_or_sink_layers_equal_each_alone(make_model):
    """Segments restart the blocks of the block-sparse pattern, and the sinks, with the positions: a segment's
    sinks are its own first tokens."""
    model = make_model()
    lengths = (150, 140)
    idx = torch.randint(0, 96, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model.logits(idx, segments=segments)
        alone = torch.cat([model.logits(part) for part in idx.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_set_windows_changes_attention_and_setting_them_back_restores_the_logits():
    model = seeded(GPTConfig(**{**SHAPE, "window": [16, None, 8, 32]}, block_sparse=[None, None, None, 2]))
    idx = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model.logits(idx)
        model.set_windows([4, 4, 8, 100])
        assert model.config.window == [4, 4, 8, 100] and [b.attn.window for b in model.blocks] == [4, 4, 8, 100]
        changed = model.logits(idx)
        model.set_windows([16, None, 8, 32])
        assert torch.equal(model.logits(idx), before)
    assert (changed - before).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match=r"block_sparse\[3\] = 2 with window\[3\] = None"):
        model.set_windows(None)
    assert model.config.window == [16, None, 8, 32]  # a refused schedule changes nothing


@pytest.mark.parametrize("option,value", [*GATED.items(), ("block_sparse", [None, None, 4, None])])
def test_hf_export_refuses_each_option_by_name(tmp_path, option, value):
    model = GPT(GPTConfig(**{**SHAPE, "window": None if option != "block_sparse" else [None, None, 8, None]},
                          **{option: value}))
    with pytest.raises(ValueError, match=f"{option}="):
        save_pretrained(model, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_bad_option_values_are_named():
    with pytest.raises(ValueError, match=r"block_sparse\[0\] = 4 with window\[0\] = None"):
        GPTConfig(**{**SHAPE, "window": None}, block_sparse=4)
    with pytest.raises(ValueError, match=r"block_sparse\[0\] = 65 with window\[0\] = 16"):
        GPTConfig(**SHAPE, block_sparse=[65, None, None, None])
    with pytest.raises(ValueError, match=r"value_embeds = 3; expected an int from 0 to 2"):
        GPTConfig(**SHAPE, value_embeds=3)
