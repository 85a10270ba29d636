"""The training controls recipes rely on (issue 33): per-part learning rates, the optimizers and schedules,
loss options against formulas written here, starting from a LoHa, a loadable file per save, sample prompts,
validation loss, EMA and max-norm. Tiny offline SDXL pipeline, a few steps per run."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image
from torch import nn

import loha
import loha.formats
import loha.optimizers as O
import train_loha_sdxl as T
from loha import data as D
from loha import sampling

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "data"

pytestmark = pytest.mark.usefixtures("one_thread_and_fresh_accelerate")


def argv_for(model_dir, out, cache, *extra, steps=3):
    return ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(EXAMPLES),
            "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--feature_cache_dir", str(cache), "--report_to", "none",
            "--checkpointing_steps", "1000", "--learning_rate", "1e-3", *map(str, extra)]


def train(model_dir, tmp_path, name, *extra, steps=3) -> Path:
    out = tmp_path / name
    assert T.main(argv_for(model_dir, out, tmp_path / "cache", *extra, steps=steps)) == 0
    return out


def refused(capsys, argv, *fragments) -> str:
    with contextlib.suppress(SystemExit):  # argparse errors exit 2; main() errors return 1
        assert T.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for f in fragments:
        assert f in err, err
    return err


def factors(folder: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))


def deltas(file) -> dict[str, torch.Tensor]:
    """scale·ΔW of every module of an adapter file, in float64, from the factors (written out here)."""
    adapter = loha.read_adapter(file)
    out = {}
    for component, modules in adapter.components.items():
        for name, mw in modules.items():
            w1a, w1b, w2a, w2b = (f.double() for f in mw.factors[:4])
            out[f"{component}.{name}"] = (w1a @ w1b) * (w2a @ w2b) * (mw.alpha / mw.rank)
    return out


# ------------------------------------------------------------------------------ learning rates
def test_a_zero_rate_freezes_its_part_exactly(tiny_pipeline_dir, tmp_path):
    """Text-encoder rate 0: the encoders' adapters are bitwise what they were at the start (a 1-step and a
    3-step run agree) while the UNet's move; UNet rate 0: the reverse. A frozen part is still exported."""
    common = ("--train_text_encoder", "--no-cache_text_embeddings")
    te_frozen = [train(tiny_pipeline_dir, tmp_path, f"te{n}", *common, "--text_encoder_lr", "0", steps=n)
                 for n in (1, 3)]
    unet_frozen = [train(tiny_pipeline_dir, tmp_path, f"unet{n}", *common, "--unet_lr", "0", "--text_encoder_lr",
                         "1e-2", "2e-2", steps=n) for n in (1, 3)]
    for part in ("text_encoder", "text_encoder_2"):
        assert factors(te_frozen[0] / part).keys() == factors(te_frozen[1] / part).keys()
        for k, v in factors(te_frozen[0] / part).items():
            assert torch.equal(v, factors(te_frozen[1] / part)[k]), k
        moved = factors(unet_frozen[1] / part)
        assert any(not torch.equal(v, moved[k]) for k, v in factors(unet_frozen[0] / part).items())
    for k, v in factors(unet_frozen[0] / "unet").items():
        assert torch.equal(v, factors(unet_frozen[1] / "unet")[k]), k
    assert any(not torch.equal(v, factors(te_frozen[1] / "unet")[k]) for k, v in factors(te_frozen[0] / "unet").items())
    with safetensors.safe_open(str(unet_frozen[1] / "loha.safetensors"), "pt") as f:
        meta = f.metadata()
        assert any(k.startswith("lora_te1_") for k in f.keys())  # the frozen UNet's and trained encoders' modules
    assert meta["ss_unet_lr"] == "0.0" and meta["ss_text_encoder_lr"] == "[0.01, 0.02]"
    card = (unet_frozen[1] / "README.md").read_text()
    assert "unet 0, text_encoder 0.01, text_encoder_2 0.02" in card
    args = json.loads((unet_frozen[1] / "training_args.json").read_text())
    assert args["unet_lr"] == 0 and args["text_encoder_lr"] == [0.01, 0.02]


