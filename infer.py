"""Generate images with SDXL and a LoHa adapter, whatever wrote the adapter.

    python infer.py --checkpoint out/ --prompt "a photo of sks dog" --compare

--checkpoint takes a training output_dir (or, if it has no final unet/ yet, its latest complete
checkpoint-<step>/), a checkpoint-<step>/ folder, a PEFT LoHa folder (ours or PEFT's), a bare
adapter_model.safetensors, or a kohya/LyCORIS single .safetensors file. diffusers' load_lora_weights
cannot load LoHa in any of these layouts; loha.load does, strictly.

Each PNG carries its generation parameters in AUTOMATIC1111's "parameters" text chunk and as separate
keys. Paths of the written files go to stdout, everything else to stderr.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import loha
import loha.cli
import loha.fp8
import loha.hub
import loha.sampling
import loha.sources
from loha.formats import COMPONENTS, PEFT_CONFIG, PEFT_WEIGHTS
from loha.sampling import SAMPLERS, make_scheduler, png_parameters, render

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


class InferError(Exception):
    """A problem with the inputs or while running: reported as one line, exit status 1."""


class UsageError(InferError):
    """A bad value on the command line: one line, exit status 2 (argparse's convention)."""


# ------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = loha.cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training output_dir, checkpoint-<step>/, PEFT LoHa "
                   "folder, adapter_model.safetensors, or kohya/LyCORIS/ComfyUI .safetensors file")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="hub id, local diffusers folder, or single-file .safetensors checkpoint; default: the base "
                        f"the checkpoint records (or {DEFAULT_BASE_MODEL} when it records none)")
    p.add_argument("--config", default=None,
                   help="for a single-file base: the diffusers folder or hub id its configs come from; default: "
                        "SDXL base 1.0's, from the local cache")
    p.add_argument("--vae", default=None,
                   help="a fixed VAE (hub id, folder or single .safetensors file), e.g. madebyollin/sdxl-vae-fp16-fix; "
                        "default: the model's")
    p.add_argument("--base_precision", choices=("auto", "fp8"), default="auto",
                   help="the UNet's Linear/Conv2d weights in --dtype (auto) or stored in fp8 and computed in --dtype "
                        "(half their memory); default: auto")
    p.add_argument("--prompt", action="append", default=[], help="repeatable; default: none (use --prompts_file)")
    p.add_argument("--prompts_file", default=None,
                   help="a text file with one prompt per line (blank lines skipped); default: none")
    p.add_argument("--negative_prompt", default=None, help="one for all prompts; default: none")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt; image i gets seed --seed + i")
    p.add_argument("--batch_size", type=int, default=1, help="images per pipeline call")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image")
    p.add_argument("--num_inference_steps", type=int, default=30, help="sampling steps")
    p.add_argument("--guidance_scale", type=float, default=5.0, help="CFG scale")
    for side in ("--height", "--width"):
        p.add_argument(side, type=int, default=None,
                       help="pixels, a multiple of 8; default: the base model's own size (SDXL base: 1024; the demo's "
                            "tiny model: 64)")
    p.add_argument("--scheduler", default="Euler", type=scheduler_name,
                   help=f"one of {', '.join(SAMPLERS)} (case and _/- do not matter)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                   help="auto: CUDA, else MPS, else CPU")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="auto: fp16 on CUDA/MPS, fp32 on CPU")
    p.add_argument("--scale", type=float, default=1.0, help="LoHa strength; 0 gives exactly the base model's image")
    p.add_argument("--fuse", action="store_true", help="merge ΔW into the weights before sampling (no per-step cost)")
    p.add_argument("--compare", action="store_true",
                   help="also render the base model with the same seeds and save base | LoHa grids")
    p.add_argument("--output_dir", default="outputs", help="PNGs go here; same names are overwritten")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def scheduler_name(text: str) -> str:
    try:
        return loha.sampling.sampler_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("sampler", "scheduler", 1)) from None


