"""training.py against hand-computed values and uninterrupted runs: the LR schedules, restoring the optimizer with
this run's hyperparameters, and the RNG state of a resume."""
import copy

import pytest
import torch

import checkpoints
import training
from model import GPT, GPTConfig

LR, MIN = 2.0, 0.2  # lr and min_lr_frac * lr for min_lr_frac = 0.1
SCHEDULE = dict(max_steps=10, lr=LR, warmup_steps=2, cooldown_frac=0.5, min_lr_frac=0.1)


@pytest.mark.parametrize("schedule,expected", [
    # warmup (step + 1) / 2 * lr; flat until the cooldown's 5 steps start at 10 - 5; then linear to MIN at step 10
    ("trapezoid", {0: 1.0, 1: 2.0, 2: 2.0, 4: 2.0, 5: 2.0, 6: 1.64, 7: 1.28, 8: 0.92, 9: 0.56, 10: MIN}),
    # cosine over the 8 steps after warmup: lr at step 2, the mean of lr and MIN halfway, MIN at the end and after
    ("cosine", {0: 1.0, 1: 2.0, 2: 2.0, 4: MIN + (LR - MIN) * 0.5 * (1 + 2 ** -0.5), 6: 1.1, 10: MIN, 12: MIN}),
    ("constant", {0: 1.0, 1: 2.0, 2: 2.0, 9: 2.0, 10: 2.0}),
])
def test_lr_schedule_values_at_hand_computed_steps(schedule, expected):
    got = {step: training.lr_at(step, schedule=schedule, **SCHEDULE) for step in expected}
    assert got == pytest.approx(expected, abs=1e-12)


def test_lr_schedule_without_warmup_or_cooldown_is_flat_and_an_unknown_one_is_named():
    flat = dict(SCHEDULE, warmup_steps=0, cooldown_frac=0.0)
    assert [training.lr_at(step, schedule="trapezoid", **flat) for step in range(11)] == [LR] * 11
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        training.lr_at(3, schedule="linear", **SCHEDULE)


@pytest.mark.parametrize("elapsed,step_seconds,reserve,expected", [
    (100.0, 10.0, 50.0, 5 + 45),  # 600 - 100 - 50 = 450 s left: 45 more steps
    (100.0, 10.0, 55.0, 5 + 44),  # a step that would end 5 s past the budget is not taken
    (0.0, 0.5, 0.0, 1000),  # more fits than MAX_STEPS: MAX_STEPS
    (590.0, 10.0, 30.0, 5),  # the budget is spent: end now
])
def test_steps_in_budget_counts_the_whole_steps_that_end_before_the_budget(elapsed, step_seconds, reserve, expected):
    assert training.steps_in_budget(5, 1000, 600.0, elapsed, step_seconds, reserve) == expected


def tiny_gpt():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, head_dim=8, mlp_hidden=32)
    return GPT(config).init_weights()


def take_a_step(model, optimizer):
    idx = torch.randint(0, 64, (2, 12))
    model.logits(idx).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_resumed_optimizer_keeps_the_saved_moments_but_this_runs_betas_and_weight_decay():
    """A run saved with weight_decay 0 and resumed with 0.1 decays its matrices at 0.1 (the norm gains stay at 0),
    with the new betas, and continues from the saved Adam moments."""
    model = tiny_gpt()
    saved_with = model.configure_optimizer(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device_type="cpu")
    take_a_step(model, saved_with)
    state = copy.deepcopy(saved_with.state_dict())
    resumed = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), device_type="cpu")
    training.load_optimizer_state(resumed, state, "step_000001.pt", "start a new --run-dir")
    matrices, gains = resumed.param_groups
    assert all(p.dim() == 2 for p in matrices["params"]) and all(p.dim() == 1 for p in gains["params"])
    assert (matrices["weight_decay"], gains["weight_decay"]) == (0.1, 0.0)
    assert matrices["betas"] == gains["betas"] == (0.8, 0.9)
    for p in model.parameters():
        assert torch.equal(resumed.state[p]["exp_avg"], saved_with.state[p]["exp_avg"])
        assert torch.equal(resumed.state[p]["exp_avg_sq"], saved_with.state[p]["exp_avg_sq"])
        assert resumed.state[p]["exp_avg"].abs().sum() > 0  # a real moment, not a fresh zero state


def test_an_optimizer_state_of_other_parameters_is_refused_naming_the_checkpoint():
    model = tiny_gpt()
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(SystemExit, match="checkpoint 'old.pt'.*start a new --run-dir"):
        training.load_optimizer_state(optimizer, other.state_dict(), "old.pt", "start a new --run-dir")


class RecordingLoader:
    def __init__(self):
        self.loaded = []

    def load_state_dict(self, state):
        self.loaded.append(state)


def test_restored_rng_draws_what_the_uninterrupted_run_drew_after_the_save(tmp_path):
    model = tiny_gpt()
    optimizer = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    take_a_step(model, optimizer)
    torch.manual_seed(1234)
    torch.rand(3)
    path = tmp_path / "step_000001.pt"
    torch.save({"optimizer": optimizer.state_dict(), "loader": {"position": 7}, "rng": checkpoints.rng_state(),
                "step": 1}, path)
    uninterrupted = torch.rand(5)  # what the run drew right after its save
    torch.rand(100)  # the run goes on (or a new process starts with another seed) before the resume
    loader = RecordingLoader()
    step = training.restore_training_state(torch.load(path, weights_only=True), optimizer, loader, str(path),
                                           "start a new --run-dir")
    assert torch.equal(torch.rand(5), uninterrupted)
    assert step == 1 and loader.loaded == [{"position": 7}]


def test_restoring_a_checkpoint_without_its_rng_names_the_missing_entry():
    with pytest.raises(SystemExit, match="checkpoint 'weights_only.pt' has no 'rng' entry"):
        training.restore_training_state({"optimizer": {}, "loader": {}, "step": 3}, None, None, "weights_only.pt",
                                        "resume from a step_*.pt")