def test_learning_rate_flags_are_checked(tiny_pipeline_dir, tmp_path, capsys):
    argv = argv_for(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c")
    refused(capsys, [*argv, "--text_encoder_lr", "1e-5"], "--text_encoder_lr needs --train_text_encoder")
    refused(capsys, [*argv, "--unet_lr", "0"], "every learning rate is 0")
    refused(capsys, [*argv, "--train_text_encoder", "--no-cache_text_embeddings", "--text_encoder_lr", "0.1", "0.2",
                     "0.3"], "one value (both encoders) or two")
    refused(capsys, [*argv, "--optimizer", "Prodigy", "--train_text_encoder", "--no-cache_text_embeddings",
                     "--text_encoder_lr", "0.5"], "Prodigy adapts one step size")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ optimizers
def tiny_model(stack: bool) -> nn.Module:
    """Two Linear shapes (three layers) and a 3x3 conv, LoHa in float64: what stacking groups and what it does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.Linear(24, 40), nn.Linear(40, 24), nn.Conv2d(4, 6, 3, padding=1))
    model.double()
    loha.inject(model, rank=3, alpha=2.0, target_modules=["0", "1", "2", "3"], dtype=torch.float64, stack=stack,
                forward_mode="grouped" if stack else "merged")
    for layer in loha.loha_layers(model).values():
        with torch.no_grad():
            for f in layer.factors():
                f.normal_(std=0.3)  # w2a is 0 at init; make every factor move from the first step
    return model


def tiny_loss(model, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    image = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    y = model[2](torch.tanh(model[0](x) * model[1](x)))
    return (y ** 2).mean() + (model[3](image) ** 2).mean()


OPTIMIZER_SETTINGS = {
    "AdamW": ({}, 1e-2), "AdamW8bit": ({}, 1e-2), "Lion": ({}, 1e-3),
    "Prodigy": ({"d0": 1e-3}, 1.0), "DAdaptAdam": ({"d0": 1e-3}, 1.0),
    "Adafactor": ({"relative_step": False, "scale_parameter": False}, 1e-2),
}


@pytest.mark.parametrize("name", list(O.OPTIMIZERS))
def test_stacked_storage_steps_like_per_layer_parameters(name):
    """float64, 4 steps: the stacked model (stepping on its stacks or on per-layer views) ends where the per-layer
    model does, to 1e-10 relative: Adafactor's factored moments, 8-bit blocks and Prodigy's sums see the tensors
    per-layer storage gives them."""
    options, lr = OPTIMIZER_SETTINGS[name]
    if name == "AdamW8bit":
        options = {"min_8bit_size": 64}  # small enough that the tiny factors are quantized too
    ends = []
    for stack in (False, True):
        model = tiny_model(stack)
        optimizer, views = O.make(name, [{"models": [model], "lr": lr}], dict(options))
        assert (views is not None) == O.OPTIMIZERS[name][3]
        params = loha.trainable_parameters(model)
        start = [p.detach().clone() for p in params]
        for step in range(4):
            tiny_loss(model, step).backward()
            if views is not None:
                views.hand_gradients()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if views is not None:
                views.clear_stack_gradients()
        assert any(not torch.equal(a, b) for a, b in zip(start, params)), "the factors did not move"
        ends.append({k: v.clone() for k, v in loha.adapter_state_dict(model).items()})
    assert ends[0].keys() == ends[1].keys()
    for k in ends[0]:
        torch.testing.assert_close(ends[1][k], ends[0][k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("name,extra", [
    ("AdamW8bit", ()), ("Lion", ("--learning_rate", "1e-4")),
    ("Prodigy", ("--learning_rate", "1.0", "--optimizer_args", "decouple=True", "d0=1e-4")),
    ("DAdaptAdam", ("--learning_rate", "1.0", "--optimizer_args", "d0=1e-4")),
    ("adafactor", ("--lr_scheduler", "adafactor")),
    ("Adafactor", ("--optimizer_args", "relative_step=False", "scale_parameter=False", "warmup_init=False",
                   "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1", "--max_grad_norm", "0")),
])
def test_each_optimizer_trains_in_the_trainer(tiny_pipeline_dir, tmp_path, name, extra):
    out = train(tiny_pipeline_dir, tmp_path, "o", "--optimizer_type", name, "--checkpointing_steps", "2", *extra,
                steps=2)
    trained = factors(out / "unet")
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(v.abs().max() > 0 for k, v in trained.items() if "hada_w2_a" in k)  # zero at init: it moved
    with safetensors.safe_open(str(out / "loha.safetensors"), "pt") as f:
        recorded = f.metadata()["ss_optimizer"]
    cls = O.optimizer_class(name)
    assert recorded.startswith(f"{cls.__module__}.{cls.__name__}")
    if "--optimizer_args" in extra:
        assert recorded.endswith("(" + ",".join(a for a in extra if "=" in a) + ")")
    assert json.loads((out / "checkpoint-2" / T.STATE_FILE).read_text())["global_step"] == 2


def test_optimizer_and_schedule_errors_are_one_line(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    argv = argv_for(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c")
    real = importlib.import_module

    def without(package):
        def import_module(name, *a, **kw):
            if name.split(".")[0] == package:
                raise ImportError(f"No module named '{package}'")
            return real(name, *a, **kw)
        return import_module

    monkeypatch.setattr(importlib, "import_module", without("prodigyopt"))
    refused(capsys, [*argv, "--optimizer", "prodigy"], "--optimizer Prodigy needs `pip install prodigyopt`")
    monkeypatch.setattr(importlib, "import_module", without("bitsandbytes"))
    refused(capsys, [*argv, "--use_8bit_adam"], "--optimizer AdamW8bit needs `pip install bitsandbytes`")
    monkeypatch.undo()
    refused(capsys, [*argv, "--optimizer", "SGDNesterov"], "unknown optimizer 'SGDNesterov'")
    refused(capsys, [*argv, "--optimizer", "Adafactor"], "use --lr_scheduler adafactor")
    refused(capsys, [*argv, "--lr_scheduler", "adafactor"], "goes with Adafactor's relative step")
    refused(capsys, [*argv, "--optimizer_args", "betas"], "key=value pairs")
    refused(capsys, [*argv, "--optimizer_args", "betas=(0.9,0.99)"], "use --adam_beta1")
    refused(capsys, [*argv, "--optimizer", "Lion", "--adam_beta1", "0.8"], "Lion takes its settings through")
    refused(capsys, [*argv, "--lr_scheduler", "piecewise_constant"], "--lr_step_rules")
    refused(capsys, [*argv, "--optimizer", "Prodigy", "--optimizer_args", "no_such_option=1"],
            "--optimizer Prodigy with these --optimizer_args")


@pytest.mark.parametrize("name", O.SCHEDULES[:-1])
def test_every_diffusers_schedule_runs(name):
    model = tiny_model(True)
    optimizer, _ = O.make("AdamW", [{"models": [model], "lr": 0.1}], {})
    schedule = O.make_schedule(name, optimizer, warmup_steps=2, total_steps=10, num_cycles=2, power=2.0,
                               step_rules="1:3,0.5:6,0.1" if name == "piecewise_constant" else None, initial_lr=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert max(lrs) <= 0.1 + 1e-12
    if name == "cosine_with_restarts":  # two cycles after the warm-up: it comes back up once
        assert any(b > a for a, b in zip(lrs[3:], lrs[4:]))
    if name == "piecewise_constant":
        assert lrs[:3] == [0.1] * 3 and lrs[3:6] == [0.05] * 3 and math.isclose(lrs[-1], 0.01)


# ------------------------------------------------------------------------------ loss options
def alphas_cumprod_f64() -> np.ndarray:
    """SDXL's scaled-linear schedule, written out: betas linear in √β from 0.00085 to 0.012 over 1000 steps."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def stub_run(prediction, v_prediction=False):
    """A run whose UNet returns ``prediction`` and records its input: what batch_loss does around the model."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction" if v_prediction else "epsilon")
    seen = []

    def unet(noisy, t, embeds, added_cond_kwargs, return_dict):
        seen.append((noisy.clone(), t.clone()))
        return (prediction.clone().requires_grad_(),)

    models = SimpleNamespace(noise_scheduler=scheduler, vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5)),
                             weight_dtype=torch.float32)
    run = SimpleNamespace(models=models, accelerator=SimpleNamespace(device=torch.device("cpu")), trained={})
    return run, unet, seen


def stub_batch(n=3, loss_weight=(1.0, 1.0, 1.0)):
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(n, 4, 4, 4, generator=g)
    params = torch.cat([mean, torch.full_like(mean, -40.0)], dim=1)  # a posterior with ~0 variance
    return {"index": list(range(10, 10 + n)), "epoch": [2] * n, "draw": [0, 1, 0][:n], "latent_params": params,
            "prompt_embeds": torch.zeros(n, 77, 8), "pooled": torch.zeros(n, 8), "time_ids": torch.zeros(n, 6),
            "loss_weight": list(loss_weight)}


def loss_args(**kw):
    defaults = dict(seed=3, noise_offset=0.0, min_timestep=None, max_timestep=None, ip_noise_gamma=0.0,
                    ip_noise_gamma_random_strength=False, loss_type="l2", huber_c=None, huber_schedule=None,
                    huber_scale=None, snr_gamma=None, debiased_estimation_loss=False, train_text_encoder=False)
    return argparse.Namespace(**{**defaults, **kw})


@pytest.mark.parametrize("case", [
    dict(loss_type="l2"), dict(loss_type="l1"),
    dict(loss_type="huber", huber_c=0.1, huber_schedule="snr", huber_scale=1.0),
    dict(loss_type="huber", huber_c=0.2, huber_schedule="exponential", huber_scale=2.0),
    dict(loss_type="smooth_l1", huber_c=0.3, huber_schedule="constant", huber_scale=0.5),
    dict(snr_gamma=5.0), dict(debiased_estimation_loss=True), dict(snr_gamma=1.0, debiased_estimation_loss=True),
    dict(snr_gamma=5.0, v=True), dict(debiased_estimation_loss=True, v=True, loss_type="smooth_l1", huber_c=0.1,
                                      huber_schedule="snr", huber_scale=1.0),
])
def test_each_loss_option_matches_its_formula(case):
    """kohya's rules, written out in float64: pseudo-Huber 2δ(√(e²+δ²)−δ) (smooth_l1 without the leading δ),
    δ by schedule (snr: (1−c)/(1+σ)²+c with σ=√((1−ᾱ)/ᾱ); exponential: scale·c^(t/T); constant: c·scale); min-SNR
    min(SNR,γ)/SNR (ε) or /(SNR+1) (v); debiased 1/√min(SNR,1000) (ε) or 1/(min(SNR,1000)+1) (v)."""
    case = dict(case)
    v = case.pop("v", False)
    args = loss_args(**case)
    prediction = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    run, unet, _ = stub_run(prediction, v)
    batch = stub_batch(loss_weight=(1.0, 0.5, 1.0))
    got = T.batch_loss(run, args, batch, unet).item()

    t, noise, eps, _ = T.draw_noise(args, batch, (4, 4, 4), 0, 1000)  # the draws themselves are the trainer's
    t = t.numpy()
    latents = (batch["latent_params"][:, :4].double() + np.exp(-20.0) * eps.double()).numpy() * 0.5
    abar = alphas_cumprod_f64()[t]
    noise = noise.double().numpy()
    target = (np.sqrt(abar)[:, None, None, None] * noise - np.sqrt(1 - abar)[:, None, None, None] * latents
              if v else noise)
    e = prediction.double().numpy() - target
    kind = args.loss_type
    if kind == "l2":
        per = e ** 2
    elif kind == "l1":
        per = np.abs(e)
    else:
        sigma = np.sqrt((1 - abar) / abar)
        delta = {"snr": (1 - args.huber_c) / (1 + sigma) ** 2 + args.huber_c,
                 "exponential": args.huber_scale * args.huber_c ** (t / 1000),
                 "constant": np.full(len(t), args.huber_c * args.huber_scale)}[args.huber_schedule][:, None, None, None]
        root = np.sqrt(e ** 2 + delta ** 2) - delta
        per = 2 * delta * root if kind == "huber" else 2 * root
    per_sample = per.mean(axis=(1, 2, 3)) * np.array([1.0, 0.5, 1.0])
    snr = abar / (1 - abar)
    if args.snr_gamma:
        per_sample *= np.minimum(snr, args.snr_gamma) / (snr + 1 if v else snr)
    if args.debiased_estimation_loss:
        capped = np.minimum(snr, 1000)
        per_sample *= 1 / (capped + 1) if v else 1 / np.sqrt(capped)
    assert got == pytest.approx(per_sample.mean(), rel=2e-5)


def test_timestep_range_and_input_perturbation():
    """--min/--max_timestep: draws in [min, max), equal ends give that timestep; --ip_noise_gamma: the UNet sees
    add_noise(latents, noise + γ·ξ) while the target stays the noise (a UNet returning the noise has zero loss)."""
    args = loss_args(min_timestep=200, max_timestep=260)
    batch = stub_batch()
    batch.update(index=list(range(200)), epoch=[0] * 200, draw=[0] * 200)
    t = T.draw_noise(args, batch, (1, 1, 1), 200, 260)[0]
    assert t.min() >= 200 and t.max() < 260 and len(set(t.tolist())) > 20
    assert set(T.draw_noise(args, batch, (1, 1, 1), 500, 500)[0].tolist()) == {500}
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    assert T.timestep_range(loss_args(), scheduler) == (0, 1000)
    with pytest.raises(loha.LoHaError, match="1000 timesteps"):
        T.timestep_range(loss_args(max_timestep=1001), scheduler)

    for gamma, random_strength in ((0.1, False), (0.3, True)):
        args = loss_args(ip_noise_gamma=gamma, ip_noise_gamma_random_strength=random_strength)
        batch = stub_batch()
        t, noise, eps, perturbation = T.draw_noise(args, batch, (4, 4, 4), 0, 1000)
        run, unet, seen = stub_run(noise)
        assert T.batch_loss(run, args, batch, unet).item() == 0
        latents = (batch["latent_params"][:, :4] + torch.exp(torch.tensor(-20.0)) * eps) * 0.5
        scheduler = run.models.noise_scheduler
        expected = scheduler.add_noise(latents, noise + perturbation, t)
        torch.testing.assert_close(seen[0][0], expected)
        assert not torch.allclose(seen[0][0], scheduler.add_noise(latents, noise, t))
        norms = perturbation.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
        assert (norms < gamma * 1.5).all() and (norms > (0 if random_strength else gamma * 0.5)).all()
    assert T.draw_noise(loss_args(), stub_batch(), (4, 4, 4), 0, 1000)[3] is None


def test_loss_flags_are_checked_and_recorded(tiny_pipeline_dir, tmp_path, capsys):
    argv = argv_for(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c")
    refused(capsys, [*argv, "--huber_c", "0.2"], "--huber_c goes with --loss_type huber or smooth_l1")
    refused(capsys, [*argv, "--loss_type", "huber", "--huber_c", "0"], "--huber_c must be in (0, 1]")
    refused(capsys, [*argv, "--min_timestep", "500", "--max_timestep", "100"], "is above --max_timestep")
    refused(capsys, [*argv, "--ip_noise_gamma_random_strength"], "needs --ip_noise_gamma")
    out = train(tiny_pipeline_dir, tmp_path, "o", "--loss_type", "smooth_l1", "--huber_schedule", "exponential",
                "--debiased_estimation_loss", "--ip_noise_gamma", "0.1", "--min_timestep", "100", "--max_timestep",
                "900", steps=1)
    with safetensors.safe_open(str(out / "loha.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"], meta["ss_huber_scale"]) == (
        "smooth_l1", "exponential", "0.1", "1.0")
    assert (meta["ss_debiased_estimation"], meta["ss_ip_noise_gamma"], meta["ss_min_timestep"],
            meta["ss_max_timestep"]) == ("True", "0.1", "100", "900")


# ------------------------------------------------------------------------------ starting from a LoHa
def test_network_weights_reproduce_the_file_at_step_0(tiny_pipeline_dir, tmp_path, capsys):
    """Started from a LoHa, the adapter before any update exports the file's ΔW exactly, and the first sample
    image equals infer.py's image of the file (same prompt, seed, sampler, steps, size and CFG)."""
    import infer

    first = train(tiny_pipeline_dir, tmp_path, "first", "--learning_rate", "2e-2", "--rank", "4", "--alpha", "2",
                  steps=3)
    file = first / "loha.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat --d 11 --s 3 --l 4 --w 64 --h 64 --ss Euler\n")
    argv = argv_for(tiny_pipeline_dir, tmp_path / "second", tmp_path / "cache", "--network_weights", file,
                    "--rank", "4", "--alpha", "2", "--sample_prompts", prompts, "--sample_at_first",
                    "--checkpointing_steps", "1", steps=1)
    args = T.parse_args(argv)
    with contextlib.ExitStack() as held:  # the output folder's lock, released after
        accelerator = T.start_accelerator(args, held)
        models = T.load_models(args, accelerator)
        T.add_adapters(models, args)
        exported = tmp_path / "step0.safetensors"
        loha.export_kohya(models.unet, exported)
    want, got = deltas(file), deltas(exported)
    assert want.keys() == got.keys() and want
    for k in want:
        assert torch.equal(want[k], got[k]), k

    assert T.main(argv) == 0
    sample = Image.open(tmp_path / "second" / "samples" / "step-000000-00-seed11.png")
    reference = infer.main(["--checkpoint", str(file), "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
                            "--prompt", "a photo of a cat", "--seed", "11", "--num_inference_steps", "3",
                            "--guidance_scale", "4", "--width", "64", "--height", "64", "--scheduler", "Euler",
                            "--output_dir", str(tmp_path / "infer")])[0]
    assert np.array_equal(np.asarray(sample), np.asarray(Image.open(reference)))
    assert "Seed: 11" in sample.info["parameters"] and "Steps: 3" in sample.info["parameters"]

    # the file's shape must be the run's: one line naming the mismatch, and --dim_from_weights adopts it
    base = argv_for(tiny_pipeline_dir, tmp_path / "third", tmp_path / "cache", "--network_weights", file)
    refused(capsys, [*base, "--rank", "8", "--alpha", "2"], "different adapter layout or rank", "--dim_from_weights")
    refused(capsys, [*base, "--rank", "4", "--alpha", "4"], "has alpha 2 in the file but 4 in this run")
    refused(capsys, [*base, "--dim_from_weights", "--rank", "4"], "--dim_from_weights takes --rank")
    refused(capsys, [*base, "--preset", "full", "--rank", "4", "--alpha", "2"], "does not match the adapters",
            "127 adapted modules have no weights in the file")
    third = train(tiny_pipeline_dir, tmp_path, "third", "--network_weights", file, "--dim_from_weights", steps=1)
    recorded = json.loads((third / "training_args.json").read_text())
    assert (recorded["rank"], recorded["alpha"]) == (4, 2.0)


