"""Muon for a model's hidden matrices and AdamW for everything else, in one torch optimizer.

Muon (momentum, then Newton-Schulz orthogonalisation of the update) suits the 2-D weights inside the blocks;
embeddings, the LM head, norm gains and scalar gates keep AdamW. A param group with "use_muon": True takes the
Muon step, any other group the AdamW step. Because both live in one object, a checkpoint holds one
`state_dict()` and an exact resume is torch's own `load_state_dict`. Groups may carry keys of their own (the
training loop's "lr_scale"); they are kept as they are.

Under DDP the gradients arrive already averaged, so every rank orthogonalises every matrix and reaches the same
update with no extra communication. The speedruns instead give each rank a share of the matrices and
all-gather the results, which saves Newton-Schulz compute on many GPUs; at this repo's model sizes the step is
a small part of the time and that bookkeeping is not worth its complexity (measured with 2 gloo processes on CPU:
343 vs 215 ms of Newton-Schulz per step, 3-7% of the step; `python bench/bench_speed.py --ddp`).
"""
import torch
from torch.optim.adamw import adamw

# The speedruns' quintic: chosen for a steep slope at zero, so 5 steps lift small singular values into a band
# around 1 (about 0.68-1.2) instead of converging exactly; the update only needs its scale evened out.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # keeps an all-zero gradient at zero instead of dividing by a zero norm

MUON_DEFAULTS = {"momentum": 0.95, "nesterov": True, "ns_steps": 5}
ADAMW_DEFAULTS = {"betas": (0.9, 0.95), "eps": 1e-8}


def newton_schulz(G, steps=5):
    """An approximate orthogonalisation U V^T of G = U S V^T (or of each matrix in a batch over the leading
    dims): the singular vectors are kept and the singular values are pushed into the band around 1.

    Runs in bfloat16 on CUDA, where it is fast and the band is coarse anyway, and in float32 elsewhere (bf16
    matmuls on CPU are hundreds of times slower); returns G's dtype."""
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(torch.bfloat16 if G.device.type == "cuda" else torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:  # X X^T is then the smaller Gram matrix: rows x rows instead of cols x cols
        X = X.mT
    # the Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1], where the
    # polynomial is designed to work
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_EPS)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def check_group(group, index):
    """Refuse a group the step could not apply: a non-matrix in a Muon group, or hyperparameters out of range."""
    if group["lr"] < 0 or group["weight_decay"] < 0:
        raise ValueError(f"param group {index}: lr {group['lr']} and weight_decay {group['weight_decay']} "
                         f"must be >= 0")
    if group["use_muon"]:
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(f"param group {index} has use_muon=True but holds a parameter of shape "
                                 f"{tuple(p.shape)}; Muon takes 2-D matrices only, so put it in a group without "
                                 f"use_muon (AdamW)")
        if not 0 <= group["momentum"] < 1 or group["ns_steps"] < 1:
            raise ValueError(f"param group {index}: momentum {group['momentum']} must be in [0, 1) and "
                             f"ns_steps {group['ns_steps']} >= 1")
    elif not all(0 <= beta < 1 for beta in group["betas"]) or group["eps"] < 0:
        raise ValueError(f"param group {index}: betas {group['betas']} must each be in [0, 1) and "
                         f"eps {group['eps']} >= 0")


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked "use_muon": True (2-D hidden matrices), AdamW on the others.

    `lr` and `weight_decay` (decoupled, both kinds) are the defaults for groups that do not set their own.
    A Muon group also takes momentum, nesterov and ns_steps; an AdamW group betas and eps. Each group receives
    only its own kind's keys, so a saved state_dict says which hyperparameters each group used."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=MUON_DEFAULTS["momentum"],
                 nesterov=MUON_DEFAULTS["nesterov"], ns_steps=MUON_DEFAULTS["ns_steps"],
                 betas=ADAMW_DEFAULTS["betas"], eps=ADAMW_DEFAULTS["eps"]):
        # set before super().__init__, which calls add_param_group for every group
        self.muon_defaults = {"momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        self.adamw_defaults = {"betas": betas, "eps": eps}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "use_muon": False})

    def add_param_group(self, param_group):
        kind_defaults = self.muon_defaults if param_group.get("use_muon", False) else self.adamw_defaults
        for key, value in kind_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        try:
            check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self.muon_step(group)
            else:
                self.adamw_step(group)
        return loss

    def muon_step(self, group):
        lr, momentum = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            # SGD-style momentum, buf = momentum * buf + grad, rather than the EMA the public Muon keeps:
            # (1 - momentum) times this buffer (and its nesterov mix) is exactly the EMA form, and Newton-Schulz
            # divides out that constant, so both give the same update (up to NS_EPS).
            buf.mul_(momentum).add_(p.grad)
            update = p.grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            # an orthogonal rows x cols matrix has an RMS per entry of 1/sqrt(max(rows, cols)); the factor makes
            # it 1/sqrt(cols) (the fan-in of an nn.Linear weight) for tall and wide alike, as the public Muon does
            update = newton_schulz(update, group["ns_steps"]) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr)

    def adamw_step(self, group):
        """torch.optim.AdamW's own update (decoupled decay, bias-corrected moments) through its functional form,
        fused where torch has the kernel (CPU and CUDA): one pass over each tensor, which matters for the
        embedding tables, the largest tensors of a small model (a loop of elementwise ops costs ~10x more)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        if not params:
            return
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                  [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
              fused=fused, foreach=None if fused else False, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
