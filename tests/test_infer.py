"""infer.py end to end on the tiny SDXL pipeline: every checkpoint layout, written by us, by real PEFT
and by real LyCORIS, gives the same image for the same weights and seed; --scale 0 is the base model bit
for bit; --fuse, --compare, PNG metadata, output naming and every error case.

Most runs call infer.main(argv) in-process (a fresh pipeline is loaded from disk each time, as the CLI
does); two run it as a subprocess to check the real command line, its stdout and its exit status.
"""

import contextlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import infer
import loha
from loha.tiny_sdxl import TINY_UNET_CONFIG, tiny_unet
from tests.helpers import randomize_adapters

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat"
SEED = 3
RANK, ALPHA = 4, 2.0
STD = 0.5  # factor scale: the image moves ~14/255 on average from the base model's, far above rounding
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# ----------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """On a shared 2-core machine, two OpenMP threads fighting other processes make these tiny models
    ~20x slower (measured: 1.7 s vs 0.08 s per 64x64 image); one thread is also deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_infer(tiny_dir, out, *extra, prompt=PROMPT, base=True) -> list[Path]:
    argv = ["--num_inference_steps", "2", "--height", "64", "--width", "64", "--seed", str(SEED),
            "--output_dir", str(out), *extra]
    if prompt is not None:
        argv += ["--prompt", prompt]
    if base:
        argv += ["--pretrained_model_name_or_path", str(tiny_dir)]
    return infer.main(argv)


def one_image(tiny_dir, out, checkpoint, *extra, **kw) -> np.ndarray:
    (path,) = run_infer(tiny_dir, out, "--checkpoint", str(checkpoint), *extra, **kw)
    return pixels(path)