# ------------------------------------------------------------------------------ saving
def test_a_loadable_file_at_every_save(tiny_pipeline_dir, tmp_path):
    """Each checkpoint's kohya file loads strictly and holds its adapter; pruning takes a checkpoint's file with
    it and never the final file; epoch files follow kohya's naming; --save_precision sets the dtype."""
    out = train(tiny_pipeline_dir, tmp_path, "o", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
                "--save_every_n_epochs", "1", "--save_precision", "bf16", "--train_text_encoder",
                "--no-cache_text_embeddings", steps=12)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # 7 images, batch 1: 7 updates an epoch, so one epoch ends within 12 steps (the last one's file is the final)
    assert names == ["loha-000001.safetensors", "loha-step00000012.safetensors", "loha.safetensors"], names
    step_file = out / "loha-step00000012.safetensors"
    with safetensors.safe_open(str(step_file), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if "hada" in k} == {torch.bfloat16}
        meta = f.metadata()
    assert meta["ss_steps"] == "12" and meta["ss_output_name"] == "loha" and "ss_tag_frequency" in meta
    pipe = SimpleNamespace(**{c: build_component(tiny_pipeline_dir, c) for c in loha.formats.COMPONENTS})
    loha.load(pipe, step_file)  # strictly: every key consumed, every module present
    checkpoint = out / "checkpoint-12"
    for component in loha.formats.COMPONENTS:
        saved = {k.removeprefix("base_model.model."): v for k, v in factors(checkpoint / component).items()}
        live = loha.adapter_state_dict(getattr(pipe, component))
        assert saved.keys() == live.keys()
        for k, v in saved.items():
            assert torch.equal(v.to(torch.bfloat16).float(), live[k].float()), k


