"""student.py and the phase-1 layer loss: MLPs initialised from the teacher (pruned, refit by least squares),
the normalised MSE and R^2, and 1 process vs 2 gloo processes building the same student."""
import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_script, torchrun
from layer_cache import LayerCache, layer_loss
from model import GPT, GPTConfig, make_mlp
from runtime import setup_device
from student import LeastSquares, build_student, init_mlps_from_teacher, refit_down, student_config

ENV = {"OMP_NUM_THREADS": "1"}


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, head_dim=8, mlp_hidden=64,
                       max_seq_len=64)
    return GPT(config).init_weights(std=0.1).eval()


def batches(n, seed, batch_size=2, seq_len=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (batch_size, seq_len), generator=g) for _ in range(n)]


def mlp_inputs(teacher, tokens, layer):
    """The normed input of `layer`'s MLP on the teacher's own trajectory, one (B*T, C) tensor per batch."""
    cache = LayerCache(teacher, teacher, tokens, "cpu", torch.autocast("cpu", enabled=False))
    cache.begin_layer(layer, setup_device("cpu"))
    with torch.no_grad():
        return [teacher.blocks[layer].mlp_norm(x).flatten(0, 1) for x in cache.inputs]


def mlp_mse(student, teacher, inputs, layer):
    with torch.no_grad():
        return sum(F.mse_loss(student.blocks[layer].mlp(x), teacher.blocks[layer].mlp(x)) for x in inputs).item()


def test_pruning_to_the_teachers_full_width_gives_exactly_the_teachers_mlps():
    teacher = tiny_teacher()
    student = GPT(teacher.config).init_weights()  # every MLP different from the teacher's until it is pruned
    student.load_state_dict({k: v for k, v in teacher.state_dict().items() if ".mlp." not in k}, strict=False)
    init_mlps_from_teacher(student, teacher, batches(3, 1), [0, 1, 2], setup_device("cpu"), cache_device="cpu")
    x = batches(1, 9)[0]
    with torch.no_grad():
        torch.testing.assert_close(student.logits(x), teacher.logits(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,hidden,layers", [("swiglu", 24, [0, 1, 2]), ("relu2", 48, [0, 2]), ("gelu", 40, [1]),
                                                ("silu", 32, [2])])
def test_refit_never_raises_the_fit_mse_and_lowers_the_held_out_mse_of_plain_pruning(kind, hidden, layers):
    teacher = tiny_teacher()
    fit, held_out = batches(6, 1), batches(4, 2)
    pruned, _ = build_student(teacher, student_config(teacher.config, kind, hidden, layers))
    refit, _ = build_student(teacher, student_config(teacher.config, kind, hidden, layers))
    init_mlps_from_teacher(pruned, teacher, fit, layers, setup_device("cpu"), cache_device="cpu", refit=False)
    report = init_mlps_from_teacher(refit, teacher, fit, layers, setup_device("cpu"), cache_device="cpu")
    for i in range(3):
        if i not in layers:  # untouched layers keep the teacher's MLP
            assert torch.equal(refit.blocks[i].mlp.down.weight, teacher.blocks[i].mlp.down.weight)
            continue
        assert report[i]["mse_init"] <= report[i]["mse_pruned"]
        fit_inputs, held_inputs = mlp_inputs(teacher, fit, i), mlp_inputs(teacher, held_out, i)
        assert mlp_mse(refit, teacher, fit_inputs, i) <= mlp_mse(pruned, teacher, fit_inputs, i) * (1 + 1e-5)
        assert mlp_mse(refit, teacher, held_inputs, i) < mlp_mse(pruned, teacher, held_inputs, i)
        # the MSE the statistics predict is the MSE the refit MLP has on the fit batches
        per_token = mlp_mse(refit, teacher, fit_inputs, i) / len(fit_inputs)
        assert abs(per_token - report[i]["mse_init"]) <= 1e-4 * per_token + 1e-9