def error_of(argv, status=1) -> str:
    """The message infer.main exits with (status 1, or 2 for a usage error, as argparse does); it must be one
    line and start with 'error:'."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(stderr):
        infer.main(argv)
    code = exc.value.code
    message = code if isinstance(code, str) else stderr.getvalue().strip()
    assert (1 if isinstance(code, str) else code) == status, (code, message)
    assert message.startswith("error: "), message
    assert "\n" not in message, message
    return message


def load_base_pipeline(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, seed=SEED) -> np.ndarray:
    """The image straight from a diffusers pipeline call, as uint8, without infer.py."""
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.int16)


# ----------------------------------------------------------------------------------- adapter files
@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_pipeline_dir):
    """One set of LoHa weights (UNet, plus a second set with text-encoder parts), written in every layout."""
    from peft import LoHaConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    tiny = str(tiny_pipeline_dir)
    unet = tiny_unet()
    loha.inject(unet, rank=RANK, alpha=ALPHA)
    randomize_adapters(unet, seed=1, std=STD)
    f = {}

    # our trainer's output_dir layout: unet/ + kohya export + checkpoint-<step>/unet
    run = root / "run"
    loha.save(unet, run / "unet", base_model=tiny)
    loha.export_kohya(unet, run / "run.safetensors", base_model=tiny)
    loha.save(unet, run / "checkpoint-4" / "unet", base_model=tiny)
    (run / "training_args.json").write_text("{}")
    f["output_dir"], f["checkpoint-N"], f["peft folder (ours)"] = run, run / "checkpoint-4", run / "unet"
    f["adapter_model.safetensors"] = run / "unet" / "adapter_model.safetensors"
    f["kohya SGM names"] = run / "run.safetensors"

    # a run still going: no final unet/; checkpoint-10 beats checkpoint-2 (numeric, not text order),
    # checkpoint-11 is half written
    going = root / "going"
    loha.save(unet, going / "checkpoint-10" / "unet", base_model=tiny)
    other = tiny_unet()
    loha.inject(other, rank=RANK, alpha=ALPHA)
    randomize_adapters(other, seed=2, std=STD)
    loha.save(other, going / "checkpoint-2" / "unet", base_model=tiny)
    (going / "checkpoint-11" / "unet").mkdir(parents=True)
    (going / "checkpoint-11" / "unet" / "adapter_config.json").write_text("{}")
    (going / "checkpoint-11" / "optimizer.bin").write_bytes(b"\x80\x04")
    f["output_dir, latest checkpoint"] = going

    # kohya/ComfyUI diffusers-path names: lora_unet_<diffusers path with _>
    tensors = {}
    for path, layer in loha.adapter_modules(unet).items():
        name = "lora_unet_" + path.replace(".", "_")
        for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            tensors[f"{name}.{n}"] = getattr(layer, n).detach().clone()
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    f["kohya diffusers names"] = root / "diffusers_names.safetensors"
    safetensors.torch.save_file(tensors, f["kohya diffusers names"])

    # real PEFT: get_peft_model + save_pretrained, with our weights copied in
    peft_unet = get_peft_model(tiny_unet(), LoHaConfig(r=RANK, alpha=ALPHA, init_weights=False,
                                                       target_modules=UNET_TARGETS))
    with torch.no_grad():
        for path, layer in loha.adapter_modules(unet).items():
            target = peft_unet.get_base_model().get_submodule(path)
            for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                getattr(target, n)["default"].copy_(getattr(layer, n))
    peft_unet.save_pretrained(root / "peft_written")
    f["peft folder (PEFT)"] = root / "peft_written"

    # real LyCORIS: LycorisNetwork on the Attention blocks, our weights copied in, save_weights
    f["lycoris_ file"] = root / "lycoris.safetensors"
    write_lycoris(unet, f["lycoris_ file"])

    # text encoders too: kohya lora_te1_/lora_te2_ file and PEFT folder with text_encoder*/
    pipe = load_base_pipeline(tiny_pipeline_dir)
    te1, te2 = pipe.text_encoder, pipe.text_encoder_2
    for i, te in enumerate((te1, te2)):
        loha.inject(te, rank=RANK, alpha=ALPHA, target_modules=TE_TARGETS)
        randomize_adapters(te, seed=10 + i, std=STD)
    with_te = root / "with_te"
    for component, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        loha.save(model, with_te / component, base_model=tiny)
    f["te: peft folders"] = with_te
    f["te: kohya file"] = loha.export_kohya(unet, root / "with_te.safetensors", text_encoder=te1,
                                            text_encoder_2=te2, base_model=tiny)
    return f


def write_lycoris(unet, file):
    from lycoris import LycorisNetwork

    preset_attrs = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                    "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    with pytest.MonkeyPatch.context() as mp:  # presets are class globals: restore them afterwards
        for attr in preset_attrs:
            if hasattr(LycorisNetwork, attr):
                mp.setattr(LycorisNetwork, attr, getattr(LycorisNetwork, attr))
        LycorisNetwork.apply_preset({"target_module": ["Attention"]})
        target = tiny_unet()
        network = LycorisNetwork(target, multiplier=1.0, lora_dim=RANK, alpha=ALPHA, network_module="loha")
        network.apply_to()
    ours = {"lycoris_" + p.replace(".", "_"): layer for p, layer in loha.adapter_modules(unet).items()}
    assert {m.lora_name for m in network.loras} == set(ours)
    with torch.no_grad():
        for module in network.loras:
            for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                getattr(module, n).copy_(getattr(ours[module.lora_name], n))
    network.save_weights(str(file), torch.float32, {})


@pytest.fixture(scope="module")
def images(tiny_pipeline_dir, files):
    """Independent references, computed without infer.py or loha's loader: the base pipeline, and the
    seed's recipe PeftModel.from_pretrained(pipe.unet, checkpoint / "unet") on our output_dir."""
    from peft import PeftModel

    base_pipe = load_base_pipeline(tiny_pipeline_dir)
    refs = {"base": diffusers_image(base_pipe)}
    pipe = load_base_pipeline(tiny_pipeline_dir)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, files["output_dir"] / "unet")
    refs["peft"] = diffusers_image(pipe)
    pipe = load_base_pipeline(tiny_pipeline_dir)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        folder = files["te: peft folders"] / component
        setattr(pipe, component, PeftModel.from_pretrained(getattr(pipe, component), folder))
    refs["peft with te"] = diffusers_image(pipe)
    return refs


# ----------------------------------------------------------------------------------- formats
FORMATS = ["output_dir", "checkpoint-N", "output_dir, latest checkpoint", "peft folder (ours)",
           "adapter_model.safetensors", "peft folder (PEFT)", "kohya SGM names", "kohya diffusers names",
           "lycoris_ file"]