def build_component(model_dir, component):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
           "text_encoder_2": CLIPTextModelWithProjection}[component]
    return cls.from_pretrained(model_dir, subfolder=component)


# ------------------------------------------------------------------------------ sample prompts
def test_sample_prompts_come_out_at_their_size_and_seed(tiny_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n\na photo of a cat --n blurry, dark --w 64 --h 48 --d 7 --l 5 --s 3\n"
                       "a red cup --ss dpmpp_2m_karras --s 2\n")
    out = train(tiny_pipeline_dir, tmp_path, "o", "--sample_prompts", prompts, "--sample_every_n_steps", "2",
                "--sample_sampler", "euler_a", "--seed", "5", steps=2)
    found = sorted(p.name for p in (out / "samples").iterdir())
    assert found == ["step-000002-00-seed7.png", "step-000002-01-seed5.png"], found
    cat = Image.open(out / "samples" / "step-000002-00-seed7.png")
    cup = Image.open(out / "samples" / "step-000002-01-seed5.png")
    assert cat.size == (64, 48) and cup.size == (64, 64)
    assert cat.info["parameters"].splitlines()[:2] == ["a photo of a cat", "Negative prompt: blurry, dark"]
    assert "Sampler: Euler a" in cat.info["parameters"] and "Sampler: DPM++ 2M Karras" in cup.info["parameters"]
    assert "CFG scale: 5, Seed: 7, Size: 64x48" in cat.info["parameters"]

    prompts.write_text("fine --w 64\na dog --w 65\n")
    err = refused(capsys, argv_for(tiny_pipeline_dir, tmp_path / "bad", tmp_path / "cache", "--sample_prompts",
                                   prompts), f"{prompts}:2: --w '65' is not valid (a positive multiple of 8)")
    assert err.startswith("usage") or "error" in err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    for line, fragment in (("a cat --q 3", "unknown option --q"), ("--w 64", "no prompt"),
                           ("a cat --ss heun", "unknown sampler 'heun'")):
        prompts.write_text(line + "\n")
        with pytest.raises(loha.LoHaError, match=fragment):
            sampling.read_prompts(prompts)


