"""Run train_loha_sdxl.py as a real, separate process with a fault injected, for tests/test_faults.py.

    LOHA_FAULT=... python tests/fault_inject.py [train_loha_sdxl.py flags...]
    python tests/fault_inject.py --zygote     # serve runs: one JSON request per stdin line, each run forked

The script is not changed: its file-system calls are wrapped here. Every file event (a temp folder made,
torch.save, Path.write_bytes/write_text, os.fsync, os.replace, the atomic folder exchange, shutil.rmtree)
whose path is under the
output dir is counted, and the fault fires just before the n-th one whose path contains a substring:

    kill:<substring>:<n>      SIGKILL this process (nothing is flushed, nothing cleaned up)
    enospc:<substring>:<n>    raise OSError(ENOSPC), as a full disk does at a Python write
    killstep:<n>              SIGKILL inside the n-th optimizer step (after backward)
    infloss:<n>               the n-th call of F.mse_loss (the n-th batch's loss) returns +inf
    nanloss:<n>[,<n>...]      the n-th batch's training loss (train_loha_sdxl.training_loss) is NaN

In-process tests use ``poisoned_losses`` and ``signals_after_update`` the same way, through monkeypatch.

With a trace file, each event is appended as a JSON line, and after every optimizer update a digest of
the trainable parameters and the optimizer state.

--zygote imports torch, diffusers, transformers and the script once (about 5 s of a 2-core machine's
time per run) and forks a fresh child per run; it never computes anything itself, so the fork is safe.
Each child is a separate process that is SIGKILLed or exits on its own, exactly as a plain one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "train_loha_sdxl.py"


def install(fault: str, trace_file: str | None, output_dir: str):
    """Wrap the file-system calls and the optimizer of this process."""
    output_dir = str(Path(output_dir).resolve())
    counts: dict[str, int] = {}

    def trace(row: dict):
        if trace_file:
            with open(trace_file, "a") as f:
                f.write(json.dumps(row) + "\n")

    def event(kind: str, path) -> None:
        path = os.path.abspath(str(path))
        if not path.startswith(output_dir):
            return
        trace({"event": kind, "path": path})
        action, _, rest = fault.partition(":")
        if action not in ("kill", "enospc"):
            return
        substring, _, n = rest.rpartition(":")
        if substring not in path:
            return
        counts[substring] = counts.get(substring, 0) + 1
        if counts[substring] != int(n):
            return
        trace({"event": f"fault:{action}", "path": path})
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    def wrap(owner, name, path_of, after=False):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if not after:
                event(name, path_of(*args, **kwargs))
            result = original(*args, **kwargs)
            if after:
                event(name, path_of(result, *args, **kwargs))
            return result

        setattr(owner, name, wrapper)

    def fd_path(fd, *_):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    wrap(tempfile, "mkdtemp", lambda result, *a, **k: result, after=True)
    wrap(torch, "save", lambda obj, f, *a, **k: f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", ""))
    wrap(Path, "write_bytes", lambda self, *a, **k: self)
    wrap(Path, "write_text", lambda self, *a, **k: self)
    wrap(os, "fsync", fd_path)
    wrap(os, "replace", lambda src, dst, *a, **k: f"{os.path.abspath(src)} -> {os.path.abspath(dst)}")
    wrap(shutil, "rmtree", lambda path, *a, **k: path)
    import loha.formats  # the atomic exchange that replaces an existing output folder

    wrap(loha.formats, "_exchange_paths", lambda a, b: f"{os.path.abspath(a)} <-> {os.path.abspath(b)}")

    if trace_file:
        original_zero_grad = torch.optim.AdamW.zero_grad

        def zero_grad(self, set_to_none: bool = True):  # once per update, skipped or not (accelerate
            original_zero_grad(self, set_to_none=set_to_none)  # looks for set_to_none in the signature)
            trace({"event": "update", "digest": digest(self)})

        torch.optim.AdamW.zero_grad = zero_grad

    if fault.startswith("infloss:"):
        import torch.nn.functional as F

        original_mse, calls, target = F.mse_loss, [0], int(fault.split(":")[1])

        def mse_loss(*args, **kwargs):
            calls[0] += 1
            loss = original_mse(*args, **kwargs)
            return loss * float("inf") if calls[0] == target else loss

        F.mse_loss = mse_loss

    if fault.startswith("nanloss:"):
        import train_loha_sdxl

        train_loha_sdxl.training_loss = poisoned_losses(train_loha_sdxl.training_loss,
                                                        {int(n) for n in fault.split(":")[1].split(",")})

    if fault.startswith("killstep:"):
        original_step, steps, target = torch.optim.AdamW.step, [0], int(fault.split(":")[1])

        def step(self, *args, **kwargs):
            steps[0] += 1
            if steps[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step


def poisoned_losses(training_loss, calls: set[int]):
    """``training_loss`` whose n-th call (1-based; with no accumulation, update n's batch) returns NaN."""
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        loss = training_loss(*args, **kwargs)
        return loss * float("nan") if count[0] in calls else loss

    return wrapped


def signals_after_update(train_one_update, update: int, signals: list):
    """``train_one_update`` that sends this process ``signals`` right after its ``update``-th call: a Ctrl-C (or
    two) arriving during that step."""
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        result = train_one_update(*args, **kwargs)
        if count[0] == update:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return result

    return wrapped


def digest(optimizer) -> str:
    """sha256 over the parameters and every optimizer state tensor (exp_avg, exp_avg_sq, step)."""
    h = hashlib.sha256()
    for group in optimizer.param_groups:
        for p in group["params"]:
            h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                h.update(key.encode())
                if isinstance(value, torch.Tensor):
                    h.update(value.detach().cpu().float().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def output_dir_of(argv: list[str]) -> str:
    return argv[argv.index("--output_dir") + 1] if "--output_dir" in argv else "/nonexistent"


def run_script(argv: list[str]) -> int:
    """What `python train_loha_sdxl.py argv` does: main()'s return value, or 1 and a traceback."""
    import train_loha_sdxl

    sys.argv = [str(SCRIPT), *argv]
    try:
        return train_loha_sdxl.main(argv) or 0
    except SystemExit as e:  # argparse, or sys.exit("message")
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def serve():
    """Fork one child per request line {"argv", "env", "cwd", "stdout", "stderr", "timeout"}; answer
    {"status": exit code, or -9 when killed}. A child still running at its timeout is SIGKILLed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    import train_loha_sdxl  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                os.chdir(request["cwd"])
                os.environ.update(request["env"])
                for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                install(request["env"].get("LOHA_FAULT", ""), request["env"].get("LOHA_FAULT_TRACE") or None,
                        output_dir_of(request["argv"]))
                code = run_script(request["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + request["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status), "timed_out": time.monotonic() > deadline}),
              flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(SCRIPT.parent))
    if sys.argv[1:] == ["--zygote"]:
        serve()
    else:
        install(os.environ.get("LOHA_FAULT", ""), os.environ.get("LOHA_FAULT_TRACE") or None,
                output_dir_of(sys.argv[1:]))
        sys.exit(run_script(sys.argv[1:]))