def test_least_squares_selection_finds_the_neurons_that_make_the_target_and_their_exact_fit():
    torch.manual_seed(0)
    mlp, env = make_mlp(16, "swiglu", 48), setup_device("cpu")
    inputs = [torch.randn(200, 16) for _ in range(3)]
    source, weights = torch.tensor([3, 7, 11, 20, 21, 30, 40, 47]), torch.randn(16, 8)
    with torch.no_grad():
        outputs = [mlp.hidden(x)[:, source] @ weights.t() for x in inputs]
    problem = LeastSquares(mlp, inputs, outputs, env)
    for chunk in (1, 8):
        kept, fitted = problem.select(8, chunk=chunk)
        assert torch.equal(kept, source)
        # the elimination's running update is the ridge solution on the kept neurons, solved directly
        eye = torch.eye(8, dtype=torch.float64)
        direct = torch.linalg.solve(problem.AtA[kept][:, kept] + problem.ridge * eye, problem.AtY[kept])
        torch.testing.assert_close(fitted, direct, rtol=1e-9, atol=1e-9)
        assert problem.mse(fitted, kept) < 1e-6 * (problem.energy_sum / problem.count).item()
        torch.testing.assert_close(fitted.t().float(), weights, rtol=0, atol=1e-3)


def test_the_elimination_curve_is_the_penalised_error_of_the_exact_fit_at_every_width():
    torch.manual_seed(1)
    mlp, env = make_mlp(16, "relu2", 40), setup_device("cpu")
    inputs = [torch.randn(300, 16) for _ in range(2)]
    outputs = [torch.randn(300, 16) + mlp(x).detach() for x in inputs]
    problem = LeastSquares(mlp, inputs, outputs, env, ridge=1e-2)
    curve = {}
    problem.select(8, chunk=4, curve=curve)
    assert sorted(curve) == list(range(8, 41, 4))
    assert all(curve[k] >= curve[k + 4] for k in range(8, 40, 4))  # fewer neurons never fit better
    for k in range(8, 41, 4):  # the same greedy path stopped at k: its ridge solution, solved directly
        kept, fitted = problem.select(k, chunk=4)
        penalty = problem.ridge * fitted.square().sum() / problem.count
        assert curve[k] == pytest.approx(problem.mse(fitted, kept) + penalty.item(), rel=1e-9)


def test_the_ridge_fit_is_least_squares_on_the_augmented_system_and_more_ridge_fits_the_fit_tokens_less():
    torch.manual_seed(4)
    mlp, env = make_mlp(12, "relu2", 20), setup_device("cpu")
    inputs = [torch.randn(150, 12) for _ in range(2)]
    outputs = [torch.randn(150, 12) for _ in range(2)]
    with torch.no_grad():
        A, Y = torch.cat([mlp.hidden(x) for x in inputs]).double(), torch.cat(outputs).double()
    fit_mse = []
    for ridge in (1e-4, 1e-2, 1e-1):
        problem = LeastSquares(mlp, inputs, outputs, env, ridge)
        # ridge regression is plain least squares on A stacked over sqrt(lambda) I (and Y over zeros)
        lam = ridge * (A * A).sum(0).mean()
        reference = torch.linalg.lstsq(torch.cat([A, lam.sqrt() * torch.eye(20, dtype=torch.float64)]),
                                       torch.cat([Y, torch.zeros(20, 12, dtype=torch.float64)])).solution
        fitted = problem.solve()
        torch.testing.assert_close(fitted, reference, rtol=1e-4, atol=1e-6)  # fp32 products per batch
        fit_mse.append(problem.mse(fitted))
    assert fit_mse[0] < fit_mse[1] < fit_mse[2]


