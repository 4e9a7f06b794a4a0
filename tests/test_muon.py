"""muon.py against references: the singular values the quintic Newton-Schulz iteration gives and the polar factor
from torch.linalg.svd, the Muon step written out by hand, torch.optim.AdamW, and an uninterrupted run for resume."""
import io
import time

import pytest
import torch

from muon import Muon, newton_schulz

# Singular values of newton_schulz(G) measured over 300 seeds per shape, and over a fine grid of the scalar
# map: 0.6818-1.2024 for every input singular value >= 2e-3 of ||G||_F. Asserted a little wider.
NS_BAND = (0.66, 1.22)
# 5 steps multiply a singular value by at most ~3.44^5 ~ 490, so smaller ones cannot reach the band (a random
# square matrix often has one); the band is asserted only above this fraction of ||G||_F.
NS_REACHABLE = 2e-3
SHAPES = {"tall": (64, 16), "wide": (16, 64), "square": (32, 32)}


def random_matrix(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def in_band(values):
    return bool(((values >= NS_BAND[0]) & (values <= NS_BAND[1])).all())


@pytest.mark.parametrize("name", SHAPES)
def test_newton_schulz_pushes_singular_values_into_the_quintic_band(name):
    G = random_matrix(SHAPES[name], seed=0)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    Y = newton_schulz(G)
    assert Y.shape == G.shape and Y.dtype == G.dtype
    # Y = U f(S) V^T: the singular vectors are kept, so U^T Y V is diagonal and pairs each output value with its
    # input singular value
    projected = U.mT @ Y @ Vh.mT
    values = projected.diagonal()
    assert torch.allclose(projected, torch.diag(values), atol=1e-4)
    reachable = s / G.norm() >= NS_REACHABLE
    assert reachable.sum() >= len(s) - 1
    assert in_band(values[reachable]), values
    assert torch.linalg.svdvals(Y).max() <= NS_BAND[1]
    # the same check fails on the input, even scaled so that its largest singular value is 1
    assert not in_band(s / s.max()), s / s.max()


@pytest.mark.parametrize("name", SHAPES)
def test_newton_schulz_is_much_closer_to_the_polar_factor_than_its_input(name):
    G = random_matrix(SHAPES[name], seed=1)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    distance = lambda M: ((M - polar).norm() / polar.norm()).item()
    # measured: ~0.2 for the iteration, ~0.76-0.86 for the normalised input
    assert distance(newton_schulz(G)) < 0.3
    assert distance(newton_schulz(G)) < 0.4 * distance(G / G.norm())


def test_newton_schulz_orthogonalises_each_matrix_of_a_batch():
    batch = torch.stack([random_matrix((16, 40), seed) for seed in range(3)])
    expected = torch.stack([newton_schulz(m) for m in batch])
    torch.testing.assert_close(newton_schulz(batch), expected, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bfloat16 path runs on CUDA only")
def test_newton_schulz_on_cuda_runs_in_bfloat16_and_returns_the_input_dtype():
    G = random_matrix((64, 16), seed=0)
    Y = newton_schulz(G.cuda())
    assert Y.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits, so the result is near the float32 one, not equal to it
    assert (Y.cpu() - newton_schulz(G)).norm() / newton_schulz(G).norm() < 0.1
    values = torch.linalg.svdvals(Y.float().cpu())
    assert values.min() > NS_BAND[0] - 0.1 and values.max() < NS_BAND[1] + 0.1


def reference_newton_schulz(G, steps=5):
    """The quintic in float64, written as a polynomial in the Gram matrix of the wide orientation."""
    X = G.double().mT if G.size(0) > G.size(1) else G.double()
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = 3.4445 * X - 4.7750 * A @ X + 2.0315 * A @ A @ X
    return (X.mT if G.size(0) > G.size(1) else X).float()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_steps_match_the_written_out_formula(shape, nesterov):
    lr, momentum, weight_decay = 0.05, 0.9, 0.1
    param = torch.nn.Parameter(random_matrix(shape, seed=2))
    optimizer = Muon([{"params": [param], "use_muon": True, "momentum": momentum, "nesterov": nesterov}],
                     lr=lr, weight_decay=weight_decay)
    expected, buf = param.detach().clone(), torch.zeros(shape)
    for step in range(3):
        grad = random_matrix(shape, seed=10 + step)
        param.grad = grad.clone()
        optimizer.step()
        buf = momentum * buf + grad
        update = grad + momentum * buf if nesterov else buf
        update = reference_newton_schulz(update) * max(1.0, shape[0] / shape[1]) ** 0.5
        expected = expected * (1 - lr * weight_decay) - lr * update
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-5)


def test_adamw_groups_match_torch_adamw_over_five_steps():
    shapes = [(6, 4), (4,), (3, 5)]
    ours = [torch.nn.Parameter(random_matrix(s, seed=i)) for i, s in enumerate(shapes)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1},
                         {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.0}]
    optimizer = Muon(groups(ours), lr=1.0, betas=(0.8, 0.95), eps=1e-8)
    reference = torch.optim.AdamW(groups(theirs), betas=(0.8, 0.95), eps=1e-8, foreach=False)
    for step in range(5):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a.grad = random_matrix(a.shape, seed=100 * step + i)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def mixed_model_params():
    """A hidden matrix for Muon, an embedding-like matrix and a gain vector for AdamW."""
    return [torch.nn.Parameter(random_matrix(s, seed=i)) for i, s in enumerate([(12, 20), (30, 12), (12,)])]


