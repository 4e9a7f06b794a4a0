"""Per-layer MLP widths for a pruned student, shared out by measured sensitivity (how the CPU recipe's widths
were chosen; numbers in the README).

A uniform student gives every layer the same number of the teacher's MLP neurons, but the layers differ: on
SmolLM2-135M, pruning layer 0's MLP alone to 256 neurons costs 0.61 nats of KL, any other layer 0.03-0.13. So:
1. the teacher's MLP inputs and outputs on FIT windows of the train split, each layer on the teacher's own
   trajectory;
2. per layer, the least-squares elimination curve E_l(k): the error of the best fit on the k neurons the greedy
   elimination keeps (student.LeastSquares.select), for k from the teacher's width down to --floor, 8 at a time;
3. per layer, the KL(teacher || teacher with only that layer's MLP pruned to --sens-width and fit) on --eval
   other train windows: its sensitivity;
4. each layer's KL at width k predicted as KL_l(sens) * E_l(k) / E_l(sens) (to first order the KL grows with the
   MLP's error), and neurons taken 8 at a time from whichever layer's predicted KL rises least, from the teacher's
   widths down to the budget --width x layers.
A layer left at the teacher's width keeps the teacher's MLP; --keep leaves layers whole by hand (the CPU recipe
keeps layer 0: README). Prints the per-layer numbers and the `mlp_layers` / `mlp_hidden` lines for a distill
config, and writes them to --out.

    python bench/bench_widths.py --teacher DIR --data-dir DIR [--width 512 --sens-width 256 --fit 16 --eval 3]
                                 [--keep 0]

Cost: per layer, two least-squares fits and one forward over the --eval windows (its time on this CPU for
SmolLM2-135M: README, Performance).
"""
import argparse
import contextlib
import heapq
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
from data import TokenLoader  # noqa: E402
from hf_interop import load_model  # noqa: E402
from model import make_mlp  # noqa: E402
from runtime import setup_device  # noqa: E402
from student import LeastSquares, prune_mlp, select_and_fit  # noqa: E402

CHUNK = 8  # neurons per elimination round, so the widths stay multiples of 8


def mlp_samples(teacher, windows):
    """{layer: ([normed MLP input (N, C) per window], [MLP output per window])} on the teacher's trajectory."""
    inputs, outputs = {}, {}

    def keep(i):
        def hook(module, args, out):
            inputs.setdefault(i, []).append(args[0].detach())
            outputs.setdefault(i, []).append(out.detach())
        return hook
    hooks = [block.mlp.register_forward_hook(keep(i)) for i, block in enumerate(teacher.blocks)]
    with torch.no_grad():
        for x in windows:
            teacher(x)
    for hook in hooks:
        hook.remove()
    return inputs, outputs


def measure_layer(teacher, i, xs, ys, eval_windows, teacher_hidden, args, env):
    """(the layer's elimination curve {k: error}, KL of the teacher with only this MLP pruned to --sens-width)."""
    mlp = teacher.blocks[i].mlp
    n = mlp.down.weight.shape[1]
    candidates = make_mlp(mlp.down.weight.shape[0], args.kind, n).to(mlp.down.weight)
    prune_mlp(candidates, mlp, torch.arange(n))  # every teacher neuron, as the student's kind computes it
    curve = {}
    LeastSquares(candidates, xs, ys, env, args.ridge).select(args.floor, chunk=CHUNK, curve=curve)
    small = make_mlp(mlp.down.weight.shape[0], args.kind, args.sens_width).to(mlp.down.weight)
    select_and_fit(small, mlp, xs, ys, env, args.ridge)
    teacher.blocks[i].mlp = small
    try:
        result = losses.evaluate(teacher, eval_windows, env, contextlib.nullcontext(), teacher=teacher,
                                 teacher_hidden=teacher_hidden)
    finally:
        teacher.blocks[i].mlp = mlp
    return curve, result["kl"]