@pytest.fixture(scope="module")
def ours_image(tiny_pipeline_dir, files, tmp_path_factory):
    return one_image(tiny_pipeline_dir, tmp_path_factory.mktemp("ours"), files["peft folder (ours)"])


def test_peft_folder_matches_the_peft_loaded_reference(ours_image, images):
    # the reference is PEFT's own loader and LoHa math on the same files: agree to one uint8 level
    assert np.abs(ours_image - images["peft"]).max() <= 1
    # and the adapter is strong enough that a wrong scale or a dropped module would show
    assert np.abs(ours_image - images["base"]).mean() > 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_image(fmt, tiny_pipeline_dir, files, ours_image, tmp_path, capsys):
    # files from our writer carry the base model in their metadata; the PEFT/LyCORIS/hand-made ones do not
    needs_base = fmt in ("peft folder (PEFT)", "kohya diffusers names", "lycoris_ file")
    image = one_image(tiny_pipeline_dir, tmp_path, files[fmt], base=needs_base)
    np.testing.assert_array_equal(image, ours_image)
    if fmt == "output_dir, latest checkpoint":
        err = capsys.readouterr().err
        assert "latest complete checkpoint, checkpoint-10" in err and "skipping incomplete checkpoint-11" in err


def test_text_encoder_parts_load_from_peft_folders_and_kohya_file(tiny_pipeline_dir, files, images, ours_image,
                                                                  tmp_path):
    from_folders = one_image(tiny_pipeline_dir, tmp_path / "a", files["te: peft folders"])
    from_kohya = one_image(tiny_pipeline_dir, tmp_path / "b", files["te: kohya file"])
    np.testing.assert_array_equal(from_folders, from_kohya)
    assert np.abs(from_folders - images["peft with te"]).max() <= 1
    assert np.abs(from_folders - ours_image).mean() > 2  # the text-encoder parts were applied


# ----------------------------------------------------------------------------------- adapter controls
def test_scale_zero_is_the_base_pipeline_bit_for_bit(tiny_pipeline_dir, files, images, tmp_path):
    image = one_image(tiny_pipeline_dir, tmp_path, files["te: kohya file"], "--scale", "0")
    np.testing.assert_array_equal(image, images["base"])
    # and before the uint8 rounding too: the float output of the same render path
    pipe = load_base_pipeline(tiny_pipeline_dir)
    kwargs = dict(steps=2, guidance=5.0, height=64, width=64, output_type="np")
    base = infer.render(pipe, PROMPT, None, [SEED, SEED + 1], **kwargs)
    loaded = loha.load(pipe, files["te: kohya file"])
    assert set(loaded) == {"unet", "text_encoder", "text_encoder_2"}
    for component in loaded:
        loha.set_scale(getattr(pipe, component), 0)
    np.testing.assert_array_equal(infer.render(pipe, PROMPT, None, [SEED, SEED + 1], **kwargs), base)


def test_scale_is_the_loha_strength(tiny_pipeline_dir, files, ours_image, images, tmp_path):
    half = one_image(tiny_pipeline_dir, tmp_path, files["kohya SGM names"], "--scale", "0.5")
    to_base, to_full = np.abs(half - images["base"]).mean(), np.abs(half - ours_image).mean()
    assert to_base > 1 and to_full > 1


def test_fuse_equals_unfused(tiny_pipeline_dir, files, ours_image, tmp_path, monkeypatch):
    merged = []

    def spy(model, **kw):  # the weights really are fused, in every adapted model
        merge(model, **kw)
        merged.append(all(layer.merged for layer in loha.adapter_modules(model).values()))

    merge = loha.merge
    monkeypatch.setattr(loha, "merge", spy)
    fused = one_image(tiny_pipeline_dir, tmp_path, files["te: kohya file"], "--fuse")
    assert merged == [True, True, True]
    monkeypatch.undo()
    unfused = one_image(tiny_pipeline_dir, tmp_path / "u", files["te: kohya file"])
    assert np.abs(fused - unfused).max() <= 1  # fp32: ΔW folded once vs added per call
    assert np.abs(fused - ours_image).mean() > 2