def mixed_optimizer(params):
    return Muon([{"params": params[:1], "use_muon": True, "lr": 0.02, "weight_decay": 0.01, "lr_scale": 0.5},
                 {"params": params[1:], "lr": 3e-3}], lr=1.0)


def train_steps(params, optimizer, steps):
    for step in steps:
        for i, p in enumerate(params):
            p.grad = random_matrix(p.shape, seed=1000 * step + i)
        optimizer.step()


def test_resume_from_state_dict_matches_uninterrupted_run():
    params = mixed_model_params()
    optimizer = mixed_optimizer(params)
    train_steps(params, optimizer, range(3))
    saved = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, saved)
    train_steps(params, optimizer, range(3, 6))

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)  # as the repo loads checkpoints
    resumed = [torch.nn.Parameter(p) for p in checkpoint["params"]]
    restored = mixed_optimizer(resumed)
    restored.load_state_dict(checkpoint["optimizer"])
    assert restored.param_groups[0]["lr_scale"] == 0.5 and restored.param_groups[0]["use_muon"]
    train_steps(resumed, restored, range(3, 6))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_groups_get_only_their_own_kind_of_hyperparameters_and_keep_extra_keys():
    groups = mixed_optimizer(mixed_model_params()).param_groups
    assert {"momentum", "nesterov", "ns_steps"} <= groups[0].keys() and "betas" not in groups[0]
    assert {"betas", "eps"} <= groups[1].keys() and "momentum" not in groups[1]
    assert groups[0]["lr_scale"] == 0.5 and groups[0]["lr"] == 0.02 and groups[1]["lr"] == 3e-3


def test_muon_group_with_a_vector_is_refused_naming_its_shape():
    with pytest.raises(ValueError, match=r"use_muon=True but holds a parameter of shape \(8,\)"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(8))], "use_muon": True}], lr=0.02)


def test_refused_group_is_not_left_in_the_optimizer():
    optimizer = Muon([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)
    with pytest.raises(ValueError, match="shape"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 3, 4))], "use_muon": True})
    assert len(optimizer.param_groups) == 1


def test_report_muon_and_adamw_step_cost_on_cpu():
    """Measures, does not assert: run with -s to see one step's time on a 576x1536 matrix."""
    def seconds_per_step(param, optimizer, repeats=3):
        param.grad = random_matrix(param.shape, seed=7)
        optimizer.step()  # the first step allocates the state
        start = time.perf_counter()
        for _ in range(repeats):
            optimizer.step()
        return (time.perf_counter() - start) / repeats

    shape = (576, 1536)
    muon = torch.nn.Parameter(random_matrix(shape, seed=0))
    adamw = torch.nn.Parameter(random_matrix(shape, seed=0))
    fused = torch.nn.Parameter(random_matrix(shape, seed=0))
    times = {"muon": seconds_per_step(muon, Muon([{"params": [muon], "use_muon": True}], lr=0.02)),
             "adamw (this module)": seconds_per_step(adamw, Muon([adamw], lr=1e-3)),
             "torch AdamW fused": seconds_per_step(fused, torch.optim.AdamW([fused], lr=1e-3, fused=True))}
    print(f"\none step on a {shape[0]}x{shape[1]} matrix, CPU, {torch.get_num_threads()} threads: " +
          ", ".join(f"{name} {1000 * t:.1f} ms" for name, t in times.items()))
