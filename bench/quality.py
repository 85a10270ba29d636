"""FedPara's claim on a diffusion UNet: LoHa at rank r against LoRA at rank 2r, the same parameter count.

The teacher is the tiny SDXL UNet with a fixed, full-rank random change added to every attention linear
(to_q/to_k/to_v/to_out.0). Two students start from the unchanged UNet: this project's LoHa at rank r and
PEFT's LoRA at rank 2r on the same linears, with 2r(in+out) parameters each (asserted). Both are trained
with the same optimizer, steps and data (the teacher's outputs on random inputs: latents, timesteps,
text states, pooled text, time ids) to match the teacher. Reported per r: the final distillation MSE on
a held-out set of random inputs (absolute, and relative to the untrained student), the numerical rank of
the learned ΔW on a few layers against the teacher's full rank, and a loss-curve PNG.

    python bench/quality.py                 # r = 2, 4, 8; writes bench/results/quality.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loha  # noqa: E402
from bench import TARGETS, make_inputs  # noqa: E402
from loha.tiny_sdxl import tiny_unet  # noqa: E402

METHODS = ("loha", "lora")
RANK_PROBE_LAYERS = 3  # matrix_rank on the first few adapted layers: enough to see r² vs 2r


def attention_linears(unet: nn.Module) -> dict[str, nn.Linear]:
    return {path: m for path, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(path.endswith("." + t) for t in TARGETS)}


@torch.no_grad()
def make_teacher(strength: float, seed: int, decay: float = 0.0) -> nn.Module:
    """The tiny UNet plus a fixed full-rank change on each attention linear: ΔW = strength·rms(W)·N(0, 1)
    (``decay`` 0: a flat singular spectrum), or with its singular values reshaped to i^-decay
    (i = 1, 2, ...), rescaled to the same Frobenius norm. Fine-tuning deltas have decaying spectra."""
    teacher = tiny_unet(seed).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in attention_linears(teacher).values():
        w = layer.weight
        delta = strength * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=gen)
        if decay:
            u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            shaped = torch.arange(1, len(sv) + 1, dtype=torch.float64) ** -decay
            shaped *= sv.norm() / shaped.norm()
            delta = ((u * shaped) @ vh).to(w.dtype)
        w += delta
    return teacher


def _double(t):
    return t.detach().double()


def make_student(method: str, rank: int, seed: int, init: str = "lycoris"):
    """(UNet with adapters, trainable params, {path: ΔW/scale in fp64}) for LoHa r or LoRA 2r.

    ΔW is rebuilt from the factors in fp64 so that matrix_rank's fp64 tolerance applies; a product taken
    in fp32 carries rounding noise at 1e-7 of σ_max that an fp64 rank test would count as rank."""
    unet = tiny_unet(seed)
    if method == "loha":
        loha.inject(unet, rank=rank, alpha=rank, target_modules=TARGETS, init=init)
        layers = loha.adapter_modules(unet)
        deltas = {p: (lambda m=m: _double(m.hada_w1_a) @ _double(m.hada_w1_b) * (_double(m.hada_w2_a) @ _double(
            m.hada_w2_b))) for p, m in layers.items()}
        params = loha.trainable_parameters(unet)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=2 * rank, lora_alpha=2 * rank, target_modules=TARGETS), unet)
        layers = {p: m for p, m in unet.named_modules() if hasattr(m, "get_delta_weight") and p.endswith(
            tuple("." + t for t in TARGETS))}
        deltas = {p: (lambda m=m: _double(m.lora_B["default"].weight) @ _double(m.lora_A["default"].weight))
                  for p, m in layers.items()}
        params = [p for p in unet.parameters() if p.requires_grad]
    return unet.train(), params, deltas


def unet_output(unet, inputs):
    return unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0]


def batch(step: int, args, teacher) -> tuple[dict, torch.Tensor]:
    """Random inputs for ``step`` (the same for every student) and the teacher's output on them."""
    inputs = make_inputs("tiny", args.batch_size, args.resolution, "cpu", torch.float32, args.seed * 100_003 + step)
    with torch.no_grad():
        return inputs, unet_output(teacher, inputs)