def test_compare_writes_base_and_loha_side_by_side(tiny_pipeline_dir, files, images, tmp_path):
    paths = run_infer(tiny_pipeline_dir, tmp_path, "--checkpoint", str(files["kohya SGM names"]), "--compare",
                      "--num_images", "2", "--batch_size", "2", "--height", "64", "--width", "96")
    names = [p.name for p in paths]
    assert names == [f"000-000-seed{SEED}.png", f"000-000-seed{SEED}-compare.png",
                     f"000-001-seed{SEED + 1}.png", f"000-001-seed{SEED + 1}-compare.png"]
    for image_path, grid_path in zip(paths[::2], paths[1::2]):
        grid, image = pixels(grid_path), pixels(image_path)
        assert grid.shape == (64, 2 * 96, 3) and image.shape == (64, 96, 3)
        np.testing.assert_array_equal(grid[:, 96:], image)
        assert np.abs(grid[:, :96] - image).mean() > 2
    # the left half is the base model: same as --scale 0 for that seed
    (base_path,) = run_infer(tiny_pipeline_dir, tmp_path / "s0", "--checkpoint", str(files["kohya SGM names"]),
                             "--scale", "0", "--height", "64", "--width", "96")
    np.testing.assert_array_equal(pixels(paths[1])[:, :96], pixels(base_path))


def test_batching_and_seeds_do_not_change_an_image(tiny_pipeline_dir, files, ours_image, tmp_path):
    paths = run_infer(tiny_pipeline_dir, tmp_path, "--checkpoint", str(files["kohya SGM names"]),
                      "--num_images", "3", "--batch_size", "2", "--seed", str(SEED - 1), "--prompt", PROMPT,
                      "--prompt", "a dog", prompt=None)
    # two prompts, three images each; a sort follows prompt then image, and names carry the seed
    assert [p.name for p in paths] == sorted(p.name for p in paths)
    assert [p.name for p in paths][:4] == [f"000-000-seed{SEED - 1}.png", f"000-001-seed{SEED}.png",
                                           f"000-002-seed{SEED + 1}.png", f"001-000-seed{SEED - 1}.png"]
    assert len(paths) == 6
    # seed SEED is the second image of the first batch here, the only image of a batch of 1 elsewhere
    assert np.abs(pixels(paths[1]) - ours_image).max() <= 1
    assert np.abs(pixels(paths[0]) - pixels(paths[1])).mean() > 5