@pytest.mark.parametrize("kind,hidden", [("swiglu", 24), ("relu2", 48)])
def test_least_squares_selection_fits_better_than_the_importance_ranking(kind, hidden):
    # enough fit tokens (1,152) for 64 candidate neurons that the better fit is not an overfit
    teacher, fit, held_out = tiny_teacher(), batches(24, 1), batches(4, 2)
    students, reports = {}, {}
    for select in ("importance", "lsq"):
        students[select], new = build_student(teacher, student_config(teacher.config, kind, hidden, [0, 1, 2]))
        reports[select] = init_mlps_from_teacher(students[select], teacher, fit, new, setup_device("cpu"),
                                                 cache_device="cpu", latent="student", select=select)
    for i in range(3):
        assert reports["lsq"][i]["mse_init"] < reports["importance"][i]["mse_init"], (i, reports)
    error = {select: sum(F.mse_loss(s, t).item() for s, t in zip(hidden_after(student, held_out, 2),
                                                                  hidden_after(teacher, held_out, 2)))
             for select, student in students.items()}
    assert error["lsq"] < error["importance"], error


def test_refit_keeps_the_current_down_projection_when_the_least_squares_one_is_not_better():
    teacher = tiny_teacher()
    student, _ = build_student(teacher, student_config(teacher.config, "swiglu", 64))
    student.load_state_dict(teacher.state_dict())  # already exact: MSE 0, nothing to gain
    inputs = mlp_inputs(teacher, batches(2, 3), 0)
    before = student.blocks[0].mlp.down.weight.clone()
    with torch.no_grad():
        outputs = [teacher.blocks[0].mlp(x) for x in inputs]
    before_mse, after_mse = refit_down(student.blocks[0].mlp, inputs, outputs, setup_device("cpu"))
    assert before_mse == after_mse < 1e-9
    assert torch.equal(student.blocks[0].mlp.down.weight, before)


def test_normalised_layer_loss_is_the_mse_over_the_teachers_update_energy():
    base = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    target = base + torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # the teacher's update: energy (4 + 0 + 0 + 4) / 4 = 2
    out = base + torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # the student's: squared error (1 + 0 + 0 + 0) / 4
    assert layer_loss(out, target, base) == pytest.approx(0.25)
    assert layer_loss(out, target, base, energy=2.0) == pytest.approx(0.125)
    cache = LayerCache(tiny_teacher(), tiny_teacher(1), batches(2, 4), "cpu", torch.autocast("cpu", enabled=False),
                       loss="nmse")
    cache.begin_layer(1, setup_device("cpu"))
    loss, r2 = cache.val_stats(setup_device("cpu"))
    energy = sum(((y - x) ** 2).mean() for x, y in zip(cache.inputs, cache.teacher_latent)).item() / 2
    assert cache.loss_energy == pytest.approx(energy, rel=1e-6)
    assert loss == pytest.approx(1 - r2, rel=1e-5)  # under nmse the val loss is 1 - R^2


SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from runtime import setup_device, shutdown
from student import build_student, init_mlps_from_teacher, student_config
from test_student import batches, tiny_teacher
env = setup_device("cpu")
teacher = tiny_teacher()
student, new = build_student(teacher, student_config(teacher.config, "relu2", 40))
tokens = batches(4, 1)[env.rank::env.world_size]
init_mlps_from_teacher(student, teacher, tokens, new, env, cache_device="cpu", latent=sys.argv[2], select=sys.argv[3])
if env.rank == 0:
    torch.save(student.state_dict(), sys.argv[1])
