"""A training run and its folder, adversarially: two runs on one folder, resumes that change flags, damaged
or edited checkpoint state, Ctrl-C and SIGTERM, and an output folder over the training data. Each case
records what happened for RELIABILITY.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from reliability import record

import loha.runs
import train_loha_sdxl as T
from tests.fault_inject import signals_after_update

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
AREA_LOCK, AREA_FLAGS, AREA_STATE, AREA_SIGNAL, AREA_PATHS = (
    "concurrent runs", "resume with changed flags", "damaged checkpoint state", "Ctrl-C and SIGTERM",
    "outputs over inputs")


pytestmark = pytest.mark.usefixtures("one_thread_and_fresh_accelerate")


def argv_for(model, out, cache, *extra, steps=4):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(EXAMPLES), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--output_dir", str(out),
            "--feature_cache_dir", str(cache), "--report_to", "none", "--checkpointing_steps", "2",
            "--learning_rate", "1e-3", "--rank", "4", *map(str, extra)]


def weights(folder: Path) -> dict:
    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != loha.runs.LOCK_FILE}


def refused(capsys, argv, *fragments, code=1) -> str:
    try:
        status = T.main(argv)
    except SystemExit as e:  # a usage error: argparse's exit 2
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == code, err
    assert err and err[-1].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[-1], err[-1]
    return err[-1]


@pytest.fixture(scope="module")
def finished(tiny_pipeline_dir, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at 2 and 4): what resumes are compared with."""
    out = tmp_path_factory.mktemp("finished") / "out"
    cache = tmp_path_factory.mktemp("cache")
    assert T.main(argv_for(tiny_pipeline_dir, out, cache)) == 0
    return out, cache


def half_done(finished, tmp_path) -> Path:
    out = tmp_path / "half"
    shutil.copytree(finished[0] / "checkpoint-2", out / "checkpoint-2")
    return out


