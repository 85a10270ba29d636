"""Faults a long training run meets, each survived with nothing lost (issue 6).

Every run here is a real, separate ``train_loha_sdxl.py`` process on the tiny SDXL pipeline (CPU, 64 px,
rank 2), forked from a "zygote" that imported torch/diffusers once (tests/fault_inject.py; this is what
keeps a run under a second). Faults are injected by wrapping the script's file-system calls, without
changing the script: SIGKILL just before the n-th file event of a checkpoint, ENOSPC at a write, SIGKILL
inside an optimizer step, an infinite loss. A real full disk (a small tmpfs in a private mount namespace)
is used where the machine allows it. Longer variants (every kill point, more random kill steps, the
final outputs, fp16 streaks) are marked slow.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from reliability import record

from loha.runs import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_loha_sdxl.py"
INJECT = REPO / "tests" / "fault_inject.py"
AREA_KILL, AREA_DISK, AREA_NAN, AREA_DATA, AREA_ARGS = (
    "kill -9", "disk full", "non-finite loss", "training data", "script inputs")

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="train_loha_sdxl.py is not written yet")


# ----------------------------------------------------------------------------------- running the script
class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str, out: Path, trace: Path | None):
        self.returncode, self.stdout, self.stderr, self.out = returncode, stdout, stderr, out
        self.trace = [json.loads(line) for line in trace.read_text().splitlines()] if trace and trace.exists() else []

    @property
    def killed(self) -> bool:
        return self.returncode == -9

    def error_line(self) -> str:
        """The one 'error: ...' line a failed run must print, and no traceback."""
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, self.stderr[-3000:]
        return errors[0]

    def digests(self) -> list[str]:
        return [row["digest"] for row in self.trace if row["event"] == "update"]

    def events(self, substring: str) -> list[dict]:
        return [row for row in self.trace if row["event"] != "update" and substring in row["path"]]


class Zygote:
    """tests/fault_inject.py --zygote: imports the heavy libraries once, forks one process per run."""

    def __init__(self, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, str(INJECT), "--zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert json.loads(self.proc.stdout.readline() or "{}").get("ready"), log.read_text()[-3000:]

    def run(self, argv, env, cwd, stdout, stderr, timeout) -> int:
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr),
                   "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert not answer["timed_out"], f"the run did not finish in {timeout} s"
        return answer["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def train_env(tiny_pipeline_dir, tmp_path_factory):
    """Six small photos with one caption, a feature cache shared by every run of this module, and the
    zygote that starts the runs."""
    data = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(6):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a photo of sks"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    zygote = Zygote(tmp_path_factory.mktemp("zygote") / "log.txt")
    yield {"model": tiny_pipeline_dir, "data": data, "cache": tmp_path_factory.mktemp("features"), "zygote": zygote}
    zygote.close()


def run_training(env, out: Path, *flags, fault: str | None = None, trace: bool = True, steps=4, every=2,
                 data: Path | None = None, dataset_name: Path | None = None, wrapper: list[str] | None = None,
                 timeout=300) -> Result:
    """One train_loha_sdxl.py process (forked by the zygote, or under `wrapper` as a plain subprocess)."""
    logs = out.parent if out.parent.is_dir() and os.access(out.parent, os.W_OK) else Path(tempfile.mkdtemp())
    trace_file, stdout, stderr = (logs / f"{out.name}.{kind}" for kind in ("trace.jsonl", "stdout", "stderr"))
    trace_file.unlink(missing_ok=True)
    flags = ["--pretrained_model_name_or_path", str(env["model"]),
             *(["--dataset_name", str(dataset_name)] if dataset_name else
               ["--train_data_dir", str(data or env["data"])]),
             "--output_dir", str(out), "--resolution", "64",
             "--train_batch_size", "2", "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
             "--rank", "2", "--learning_rate", "1e-2", "--report_to", "none", "--seed", "0",
             "--feature_cache_dir", str(env["cache"]), *flags]
    environ = {"HF_HUB_OFFLINE": "1", "LOHA_FAULT": fault or "", "LOHA_FAULT_TRACE": str(trace_file) if trace else ""}
    if wrapper is None:
        returncode = env["zygote"].run(flags, environ, logs, stdout, stderr, timeout)
    else:
        environ = {k: v for k, v in os.environ.items() if k != "LOHA_RELIABILITY_LOG"} | environ
        with stdout.open("w") as o, stderr.open("w") as e:
            returncode = subprocess.run([*wrapper, sys.executable, str(INJECT), *flags], stdout=o, stderr=e,
                                        timeout=timeout, env=environ, cwd=logs).returncode
    return Result(returncode, stdout.read_text(), stderr.read_text(), out, trace_file if trace else None)


def tensors(path: Path) -> dict:
    return safetensors.torch.load_file(path)


def assert_same_tensors(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:2]}"


def optimizer_state(checkpoint: Path) -> dict:
    # our own file from a run we just made: safe to unpickle, weights only
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)


def assert_same_optimizer(a: Path, b: Path):
    sa, sb = optimizer_state(a)["state"], optimizer_state(b)["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)


def _tidy(name: str) -> str:
    """.checkpoint-4.tmp-k2j3h4 -> .checkpoint-4.tmp-* (the random part differs from run to run)."""
    return re.sub(r"\.(tmp|old)-\w+", r".\1-*", name)


def snapshot(directory: Path) -> dict[str, object]:
    """Every file's content; a safetensors file as (metadata, tensors), since its header's key order
    varies from process to process. run_args.json is left out: it records the run's flags, and the fault
    tests' runs differ from the reference by the flags under test."""
    def content(p: Path):
        if p.suffix != ".safetensors":
            return p.read_bytes()
        with safetensors.safe_open(p, "pt") as f:
            return sorted((f.metadata() or {}).items()), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
    return {str(p.relative_to(directory)): content(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "run_args.json"}


def complete_checkpoints(out: Path) -> list[str]:
    """What train_loha_sdxl.py itself would resume from, newest last."""
    sys.path.insert(0, str(REPO))
    try:
        import train_loha_sdxl
    finally:
        sys.path.remove(str(REPO))
    return [p.name for _, p in train_loha_sdxl.list_checkpoints(out)]


@pytest.fixture(scope="module")
def reference(train_env, tmp_path_factory) -> Result:
    """The uninterrupted run every fault is compared with: 4 steps, checkpoints at 2 and 4."""
    result = run_training(train_env, tmp_path_factory.mktemp("reference") / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert complete_checkpoints(result.out) == ["checkpoint-2", "checkpoint-4"]
    return result


# ----------------------------------------------------------------------------------- kill -9 during a save
def kill_during_checkpoint(train_env, reference, tmp_path, n: int) -> tuple[Result, str]:
    """SIGKILL just before the n-th file event of writing checkpoint-4; check what is left; return it."""
    events = reference.events("checkpoint-4")
    out = tmp_path / f"kill{n}" / "out"
    out.parent.mkdir()
    killed = run_training(train_env, out, fault=f"kill:checkpoint-4:{n}")
    assert killed.killed, killed.stderr[-3000:]
    event = events[n - 1]
    point = (f"{'just after' if event['event'] == 'mkdtemp' else 'just before'} {event['event']} "
             f"{_tidy(Path(event['path'].split(' -> ')[-1]).name)}")
    # the previous checkpoint is intact, byte for byte; nothing partial carries a checkpoint-N name
    assert snapshot(out / "checkpoint-2") == snapshot(reference.out / "checkpoint-2")
    latest = complete_checkpoints(out)
    assert latest == ["checkpoint-2"], latest
    assert not (out / "checkpoint-4").exists()
    assert not (out / "unet").exists() and not (out / "loha.safetensors").exists()
    leftovers = sorted(_tidy(p.name) for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)
    return killed, f"{point}: checkpoint-2 intact, latest = checkpoint-2, leftovers {leftovers or 'none'}"


def resume_and_compare(train_env, reference, out: Path) -> str:
    had_checkpoint = bool(complete_checkpoints(out))
    resumed = run_training(train_env, out, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("resumed from" in resumed.stdout + resumed.stderr) == had_checkpoint
    assert_same_tensors(out / "unet" / "adapter_model.safetensors",
                        reference.out / "unet" / "adapter_model.safetensors")
    assert_same_tensors(out / "loha.safetensors", reference.out / "loha.safetensors")
    assert_same_optimizer(out / "checkpoint-4", reference.out / "checkpoint-4")
    abandoned = [p.name for p in out.glob(".checkpoint-*.tmp-*")]
    assert not abandoned, f"temp folders of killed checkpoint writes are never cleaned up: {abandoned}"
    return ("resume latest -> final adapter and optimizer state bitwise equal to the uninterrupted run; "
            "the killed write's temp folder removed")


def _kill_points(reference) -> dict[str, int]:
    events = reference.events("checkpoint-4")
    return {"temp folder just made": 1,
            "accelerate state half written": next(i for i, e in enumerate(events, 1) if e["event"] == "save"),
            "all written and fsynced, rename pending": next(
                i for i, e in enumerate(events, 1) if e["event"] == "replace" and e["path"].endswith("/checkpoint-4"))}


@pytest.mark.parametrize("point", ["temp folder just made", "accelerate state half written",
                                   "all written and fsynced, rename pending"])
def test_kill_during_checkpoint_write_then_resume(train_env, reference, tmp_path, point):
    n = _kill_points(reference)[point]
    killed, what = kill_during_checkpoint(train_env, reference, tmp_path, n)
    if point.startswith("all written"):  # the most complete-looking partial state
        what += "; " + resume_and_compare(train_env, reference, killed.out)
    record(AREA_KILL, f"SIGKILL while writing checkpoint-4: {point} (file event {n} of "
                      f"{len(reference.events('checkpoint-4'))})", what)


@pytest.mark.slow
def test_kill_at_every_point_of_a_checkpoint_write(train_env, reference, tmp_path):
    events = reference.events("checkpoint-4")
    for n in range(1, len(events) + 1):
        killed, what = kill_during_checkpoint(train_env, reference, tmp_path, n)
        what += "; " + resume_and_compare(train_env, reference, killed.out)
        record(AREA_KILL, f"SIGKILL while writing checkpoint-4, at file event {n} of {len(events)}", what)


@pytest.mark.slow
def test_kill_during_final_output_write(train_env, reference, tmp_path):
    """The kohya file is written last: killing just before its rename leaves no loha.safetensors at all,
    never a partial one; resuming finishes the run with the same file."""
    out = tmp_path / "out"
    events = reference.events("loha.safetensors")
    n = next(i for i, e in enumerate(events, 1) if e["event"] == "replace")
    killed = run_training(train_env, out, fault=f"kill:loha.safetensors:{n}")
    assert killed.killed
    assert not (out / "loha.safetensors").exists()
    assert_same_tensors(out / "unet" / "adapter_model.safetensors",
                        reference.out / "unet" / "adapter_model.safetensors")
    leftovers = sorted(_tidy(p.name) for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)
    assert complete_checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    resumed = run_training(train_env, out, "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_tensors(out / "loha.safetensors", reference.out / "loha.safetensors")
    assert not list(out.glob(".loha.safetensors.tmp-*")), "the killed write's temp file is never cleaned up"
    record(AREA_KILL, "SIGKILL just before loha.safetensors (final kohya file) is renamed into place",
           f"no loha.safetensors (never a partial one); unet/ complete; leftovers {leftovers}; resume latest "
           "rewrites the same file and removes the leftover")


@pytest.mark.slow
@pytest.mark.parametrize("event,expect", [(6, "previous"), (7, "new")])
def test_kill_around_the_exchange_that_replaces_an_existing_output(train_env, reference, tmp_path, event, expect):
    """Replacing an existing unet/ is one atomic exchange (renameat2): a kill just before it leaves the
    previous unet/ whole, a kill just after it (before the old copy is deleted) the new one whole; there
    is no moment without a unet/."""
    out = tmp_path / "out"
    shutil.copytree(reference.out, out)
    previous = out / "unet" / "adapter_model.safetensors"
    marked = {k: t + 1 for k, t in tensors(previous).items()}  # so the two versions can be told apart
    safetensors.torch.save_file(marked, previous, metadata={"format": "pt"})
    # a finished run resumed again: no training left, so only the final outputs are rewritten
    run = run_training(train_env, out, "--resume_from_checkpoint", "latest", fault=f"kill:{out}/.unet.tmp-:{event}")
    assert run.killed
    before_kill = run.trace[-2]["event"]
    assert before_kill == ("_exchange_paths" if expect == "previous" else "rmtree"), run.trace[-3:]
    expected = marked if expect == "previous" else safetensors.torch.load_file(
        reference.out / "unet" / "adapter_model.safetensors")
    got = safetensors.torch.load_file(out / "unet" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert (out / "unet" / "adapter_config.json").is_file()
    record(AREA_KILL, f"SIGKILL just {'before' if expect == 'previous' else 'after'} the atomic exchange that "
           "replaces an existing unet/", f"unet/ is the {expect} version, whole; no moment without a unet/")


@pytest.mark.parametrize("when", ["before the rename out of sight", "during the delete"])
def test_kill_while_pruning_an_old_checkpoint(train_env, reference, tmp_path, when):
    """--checkpoints_total_limit 1: after checkpoint-4 is complete, checkpoint-2 is renamed to a hidden
    temp name and then deleted. Killed at either point, no torn folder carries a checkpoint-N name, the
    next start removes the leftover, and resuming ends exactly as the uninterrupted run."""
    out = tmp_path / "out"
    n = 1 if when.startswith("before") else 2  # event 1: the rename (os.replace), event 2: the rmtree
    killed = run_training(train_env, out, "--checkpoints_total_limit", "1",
                          fault=f"kill:.checkpoint-2.tmp-pruned:{n}")
    assert killed.killed, killed.stderr[-3000:]
    assert snapshot(out / "checkpoint-4") == snapshot(reference.out / "checkpoint-4")
    hidden = out / ".checkpoint-2.tmp-pruned"
    if n == 1:
        assert complete_checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not hidden.exists()
        assert snapshot(out / "checkpoint-2") == snapshot(reference.out / "checkpoint-2")
    else:
        assert complete_checkpoints(out) == ["checkpoint-4"] and hidden.is_dir()
        shutil.rmtree(hidden / "unet")  # as if the delete had got this far: still never a checkpoint-N
        assert complete_checkpoints(out) == ["checkpoint-4"]
    what = resume_and_compare(train_env, reference, out)
    assert not hidden.exists()
    record(AREA_KILL, f"SIGKILL while pruning checkpoint-2 (--checkpoints_total_limit 1), {when}",
           f"latest = checkpoint-4, byte-identical to the uninterrupted run's; "
           f"{'checkpoint-2 still whole' if n == 1 else 'only a hidden .checkpoint-2.tmp-pruned left'}; {what}; "
           "leftover removed at the next start")


@pytest.mark.parametrize("seed", [5, pytest.param(2, marks=pytest.mark.slow), pytest.param(0, marks=pytest.mark.slow)])
def test_kill_at_a_random_step_then_resume(train_env, reference, tmp_path, seed):
    step = random.Random(seed).randint(1, 4)
    out = tmp_path / "out"
    killed = run_training(train_env, out, fault=f"killstep:{step}")
    assert killed.killed
    assert complete_checkpoints(out) == (["checkpoint-2"] if step > 2 else [])
    what = resume_and_compare(train_env, reference, out)
    record(AREA_KILL, f"SIGKILL inside optimizer step {step} (random, seed {seed})", what)


def test_a_partial_checkpoint_is_never_latest(train_env, reference, tmp_path):
    """Hand-made partial folders (an interrupted copy, a crash of an older version) are never resumed."""
    out = tmp_path / "out"
    shutil.copytree(reference.out / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(reference.out / "checkpoint-4", out / "checkpoint-9")
    (out / "checkpoint-9" / "training_state.json").unlink()  # the last file a checkpoint gets
    weights = out / "checkpoint-9" / "unet" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # and a torn adapter
    shutil.copytree(reference.out / "checkpoint-4", out / ".checkpoint-12.tmp-abc")
    (out / "checkpoint-x").mkdir()
    assert complete_checkpoints(out) == ["checkpoint-2"]
    sys.path.insert(0, str(REPO))
    try:
        import infer
        path, _ = infer.resolve_checkpoint(out)
    finally:
        sys.path.remove(str(REPO))
    assert path.name == "checkpoint-2"
    record(AREA_KILL, "checkpoint-9 (torn adapter, no training_state.json), .checkpoint-12.tmp-*, checkpoint-x "
                      "beside checkpoint-2", f"train's latest = checkpoint-2; infer.py picks {path.name}")


# ----------------------------------------------------------------------------------- disk full
def test_disk_full_at_a_checkpoint_write(train_env, reference, tmp_path):
    """ENOSPC injected at the adapter write inside checkpoint-4 (a Python write raises OSError ENOSPC)."""
    out = tmp_path / "out"
    events = reference.events("checkpoint-4")
    n = next(i for i, e in enumerate(events, 1) if e["event"] == "write_bytes")
    full = run_training(train_env, out, fault=f"enospc:checkpoint-4:{n}")
    line = full.error_line()
    assert full.returncode != 0 and "No space left on device" in line
    assert snapshot(out / "checkpoint-2") == snapshot(reference.out / "checkpoint-2")
    assert complete_checkpoints(out) == ["checkpoint-2"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-4")], "temp folder left behind"
    assert not (out / "unet").exists() and not (out / "loha.safetensors").exists()
    record(AREA_DISK, "ENOSPC injected at the adapter write of checkpoint-4",
           f"exit {full.returncode}, {line!r}; checkpoint-2 intact and latest; no temp folder left")


def _can_mount_tmpfs(tmp_path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


def _pages(path: Path) -> int:
    """Bytes a tmpfs charges for the files under ``path`` (whole 4 KiB pages)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files)


@pytest.mark.parametrize("stage", ["checkpoint-4", pytest.param("final outputs", marks=pytest.mark.slow)])
def test_disk_full_on_a_real_small_filesystem(train_env, reference, tmp_path, stage):
    """A real full disk: a tmpfs in a private mount namespace (unshare -rm), sized from the reference run
    to fill up half-way through `stage`, so the errors are the ones torch.save and safetensors really
    raise. The folder is copied out before the namespace ends."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    ref = reference.out
    size = _pages(ref / "checkpoint-2") + (_pages(ref / "checkpoint-4") // 2 if stage == "checkpoint-4" else
                                           _pages(ref / "checkpoint-4") + _pages(ref / "unet") // 2)
    small, copy = tmp_path / "small", tmp_path / "copy"
    small.mkdir()
    copy.mkdir()
    wrapper = ["unshare", "-rm", "sh", "-c",
               f'mount -t tmpfs -o size={size} tmpfs {small} && "$@"; rc=$?; cp -a {small}/. {copy}/; exit $rc', "sh"]
    full = run_training(train_env, small / "out", wrapper=wrapper, trace=False)
    out = copy / "out"
    line = full.error_line()
    assert full.returncode != 0 and str(small / "out") in line, line
    assert "No space left on device" in line or "disk full" in line, line
    assert snapshot(out / "checkpoint-2") == snapshot(ref / "checkpoint-2")
    assert complete_checkpoints(out) == (["checkpoint-2"] if stage == "checkpoint-4" else
                                         ["checkpoint-2", "checkpoint-4"])
    final_names = [p.name for p in out.iterdir() if not p.name.startswith(".") and not p.name.startswith("checkpoint-")]
    for name in final_names:  # whatever carries a final name must be whole
        if name == "unet":
            assert_same_tensors(out / "unet" / "adapter_model.safetensors", ref / "unet" / "adapter_model.safetensors")
        elif name == "loha.safetensors":
            assert_same_tensors(out / name, ref / name)
    leftovers = sorted(_tidy(p.name) for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)
    record(AREA_DISK, f"real {size // 1024} KiB tmpfs, full during {stage}",
           f"exit {full.returncode}, {line!r}; checkpoint-2 intact and complete; final names present: "
           f"{final_names or 'none'} (each whole); leftovers {leftovers or 'none'}")


# ----------------------------------------------------------------------------------- non-finite loss
@pytest.mark.parametrize("precision, poison", [("bf16", "NaN"), ("fp16", "Inf")])
def test_one_nonfinite_batch_is_skipped_cleanly(train_env, tmp_path, precision, poison):
    """Update 2's loss is NaN (fault_inject's nanloss) or +Inf (fault_inject makes the 2nd
    batch's mse_loss infinite): the update is skipped, the parameters and optimizer state after it equal
    the state before it (as if that batch never existed), training goes on, and the skip is warned about
    and counted."""
    out = tmp_path / "out"
    if poison == "NaN":
        run = run_training(train_env, out, "--mixed_precision", precision, fault="nanloss:2", steps=3, every=1)
    else:
        run = run_training(train_env, out, "--mixed_precision", precision, fault="infloss:2", steps=3, every=1)
    assert run.returncode == 0, run.stderr[-3000:]
    d = run.digests()
    assert len(d) == 3 and d[1] == d[0] and d[2] != d[1], "state must be unchanged by the skipped update only"
    warnings = [line for line in (run.stdout + run.stderr).splitlines() if "update skipped" in line]
    assert len(warnings) == 1 and "step 2" in warnings[0], warnings
    assert "1 updates were skipped" in run.stdout
    assert complete_checkpoints(out) == ["checkpoint-1", "checkpoint-3"]  # none written mid-streak
    final = tensors(out / "unet" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())
    record(AREA_NAN, f"{poison} loss at update 2 of 3 under {precision} mixed precision",
           f"update skipped (parameters + AdamW state after it identical to before it), {warnings[0].strip()!r}, "
           f"summary counts 1 skipped; no checkpoint at the skipped step; run finished, final adapter finite")


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_five_nonfinite_updates_in_a_row_stop_the_run(train_env, tmp_path, precision):
    out = tmp_path / "out"
    run = run_training(train_env, out, "--mixed_precision", precision, fault="nanloss:2,3,4,5,6", steps=8, every=1)
    line = run.error_line()
    assert run.returncode != 0 and "5 updates in a row" in line and "checkpoint-1" in line, line
    d = run.digests()
    assert len(d) == 6 and len(set(d[:6])) == 1, "no poisoned update may change the state"
    assert complete_checkpoints(out) == ["checkpoint-1"]
    assert not (out / "unet").exists()
    ckpt = tensors(out / "checkpoint-1" / "unet" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in ckpt.values())
    record(AREA_NAN, f"NaN loss at updates 2-6 under {precision} mixed precision",
           f"5 warnings, then exit {run.returncode}: {line!r}; checkpoint-1 kept as latest, finite; "
           "no final outputs")


# ----------------------------------------------------------------------------------- data faults
def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header) and holds almost nothing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg(rng, size=(16, 24), orientation=None) -> bytes:
    import io

    image = Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def make_faulty_dataset(root: Path, good=180) -> tuple[set[str], set[str]]:
    """~200 images: `good` fine ones (PNG/JPEG, some EXIF-rotated, one through an inside symlink) and
    the broken ones. Returns (names that must be skipped, names that must be used)."""
    rng = np.random.RandomState(0)
    root.mkdir(parents=True)
    rows, broken, fine = [], set(), set()

    def add(name, data, caption="a photo of sks", ok=True):
        if data is not None:
            (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": caption})
        (fine if ok else broken).add(name)

    for i in range(good):
        if i % 3 == 0:
            add(f"good{i}.jpg", _jpeg(rng, orientation=6 if i % 2 else None))
        else:
            Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"good{i}.png")
            add(f"good{i}.png", None)
    png = (root / "good1.png").read_bytes()
    jpeg = _jpeg(rng)
    add("truncated.png", png[: len(png) // 2], ok=False)
    add("truncated.jpg", jpeg[: len(jpeg) // 3], ok=False)
    add("zero-bytes.png", b"", ok=False)
    add("random-bytes.png", rng.bytes(500), ok=False)
    add("not-an-image.jpg", b"this is a text file, not a photo\n" * 10, ok=False)
    add("a-pdf.png", b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n", ok=False)
    add("bomb-30000x30000.png", _png_header_only(30000, 30000), ok=False)
    add("missing-file.png", None, ok=False)
    (root / "a-folder.png").mkdir()
    add("a-folder.png", None, ok=False)
    os.symlink(root / "good1.png", root / "inside-link.png")
    add("inside-link.png", None)
    for name, caption in [("caption-int", 5), ("caption-null", None), ("caption-list-of-int", [1, 2]),
                          ("caption-dict", {"a": "b"}), ("caption-empty-list", []), ("caption-bool", True)]:
        Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{name}.png")
        add(f"{name}.png", None, caption=caption, ok=False)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return broken, fine


def test_data_faults_are_skipped_exactly(train_env, tmp_path):
    data = tmp_path / "data"
    broken, fine = make_faulty_dataset(data)
    out = tmp_path / "out"
    run = run_training(train_env, out, data=data, trace=False, steps=1, every=10)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = [line for line in run.stdout.splitlines() if "samples were skipped" in line]
    assert len(summary) == 1, run.stdout
    count, names = re.match(r"warning: (\d+) samples were skipped: (.*)", summary[0]).groups()
    assert int(count) == len(broken) and set(names.split(", ")) == broken, (summary[0], sorted(broken))
    assert f"skipped {len(broken)} of {len(broken) + len(fine)} samples" in run.stderr
    card = (out / "README.md").read_text()
    assert re.search(rf"training images \| {len(fine)} \|", card), card
    record(AREA_DATA, f"{len(fine) + len(broken)} images: truncated PNG/JPEG, zero bytes, random bytes, text and "
                      "PDF named .png/.jpg, a 30000x30000 PNG header (decompression bomb), a missing file, a "
                      "folder named .png, 6 non-text captions; EXIF-rotated JPEGs and an inside symlink are fine",
           f"exit 0; skipped exactly the {len(broken)} broken ones, named in the summary: {names}; trained on "
           f"{len(fine)}")


def test_exif_rotation_is_applied():
    from loha import data as loha_data

    image = loha_data.decode_image(_jpeg(np.random.RandomState(1), size=(16, 24), orientation=6))
    assert image.size == (24, 16)
    record(AREA_DATA, "JPEG stored 16x24 with EXIF orientation 6 (rotate 90)", f"decoded upright as {image.size}")


@pytest.fixture
def outside_fifo(tmp_path):
    """A FIFO outside the data folder: opening it for reading blocks forever, so a read would hang."""
    fifo = tmp_path / "outside.png"
    os.mkfifo(fifo)
    return fifo


ESCAPES = {
    "metadata.jsonl file_name ../outside.png": lambda root, fifo: "../outside.png",
    "metadata.jsonl file_name absolute path": lambda root, fifo: str(fifo),
    "symlink inside the folder pointing outside": lambda root, fifo: os.symlink(fifo, root / "link.png") or "link.png",
    "metadata.jsonl file_name sub/../../outside.png": lambda root, fifo: "sub/../../outside.png",
}


@pytest.mark.parametrize("case", ESCAPES)
def test_entries_escaping_the_data_folder_are_refused_unread(case, tmp_path, outside_fifo):
    """Decided: an entry that resolves outside --train_data_dir stops the run before any image is read
    (a downloaded dataset must not read files of the machine into a model). Checked in-process here; the
    script turns the LoHaError into one line (test_escape_stops_the_script_with_one_line)."""
    from loha import LoHaError
    from loha import data as loha_data

    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "ok.png")
    name = ESCAPES[case](root, outside_fifo)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "ok.png", "text": "a"}) + "\n"
                                         + json.dumps({"file_name": name, "text": "b"}) + "\n")
    with pytest.raises(LoHaError) as e:
        samples = loha_data.samples_from_folder(root)
        loha_data.check_samples(samples)  # would block on the FIFO if it got this far and read it
    assert "outside" in str(e.value) and "\n" not in str(e.value)
    record(AREA_DATA, case, f"refused before reading anything: {e.value}")


def test_kohya_layout_never_reads_outside(tmp_path, outside_fifo):
    """Without metadata.jsonl (kohya layout: photo.png + photo.txt): an image symlinked outside stops the
    run; a caption file symlinked outside is not read (the sample is then skipped for having no caption)."""
    from loha import LoHaError
    from loha import data as loha_data

    root = tmp_path / "kohya"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "ok.png")
    secret = tmp_path / "secret.txt"
    secret.write_text("a caption read from outside")
    (root / "ok.txt").symlink_to(secret)
    samples = loha_data.samples_from_folder(root)
    report = loha_data.check_samples(samples)
    assert [s.caption for s in samples] == [None] and [name for name, _ in report.skipped] == ["ok.png"]
    record(AREA_DATA, "kohya layout: caption ok.txt is a symlink to a file outside the folder",
           f"caption not read; sample skipped: {report.skipped[0][1]}")
    (root / "link.png").symlink_to(outside_fifo)
    with pytest.raises(LoHaError) as e:
        loha_data.check_samples(loha_data.samples_from_folder(root))
    assert "outside" in str(e.value)
    record(AREA_DATA, "kohya layout: link.png is a symlink to a FIFO outside the folder",
           f"refused before reading anything: {e.value}")


def test_escape_stops_the_script_with_one_line(train_env, tmp_path, outside_fifo):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16)).save(data / "ok.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "ok.png", "text": "a"}) + "\n"
                                         + json.dumps({"file_name": "../outside.png", "text": "b"}) + "\n")
    run = run_training(train_env, tmp_path / "out", data=data, trace=False, timeout=120)
    line = run.error_line()
    assert run.returncode != 0 and "outside" in line
    record(AREA_ARGS, "train_loha_sdxl.py with a metadata.jsonl entry ../outside.png (a FIFO)",
           f"exit {run.returncode}: {line!r}")


@pytest.mark.parametrize("case", ["metadata.jsonl file_name ../outside.png", "symlink inside pointing outside"])
def test_dataset_name_folder_never_reads_outside(train_env, tmp_path, outside_fifo, case):
    """--dataset_name with a local imagefolder: the same rule as --train_data_dir. datasets refuses ../
    itself (the script must say so in one line); a symlink out is followed by datasets, so the script
    must refuse it before reading (the FIFO would block a read until the run's timeout)."""
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16)).save(data / "ok.png")
    if case.startswith("metadata"):
        name = "../outside.png"
    else:
        name = "link.png"
        (data / name).symlink_to(outside_fifo)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "ok.png", "text": "a"}) + "\n"
                                         + json.dumps({"file_name": name, "text": "b"}) + "\n")
    run = run_training(train_env, tmp_path / "out", dataset_name=data, trace=False, timeout=60)
    line = run.error_line()
    assert run.returncode != 0 and ("outside" in line or "inside" in line), line
    record(AREA_ARGS, f"--dataset_name <local imagefolder> with {case} (a FIFO)", f"exit {run.returncode}: {line!r}")


# ----------------------------------------------------------------------------------- output dir
def test_unwritable_output_dir(train_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = {"--output_dir below a regular file": blocker / "out"}
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    if not os.access(readonly, os.W_OK):  # root ignores permission bits
        cases["--output_dir in a read-only folder"] = readonly / "out"
    for case, out in cases.items():
        run = run_training(train_env, out, trace=False, timeout=120)
        line = run.error_line()
        assert run.returncode != 0 and "output_dir" in line, line
        record(AREA_ARGS, case, f"exit {run.returncode}: {line!r}")
