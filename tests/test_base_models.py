"""Base models: fp8 storage of the frozen weights, single-file checkpoints, and the dry run's plan and memory
estimate; on the tiny offline SDXL pipeline."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

import loha
import train_loha_sdxl as T
from loha.fp8 import FP8, store_fp8
from loha.tiny_sdxl import tiny_unet
from tests.helpers import randomize_adapters, unet_inputs
from tests.test_train import adapter_weights, assert_same_weights, base_args

pytestmark = pytest.mark.usefixtures("one_thread_and_fresh_accelerate")


def rounded_to_fp8(module):
    """A copy whose Linear and Conv2d weights are rounded to fp8 and kept in their own dtype."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d):
            m.weight.data = m.weight.data.to(FP8).to(m.weight.dtype)
    return module


@pytest.mark.parametrize("mode", ["grouped", "merged"])
def test_an_fp8_base_computes_what_its_rounded_weights_do(mode):
    """The tiny UNet with LoHa under bf16 autocast: fp8-stored weights give the same output and the same factor
    gradients, bit for bit, as the same weights rounded to fp8 and kept in bf16 (grouped builds upcast inside the
    stacked W + ΔW; frozen layers per use); the fp8 model keeps half the bytes per weight."""
    base = tiny_unet(0).to(torch.bfloat16).requires_grad_(False)
    models = []
    for fp8 in (True, False):
        unet = copy.deepcopy(base)
        if fp8:
            assert store_fp8(unet) > 200
        else:
            unet = rounded_to_fp8(unet)
        loha.inject(unet, rank=4, preset="full", forward_mode=mode, stack=mode == "grouped")
        randomize_adapters(unet, seed=3, std=0.1)
        models.append(unet)
    inputs = unet_inputs()
    results = []
    for unet in models:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(**inputs).sample
        out.float().square().mean().backward()
        results.append([out.detach(), *(g for layer in loha.loha_layers(unet).values()
                                        for g in layer.factor_gradients())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    fp8_weights = [m.weight for m in models[0].modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert fp8_weights and all(w.dtype == FP8 for w in fp8_weights)


def test_store_fp8_refuses_a_trainable_weight():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(loha.LoHaError, match="trainable weight"):
        store_fp8(layer)


@pytest.fixture(scope="module")
def fp8_rounded_pipeline(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline with its UNet's Linear/Conv2d weights rounded to fp8 from bf16 (as a bf16 run loads them
    before storing them in fp8), kept in bf16."""
    out = tmp_path_factory.mktemp("fp8-rounded") / "tiny"
    shutil.copytree(tiny_pipeline_dir, out)
    file = out / "unet" / "diffusion_pytorch_model.safetensors"
    from diffusers import UNet2DConditionModel

    unet = rounded_to_fp8(UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet",
                                                               dtype=torch.bfloat16))
    safetensors.torch.save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(file))
    return out


def test_fp8_training_matches_rounded_weights_exports_and_resumes(tiny_pipeline_dir, fp8_rounded_pipeline, tmp_path):
    """--base_precision fp8 under bf16 mixed precision: the adapter after 3 steps equals the run on weights
    rounded to fp8 and kept in bf16 (bit for bit); its kohya file is the usual one (same keys, fp32 factors, the
    base precision recorded); and a run resumed from checkpoint-2 ends on the uninterrupted run's adapter."""
    common = ("--mixed_precision", "bf16", "--rank", "4", "--checkpointing_steps", "2")
    fp8_out = tmp_path / "fp8"
    assert T.main(base_args(tiny_pipeline_dir, fp8_out, tmp_path / "c", *common, "--base_precision", "fp8")) == 0
    rounded = tmp_path / "rounded"
    assert T.main(base_args(fp8_rounded_pipeline, rounded, tmp_path / "c2", *common)) == 0
    assert_same_weights(adapter_weights(fp8_out / "unet"), adapter_weights(rounded / "unet"))
    file = loha.read_adapter(fp8_out / "loha.safetensors")
    usual = loha.read_adapter(rounded / "loha.safetensors")
    assert file.components.keys() == usual.components.keys() == {"unet"}
    assert file.components["unet"].keys() == usual.components["unet"].keys()
    with safetensors.safe_open(str(fp8_out / "loha.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "hada_" in k} == {"F32"}
    assert json.loads((fp8_out / "training_args.json").read_text())["base_precision"] == "fp8"
    resumed = tmp_path / "resumed"
    shutil.copytree(fp8_out / "checkpoint-2", resumed / "checkpoint-2")
    assert T.main(base_args(tiny_pipeline_dir, resumed, tmp_path / "c", *common, "--base_precision", "fp8",
                            "--resume_from_checkpoint", "latest")) == 0
    assert_same_weights(adapter_weights(resumed / "unet"), adapter_weights(fp8_out / "unet"))


def test_infer_with_an_fp8_base(tiny_pipeline_dir, fp8_rounded_pipeline, tmp_path):
    """infer.py --base_precision fp8: the image of the fp8-stored UNet equals the one of its fp8-rounded twin."""
    import numpy as np
    from PIL import Image

    import infer

    unet = tiny_unet(0)
    loha.inject(unet, rank=4)
    randomize_adapters(unet, seed=2, std=0.2)
    loha.save(unet, tmp_path / "adapter")
    images = []
    for base, extra in ((tiny_pipeline_dir, ["--base_precision", "fp8"]), (fp8_rounded_pipeline, [])):
        out = tmp_path / f"img-{len(images)}"
        written = infer.main(["--checkpoint", str(tmp_path / "adapter"), "--pretrained_model_name_or_path", str(base),
                              "--prompt", "a cat", "--num_inference_steps", "2", "--dtype", "bf16",
                              "--output_dir", str(out), *extra])
        images.append(np.asarray(Image.open(written[0])))
    assert np.array_equal(images[0], images[1])


# ---------------------------------------------------------------------------------------- the dry run
def test_dry_run_prints_the_plan_and_an_estimate_and_writes_nothing(tiny_pipeline_dir, tmp_path, capsys):
    """--dry_run: the plan (images, buckets, batches, epochs, steps) and the estimated peak, from the configs;
    nothing is written (not the output folder, not the feature cache's latents), no weight is read."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = base_args(tiny_pipeline_dir, out, cache, "--dry_run", "--train_batch_size", "2", steps=8)
    real_load = T.load_models
    T.load_models = lambda *a: pytest.fail("a dry run loads no model")
    try:
        assert T.main(argv) == 0
    finally:
        T.load_models = real_load
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "plan: 7 training images" in text and "64x64: 7" in text and "8 steps" in text
    assert "estimated peak GPU memory:" in text and "fits a GPU with 8 GB" in text
    assert not out.exists() and not (cache / "latents").exists()


def test_the_estimate_is_the_counted_peak_of_the_trainers_own_step(tiny_pipeline_dir, tmp_path):
    """The dry run's estimate and bench.py --count's peak (the item-1 measurement, its own step harness) for the
    same configuration: the tiny UNet, bf16, 64², batch 1, rank 8, attention preset, latents and embeddings
    cached, with and without checkpointing. The trainer's step also holds its noise, latents and time ids:
    within 1 % (the SDXL comparison is test_sdxl_estimate_matches_the_committed_table)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import count

    import bench

    for checkpointing in (False, True):
        args = T.parse_args(base_args(tiny_pipeline_dir, tmp_path / "o", tmp_path / "cache", "--rank", "8",
                                      "--cache_latents", *(["--gradient_checkpointing"] if checkpointing else [])))
        data = T.load_training_data(args, T.SimpleNamespace(is_main_process=False, num_processes=1))
        estimate = T.estimate_peak(args, data, "bf16")
        counted = count.count_all(bench.parse_args(["--count", "--model", "tiny", "--dtype", "bf16", "--resolution",
                                                    "64", "--variants", "floor", "loha-grouped",
                                                    *(["--gradient_checkpointing"] if checkpointing else [])]))
        ours = counted["counts"]["loha-grouped"]["peak"]["bytes"]
        assert abs(estimate["bytes"] - ours) <= 0.01 * ours, (checkpointing, estimate["bytes"], ours)
        assert estimate["bytes"] > counted["counts"]["floor"]["peak"]["bytes"]
        again = T.estimate_peak(args, data, "bf16")  # cached by configuration
        assert again == estimate and list((tmp_path / "cache" / "estimates").glob("*.json"))


# ------------------------------------------------------------------------------------ single files
def test_a_single_file_base_trains_like_its_folder(tiny_pipeline_dir, tiny_single_file, tmp_path):
    """The tiny pipeline written as a single file (A1111/ComfyUI layout) trains, with --config for its
    configs, to the adapter its diffusers folder trains to, bit for bit (same seed, MKL_CBWR, fresh aligned
    storage on both paths); the file records the single file as its base, with kohya's hashes."""
    folder = tmp_path / "folder"
    assert T.main(base_args(tiny_pipeline_dir, folder, tmp_path / "c1")) == 0
    single = tmp_path / "single"
    assert T.main(base_args(tiny_single_file, single, tmp_path / "c2", "--config", tiny_pipeline_dir)) == 0
    assert_same_weights(adapter_weights(folder / "unet"), adapter_weights(single / "unet"))
    _, metadata = loha.read_safetensors(single / "loha.safetensors")
    assert metadata["ss_sd_model_name"] == "tiny-sdxl.safetensors"
    assert metadata["loha.base_model"] == str(tiny_single_file.resolve())
    assert len(metadata["ss_sd_model_hash"]) == 8 and len(metadata["ss_new_sd_model_hash"]) == 64


def test_bad_single_files_are_refused_in_one_line(tiny_pipeline_dir, tmp_path, capsys):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    adapter = tmp_path / "adapter.safetensors"
    unet = tiny_unet(0)
    loha.inject(unet, rank=2)
    loha.export_kohya(unet, adapter)
    for file, words in ((pickle, "is a pickle"), (garbage, "garbage.safetensors"), (adapter, "not a single-file")):
        code = T.main(base_args(file, tmp_path / "o", tmp_path / "c", "--config", tiny_pipeline_dir))
        assert code != 0
        assert words in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o" / "unet").exists()


def test_a_single_file_without_config_offline_says_to_pass_config(tiny_single_file, tmp_path, capsys):
    code = T.main(base_args(tiny_single_file, tmp_path / "o", tmp_path / "c"))
    assert code != 0
    assert "pass --config" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_single_file_vae_and_base_for_inference(tiny_pipeline_dir, tiny_single_file, tmp_path):
    """--pretrained_vae_model_name_or_path takes a single-file VAE (the LDM layout, read by diffusers); infer.py
    renders from a single-file base with --config, the image its folder gives."""
    import numpy as np
    from PIL import Image

    import infer
    from loha import checkpoints as ck

    vae = loha.read_safetensors(tiny_single_file)[0]
    vae_file = tmp_path / "vae.safetensors"
    safetensors.torch.save_file({k.removeprefix(ck.PREFIX["vae"]): v for k, v in vae.items()
                                 if k.startswith(ck.PREFIX["vae"])}, str(vae_file))
    out = tmp_path / "run"
    assert T.main(base_args(tiny_pipeline_dir, out, tmp_path / "c", "--pretrained_vae_model_name_or_path", vae_file,
                            steps=1)) == 0
    images = []
    for base, extra in ((tiny_single_file, ["--config", str(tiny_pipeline_dir)]), (tiny_pipeline_dir, [])):
        written = infer.main(["--checkpoint", str(out), "--pretrained_model_name_or_path", str(base), "--prompt", "a",
                              "--num_inference_steps", "2", "--output_dir", str(tmp_path / f"i{len(images)}"), *extra])
        images.append(np.asarray(Image.open(written[0])))
    assert np.array_equal(*images)


def test_v_prediction_with_zero_terminal_snr(tiny_pipeline_dir, tmp_path):
    """--prediction_type v_prediction --zero_terminal_snr: the training scheduler's last timestep has zero SNR
    (Lin et al. 2023's rescaled betas, as diffusers computes them), the sampler ends on it, and a run trains."""
    args = T.parse_args(base_args(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c", "--prediction_type",
                                  "v_prediction", "--zero_terminal_snr"))
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(tiny_pipeline_dir, subfolder="scheduler")
    noise, sampling = T.make_schedulers(config, args)
    assert noise.config.prediction_type == "v_prediction" and sampling.config.prediction_type == "v_prediction"
    assert noise.alphas_cumprod[-1].item() == 0.0 and noise.alphas_cumprod[0].item() > 0.99
    plain, _ = T.make_schedulers(config, T.parse_args(base_args(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c")))
    assert plain.alphas_cumprod[-1].item() > 0
    sampling.set_timesteps(4)
    assert int(sampling.timesteps[0]) == noise.config.num_train_timesteps - 1
    assert T.main(base_args(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c", "--prediction_type", "v_prediction",
                            "--zero_terminal_snr", steps=2)) == 0
