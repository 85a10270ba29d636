"""Rendering sample images, shared by infer.py and the trainer's sample prompts: A1111's sampler names on
diffusers' schedulers, one render call, AUTOMATIC1111's PNG "parameters" text, and kohya's sample-prompt file.

A sample-prompt file has one prompt a line, with per-prompt options after ``--``:

    a photo of sks dog on a beach --n blurry, lowres --w 1024 --h 1024 --d 42 --l 7.0 --s 28 --ss Euler a

``--n`` negative prompt, ``--w``/``--h`` size (multiples of 8), ``--d`` seed, ``--l`` CFG scale, ``--s`` steps,
``--ss`` sampler (the names below). Blank lines and lines starting with ``#`` are skipped. An unknown option
or a bad value is refused with its line number."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import PngImagePlugin

from .layer import LoHaError

SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM")  # AUTOMATIC1111's names
OPTION = re.compile(r"(\w+)\s+(.*)", re.S)


class NonFiniteLatents(LoHaError):
    """The latents turned NaN/Inf while sampling: the image would be black or noise."""


def sampler_name(text: str) -> str:
    """The canonical sampler name for ``text`` (case, spaces, _ and - do not matter; dpmpp = DPM++)."""
    key = lambda s: re.sub(r"[\s_-]+", " ", s.lower().replace("dpmpp", "dpm++")).strip()
    for name in SAMPLERS:
        if key(text) == key(name):
            return name
    raise ValueError(f"unknown sampler {text!r}; choose from {', '.join(SAMPLERS)}")


def make_scheduler(name: str, config):
    """A1111's sampler names on diffusers schedulers, built from the model's own scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name == "Euler":
        return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=False)
    if name == "Euler a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name.startswith("DPM++ 2M"):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=name.endswith("Karras"))
    # SDXL latents are not confined to [-1, 1]; DDIM's clip_sample defaults to True when the config is silent.
    return DDIMScheduler.from_config(config, clip_sample=False)


def render(pipe, prompt: str, negative_prompt: str | None, seeds: list[int], *, steps: int, guidance: float,
           height: int, width: int, output_type: str = "pil"):
    """One batch: one image per seed. Generators live on the CPU so a seed gives the same starting noise
    on CUDA, MPS and CPU, and one generator per image makes an image independent of its batch. Latents
    that turn NaN/Inf stop the call before anything is decoded (NonFiniteLatents)."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    n = len(seeds)

    def check_latents(pipeline, step, timestep, tensors):
        if not torch.isfinite(tensors["latents"]).all():
            raise NonFiniteLatents(f"the latents became NaN/Inf at sampling step {step + 1} of {steps}: the adapter "
                                   "is broken or too strong at this scale for this dtype")
        return tensors

    return pipe(prompt=[prompt] * n, negative_prompt=None if negative_prompt is None else [negative_prompt] * n,
                num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=generators, output_type=output_type, callback_on_step_end=check_latents,
                callback_on_step_end_tensor_inputs=["latents"]).images


def _a1111_quote(value) -> str:
    """AUTOMATIC1111 quotes a value as JSON when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def png_parameters(p: dict) -> PngImagePlugin.PngInfo:
    """AUTOMATIC1111's "parameters" text (prompt / Negative prompt: / key: value, ...) plus one text key per
    parameter, for tools that read PNG keys rather than parse A1111's format."""
    fields = {"Steps": p["steps"], "Sampler": p["scheduler"], "CFG scale": f"{p['guidance_scale']:g}",
              "Seed": p["seed"], "Size": f"{p['width']}x{p['height']}", "Model": p["base_model"],
              "LoHa": p["checkpoint"], "LoHa scale": f"{p['scale']:g}"}
    lines = [p["prompt"]]
    if p["negative_prompt"] is not None:
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_a1111_quote(v)}" for k, v in fields.items()))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "\n".join(lines))
    for key, value in p.items():
        if value is not None:
            info.add_text(key, str(value))  # PIL writes iTXt when the text is not Latin-1
    return info


# ------------------------------------------------------------------------------ sample-prompt files
@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None
    sampler: str | None = None
    line: int = 0


def _option(key: str, value: str) -> tuple[str, object]:
    """(field, value) for one ``--key value``; ValueError with the rule a bad value breaks."""
    if key == "n":
        return "negative_prompt", value
    if key in ("w", "h"):
        size = int(value)
        if size < 8 or size % 8:
            raise ValueError("a positive multiple of 8")
        return ("width" if key == "w" else "height"), size
    if key == "d":
        return "seed", int(value)
    if key == "l":
        return "guidance_scale", float(value)
    if key == "s":
        if not 1 <= int(value) <= 1000:
            raise ValueError("from 1 to 1000")
        return "steps", int(value)
    return "sampler", sampler_name(value)


def read_prompts(file) -> list[SamplePrompt]:
    """The prompts of a sample-prompt file (see the module docstring)."""
    path = Path(file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LoHaError(f"cannot read --sample_prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = []
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"--sample_prompts {path}:{number}"
        parts = text.split(" --")
        values = {"prompt": parts[0].strip(), "line": number}
        if not values["prompt"] or values["prompt"].startswith("--"):
            raise LoHaError(f"{where}: the line has options but no prompt")
        for part in parts[1:]:
            m = OPTION.fullmatch(part.strip())
            if m is None:
                raise LoHaError(f"{where}: '--{part.strip()}' has no value")
            key, value = m[1].lower(), m[2].strip()
            if key not in ("n", "w", "h", "d", "l", "s", "ss"):
                raise LoHaError(f"{where}: unknown option --{key} (this kit reads --n, --w, --h, --d, --l, --s and "
                                "--ss)")
            try:
                field, parsed = _option(key, value)
            except ValueError as e:
                hint = f" ({e})" if str(e) and "invalid literal" not in str(e) and "could not" not in str(e) else ""
                raise LoHaError(f"{where}: --{key} {value!r} is not valid{hint}") from None
            values[field] = parsed
        prompts.append(SamplePrompt(**values))
    if not prompts:
        raise LoHaError(f"--sample_prompts {path} holds no prompt")
    return prompts