# ------------------------------------------------------------------------------------ two runs, one folder
def test_a_second_run_on_the_same_folder_is_refused_and_cleans_nothing(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    stale = out / ".checkpoint-9.tmp-abc"  # what a killed run leaves: the running one might still be writing it
    stale.mkdir(parents=True)
    with loha.runs.OutputLock(out):
        line = refused(capsys, argv_for(tiny_pipeline_dir, out, tmp_path / "c"), "is in use by another training run",
                       f"pid {os.getpid()}")
    assert stale.is_dir() and not (out / "unet").exists()
    record(AREA_LOCK, "a second run while the first holds --output_dir", f"exit 1, {line!r}; the first run's "
           "temp folder left alone, nothing written")
    # once the first run is gone its leftovers are swept and the folder is usable
    assert T.main(argv_for(tiny_pipeline_dir, out, tmp_path / "c", steps=1)) == 0
    assert not stale.exists() and (out / "unet").is_dir()


def test_a_killed_run_leaves_no_stuck_lock(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, loha.runs\n"
                               f"lock = loha.runs.OutputLock({str(out)!r}).__enter__()\nprint('held', flush=True)\n"
                               "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(capsys, argv_for(tiny_pipeline_dir, out, tmp_path / "c", steps=1), f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert T.main(argv_for(tiny_pipeline_dir, out, tmp_path / "c", steps=1)) == 0
    record(AREA_LOCK, "the run holding the folder is killed with SIGKILL", "the kernel drops its flock: the next run "
           "starts at once, no stale lock to remove by hand")


@pytest.mark.slow
def test_two_runs_sharing_one_feature_cache_at_once(tiny_pipeline_dir, tmp_path):
    """Two processes, two output folders, one feature cache, started together: both write the same entries
    (atomically, content-keyed) and both end with the adapter a run alone reaches."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(REPO / "train_loha_sdxl.py"), "--cache_latents",
                               *argv_for(tiny_pipeline_dir, tmp_path / f"out{i}", cache, steps=2)],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    alone = tmp_path / "alone"
    assert T.main(["--cache_latents", *argv_for(tiny_pipeline_dir, alone, tmp_path / "fresh", steps=2)]) == 0
    assert same(weights(tmp_path / "out0" / "unet"), weights(alone / "unet"))
    assert same(weights(tmp_path / "out1" / "unet"), weights(alone / "unet"))
    record(AREA_LOCK, "two runs on one --feature_cache_dir at the same time", "both finish with the adapter a run "
           "alone reaches, bit for bit")


# ----------------------------------------------------------------------------------- resume, other flags
@pytest.mark.parametrize("flag,value", [("--learning_rate", "5e-3"), ("--alpha", "2"), ("--train_batch_size", "2"),
                                         ("--seed", "7"), ("--resolution", "128"), ("--lr_scheduler", "cosine")])
def test_a_resume_that_changes_what_was_trained_is_refused(tiny_pipeline_dir, finished, tmp_path, capsys,
                                                           flag, value):
    out = half_done(finished, tmp_path)
    before = files(out)
    line = refused(capsys, [*argv_for(tiny_pipeline_dir, out, finished[1]), "--resume_from_checkpoint", "latest",
                            flag, value], f"{flag} ", "differs from", f"drop {flag}")
    assert files(out) == before  # nothing written
    record(AREA_FLAGS, f"resume with {flag} {value}", f"exit 1, {line!r}; nothing written")


def test_flags_left_out_on_resume_come_from_the_checkpoint(tiny_pipeline_dir, finished, tmp_path, capsys):
    """The original run had --rank 4 and --learning_rate 1e-3; a resume that names neither continues with
    them (said in one line) and ends bit for bit where the uninterrupted run ended."""
    out = half_done(finished, tmp_path)
    argv = argv_for(tiny_pipeline_dir, out, finished[1])
    for flag in ("--rank", "--learning_rate"):
        i = argv.index(flag)
        del argv[i:i + 2]
    assert T.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    err = capsys.readouterr().err
    assert "resuming checkpoint-2 with its own --learning_rate 0.001, --rank 4 (not given here)" in err
    assert same(weights(out / "unet"), weights(finished[0] / "unet"))
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["rank"] == 4 and recorded["learning_rate"] == 1e-3 and recorded["flag_history"] == []
    record(AREA_FLAGS, "resume without repeating --rank and --learning_rate", "the checkpoint's values are used "
           "(said in one line); final adapter bit for bit the uninterrupted run's; training_args.json records them")


def test_adjustable_flags_apply_from_the_resume_and_are_recorded(tiny_pipeline_dir, finished, tmp_path, capsys):
    out = half_done(finished, tmp_path)
    argv = [*argv_for(tiny_pipeline_dir, out, finished[1], steps=6), "--resume_from_checkpoint", "latest",
            "--checkpointing_steps", "3", "--max_grad_norm", "0.5"]
    assert T.main(argv) == 0
    err = capsys.readouterr().err
    assert "--max_train_steps 6 (was 4) applies from step 2 on" in err
    history = json.loads((out / "training_args.json").read_text())["flag_history"]
    assert {(h["flag"], h["value"], h["was"], h["from_step"]) for h in history} == {
        ("max_train_steps", 6, 4, 2), ("checkpointing_steps", 3, 2, 2), ("max_grad_norm", 0.5, 1.0, 2)}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-6"]
    card = (out / "README.md").read_text()
    assert "from step 2: --max_grad_norm 0.5 (was 1.0)" in card and "| steps | 6 |" in card
    record(AREA_FLAGS, "resume with --max_train_steps 6, --checkpointing_steps 3, --max_grad_norm 0.5 (constant lr)",
           "applied from step 2 on; each change, with its step and old value, in training_args.json and the model card")
    # a longer run on a schedule that depends on its length is refused: the steps taken had other rates
    cosine = tmp_path / "cosine"
    assert T.main([*argv_for(tiny_pipeline_dir, cosine, finished[1], steps=4), "--lr_scheduler", "cosine"]) == 0
    line = refused(capsys, [*argv_for(tiny_pipeline_dir, cosine, finished[1], steps=8), "--lr_scheduler", "cosine",
                            "--resume_from_checkpoint", "latest"], "changes the length of the cosine schedule")
    record(AREA_FLAGS, "resume with a longer --max_train_steps on a cosine schedule", f"exit 1, {line!r}")


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tiny_pipeline_dir, finished, tmp_path, capsys):
    out = tmp_path / "done"
    shutil.copytree(finished[0], out)
    assert T.main([*argv_for(tiny_pipeline_dir, out, finished[1]), "--resume_from_checkpoint", "latest"]) == 0
    output = capsys.readouterr()
    assert "nothing to train: the run is already at step 4 (--max_train_steps 4)" in output.out
    assert "trained 4 steps" not in output.out


# -------------------------------------------------------------------------------- damaged checkpoint state
def _edit_state(text):
    def edit(ckpt: Path):
        (ckpt / T.STATE_FILE).write_text(text)
    return edit


def _rename_to(step):
    def edit(ckpt: Path):
        (ckpt / T.STATE_FILE).write_text(json.dumps({"global_step": step, "factor_storage": "stacked"}))
        ckpt.rename(ckpt.with_name(f"checkpoint-{step}"))
    return edit


def _corrupt(name, data=b"garbage, not a pickle"):
    def edit(ckpt: Path):
        (ckpt / name).write_bytes(data)
    return edit


DAMAGE = {  # case: (edit of checkpoint-2, words the one-line error must hold)
    "global_step 10**12": (_edit_state('{"global_step": 1000000000000, "factor_storage": "stacked"}'),
                           "says step 1000000000000, but the folder is named checkpoint-2"),
    "negative global_step": (_edit_state('{"global_step": -5, "factor_storage": "stacked"}'), "global_step -5"),
    "non-integer global_step": (_edit_state('{"global_step": "two", "factor_storage": "stacked"}'),
                                "global_step 'two'"),
    "missing global_step": (_edit_state('{"factor_storage": "stacked"}'), "global_step None"),
    "training_state.json not JSON": (_edit_state("{oops"), "unreadable or not JSON"),
    "renamed to checkpoint-3 with its state edited to match": (_rename_to(3), "scheduler state is at step 2"),
    "optimizer.bin garbage": (_corrupt("optimizer.bin"), "a state file is damaged"),
    "random_states_0.pkl garbage": (_corrupt("random_states_0.pkl"), "a state file is damaged"),
    "scheduler.bin truncated": (_corrupt("scheduler.bin", b"PK\x03\x04"), "a state file is damaged"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_or_edited_checkpoint_state_is_one_line(tiny_pipeline_dir, finished, tmp_path, capsys, case):
    out = half_done(finished, tmp_path)
    edit, words = DAMAGE[case]
    edit(out / "checkpoint-2")
    before = files(out)
    line = refused(capsys, [*argv_for(tiny_pipeline_dir, out, finished[1]), "--resume_from_checkpoint", "latest"],
                   words)
    assert files(out) == before and not (out / "logs").exists()
    record(AREA_STATE, case, f"exit 1, {line!r}; nothing written")


# ------------------------------------------------------------------------------------ Ctrl-C and SIGTERM
@pytest.mark.parametrize("name,status", [("INT", 130), ("TERM", 143)])
def test_first_signal_checkpoints_the_step_and_resume_is_bitwise(tiny_pipeline_dir, finished, tmp_path, capsys,
                                                                 name, status):
    out = tmp_path / "out"
    argv = argv_for(tiny_pipeline_dir, out, finished[1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "train_one_update", signals_after_update(T.train_one_update, 3, [getattr(signal, f"SIG{name}")]))
        assert T.main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: SIG{name} at step 3: saved {out / 'checkpoint-3'}; resume with "
                       "--resume_from_checkpoint latest"), err[-3:]
    assert not any("Traceback" in line for line in err)
    assert (out / "checkpoint-3" / T.STATE_FILE).is_file() and not (out / "unet").exists()
    assert T.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert same(weights(out / "unet"), weights(finished[0] / "unet"))
    record(AREA_SIGNAL, f"SIG{name} during step 3", f"step 3 finished and checkpointed, exit {status}, {err[-1]!r}; "
           "resume latest -> final adapter bit for bit the uninterrupted run's")


def test_a_second_signal_stops_at_once(tiny_pipeline_dir, finished, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "train_one_update", signals_after_update(T.train_one_update, 3, [signal.SIGINT] * 2))
        assert T.main(argv_for(tiny_pipeline_dir, out, finished[1])) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: SIGINT again: stopped at once; the last checkpoint is {out / 'checkpoint-2'}"
    assert not (out / "checkpoint-3").exists() and not [p for p in out.iterdir() if ".tmp-" in p.name]
    record(AREA_SIGNAL, "a second SIGINT right after the first", f"exit 130 at once, {err[-1]!r}; no partial "
           "checkpoint")


@pytest.mark.slow  # the in-process signal tests above cover the logic; this one sends a real SIGINT
def test_a_real_sigint_from_outside_the_process(tiny_pipeline_dir, tmp_path):
    """A real Ctrl-C: SIGINT sent to the training process while it trains."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "train_loha_sdxl.py"),
                             *argv_for(tiny_pipeline_dir, out, tmp_path / "c", steps=100000)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list(out.glob("checkpoint-2")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: SIGINT at step ") and "resume with --resume_from_checkpoint latest" in last
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = int(last.split("step ")[1].split(":")[0])
    assert (out / f"checkpoint-{step}" / T.STATE_FILE).is_file()
    record(AREA_SIGNAL, "Ctrl-C (a real SIGINT) sent from outside during training", f"exit 130, {last!r}")


# ---------------------------------------------------------------------------------- outputs over inputs
@pytest.mark.parametrize("where", ["the data folder", "inside the data folder", "a folder holding the data"])
def test_output_folder_over_the_training_data_is_refused(tiny_pipeline_dir, tmp_path, capsys, where):
    data = tmp_path / "photos" / "set"
    shutil.copytree(EXAMPLES, data)
    out = {"the data folder": data, "inside the data folder": data / "out",
           "a folder holding the data": tmp_path / "photos"}[where]
    before = files(data)
    argv = argv_for(tiny_pipeline_dir, out, tmp_path / "c")
    argv[argv.index("--train_data_dir") + 1] = str(data)
    line = refused(capsys, argv, "the image folder", "choose a folder outside it", code=2)
    assert files(data) == before
    record(AREA_PATHS, f"--output_dir is {where}", f"exit 2, {line!r}; the data folder untouched")
