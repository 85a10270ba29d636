"""A new user's first run: the package installs, every flag explains itself, errors name the right thing
and the fix, output is our own and quiet, outputs are deterministic, and the README tells the truth."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import infer
import loha
import train_loha_sdxl as T

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
NOISE = ("requires torchvision", "should be kept in float32", "Loading weights", "Writing model shards",
         "Loading pipeline components", "Traceback")


pytestmark = pytest.mark.usefixtures("one_thread_and_fresh_accelerate")


def train_argv(model, out, cache, *extra, steps=2):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(EXAMPLES), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--output_dir", str(out),
            "--feature_cache_dir", str(cache), "--report_to", "none", *map(str, extra)]


# ------------------------------------------------------------------------------------------- install
def test_the_package_installs_loha_and_nothing_else(tmp_path):
    """pip builds a wheel of the repo (as `pip install .` does) holding the loha package alone, with the
    version loha.__version__ states and exactly requirements.txt's dependencies."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "loha", "bench", "tests", "infer.py"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"loha", f"loha_sdxl-{loha.__version__}.dist-info"}
    assert {"loha/layer.py", "loha/math.py", "loha/grouped.py"} <= set(names)
    assert not any(n.endswith((".cpp", ".so", ".c")) for n in names)  # one form of the math, in Python
    metadata = zipfile.ZipFile(wheel).read(f"loha_sdxl-{loha.__version__}.dist-info/METADATA").decode()
    required = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert "Provides-Extra: optimizers" in metadata  # pip install .[optimizers]: the optional optimizers
    listed = sorted(line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.split("#")[0].strip())
    canonical = lambda spec: re.sub(r"\s+", "", spec).lower().split(";")[0]
    assert sorted(map(canonical, required)) == sorted(map(canonical, _reordered(listed)))
    assert re.fullmatch(r"\d+\.\d+\.\d+", loha.__version__)
    entry_points = zipfile.ZipFile(wheel).read(f"loha_sdxl-{loha.__version__}.dist-info/entry_points.txt").decode()
    assert "loha = loha.__main__:main" in entry_points  # the toolbox as a command


def _reordered(specs):
    """pip writes 'diffusers<0.43,>=0.42' for 'diffusers>=0.42,<0.43': compare the clauses as sets."""
    out = []
    for spec in specs:
        name, clauses = re.match(r"([A-Za-z0-9_.-]+)(.*)", spec).groups()
        out.append(name + ",".join(sorted(c.strip() for c in clauses.split(",") if c.strip())))
    return out


def test_readme_shows_the_notebook_install():
    readme = (REPO / "README.md").read_text()
    assert "pip install -e ." in readme and "import loha" in readme


# ---------------------------------------------------------------------------------------------- help
def _parsers(cli):
    if cli == "toolbox":
        from loha.__main__ import build_parser

        verbs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return list(verbs.choices.values())
    return [T.build_parser() if cli == "train" else infer.build_parser()]


@pytest.mark.parametrize("cli", ["train", "infer", "toolbox"])
def test_every_flag_has_help_stating_its_default_once(cli):
    for built in _parsers(cli):
        _check_help(built)
    if cli == "train":
        resolution = next(a for a in T.build_parser()._actions if a.dest == "resolution")
        assert "multiple of 8" in resolution.help and "64 with --enable_bucket" in resolution.help


def _check_help(built):
    formatter = built._get_formatter()
    for action in built._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings} has no help text"
        if action.required:
            continue
        text = formatter._get_help_string(action)
        assert text.count("default:") == 1, (action.option_strings, text)


def test_usage_errors_exit_2_and_runtime_errors_exit_1(tiny_pipeline_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as usage:
        T.main(train_argv(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c", "--resolution", "60"))
    assert usage.value.code == 2
    assert "--resolution must be a positive multiple of 8" in capsys.readouterr().err
    assert T.main(train_argv(tmp_path / "no-model", tmp_path / "o", tmp_path / "c")) == 1
    with pytest.raises(SystemExit) as usage:
        infer.main(["--prompt", "x"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as runtime:
        infer.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    assert isinstance(runtime.value.code, str) and runtime.value.code.startswith("error: ")  # status 1


# ------------------------------------------------------------------------------------------ messages
def test_a_unet_loha_loaded_into_a_text_encoder_names_the_component(tmp_path, tiny_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    unet = loha.tiny_sdxl.tiny_unet()
    loha.inject(unet, rank=2)
    loha.export_kohya(unet, tmp_path / "u.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(loha.LoHaFileError, match=r"holds unet weights, but the model given is a text encoder "
                                                 r"\(CLIPTextModel\)"):
        loha.load(pipe.text_encoder, tmp_path / "u.safetensors")


def test_a_base_model_given_as_checkpoint_says_so(tiny_pipeline_dir):
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(tiny_pipeline_dir), "--prompt", "x"])
    assert "is a base model (a diffusers pipeline or model folder), not an adapter; pass it as " \
           "--pretrained_model_name_or_path" in e.value.code
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(tiny_pipeline_dir / "unet"), "--prompt", "x"])
    assert "is a base model" in e.value.code


def test_hub_offline_error_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert T.main(train_argv("some-org/not-downloaded-sdxl", tmp_path / "o", tmp_path / "c")) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("error: cannot load the model some-org/not-downloaded-sdxl: it is not a local folder, and "
                    "HF_HUB_OFFLINE=1 forbids downloading it; pass a local diffusers folder, or unset "
                    "HF_HUB_OFFLINE to download it")
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(_tiny_adapter(tmp_path)), "--prompt", "x",
                    "--pretrained_model_name_or_path", "some-org/not-downloaded-sdxl", "--output_dir",
                    str(tmp_path / "img")])
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in e.value.code and "stacktrace" not in e.value.code