def test_schedulers(tiny_pipeline_dir, files, tmp_path):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    config = load_base_pipeline(tiny_pipeline_dir).scheduler.config
    expected = {"Euler": EulerDiscreteScheduler, "Euler a": EulerAncestralDiscreteScheduler,
                "DPM++ 2M": DPMSolverMultistepScheduler, "DPM++ 2M Karras": DPMSolverMultistepScheduler,
                "DDIM": DDIMScheduler}
    for name, cls in expected.items():
        scheduler = infer.make_scheduler(name, config)
        assert type(scheduler) is cls
        assert scheduler.config.beta_schedule == config.beta_schedule  # built from the model's config
    assert infer.make_scheduler("DPM++ 2M Karras", config).config.use_karras_sigmas
    assert not infer.make_scheduler("DPM++ 2M", config).config.use_karras_sigmas
    assert infer.scheduler_name("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert infer.scheduler_name("euler-a") == "Euler a"
    (path,) = run_infer(tiny_pipeline_dir, tmp_path, "--checkpoint", str(files["kohya SGM names"]),
                        "--scheduler", "dpm++ 2m karras")
    assert Image.open(path).text["scheduler"] == "DPM++ 2M Karras"


def test_notebook_recipe_from_the_readme(tiny_pipeline_dir, files, ours_image, images):
    pipe = load_base_pipeline(tiny_pipeline_dir)
    loha.load(pipe.unet, files["peft folder (ours)"])
    full = diffusers_image(pipe)
    np.testing.assert_array_equal(full, ours_image)  # what infer.py renders for these weights
    loha.set_scale(pipe.unet, 0)
    np.testing.assert_array_equal(diffusers_image(pipe), images["base"])
    loha.set_scale(pipe.unet, 1)
    loha.merge(pipe.unet)
    assert np.abs(diffusers_image(pipe) - full).max() <= 1
    loha.unmerge(pipe.unet)
    np.testing.assert_array_equal(diffusers_image(pipe), full)
    loha.eject(pipe.unet)
    np.testing.assert_array_equal(diffusers_image(pipe), images["base"])


# ----------------------------------------------------------------------------------- metadata
# AUTOMATIC1111's infotext parser (modules/infotext_utils.py): "key: value" pairs, values JSON-quoted
# when they hold a comma, colon or newline.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {k: json.loads(v) if v.startswith('"') else v for k, v in A1111_PARAM.findall(last)}
    return {"prompt": "\n".join(prompt), "negative": "\n".join(negative) if in_negative else None, **fields}


def test_png_metadata_round_trips(tiny_pipeline_dir, files, tmp_path):
    prompt = 'a "cat", sitting: on a mat\nwith ünïcødé 猫'
    negative = "blurry, low quality: 2"
    checkpoint = files["kohya SGM names"]
    (path,) = run_infer(tiny_pipeline_dir, tmp_path, "--checkpoint", str(checkpoint), "--negative_prompt", negative,
                        "--guidance_scale", "6.5", "--scale", "0.75", "--scheduler", "Euler a", prompt=prompt)
    text = Image.open(path).text
    parsed = parse_a1111(text["parameters"])
    assert parsed == {"prompt": prompt, "negative": negative, "Steps": "2", "Sampler": "Euler a",
                      "CFG scale": "6.5", "Seed": str(SEED), "Size": "64x64", "Model": str(tiny_pipeline_dir),
                      "LoHa": str(checkpoint), "LoHa scale": "0.75"}
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler",
                                 "width", "height", "base_model", "checkpoint", "scale")} == {
        "prompt": prompt, "negative_prompt": negative, "seed": str(SEED), "steps": "2", "guidance_scale": "6.5",
        "scheduler": "Euler a", "width": "64", "height": "64", "base_model": str(tiny_pipeline_dir),
        "checkpoint": str(checkpoint), "scale": "0.75"}


def test_base_model_choice(files, tmp_path, capsys):
    adapter = loha.read_adapter(files["kohya SGM names"])
    args = infer.parse_args(["--checkpoint", "x"])
    assert infer.base_model_for(args, adapter) == adapter.base_model  # the tiny folder, from metadata
    for named, expected in [("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
                            ("sd_xl_base_1.0.safetensors", infer.DEFAULT_BASE_MODEL),
                            (None, infer.DEFAULT_BASE_MODEL)]:
        adapter.metadata["base_model"] = named
        assert infer.base_model_for(args, adapter) == expected
    # a recorded base that is not here: named, with its hash, and how to pass it (no silent substitute)
    for named in (str(tmp_path / "gone.safetensors"), "ponyDiffusionV6XL.safetensors"):
        adapter.metadata.update(base_model=named, ss_new_sd_model_hash="ab" * 32)
        with pytest.raises(infer.InferError, match=r"made for the base model .*\.safetensors \(sha256 abababab"):
            infer.base_model_for(args, adapter)
    args = infer.parse_args(["--checkpoint", "x", "--pretrained_model_name_or_path", "my/model"])
    assert infer.base_model_for(args, adapter) == "my/model"


# ----------------------------------------------------------------------------------- errors
def test_error_missing_path(tmp_path):
    assert "does not exist" in error_of(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])