# ------------------------------------------------------------------------------ validation loss
def test_validation_loss_is_fixed_and_held_out(tiny_pipeline_dir, tmp_path):
    args = T.parse_args(argv_for(tiny_pipeline_dir, tmp_path / "o", tmp_path / "cache", "--validation_split", "0.3",
                                 "--cache_latents"))
    accelerator = T.start_accelerator(args, contextlib.ExitStack())
    models = T.load_models(args, accelerator)
    T.add_adapters(models, args)
    data = T.load_training_data(args, accelerator)
    assert len(data.validation) == 2 and len(data.samples) == 5  # round(7 x 0.3) held out
    assert not {c.index for c in data.validation} & {c.index for c in data.samples}
    T.cache_features(data, models, args, accelerator)
    assert data.validation_set.timesteps == [200, 400, 600, 800]
    run = T.prepare_training(models, data, args, accelerator)
    first = T.validation_loss(run, args)
    assert T.validation_loss(run, args) == first  # the same weights, the same number
    T.train_one_update(run, args, [T.collate([data.dataset[(0, 0, 0)]])])
    assert T.validation_loss(run, args) != first

    out = train(tiny_pipeline_dir, tmp_path, "run", "--validation_data_dir", EXAMPLES, "--validation_steps", "2",
                steps=4)
    image = Image.open(out / "loss.png")
    assert image.format == "PNG" and image.size[0] > 400