def allocate(curves, kls, sens_width, budget, widths, keep=()):
    """Neurons taken CHUNK at a time, from the layers' `widths` (the teacher's), from whichever layer's predicted
    KL rises least, until they sum to `budget`; the layers in `keep` are left whole. Returns {layer: width}."""
    weight = {i: kls[i] / curves[i][sens_width] for i in curves}
    width = dict(widths)
    excess = sum(width.values()) - budget
    rise = lambda i: weight[i] * (curves[i][width[i] - CHUNK] - curves[i][width[i]])
    heap = [(rise(i), i) for i in width if i not in keep and width[i] - CHUNK in curves[i]]
    heapq.heapify(heap)
    while excess > 0:
        if not heap:
            raise SystemExit(f"the budget {budget} is below what --floor allows; lower --floor")
        _, i = heapq.heappop(heap)
        width[i] -= CHUNK
        excess -= CHUNK
        if width[i] - CHUNK in curves[i]:
            heapq.heappush(heap, (rise(i), i))
    return width


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="HF Llama dir, .gguf or a checkpoint of ours")
    parser.add_argument("--data-dir", required=True, help="prepare.py shards made with the teacher's tokenizer")
    parser.add_argument("--width", type=int, default=512, help="the mean width per layer the budget allows")
    parser.add_argument("--kind", default="swiglu", help="the student's MLP kind (its neurons are the teacher's)")
    parser.add_argument("--sens-width", type=int, default=256, help="width of the one-layer prune KL is measured at")
    parser.add_argument("--floor", type=int, default=64, help="no layer gets fewer neurons")
    parser.add_argument("--fit", type=int, default=16, help="train windows of 4 x 256 the fits use")
    parser.add_argument("--eval", type=int, default=3, help="other train windows of 4 x 256 the KL is measured on")
    parser.add_argument("--ridge", type=float, default=1e-4, help="least-squares ridge, as distill.py REFIT_RIDGE")
    parser.add_argument("--keep", type=int, nargs="*", default=[], help="layers that keep the teacher's MLP")
    parser.add_argument("--out", default=os.path.join("bench", "out", "widths.json"))
    args = parser.parse_args()
    if args.width % CHUNK or args.sens_width % CHUNK or args.floor % CHUNK:
        raise SystemExit(f"--width, --sens-width and --floor must be multiples of {CHUNK}")
    if not args.floor <= args.sens_width:
        raise SystemExit(f"--floor {args.floor} must not exceed --sens-width {args.sens_width}")

    env = setup_device("cpu")
    teacher, _ = load_model(args.teacher)
    teacher.eval().requires_grad_(False)
    if any(w % CHUNK for w in teacher.config.mlp_hidden) or args.sens_width >= min(teacher.config.mlp_hidden):
        raise SystemExit(f"the teacher's MLP widths {sorted(set(teacher.config.mlp_hidden))} must be multiples of "
                         f"{CHUNK} and above --sens-width {args.sens_width}")
    if any(not 0 <= i < teacher.config.n_layer for i in args.keep):
        raise SystemExit(f"--keep {args.keep}: the teacher has layers 0..{teacher.config.n_layer - 1}")
    loader = TokenLoader(args.data_dir, "train", 4, 256, vocab_size=teacher.config.vocab_size)
    window = 4 * 256
    whole = (loader.total - 1) // window
    fit_windows = [x for x, _ in loader.spread_windows(args.fit)]
    # halfway between two fit windows (spread_windows puts fit window j at j * whole // fit), so the KL is not
    # measured on the tokens the fits saw
    between = [int((k * args.fit // args.eval + 0.5) * whole / args.fit) for k in range(args.eval)]
    if whole < 2 * args.fit or args.eval > args.fit:
        raise SystemExit(f"the train split has {whole} windows of 4 x 256: too few for --fit {args.fit} and --eval "
                         f"{args.eval} apart (at least 2 x --fit, and --eval <= --fit)")
    eval_windows = [loader.window_at(start * window) for start in between]
    teacher_hidden = losses.teacher_val_hidden(teacher, eval_windows, contextlib.nullcontext())
    inputs, outputs = mlp_samples(teacher, fit_windows)

    curves, kls, t0 = {}, {}, time.perf_counter()
    for i in range(teacher.config.n_layer):
        curves[i], kls[i] = measure_layer(teacher, i, inputs.pop(i), outputs.pop(i), eval_windows, teacher_hidden,
                                          args, env)
        print(f"layer {i:2d} | KL with only this MLP pruned to {args.sens_width}: {kls[i]:.4f} | fit error at "
              f"{args.sens_width} / at full width: {curves[i][args.sens_width]:.4g} / "
              f"{curves[i][max(curves[i])]:.4g} | {time.perf_counter() - t0:.0f}s", flush=True)
    widths = allocate(curves, kls, args.sens_width, args.width * teacher.config.n_layer,
                      dict(enumerate(teacher.config.mlp_hidden)), set(args.keep))
    new = [i for i in sorted(widths) if widths[i] != teacher.config.mlp_hidden[i]]
    record = {"mlp_layers": new, "mlp_hidden": [widths[i] for i in new], "widths": [widths[i] for i in sorted(widths)],
              "kl_at_sens_width": kls, "settings": vars(args)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"widths per layer: {record['widths']} (sum {sum(record['widths'])})\n"
          f"mlp_layers: {record['mlp_layers']}\nmlp_hidden: {record['mlp_hidden']}\n-> {args.out}")


if __name__ == "__main__":
    main()
