"""The distillation student: the teacher's GPTConfig with per-layer changes (MLP kind and width, sliding-window
attention), built from the teacher's weights, and which of its parameters train in each phase."""
import dataclasses

import torch

from config import ConfigError
from model import GPT, GPTConfig


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
                   full_attn_layers=()):
    """The teacher's GPTConfig with the per-layer MLP and attention-window changes (mlp_kind "keep": the
    teacher's MLPs)."""
    n = teacher_config.n_layer
    fields = dataclasses.asdict(teacher_config)
    if mlp_kind != "keep":
        for i in check_layers("mlp_layers", range(n) if mlp_layers is None else mlp_layers, n):
            # half the teacher's width, on a multiple of 8 so the matmuls stay on fast kernel shapes
            fields["mlp_hidden"][i] = mlp_hidden or teacher_config.mlp_hidden[i] // 2 // 8 * 8
            fields["mlp_kind"][i] = mlp_kind
    if window is not None:
        keep_full = set(check_layers("full_attn_layers", full_attn_layers, n))
        fields["window"] = [None if i in keep_full else window for i in range(n)]
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
    return {"decoder": [block.mlp_norm, block.mlp], "attn": [block.attn_norm, block.attn], "block": [block]}[target]


def phase2_target(student, train_params):
    """What phase 2 trains: all | blocks (not embeddings, head, final norm) | mlp | attn."""
    return {"all": [student], "blocks": list(student.blocks), "mlp": [b.mlp for b in student.blocks],
            "attn": [b.attn for b in student.blocks]}[train_params]