# ------------------------------------------------------------------------------ EMA
def test_ema_follows_its_formula_and_resumes_bitwise(tiny_pipeline_dir, tmp_path):
    """EMA e₁ = θ₁, eₙ = dₙ·eₙ₋₁ + (1 − dₙ)·θₙ with dₙ = min(decay, n/(n + 9)) (diffusers' warm-up), over the raw
    factors of each checkpoint; the final files hold e₄, <name>-raw.safetensors θ₄; a resume carries the EMA."""
    decay = 0.5
    out = train(tiny_pipeline_dir, tmp_path, "o", "--use_ema", "--ema_decay", decay, "--checkpointing_steps", "1",
                "--learning_rate", "2e-2", steps=4)
    thetas = [{k.removeprefix("base_model.model."): v.double() for k, v in factors(out / f"checkpoint-{n}" / "unet")
               .items()} for n in range(1, 5)]
    ema = dict(thetas[0])
    for n, theta in enumerate(thetas[1:], start=2):
        d = min(decay, n / (n + 9))
        ema = {k: d * ema[k] + (1 - d) * theta[k] for k in ema}
    final = {k.removeprefix("base_model.model."): v for k, v in factors(out / "unet").items()}
    for k in ema:
        torch.testing.assert_close(final[k].double(), ema[k], rtol=1e-6, atol=1e-7, msg=k)
    raw, averaged = deltas(out / "loha-raw.safetensors"), deltas(out / "loha.safetensors")
    assert any(not torch.allclose(raw[k], averaged[k]) for k in raw)
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()

    resumed = tmp_path / "resumed"
    assert T.main(argv_for(tiny_pipeline_dir, resumed, tmp_path / "cache", "--use_ema", "--ema_decay", decay,
                           "--checkpointing_steps", "2", "--learning_rate", "2e-2", steps=2)) == 0
    assert T.main(argv_for(tiny_pipeline_dir, resumed, tmp_path / "cache", "--use_ema", "--ema_decay", decay,
                           "--checkpointing_steps", "2", "--learning_rate", "2e-2", "--resume_from_checkpoint",
                           "latest", steps=4)) == 0
    for name in ("loha.safetensors", "loha-raw.safetensors"):
        a, b = loha.read_safetensors(out / name)[0], loha.read_safetensors(resumed / name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------ max-norm
def test_scale_weight_norms_matches_the_norm_of_the_built_delta():
    """loha.scale_weight_norms against ‖scale·ΔW‖ of the built ΔW: stacked, per layer, Tucker."""
    for stack in (True, False):
        for tucker in (False, True):
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(16, 24), nn.Linear(16, 24), nn.Conv2d(4, 6, 3))
            loha.inject(model, rank=3, alpha=1.5, target_modules=["0", "1", "2"], use_tucker=tucker, stack=stack)
            layers = list(loha.loha_layers(model).values())
            with torch.no_grad():
                for layer in layers:
                    for f in layer.factors():
                        f.normal_()
                layers[1].factors()[0].mul_(1e-3)  # one layer stays under the bound
            before = [layer.delta_weight().double().norm().item() for layer in layers]
            limit = 0.5 * max(before)
            scaled, after = loha.scale_weight_norms(model, limit)
            assert scaled == sum(b > limit for b in before)
            now = [layer.delta_weight().double().norm().item() for layer in layers]
            for b, n in zip(before, now):
                assert n == pytest.approx(min(b, limit), rel=1e-5)
            assert sorted(after.tolist()) == pytest.approx(sorted(now), rel=1e-5)


