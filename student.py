"""The distillation student: the teacher's GPTConfig with per-layer changes (MLP kind and width, sliding-window
attention), built from the teacher's weights; its new MLPs initialised from the teacher's (pruned to the most
important neurons, down projection refit by least squares); and which of its parameters train in each phase."""
import contextlib
import dataclasses
import time

import torch

from config import ConfigError
from data import TokenLoader
from hf_interop import load_model
from layer_cache import LayerCache
from model import GPT, GPTConfig, SwiGLU, make_mlp, matmul
from runtime import all_reduce_sum, say


def check_layers(name, layers, n_layer):
    """`layers` as a list, refused (naming the setting) if any index is out of range or repeated."""
    layers = list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layer]
    if bad:
        raise ConfigError(f"{name} = {layers}: layer(s) {bad} out of range; the teacher has layers 0..{n_layer - 1}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{name} = {layers} lists a layer twice")
    return layers


def student_config(teacher_config, mlp_kind="relu2", mlp_hidden=None, mlp_layers=None, window=None,
                   full_attn_layers=(), sink_tokens=0):
    """The teacher's GPTConfig with the per-layer MLP and attention-window changes (mlp_kind "keep": the
    teacher's MLPs; mlp_hidden: one width for every new MLP, or a list of one per layer of mlp_layers, in its
    order; sink_tokens: the first positions every windowed layer also sees)."""
    n = teacher_config.n_layer
    fields = dataclasses.asdict(teacher_config)
    if mlp_kind != "keep":
        layers = check_layers("mlp_layers", range(n) if mlp_layers is None else mlp_layers, n)
        if isinstance(mlp_hidden, (list, tuple)) and len(mlp_hidden) != len(layers):
            raise ConfigError(f"mlp_hidden lists {len(mlp_hidden)} widths but there are {len(layers)} new MLPs "
                              f"(mlp_layers = {mlp_layers}, every layer if none): give one width per new MLP, or one "
                              f"int for all")
        for n_new, i in enumerate(layers):
            width = mlp_hidden[n_new] if isinstance(mlp_hidden, (list, tuple)) else mlp_hidden
            # half the teacher's width, on a multiple of 8 so the matmuls stay on fast kernel shapes
            fields["mlp_hidden"][i] = width or teacher_config.mlp_hidden[i] // 2 // 8 * 8
            fields["mlp_kind"][i] = mlp_kind
    if window is not None:
        keep_full = set(check_layers("full_attn_layers", full_attn_layers, n))
        fields["window"] = [None if i in keep_full else window for i in range(n)]
        fields["sink_tokens"] = sink_tokens
    return GPTConfig.from_dict(fields)


def build_student(teacher, config):
    """GPT(config) holding every teacher tensor whose name and shape match; the other (new) MLPs get a fresh
    init with `down` zeroed, so the student starts as the teacher minus those MLPs. Returns (student, the
    layers whose MLP is new)."""
    student = GPT(config).init_weights()
    teacher_state = teacher.state_dict()
    new_mlps = set()
    for name, tensor in student.state_dict().items():
        source = teacher_state.get(name)
        if source is not None and source.shape == tensor.shape:
            tensor.copy_(source)
        elif ".mlp." in name:
            new_mlps.add(int(name.split(".")[1]))
        else:
            raise ValueError(f"student tensor '{name}' {tuple(tensor.shape)} has no teacher tensor of that shape "
                             f"({None if source is None else tuple(source.shape)}); only MLPs may differ")
    for i in sorted(new_mlps):
        torch.nn.init.zeros_(student.blocks[i].mlp.down.weight)
    return student, sorted(new_mlps)


# ----------------------------------------------------------------------------------------------------------
# MLP initialisation from the teacher

REFIT_RIDGE = 1e-4  # default ridge of the least-squares fits, relative to the mean diagonal of A^T A: keeps them
# well posed (distill.py's REFIT_RIDGE sets it per run: more ridge fits the fit tokens less and the rest better)


@torch.no_grad()
def prune_mlp(student_mlp, teacher_mlp, kept):
    """Copy the teacher's neurons `kept` (indices, one per student neuron) into the student's MLP: for a SwiGLU
    student the neurons' gate, up and down weights (an exact sub-network of the teacher's MLP); for a plain MLP
    the teacher's gate rows as `up` (the argument of the neuron's non-linearity) and the down columns."""
    if isinstance(teacher_mlp, SwiGLU):
        gate, up = teacher_mlp.gate_up.weight.chunk(2)
    else:
        gate = up = teacher_mlp.up.weight
    if isinstance(student_mlp, SwiGLU):
        student_mlp.gate_up.weight.copy_(torch.cat([gate[kept], up[kept]]))
    else:
        student_mlp.up.weight.copy_(gate[kept])
    student_mlp.down.weight.copy_(teacher_mlp.down.weight[:, kept])