def test_error_unknown_formats(files, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    assert "notes.txt" in error_of(["--checkpoint", str(folder), "--prompt", "x"])  # names what it found
    lora = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2),
                                 "lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, lora)
    assert "LoRA" in error_of(["--checkpoint", str(lora), "--prompt", "x"])
    text = tmp_path / "readme.safetensors"
    text.write_text("# not a model at all, just some text that is long enough")
    assert "not safetensors" in error_of(["--checkpoint", str(text), "--prompt", "x"])
    old_peft = tmp_path / "old_peft"  # PEFT's pre-safetensors layout
    old_peft.mkdir()
    (old_peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 4, "alpha": 4}))
    (old_peft / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    assert "pickle" in error_of(["--checkpoint", str(old_peft), "--prompt", "x"])
    empty_run = tmp_path / "run"
    (empty_run / "checkpoint-5").mkdir(parents=True)
    assert "none of its 1 checkpoint" in error_of(["--checkpoint", str(empty_run), "--prompt", "x"])


def test_error_truncated_and_corrupt_safetensors(files, tmp_path):
    data = Path(files["kohya SGM names"]).read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in error_of(["--checkpoint", str(truncated), "--prompt", "x"])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"\xff" * 16 + data[24:])
    assert "not a valid safetensors" in error_of(["--checkpoint", str(corrupt), "--prompt", "x"])


class _Tripwire:
    """Unpickling this creates a marker file: proof that something opened the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_error_pickle_refused_without_opening(suffix, tmp_path, monkeypatch):
    marker = tmp_path / "opened"
    file = tmp_path / f"model{suffix}"
    file.write_bytes(pickle.dumps(_Tripwire(marker)))
    real_open = open
    opened = []

    def spy(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr("io.open", spy)
    message = error_of(["--checkpoint", str(file), "--prompt", "x"])
    assert "pickle" in message
    assert str(file) not in opened and not marker.exists()


def test_error_adapter_for_another_base_model(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 80})  # attn2 k/v: 80 -> ...
    loha.inject(other, rank=RANK)
    loha.save(other, tmp_path / "other" / "unet", base_model=str(tiny_pipeline_dir))
    message = error_of(["--checkpoint", str(tmp_path / "other"), "--prompt", "x", "--output_dir", str(tmp_path)])
    assert "this LoHa was trained for a different base model" in message


def test_error_sd1_file_on_sdxl(files, tmp_path):
    # a kohya SD 1.5 LoHa: one text encoder, keyed lora_te_ (SDXL's are lora_te1_/lora_te2_)
    sd1 = tmp_path / "sd15_loha.safetensors"
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    factors = {f"{name}.hada_w1_a": torch.ones(32, 2), f"{name}.hada_w1_b": torch.ones(2, 32),
               f"{name}.hada_w2_a": torch.ones(32, 2), f"{name}.hada_w2_b": torch.ones(2, 32),
               f"{name}.alpha": torch.tensor(2.0)}
    safetensors.torch.save_file(factors, sd1, metadata={"ss_base_model_version": "sd_v1"})
    assert "trained for a different base model" in error_of(["--checkpoint", str(sd1), "--prompt", "x"])


def test_error_empty_prompt_list(files, tmp_path):
    assert "no prompts" in error_of(["--checkpoint", str(files["kohya SGM names"])], status=2)
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n   \n\n")
    message = error_of(["--checkpoint", str(files["kohya SGM names"]), "--prompts_file", str(blank)])
    assert f"no prompts: --prompts_file {blank} has no non-blank line" in message  # names the file
    assert "cannot read" in error_of(["--checkpoint", str(files["kohya SGM names"]),
                                      "--prompts_file", str(tmp_path / "missing.txt")])


@pytest.mark.parametrize("size", [["--height", "100"], ["--width", "0"], ["--height", "-64"]])
def test_error_bad_size(size, files):
    assert "multiple of 8" in error_of(["--checkpoint", str(files["kohya SGM names"]), "--prompt", "x", *size],
                                       status=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_absent(files):
    assert "no CUDA" in error_of(["--checkpoint", str(files["kohya SGM names"]), "--prompt", "x", "--device", "cuda"])


def test_error_bad_flags(files):
    """Usage errors exit 2, as argparse's do (runtime errors exit 1)."""
    assert "unknown scheduler" in error_of(["--checkpoint", "x", "--prompt", "x", "--scheduler", "PLMS"], status=2)
    assert "--checkpoint" in error_of(["--prompt", "x"], status=2)
    assert "--num_images" in error_of(["--checkpoint", "x", "--prompt", "x", "--num_images", "0"], status=2)


# ----------------------------------------------------------------------------------- the real CLI
def _cli(*argv):
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *argv], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=120)