@torch.no_grad()
def eval_mse(unet, eval_set) -> float:
    was_training = unet.training
    unet.eval()
    mse = sum(torch.nn.functional.mse_loss(unet_output(unet, x), y).item() for x, y in eval_set) / len(eval_set)
    unet.train(was_training)
    return mse


def numerical_rank(deltas: dict) -> list[int]:
    # matrix_rank's default tolerance, σ_max·max(m, n)·eps(fp64), on ΔW built in fp64 from the factors.
    return [int(torch.linalg.matrix_rank(fn())) for fn in list(deltas.values())[:RANK_PROBE_LAYERS]]


def distill(method: str, rank: int, teacher, eval_set, args) -> dict:
    torch.manual_seed(args.seed)
    unet, params, deltas = make_student(method, rank, args.seed, args.loha_init)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    # Cosine decay: the late small steps average out the noise of fresh random inputs every step.
    schedule = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.steps // 20,
                             num_training_steps=args.steps)
    curve = [(0, eval_mse(unet, eval_set))]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, target = batch(step, args, teacher)
        loss = torch.nn.functional.mse_loss(unet_output(unet, inputs), target)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"quality.py: error: {method} r={rank} diverged at step {step}; lower --lr")
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, eval_mse(unet, eval_set)))
    return {
        "method": method,
        "rank": rank if method == "loha" else 2 * rank,
        "params": sum(p.numel() for p in params),
        "initial_mse": curve[0][1],
        "final_mse": curve[-1][1],
        "final_relative_mse": curve[-1][1] / curve[0][1],
        "delta_w_rank": numerical_rank(deltas),
        "train_seconds": time.perf_counter() - start,
        "curve": curve,
    }