def test_max_norm_bounds_every_exported_module(tiny_pipeline_dir, tmp_path):
    limit = 0.02
    out = train(tiny_pipeline_dir, tmp_path, "o", "--scale_weight_norms", limit, "--learning_rate", "5e-2", steps=4)
    norms = [d.norm().item() for d in deltas(out / "loha.safetensors").values()]
    assert max(norms) <= limit * (1 + 1e-5)
    assert sum(n > limit * 0.999 for n in norms) > len(norms) // 4  # the bound was reached, and held
    with safetensors.safe_open(str(out / "loha.safetensors"), "pt") as f:
        assert f.metadata()["ss_scale_weight_norms"] == str(limit)


def test_every_new_flag_is_classified_for_resume():
    flags = {a.dest for a in T.build_parser()._actions if a.dest != "help"}
    sets = (T.RESUME_FIXED, T.RESUME_ADJUSTABLE, T.NOT_RECORDED)
    for flag in flags:
        assert sum(flag in s for s in sets) == 1, flag
    help_text = T.build_parser().format_help()
    for flag in ("--unet_lr", "--optimizer_args", "--huber_schedule", "--network_weights", "--save_every_n_epochs",
                 "--sample_prompts", "--validation_split", "--use_ema", "--scale_weight_norms"):
        assert flag in help_text
    assert D.validation_timesteps(100, 900) == [260, 420, 580, 740]


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "examples" / "recipes").glob("*.sh")))
def test_each_recipe_runs_as_a_dry_run(tiny_pipeline_dir, tmp_path, capsys, recipe):
    """Each recipe as a user runs it (bash, with `accelerate launch` on PATH), on the tiny pipeline and a kohya
    folder: the stand-in `accelerate` records the command line the script builds, which then runs here with
    --dry_run: every flag it sets is accepted, and the plan and the memory estimate come out."""
    import os
    import shutil
    import subprocess

    data = tmp_path / "data" / "10_sks dog"
    data.mkdir(parents=True)
    for image in sorted(EXAMPLES.glob("*.jpg"))[:3]:
        shutil.copy(image, data / image.name)
    bin_dir, argv_file = tmp_path / "bin", tmp_path / "argv"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(f"#!/bin/sh\nshift\nprintf '%s\\0' \"$@\" > '{argv_file}'\n")
    (bin_dir / "accelerate").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MODEL": str(tiny_pipeline_dir),
           "DATA": str(tmp_path / "data"), "INSTANCE": str(data), "CLASS": str(data), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(REPO / "examples" / "recipes" / recipe), "--dry_run",
                           "--pretrained_vae_model_name_or_path", str(tiny_pipeline_dir / "vae")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    script, *argv = argv_file.read_text().split("\0")[:-1]
    assert Path(script).resolve() == REPO / "train_loha_sdxl.py"
    assert T.main(argv) == 0
    out = capsys.readouterr()
    assert "steps" in out.err and "estimated peak" in out.out + out.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", [n for n, spec in O.OPTIMIZERS.items() if spec[3]])