def _tiny_adapter(tmp_path) -> Path:
    unet = loha.tiny_sdxl.tiny_unet()
    loha.inject(unet, rank=2)
    return loha.export_kohya(unet, tmp_path / "a.safetensors")


# ------------------------------------------------------------------------------------- quiet output
def test_a_run_prints_only_our_own_output(tiny_pipeline_dir, tmp_path):
    """The CLI, as a user runs it: no third-party notices or loading bars; our progress bars and lines stay."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = train_argv(tiny_pipeline_dir, tmp_path / "out", tmp_path / "cache", "--validation_prompt", "a cat",
                      "--num_validation_images", "1", "--num_validation_inference_steps", "2")
    proc = subprocess.run([sys.executable, str(REPO / "train_loha_sdxl.py"), *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in NOISE:
        assert noise not in proc.stderr + proc.stdout, noise
    assert "training" in proc.stderr and "trained 2 steps" in proc.stdout
    image = subprocess.run([sys.executable, str(REPO / "infer.py"), "--checkpoint", str(tmp_path / "out"),
                            "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--prompt", "a cat",
                            "--num_inference_steps", "2", "--output_dir", str(tmp_path / "img")],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert image.returncode == 0, image.stderr[-2000:]
    for noise in NOISE:
        assert noise not in image.stderr + image.stdout, noise


def test_a_second_run_says_it_replaces_the_first_and_logs_apart(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*train_argv(tiny_pipeline_dir, out, tmp_path / "cache"), "--report_to", "tensorboard"]
    assert T.main(argv) == 0
    capsys.readouterr()
    assert T.main(argv) == 0
    err = capsys.readouterr().err
    assert f"note: {out} holds an earlier run's outputs; this run replaces them (its logs go to logs/run-" in err
    runs = sorted(p for p in (out / "logs").iterdir())
    assert len(runs) == 2 and all(list(r.rglob("events.out.tfevents.*")) for r in runs)  # one folder per run


def test_identical_runs_write_identical_files(tiny_pipeline_dir, tmp_path):
    for name in ("a", "b"):
        assert T.main(train_argv(tiny_pipeline_dir, tmp_path / name, tmp_path / "cache", "--output_name", "x")) == 0
    for rel in ("x.safetensors", "unet/adapter_model.safetensors", "unet/adapter_config.json"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------- README truths
def test_the_readme_states_one_demo_time_and_the_true_defaults():
    readme = (REPO / "README.md").read_text()
    times = re.findall(r"demo[^.\n]*?(\d+ s(?:econds)? on [^.;)\n]+)", readme)
    assert times and len(set(times)) == 1, times  # one measured figure, with its machine
    assert "a few minutes" not in readme and "under a minute" not in readme
    assert "1024 by default" not in readme
    assert "torch_dtype=" not in readme  # diffusers 0.42 and transformers 5 call it dtype
    help_text = T.build_parser().format_help()
    assert "under a minute" not in help_text


def test_the_readme_notebook_recipe_runs(tmp_path, tiny_pipeline_dir):
    """The README's "Use a LoHa from Python" block, run as written on the tiny pipeline (hub id → the tiny
    folder, cuda → cpu, and a trained output folder in place of loha-sdxl)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Use a LoHa from Python"):]
    code = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    out = tmp_path / "loha-sdxl"
    assert T.main(train_argv(tiny_pipeline_dir, out, tmp_path / "cache", "--checkpointing_steps", "1")) == 0
    (out / "checkpoint-500").symlink_to(out / "checkpoint-2")
    code = (code.replace('"stabilityai/stable-diffusion-xl-base-1.0"', repr(str(tiny_pipeline_dir)))
            .replace('.to("cuda")', "").replace("torch.float16", "torch.float32")
            .replace('"loha-sdxl', json.dumps(str(out))[:-1]).replace('pipe("a photo of sks dog"',
                                                                 'pipe("a photo of sks dog", num_inference_steps=2'))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert "image" in namespace
    json.dumps(sorted(namespace))  # it ran to the end