def plot_curves(results: list[dict], path: Path, title: str):
    """Relative eval MSE against step, log scale, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 560, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(s, m / r["initial_mse"]) for r in results for s, m in r["curve"]]
    max_step = max(s for s, _ in points) or 1
    lo, hi = math.floor(math.log10(min(v for _, v in points))), 0.0
    lo = min(lo, -1)
    xy = lambda s, v: (left + (width - left - right) * s / max_step,
                       top + (height - top - bottom) * (hi - math.log10(v)) / (hi - lo))
    for decade in range(int(lo), int(hi) + 1):
        for sub in (1, 2, 5):
            v = sub * 10.0 ** decade
            if 10.0 ** lo <= v <= 10.0 ** hi:
                y = xy(0, v)[1]
                draw.line([(left, y), (width - right, y)], fill=(225, 225, 225) if sub > 1 else (180, 180, 180))
                if sub in (1, 2, 5):
                    draw.text((5, y - 6), f"{v:g}", fill="black")
    for k in range(5):
        s = max_step * k / 4
        x = xy(s, 1.0)[0]
        draw.line([(x, top), (x, height - bottom)], fill=(235, 235, 235))
        draw.text((x - 10, height - bottom + 6), f"{s:.0f}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((width // 2 - 20, height - 22), "step", fill="black")
    draw.text((left, 12), title, fill="black")
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]
    ranks = sorted({r["rank"] for r in results if r["method"] == "loha"})
    for r in results:
        color = palette[ranks.index(r["rank"] if r["method"] == "loha" else r["rank"] // 2) % len(palette)]
        line = [xy(s, m / r["initial_mse"]) for s, m in r["curve"]]
        if r["method"] == "loha":
            draw.line(line, fill=color, width=3)
        else:  # dashed: every other segment
            for a, b in zip(line[::2], line[1::2]):
                draw.line([a, b], fill=color, width=2)
    for i, r in enumerate(results):
        color = palette[ranks.index(r["rank"] if r["method"] == "loha" else r["rank"] // 2) % len(palette)]
        label = f"{'LoHa' if r['method'] == 'loha' else 'LoRA'} r{r['rank']}: {r['final_relative_mse']:.3f}"
        y = top + 10 + 16 * i
        draw.line([(width - right - 200, y + 6), (width - right - 175, y + 6)], fill=color,
                  width=3 if r["method"] == "loha" else 1)
        draw.text((width - right - 170, y), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def markdown(results: list[dict], args) -> str:
    lines = [
        f"tiny UNet, teacher ΔW strength {args.strength} (full rank"
        f"{f', singular values ∝ i^-{args.teacher_decay:g}' if args.teacher_decay else ''}), "
        f"{args.steps} Adam steps, lr {args.lr} "
        f"({args.lr_scheduler}), "
        f"batch {args.batch_size}, {args.resolution}², eval on {args.eval_batches} held-out batches, seed {args.seed}",
        "",
        "| r | LoHa r params | LoHa final MSE (rel.) | LoRA 2r final MSE (rel.) | LoHa/LoRA | rank ΔW LoHa | "
        "rank ΔW LoRA | teacher ΔW rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["method"], r["rank"]): r for r in results}
    for r in args.ranks:
        a, b = by_key["loha", r], by_key["lora", 2 * r]
        lines.append(
            f"| {r} | {a['params']:,} | {a['final_mse']:.4g} ({a['final_relative_mse']:.3f}) "
            f"| {b['final_mse']:.4g} ({b['final_relative_mse']:.3f}) | {a['final_mse'] / b['final_mse']:.2f} "
            f"| {a['delta_w_rank']} | {b['delta_w_rank']} | {args.teacher_rank} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="LoHa ranks r (LoRA gets 2r)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam peak learning rate, the same for both methods")
    p.add_argument("--lr_scheduler", default="cosine", help="diffusers get_scheduler name, e.g. constant")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--strength", type=float, default=0.3, help="teacher ΔW as a multiple of each W's rms")
    p.add_argument("--teacher_decay", type=float, default=0.0,
                   help="singular values of the teacher's ΔW ∝ i^-decay (0: the flat spectrum of Gaussian noise)")
    p.add_argument("--loha_init", choices=("lycoris", "peft"), default="lycoris", help="LoHa factor init")
    p.add_argument("--eval_every", type=int, default=25)
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for quality.json/.md/.png (default: bench/results, what BENCHMARKS.md shows)")
    args = p.parse_args(argv)
    if any(r < 1 for r in args.ranks) or args.steps < 1 or args.eval_every < 1 or args.eval_batches < 1:
        p.error("--ranks, --steps, --eval_every and --eval_batches must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    # Both settings are process-wide: put them back, so that a caller (e.g. pytest) is left as it was.
    threads, verbosity = torch.get_num_threads(), diffusers_logging.get_verbosity()
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)
        diffusers_logging.set_verbosity(verbosity)


def run(args) -> int:
    teacher = make_teacher(args.strength, args.seed, args.teacher_decay)
    base = tiny_unet(args.seed)
    probe = next(iter(attention_linears(teacher)))
    teacher_delta = (teacher.get_submodule(probe).weight - base.get_submodule(probe).weight).double()
    args.teacher_rank = int(torch.linalg.matrix_rank(teacher_delta))
    eval_set = [batch(-1 - i, args, teacher) for i in range(args.eval_batches)]
    results = []
    for r in args.ranks:
        pair = [distill(method, r, teacher, eval_set, args) for method in METHODS]
        if pair[0]["params"] != pair[1]["params"]:
            raise SystemExit(f"quality.py: error: LoHa r={r} has {pair[0]['params']} parameters but LoRA "
                             f"r={2 * r} has {pair[1]['params']}; the comparison needs equal counts")
        results += pair
        for res in pair:
            print(f"{res['method']} r={res['rank']}: final MSE {res['final_mse']:.4g} "
                  f"(relative {res['final_relative_mse']:.3f}), rank ΔW {res['delta_w_rank']}, "
                  f"{res['train_seconds']:.0f}s", flush=True)
    table = markdown(results, args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(table)
    (args.out / "quality.json").write_text(json.dumps(
        {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
         "results": results}, indent=2) + "\n")
    plot_curves(results, args.out / "quality.png",
                "distillation to a full-rank teacher: eval MSE / initial (solid LoHa r, dashed LoRA 2r)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