def test_the_estimate_counts_each_optimizers_real_state(name):
    """The dry run cannot step these optimizers on fake tensors (they read scalars), so it allocates their state by
    loha.memory.optimizer_state_layout: byte for byte what the real optimizer keeps after a step."""
    from loha import memory

    options, lr = OPTIMIZER_SETTINGS[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.Linear(96, 80), nn.Conv2d(8, 16, 3))  # 8-bit and 32-bit states
    loha.inject(model, rank=8, target_modules=["0", "1", "2"], use_tucker=True)
    with torch.no_grad():  # Prodigy keeps a 0-dim p0 for an all-zero tensor (w2a at init); the layout counts it whole
        for p in loha.trainable_parameters(model):
            p.normal_()
    optimizer, views = O.make(name, [{"models": [model], "lr": lr}], dict(options))
    (model[0](torch.randn(3, 96)).sum() + model[1](torch.randn(3, 96)).sum()
     + model[2](torch.randn(1, 8, 5, 5)).sum()).backward()
    views.hand_gradients()
    optimizer.step()
    for p in (p for g in views.groups for p in g["params"]):
        real = sum(t.nbytes for k, t in optimizer.state[p].items() if isinstance(t, torch.Tensor) and "qmap" not in k
                   and t.dim() > 0)
        counted = sum(math.prod(shape) * dtype.itemsize for shape, dtype in
                      memory.optimizer_state_layout(name, p, options))
        assert counted == real, (tuple(p.shape), counted, real)