def check_args(args) -> list[str]:
    """Everything that can be checked before loading a model. Returns the prompts."""
    for flag in ("num_images", "batch_size", "num_inference_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and (value < 8 or value % 8):
            raise UsageError(f"--{flag} must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    if not math.isfinite(args.scale) or not math.isfinite(args.guidance_scale):
        raise UsageError("--scale and --guidance_scale must be finite numbers")
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise InferError(f"cannot read --prompts_file {args.prompts_file}: {reason}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        if args.prompts_file:
            raise InferError(f"no prompts: --prompts_file {args.prompts_file} has no non-blank line (and no --prompt "
                             "was given)")
        raise UsageError("no prompts: give --prompt (repeatable) or a --prompts_file with at least one non-blank line")
    return prompts


def pick_device(name: str) -> torch.device:
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InferError("--device cuda was asked for, but this PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
    if name == "mps" and not has_mps:
        raise InferError("--device mps was asked for, but MPS is not available on this machine")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ------------------------------------------------------------------------------------ checkpoint
def resolve_checkpoint(path) -> tuple[Path, loha.Adapter]:
    """The adapter path to load and its parsed contents (validated, nothing loaded into a model yet)."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise InferError(f"--checkpoint {path} is a symlink that leads nowhere (broken, or a loop)")
        raise InferError(f"--checkpoint {path} does not exist")
    adapter_entries = (*COMPONENTS, PEFT_CONFIG, PEFT_WEIGHTS, "adapter_model.bin")
    if path.is_dir() and not any((path / name).exists() for name in adapter_entries):
        checkpoints = [c for c in path.glob("checkpoint-*") if c.is_dir() and re.fullmatch(r"checkpoint-\d+", c.name)]
        if checkpoints:
            return latest_complete_checkpoint(path, checkpoints)
    return path, loha.read_adapter(path)


def latest_complete_checkpoint(output_dir: Path, checkpoints: list[Path]) -> tuple[Path, loha.Adapter]:
    """A training output_dir without a final unet/ (a run still going, or stopped early): its newest
    checkpoint-<step>/ that reads cleanly. Newer ones that do not (half written) are skipped, with a note."""
    skipped = []
    for checkpoint in sorted(checkpoints, key=lambda c: int(c.name.split("-")[1]), reverse=True):
        try:
            adapter = loha.read_adapter(checkpoint)
        except loha.LoHaFileError as e:
            skipped.append(f"{checkpoint.name} ({e})")
            continue
        for note in skipped:
            log(f"skipping incomplete {note}")
        log(f"{output_dir} has no final unet/ yet: using its latest complete checkpoint, {checkpoint.name}")
        return checkpoint, adapter
    raise InferError(f"{output_dir} has no final unet/ and none of its {len(checkpoints)} checkpoint folders is "
                     f"complete; newest: {skipped[0]}")


def describe(adapter: loha.Adapter) -> str:
    """e.g. 'kohya file (SGM names): unet 140 + text_encoder 12 modules, rank 8, alpha 8'."""
    names = [n for modules in adapter.components.values() for n in modules]
    if adapter.style == "peft":
        kind = "PEFT LoHa"
    elif any(n.startswith("lycoris_") for n in names):
        kind = "LyCORIS file"
    elif any(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in names):
        kind = "kohya file (SGM names)"
    else:
        kind = "kohya file (diffusers names)"
    weights = [w for modules in adapter.components.values() for w in modules.values()]
    ranks = sorted({w.rank for w in weights})
    alphas = sorted({w.alpha for w in weights})
    parts = " + ".join(f"{c} {len(m)}" for c, m in adapter.components.items())
    return (f"{kind}: {parts} modules, rank {'/'.join(map(str, ranks))}, "
            f"alpha {'/'.join(f'{a:g}' for a in alphas)}")


def base_model_for(args, adapter: loha.Adapter) -> str:
    """The base to load: --pretrained_model_name_or_path, else the one the checkpoint records (an absolute
    path or hub id), else SDXL base 1.0 when it records none. A recorded base that is not here is an error that
    names it (file name and hash) and says how to pass it."""
    if args.pretrained_model_name_or_path:
        return args.pretrained_model_name_or_path
    named = adapter.base_model
    if loha.sources.found(named):
        log(f"base model: {named} (from the checkpoint's metadata)")
        return named
    if named and not re.fullmatch(r"sd_xl_base_1\.0.*\.safetensors", Path(named).name):
        raise InferError(loha.sources.unreachable_base_note(named, adapter.metadata))
    if named:  # SDXL base 1.0's own file, as kohya files from other machines name it: the hub's copy of it
        log(f"base model: {DEFAULT_BASE_MODEL} (the checkpoint names {named}, SDXL base 1.0's file)")
        return DEFAULT_BASE_MODEL
    log(f"base model: {DEFAULT_BASE_MODEL} (the checkpoint names none; set --pretrained_model_name_or_path to "
        "choose)")
    return DEFAULT_BASE_MODEL


# ------------------------------------------------------------------------------------ pipeline
def load_pipeline(base_model: str, vae: str | None, dtype: torch.dtype, config: str | None = None):
    """The SDXL pipeline of a diffusers folder, hub id or single file (its configs from ``config``)."""
    StableDiffusionXLPipeline = loha.hub.import_sdxl_pipeline()  # noqa: N806 - a class
    from diffusers import DDPMScheduler

    source = loha.sources.resolve(base_model, config=config, what="the SDXL base model")
    parts = loha.sources.load_components(source, dtype, need_vae=not vae)
    if vae:
        parts["vae"] = loha.sources.load_vae(vae, dtype, config=source.configs)
    scheduler_class = getattr(__import__("diffusers"), parts["scheduler_config"].get("_class_name", ""), DDPMScheduler)
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                                     tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
                                     scheduler=scheduler_class.from_config(parts["scheduler_config"]),
                                     add_watermarker=False)
    if Path(source.configs).is_dir():
        pipe.set_progress_bar_config(leave=False)
    return pipe


# ------------------------------------------------------------------------------------ output
def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    grid = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    grid.paste(left, (0, 0))
    grid.paste(right, (left.width, 0))
    return grid


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ main
def run(args) -> list[Path]:
    prompts = check_args(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    checkpoint, adapter = resolve_checkpoint(args.checkpoint)
    log(f"checkpoint: {checkpoint} ({describe(adapter)})")
    base_model = base_model_for(args, adapter)
    out = Path(args.output_dir)
    try:  # before minutes of model loading: a folder we cannot write into fails now
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InferError(f"cannot write into --output_dir {out}: {e.strerror or e}") from None

    pipe = load_pipeline(base_model, args.vae, dtype, args.config)
    adapted = [getattr(pipe, c) for c in loha.load(pipe, adapter)]  # strict: a bad shape = another base model
    if args.base_precision == "fp8":
        loha.fp8.store_fp8(pipe.unet)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.to(device)
    default_size = pipe.default_sample_size * pipe.vae_scale_factor  # 1024 for SDXL
    settings = dict(steps=args.num_inference_steps, guidance=args.guidance_scale,
                    height=args.height or default_size, width=args.width or default_size)

    seeds = [args.seed + i for i in range(args.num_images)]
    batches = [(p, prompt, seeds[i:i + args.batch_size])
               for p, prompt in enumerate(prompts) for i in range(0, len(seeds), args.batch_size)]
    base_images = {}
    if args.compare:  # first, while the weights are unfused; scale 0 calls the base layers directly
        log("rendering the base model (--compare)")
        for model in adapted:
            loha.set_scale(model, 0.0)
        for p, prompt, batch in batches:
            images = render(pipe, prompt, args.negative_prompt, batch, **settings)
            base_images.update({(p, seed): image for seed, image in zip(batch, images)})
    for model in adapted:
        loha.set_scale(model, args.scale)
        if args.fuse:
            loha.merge(model, keep_original=False)  # nothing needs the unfused weights after this

    log(f"rendering {len(prompts) * len(seeds)} images at {settings['width']}x{settings['height']}, "
        f"{args.scheduler}, {args.num_inference_steps} steps, LoHa scale {args.scale:g}"
        + (" (fused)" if args.fuse else ""))
    written, start = [], time.perf_counter()
    for p, prompt, batch in batches:
        for seed, image in zip(batch, render(pipe, prompt, args.negative_prompt, batch, **settings)):
            params = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed,
                      "steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                      "scheduler": args.scheduler, "width": settings["width"], "height": settings["height"],
                      "base_model": base_model, "checkpoint": str(checkpoint), "scale": args.scale}
            written += save_image(out, image, params, index=(p, seed - args.seed), counts=(len(prompts), len(seeds)),
                                  base_image=base_images.get((p, seed)))
    seconds = time.perf_counter() - start
    log(f"{len(prompts) * len(seeds)} images in {seconds:.1f} s ({seconds / (len(prompts) * len(seeds)):.2f} s each)")
    return written


def save_image(out: Path, image, params: dict, *, index, counts, base_image=None) -> list[Path]:
    """<prompt>-<image>-seed<seed>.png, zero-padded so a sort follows prompt then image; with a base
    image also <...>-compare.png, base | LoHa."""
    (p, i), (n_prompts, n_images) = index, counts
    stem = f"{p:0{max(3, len(str(n_prompts - 1)))}d}-{i:0{max(3, len(str(n_images - 1)))}d}-seed{params['seed']}"
    paths = [out / f"{stem}.png"]
    image.save(paths[0], pnginfo=png_parameters(params))
    if base_image is not None:
        paths.append(out / f"{stem}-compare.png")
        side_by_side(base_image, image).save(paths[1], pnginfo=png_parameters({**params, "compare": "base | LoHa"}))
    return paths


def main(argv=None) -> list[Path]:
    try:
        written = run(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except loha.sampling.NonFiniteLatents as e:
        raise SystemExit(f"error: {e} (try a lower --scale, or --dtype bf16/fp32); no image was written") from None
    except (InferError, loha.LoHaError) as e:
        raise SystemExit(f"error: {e}") from None
    except torch.cuda.OutOfMemoryError:
        raise SystemExit("error: out of GPU memory; try --batch_size 1, a smaller size, or --dtype fp16") from None
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