def test_cli_prints_written_paths(tiny_pipeline_dir, files, tmp_path):
    result = _cli("--checkpoint", str(files["output_dir"]), "--prompt", PROMPT, "--num_inference_steps", "2",
                  "--seed", str(SEED), "--output_dir", str(tmp_path), "--compare")
    assert result.returncode == 0, result.stderr[-2000:]
    paths = result.stdout.split()
    assert paths == [str(tmp_path / f"000-000-seed{SEED}.png"), str(tmp_path / f"000-000-seed{SEED}-compare.png")]
    assert Image.open(paths[1]).size == (128, 64)  # the pipeline's default size, from the metadata's model
    assert "base model: " + str(tiny_pipeline_dir) in result.stderr


def test_cli_error_is_one_line_and_non_zero(files, tmp_path):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(Path(files["kohya SGM names"]).read_bytes()[:1000])
    result = _cli("--checkpoint", str(truncated), "--prompt", "x")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "truncated" in last


# ----------------------------------------------------------------------------------- a real training run
@pytest.fixture(scope="module")
def trained_run(tiny_pipeline_dir, tmp_path_factory):
    """Two steps of train_loha_sdxl.py with text-encoder LoHa, a checkpoint at each step."""
    train = pytest.importorskip("train_loha_sdxl")
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("trained")
    argv = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir",
            str(REPO / "examples" / "data"), "--resolution", "64", "--train_batch_size", "1",
            "--max_train_steps", "2", "--checkpointing_steps", "1", "--learning_rate", "3e-2",
            "--train_text_encoder", "--output_dir", str(root / "out"), "--feature_cache_dir", str(root / "cache"),
            "--report_to", "none", "--output_name", "mine"]
    try:
        assert train.main(argv) == 0
    finally:  # accelerate keeps process-wide state
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return root / "out"


def test_trained_output_dir_checkpoints_and_export_give_one_image(trained_run, tiny_pipeline_dir, images, tmp_path,
                                                                  capsys):
    out = trained_run
    assert {"unet", "text_encoder", "text_encoder_2", "mine.safetensors", "checkpoint-2"} <= {
        p.name for p in out.iterdir()}
    final = one_image(tiny_pipeline_dir, tmp_path / "final", out, base=False)  # base model from the metadata
    assert np.abs(final - images["base"]).mean() > 2  # the trained adapter (incl. text encoders) shows
    for name, path in [("checkpoint", out / "checkpoint-2"), ("kohya export", out / "mine.safetensors")]:
        np.testing.assert_array_equal(one_image(tiny_pipeline_dir, tmp_path / name, path, base=False), final,
                                      err_msg=name)
    # a run without its final folders yet resolves to its newest checkpoint
    running = tmp_path / "running"
    running.mkdir()
    for step in (1, 2):
        (running / f"checkpoint-{step}").symlink_to(out / f"checkpoint-{step}", target_is_directory=True)
    np.testing.assert_array_equal(one_image(tiny_pipeline_dir, tmp_path / "running_out", running, base=False), final)
    assert "latest complete checkpoint, checkpoint-2" in capsys.readouterr().err


def test_fuse_in_bf16_stays_within_bf16_tolerance(tiny_pipeline_dir, files, ours_image, tmp_path):
    # both paths round W + ΔW (summed in fp32) to bf16, once (--fuse) or per call (measured: identical here)
    fused = one_image(tiny_pipeline_dir, tmp_path / "f", files["kohya SGM names"], "--dtype", "bf16", "--fuse")
    unfused = one_image(tiny_pipeline_dir, tmp_path / "u", files["kohya SGM names"], "--dtype", "bf16")
    assert np.abs(fused - unfused).mean() < 0.5, np.abs(fused - unfused).mean()
    assert np.abs(fused - unfused).max() <= 8
    assert np.abs(unfused - ours_image).max() > 0  # --dtype bf16 really ran in bf16


def test_error_base_model_not_found(files, tmp_path):
    missing = str(tmp_path / "no_such_model")
    message = error_of(["--checkpoint", str(files["kohya SGM names"]), "--prompt", "x",
                        "--pretrained_model_name_or_path", missing, "--output_dir", str(tmp_path)])
    assert "neither a folder here" in message and "hub id" in message