shutdown(env)
"""


@pytest.mark.parametrize("latent,select", [("teacher", "importance"), ("student", "lsq")])
def test_one_process_and_two_gloo_processes_build_the_same_student(tmp_path, latent, select):
    """Importance and least-squares statistics are sums over ranks: two processes with half the batches each
    pick the same neurons and solve the same system as one process with all of them."""
    script = tmp_path / "init.py"
    script.write_text(SCRIPT.format(repo=REPO))
    env = {**os.environ, **ENV, "PYTHONPATH": os.path.join(REPO, "tests")}
    outputs = {}
    for nproc in (1, 2):
        outputs[nproc] = tmp_path / f"student_{nproc}.pt"
        cmd = torchrun("tests/test_student.py", nproc)[:-1] + [str(script), str(outputs[nproc]), latent, select]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(outputs[n], weights_only=True) for n in (1, 2))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    assert one["blocks.0.mlp.down.weight"].abs().max() > 0  # initialised from the teacher, not left at zero


def hidden_after(model, tokens, layer):
    """The residual stream after `layer`, one (B, T, C) tensor per batch."""
    with torch.no_grad():
        out = []
        for x in tokens:
            h = model.embed(x)
            cos, sin = model.rope(0, x.shape[1], h.device)
            for block in model.blocks[:layer + 1]:
                h = block(h, cos, sin)
            out.append(h)
        return out


@pytest.mark.parametrize("kind,hidden", [("swiglu", 24), ("relu2", 48)])
def test_refit_on_the_students_own_latent_corrects_the_error_of_the_layers_below(kind, hidden):
    # Layer 0 is fit the same way under both latents (its input is the teacher's embedding either way). Layer 1
    # then sees the student's own drifted input: fit on it, the student's state after layer 1 is closer to the
    # teacher's than a fit on the teacher's trajectory leaves it (least squares is optimal for that very target).
    teacher, fit = tiny_teacher(), batches(6, 1)
    students = {}
    for latent in ("teacher", "student"):
        students[latent], new = build_student(teacher, student_config(teacher.config, kind, hidden, [0, 1]))
        init_mlps_from_teacher(students[latent], teacher, fit, new, setup_device("cpu"), cache_device="cpu",
                               latent=latent)
    assert torch.equal(students["teacher"].blocks[0].mlp.down.weight, students["student"].blocks[0].mlp.down.weight)
    error = {latent: sum(F.mse_loss(s, t).item() for s, t in zip(hidden_after(student, fit, 1),
                                                                  hidden_after(teacher, fit, 1)))
             for latent, student in students.items()}
    assert error["student"] < 0.95 * error["teacher"], error


def test_bench_widths_shares_the_neuron_budget_by_measured_sensitivity(teacher_dir, data_dir, tmp_path):
    import sys
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from bench_widths import allocate

    # two layers with the same fit errors: the one whose one-layer prune costs 4x the KL keeps more neurons
    curve = {k: (64 - k) ** 2 / 64 ** 2 for k in range(8, 65, 8)}
    widths = allocate({0: curve, 1: curve}, {0: 0.4, 1: 0.1}, 32, 64, {0: 64, 1: 64})
    assert sum(widths.values()) == 64 and widths[0] > widths[1]
    assert allocate({0: curve, 1: curve}, {0: 0.1, 1: 0.4}, 32, 80, {0: 64, 1: 64}, keep={0}) == {0: 64, 1: 16}
    # end to end on a tiny teacher (MLPs of 160): a budget of 64 per layer, multiples of 8, the rest in the JSON
    out = str(tmp_path / "widths.json")
    result = run_script("bench/bench_widths.py", "--teacher", teacher_dir, "--data-dir", data_dir, "--width", "64",
                        "--sens-width", "32", "--floor", "8", "--fit", "2", "--eval", "2", "--out", out)
    with open(out) as f:
        record = json.load(f)
    widths = record["widths"]
    assert len(widths) == 3 and sum(widths) == 3 * 64 and all(w % 8 == 0 and 8 <= w <= 160 for w in widths)
    assert record["mlp_layers"] == [i for i, w in enumerate(widths) if w != 160]
    assert record["mlp_hidden"] == [w for w in widths if w != 160]
    assert all(kl > 0 for kl in record["kl_at_sens_width"].values())
    assert f"mlp_hidden: {record['mlp_hidden']}" in result.stdout