@torch.no_grad()
def mlp_importance(teacher_mlp, inputs, env):
    """Per teacher neuron: mean |activation| over the tokens of `inputs` (normed MLP inputs, one (N, C) tensor per
    batch) times the norm of its down-projection column: how much of the MLP's output it carries. Summed over
    ranks, so every rank ranks the neurons alike."""
    total = torch.zeros(teacher_mlp.down.weight.shape[1], dtype=torch.float64, device=env.device)
    count = torch.zeros((), dtype=torch.float64, device=env.device)
    for x in inputs:
        total += teacher_mlp.hidden(x).abs().sum(0).double()
        count += x.shape[0]
    all_reduce_sum([total, count], env)
    return (total / count).float() * teacher_mlp.down.weight.norm(dim=0)


class LeastSquares:
    """The statistics of the least-squares problem min_W ||A W^T - Y||^2 over the tokens of `inputs` (normed MLP
    inputs, one (N, C) tensor per batch): A = mlp.hidden(x), Y = `outputs`. A^T A, A^T Y and |Y|^2 are summed
    in fp64 over batches and ranks, so every rank solves the same system. `ridge` is relative to the mean
    diagonal of A^T A."""

    @torch.no_grad()
    def __init__(self, mlp, inputs, outputs, env, ridge=REFIT_RIDGE):
        K, C = mlp.down.weight.shape[1], mlp.down.weight.shape[0]
        device = mlp.down.weight.device
        self.AtA = torch.zeros(K, K, dtype=torch.float64, device=device)
        self.AtY = torch.zeros(K, C, dtype=torch.float64, device=device)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # |Y|^2, tokens
        for x, y in zip(inputs, outputs):  # per-batch products in fp32 (4x faster than fp64 on CPU), sums in fp64
            a = mlp.hidden(x)
            self.AtA += matmul(a.t(), a).double()
            self.AtY += matmul(a.t(), y).double()
            sums[0] += y.double().square().sum()
            sums[1] += x.shape[0]
        all_reduce_sum([self.AtA, self.AtY, sums], env)
        self.energy_sum, self.count = sums[0], sums[1] * C
        # keeps the system well posed where neurons are (nearly) collinear or dead
        self.ridge = ridge * self.AtA.diagonal().mean()

    def mse(self, Wt, kept=None):
        """The MSE of the (K', C) weights Wt on the neurons `kept` (default all), from the statistics alone;
        clamped, since cancellation can dip just below 0 at an exact fit."""
        AtA, AtY = (self.AtA, self.AtY) if kept is None else (self.AtA[kept][:, kept], self.AtY[kept])
        return max(0.0, ((self.energy_sum - 2 * (Wt * AtY).sum() + (Wt * (AtA @ Wt)).sum()) / self.count).item())

    def solve(self):
        eye = torch.eye(self.AtA.shape[0], dtype=torch.float64, device=self.AtA.device)
        return torch.linalg.solve(self.AtA + self.ridge * eye, self.AtY)

    def select(self, K, chunk=None, curve=None):
        """Greedy backward elimination (Optimal Brain Surgeon for whole neurons): start from the ridge fit on
        every neuron and repeatedly drop the `chunk` neurons (default: 8, or more for wide teachers, so that
        there are at most ~128 rounds) whose removal raises the fitted error least, re-solving for the rest
        after each drop. With H = A^T A + ridge, removing neuron j from the optimum costs
        |B_j|^2 / (H^-1)_jj exactly, and the Schur complement of H^-1 and the matching update of B give the
        exact optimum on the remaining neurons. Returns (kept indices sorted, their fitted (K, C) weights).
        With a dict `curve`, records {neurons kept: the fitted MSE, ridge term included} after every round."""
        eye = torch.eye(self.AtA.shape[0], dtype=torch.float64, device=self.AtA.device)
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(self.AtA + self.ridge * eye))
        B = Hinv @ self.AtY
        alive = torch.arange(self.AtA.shape[0], device=self.AtA.device)
        chunk = chunk or max(8, (len(alive) - K) // 128)
        if curve is not None:
            error = self.mse(B) + self.ridge.item() * B.square().sum().item() / self.count.item()
            curve[len(alive)] = error
        while len(alive) > K:
            cost = B.square().sum(1) / Hinv.diagonal()
            order = cost.argsort()
            drop, keep = order[:min(chunk, len(alive) - K)], order[min(chunk, len(alive) - K):].sort().values
            Hdd = Hinv[drop][:, drop]
            Hkd = Hinv[keep][:, drop]
            step = torch.linalg.solve(Hdd, B[drop])
            if curve is not None:  # the exact rise of the penalised error when these neurons go
                error += (B[drop] * step).sum().item() / self.count.item()
                curve[len(keep)] = error
            B = B[keep] - Hkd @ step
            Hinv = Hinv[keep][:, keep] - Hkd @ torch.linalg.solve(Hdd, Hkd.t())
            alive = alive[keep]
        return alive, B


@torch.no_grad()
def refit_down(student_mlp, inputs, outputs, env, apply=True, ridge=REFIT_RIDGE):
    """Least squares (ridge) for the student's down projection: the W minimising ||A W^T - Y||^2 over the tokens
    of `inputs`, with A the student's hidden activations and Y the target `outputs` (see LeastSquares). The refit
    replaces W only if it lowers the MSE on these tokens (apply=False: only measure). Returns (MSE before, MSE
    after)."""
    W = student_mlp.down.weight
    problem = LeastSquares(student_mlp, inputs, outputs, env, ridge)
    fitted = problem.solve()
    before, after = problem.mse(W.t().double()), problem.mse(fitted)
    energy = (problem.energy_sum / problem.count).item()
    if apply and after < before - 1e-6 * energy:  # a real gain, not a rounding-level one (as at an exact fit)
        W.copy_(fitted.t().to(W.dtype))
        return before, after
    return before, before


@torch.no_grad()
def select_and_fit(student_mlp, teacher_mlp, inputs, outputs, env, ridge=REFIT_RIDGE):
    """The student's neurons chosen among all the teacher's by least squares (LeastSquares.select) on the
    student's own activations of each teacher neuron (its non-linearity on the teacher's gate rows), and its
    down projection the exact fit on them. Returns (MSE with the teacher's down columns, MSE after the fit)."""
    kind = "swiglu" if isinstance(student_mlp, SwiGLU) else student_mlp.activation
    n = teacher_mlp.down.weight.shape[1]
    candidates = make_mlp(teacher_mlp.down.weight.shape[0], kind, n).to(teacher_mlp.down.weight)
    prune_mlp(candidates, teacher_mlp, torch.arange(n))  # every teacher neuron, as the student's kind computes it
    problem = LeastSquares(candidates, inputs, outputs, env, ridge)
    kept, fitted = problem.select(student_mlp.down.weight.shape[1])
    prune_mlp(student_mlp, teacher_mlp, kept)
    before = problem.mse(teacher_mlp.down.weight[:, kept].t().double(), kept)
    student_mlp.down.weight.copy_(fitted.t().to(student_mlp.down.weight.dtype))
    return before, problem.mse(fitted, kept)


@torch.no_grad()
def init_mlps_from_teacher(student, teacher, tokens, layers, env, *, cache_device, refit=True, latent="teacher",
                           select="importance", ridge=REFIT_RIDGE):
    """Initialise the student's new MLPs in `layers` from the teacher's: prune (and refit) on the hidden states
    of the batches `tokens` (this rank's list of (B, T) id tensors), walked up the network once in a LayerCache,
    in fp32. The neurons kept are the top ones by `mlp_importance` (select "importance"), or those a greedy
    least-squares elimination keeps (select "lsq": `select_and_fit`, which always refits). With latent
    "teacher" each MLP is fit on the teacher's trajectory: the target is the teacher MLP's output. With latent
    "student" the layers are fit in order on the student's own trajectory (its MLPs below already initialised):
    the target is what the MLP must add for the student's hidden state after the layer to equal the teacher's,
    so each refit also corrects the error the pruned layers below it left. Returns
    {layer: MSE of the MLP output against that target after pruning, and after the refit} on those tokens."""
    # the MLP input is h + attention(h) and the target is the teacher's block output minus it, so no MLP runs twice
    t0 = time.perf_counter()
    cache = LayerCache(teacher, teacher if latent == "teacher" else student, tokens, cache_device,
                       contextlib.nullcontext(), latent=latent)
    report = {}
    for i in sorted(layers):
        inputs, targets = cache.begin_layer(i, env)
        norm, teacher_mlp, student_mlp = teacher.blocks[i].mlp_norm, teacher.blocks[i].mlp, student.blocks[i].mlp
        xs = [norm(inputs[n].to(env.device)).flatten(0, 1) for n in range(len(tokens))]
        ys = [(targets[n] - inputs[n]).to(env.device).flatten(0, 1) for n in range(len(tokens))]
        if select == "lsq":
            pruned, fitted = select_and_fit(student_mlp, teacher_mlp, xs, ys, env, ridge)
        else:
            top = mlp_importance(teacher_mlp, xs, env).topk(student_mlp.down.weight.shape[1]).indices
            prune_mlp(student_mlp, teacher_mlp, top.sort().values)
            pruned, fitted = refit_down(student_mlp, xs, ys, env, apply=refit, ridge=ridge)
        report[i] = {"mse_pruned": pruned, "mse_init": fitted}
        cache.end_layer()
    mean = lambda key: sum(r[key] for r in report.values()) / len(report)
    how = "chosen by least-squares elimination" if select == "lsq" else "top by importance"
    widths = sorted({student.config.mlp_hidden[i] for i in layers})
    say(f"mlp init: {widths[0] if len(widths) == 1 else [student.config.mlp_hidden[i] for i in sorted(layers)]} "
        f"teacher neurons {how} in layers {layers}"
        + (", down refit by least squares" if refit or select == "lsq" else "")
        + f" | mean MLP-output MSE vs the teacher {mean('mse_pruned'):.5f} pruned -> {mean('mse_init'):.5f} | "
          f"{time.perf_counter() - t0:.1f}s")
    return report


def load_student(s, start_path, teacher):
    """distill.py's student (settings `s`): from the checkpoint a run starts at, or built from the teacher:
    (student, its checkpoint or None, the layers whose MLP is new)."""
    if start_path is not None:
        student, checkpoint = load_model(start_path)
        if teacher is not None:
            check_student_matches_teacher(student.config, teacher.config, start_path, s.teacher)
        say(f"student: from {start_path} (its architecture; mlp_kind/mlp_hidden/window/sink_tokens settings are not "
            f"used)")
        return student, checkpoint, []
    config = student_config(teacher.config, s.mlp_kind, s.mlp_hidden, s.mlp_layers, s.window, s.full_attn_layers,
                            s.sink_tokens)
    student, new_mlps = build_student(teacher, config)
    say(f"student: copy of {s.teacher} with new MLPs in layers {new_mlps} (mlp_init {s.mlp_init})")
    return student, None, new_mlps


def init_new_mlps(s, student, teacher, layers, env, cache_device):
    """distill.py's MLP_INIT=prune: the new MLPs as the teacher's most important neurons (or those least squares
    keeps, NEURON_SELECT=lsq), their down projections refit by least squares (REFIT_DOWN, ridge
    REFIT_RIDGE), on NUM_BATCHES train windows of this rank spread evenly over the train split. The layers are fit in order on the
    student's own trajectory: on the real SmolLM2 teacher that start is 0.15 (SwiGLU 512) to 0.92 (relu2 768)
    nats of val CE better than fitting each MLP on the teacher's. Spread windows, not the first ones: the fit
    overfits its tokens' documents, by 0.06 nats of val KL on a corpus stored novel after novel (README)."""
    loader = TokenLoader(s.data_dir, "train", s.batch_size, s.seq_len, rank=env.rank, world_size=env.world_size,
                         vocab_size=student.config.vocab_size)
    tokens = [x for x, _ in loader.spread_windows(s.num_batches)]
    return init_mlps_from_teacher(student, teacher, tokens, layers, env, refit=s.refit_down,
                                  cache_device=cache_device, latent="student", select=s.neuron_select,
                                  ridge=s.refit_ridge)


def check_student_matches_teacher(student_config_, teacher_config, student_source, teacher_source):
    for key in ("n_layer", "n_embd", "vocab_size", "n_head", "n_kv_head", "head_dim"):
        s, t = getattr(student_config_, key), getattr(teacher_config, key)
        if s != t:
            raise SystemExit(f"student '{student_source}' has {key} = {s} but the teacher '{teacher_source}' has "
                             f"{t}; the student's layers and vocabulary must line up with the teacher's")


def set_trainable(model, modules):
    """requires_grad only for the parameters of `modules`; returns them."""
    model.requires_grad_(False)
    for module in modules:
        module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def layer_target(block, target):
    """What phase 1 trains in a layer; each sublayer comes with its pre-norm."""
    attention = [block.attn_norm, block.attn]
    return {"decoder": [block.mlp_norm, block.mlp], "attn": attention, "attn_out": attention, "block": [block]}[target]


def phase2_target(student, train_params):
    """What phase 2 trains: all | blocks (not embeddings, head, final norm) | mlp | attn."""
    return {"all": [student], "blocks": list(student.blocks), "mlp": [b.mlp for b in student.blocks],
            "attn": [b.attn for b in student.blocks]}[train_params]
