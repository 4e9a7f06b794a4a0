"""Test-only fault injection: run one of the repo's scripts exactly as `python SCRIPT ARGS` would, and kill or
poison it at a named point. The scripts have no branches for this; the hooks wrap os functions and model.py's forwards from outside.

    python tests/faults.py FAULT SCRIPT [ARGS...]

FAULT is KIND:PATTERN@N (PATTERN a regex on a file's base name, N the 1-based count of matching events, default 1):

    torn_temp:PATTERN@N     the Nth rename of a temp file whose target matches: the temp file is cut to half its
                            bytes and the process SIGKILLs itself before the rename (a kill mid-write)
    after_rename:PATTERN@N  the Nth rename onto a matching name happens, then SIGKILL (e.g. a checkpoint's .pt is
                            in place but its .json mark is not)
    after_remove:PATTERN@N  the Nth removal of a matching file happens, then SIGKILL (e.g. mid-prune)
    nan_forward:CLASS@N     the Nth forward with gradients on of model.py's CLASS (default GPT) returns NaN (a
                            diverged step; e.g. nan_forward:PlainMLP for distill's phase 1)
    kill_eval:CLASS@N       the Nth forward with gradients off (an eval batch) SIGKILLs the process
"""
import os
import re
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_fault(spec):
    match = re.fullmatch(r"(torn_temp|after_rename|after_remove|nan_forward|kill_eval)(?::(.+?))?(?:@(\d+))?", spec)
    if match is None:
        raise SystemExit(f"faults.py: cannot read fault {spec!r}; expected KIND:PATTERN@N (see the docstring)")
    kind, pattern, count = match.groups()
    return kind, pattern, int(count or 1)


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(kind, pattern, count):
    seen = [0]

    def due(path):
        if not re.search(pattern or ".*", os.path.basename(str(path))):
            return False
        seen[0] += 1
        return seen[0] == count

    if kind in ("torn_temp", "after_rename"):
        real_replace = os.replace

        def replace(src, dst, **kwargs):
            if due(dst):
                if kind == "torn_temp":
                    os.truncate(src, os.path.getsize(src) // 2)
                    die()
                real_replace(src, dst, **kwargs)
                die()
            return real_replace(src, dst, **kwargs)

        os.replace = replace
    elif kind == "after_remove":
        real_remove = os.remove

        def remove(path, **kwargs):
            real_remove(path, **kwargs)
            if due(path):
                die()

        os.remove = remove
    else:
        import torch

        import model

        module = getattr(model, pattern or "GPT")
        real_forward = module.forward

        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled() == (kind == "nan_forward"):
                seen[0] += 1
                if seen[0] == count:
                    if kind == "kill_eval":
                        die()
                    return real_forward(self, *args, **kwargs) * float("nan")
            return real_forward(self, *args, **kwargs)

        module.forward = forward


if __name__ == "__main__":
    fault, script, *args = sys.argv[1:]
    sys.path.insert(0, REPO)
    install(*parse_fault(fault))
    sys.argv = [os.path.join(REPO, script), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")
