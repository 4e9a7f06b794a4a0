"""Where a script runs: the device, torchrun's process group, the precision, and printing on rank 0."""
import contextlib
import ctypes
import os
import platform
import types

import torch
from tqdm import tqdm


def is_rank0():
    # torchrun sets RANK before the process group exists, so this holds from the first line of a script
    return int(os.environ.get("RANK", "0")) == 0


def say(*args):
    """Print on rank 0 only, above any tqdm bar."""
    if is_rank0():
        tqdm.write(" ".join(str(a) for a in args))


def setup_device(device="auto"):
    """Initialise torch.distributed when launched by torchrun, and pick the device.

    Returns a SimpleNamespace with device, device_type, rank, local_rank, world_size, is_master and ddp.
    On CUDA and ROCm (which PyTorch also calls "cuda") the backend is NCCL/RCCL; on CPU it is gloo. On a GPU,
    fp32 matmuls outside autocast may use TF32: the precision every script here wants there.
    """
    ddp = int(os.environ.get("RANK", "-1")) != -1
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"device '{device}' requested but torch sees no CUDA/ROCm GPU "
                             f"(torch {torch.__version__}); use --device cpu")
        if ddp:
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    else:
        keep_freed_memory()
    if ddp and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend, device_id=torch.device(device)
                                             if backend == "nccl" else None)
    return types.SimpleNamespace(device=device, device_type="cuda" if device.startswith("cuda") else "cpu",
                                 rank=rank, local_rank=local_rank, world_size=world_size,
                                 is_master=rank == 0, ddp=ddp)


def keep_freed_memory():
    """On CPU, tell glibc's malloc to keep freed blocks for reuse instead of handing them back to the OS.

    By default a block over a threshold (128 KiB, rising with use to at most 32 MiB) is its own mmap, unmapped on
    free, and the heap's freed top is trimmed past 128 KiB: each training step then page-faults its activations
    and vocab-wide logit chunks back in, zeroed by the kernel. Keeping them: the CPU recipe's phase-2 step
    1.23x faster for 11% more peak RSS, flat over 100 steps (bench/bench_allocator.py; README Performance). A no-op off
    glibc (macOS, musl), where mallopt does not exist or means something else."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)  # only blocks over 1 GiB are mapped on their own
    libc.mallopt(m_trim_threshold, 2 ** 31 - 1)  # the heap's freed top is not given back (the int maximum)


def shutdown(env):
    """End DDP on every rank (each caller is a point all ranks reach). The barrier first: a gloo rank that tears
    down while its peer is still finishing (rank 0 writing the last files) can abort at exit, "terminate called
    without an active exception", seen once in 4 runs of the 2-process Muon test."""
    if env.ddp and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def resolve_dtype(dtype, device_type):
    """'auto' -> bf16 on a GPU that supports it, fp32 otherwise (bf16 matmuls on CPU are very slow)."""
    if dtype == "auto":
        if device_type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise SystemExit(f"unknown dtype '{dtype}'; expected one of auto, {', '.join(table)}")
    return table[dtype]


def autocast(device_type, dtype):
    """Mixed precision context: weights stay fp32, matmuls run in `dtype`. A no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def all_reduce_mean(value, env):
    """Average a Python float over DDP ranks (identity without DDP)."""
    if not env.ddp:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(t)
    return t.item() / env.world_size


def all_reduce_sum(tensors, env):
    """Sum each tensor over DDP ranks in place (nothing without DDP): statistics every rank must agree on."""
    if env.ddp:
        for t in tensors:
            torch.distributed.all_reduce(t)


def peak_flops(device):
    """Peak dense bf16 FLOP/s of the GPU if we know it exactly, else None (no MFU beats a wrong MFU)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).lower()
    table = [("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l40s", 362e12), ("a10g", 125e12),
             ("4090", 165e12), ("3090", 71e12), ("mi300x", 1307e12), ("mi250x", 383e12)]
    for key, flops in table:
        if key in name:
            return flops
    return None
