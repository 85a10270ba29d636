"""FedPara's claim with a learning-rate sweep: each method judged at its own best learning rate.

bench/quality.py compares LoHa r and LoRA 2r at one shared learning rate, and the ranking it finds flips
with the learning rate (BENCHMARKS.md §5). This runs quality.py once per learning rate (each into its own
folder, reused when it already holds a run with the same settings) and summarises: the final relative
MSE of every (method, r, lr), each method's best lr, and the LoHa/LoRA ratio at the best lrs.

    python bench/quality_sweep.py --lrs 5e-4 1e-3 2e-3 4e-3 --ranks 2 8 --steps 1200   # ~9 min per lr
    # writes <out>/lr<lr>/quality.* and <out>/quality-sweep.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

# The settings a reused run must share with this sweep (the rest of quality.py's flags keep their defaults).
SHARED = ("steps", "batch_size", "resolution", "strength", "teacher_decay", "seed", "lr_scheduler", "loha_init",
          "eval_batches")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", required=True)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher_decay", type=float, default=0.0, help="passed to quality.py")
    p.add_argument("--rerun", action="store_true", help="run every lr again even if its folder holds a run")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "quality-sweep")
    return p.parse_args(argv)


def run_one(lr: float, args) -> list[dict]:
    folder = args.out / f"lr{lr:g}"
    argv = ["--ranks", *map(str, args.ranks), "--steps", str(args.steps), "--lr", repr(lr),
            "--eval_every", str(args.eval_every), "--threads", str(args.threads), "--out", str(folder),
            "--teacher_decay", repr(args.teacher_decay)]
    wanted = vars(quality.parse_args(argv))
    saved = folder / "quality.json"
    if saved.is_file() and not args.rerun:
        previous = json.loads(saved.read_text())
        config = previous["config"]
        same = all(config.get(k, 0.0 if k == "teacher_decay" else None) == wanted[k] for k in SHARED) \
            and math.isclose(config["lr"], lr)
        have = {(r["method"], r["rank"]) for r in previous["results"]}
        if same and all(("loha", r) in have and ("lora", 2 * r) in have for r in args.ranks):
            print(f"lr {lr:g}: reusing {saved}", flush=True)
            return previous["results"]
    print(f"lr {lr:g}: running quality.py {' '.join(argv)}", flush=True)
    if quality.main(argv) != 0:
        raise SystemExit(f"quality_sweep.py: error: quality.py failed at lr {lr:g}")
    return json.loads(saved.read_text())["results"]


def summarise(runs: dict[float, list[dict]], ranks: list[int]) -> tuple[list[dict], str]:
    rows, lines = [], []
    lrs = sorted(runs)
    header = "| r | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | best relative MSE |"
    lines += [header, "|" + "---|" * (len(lrs) + 4)]
    best = {}
    for r in ranks:
        for method, rank in (("loha", r), ("lora", 2 * r)):
            values = {lr: next(x for x in runs[lr] if x["method"] == method and x["rank"] == rank)["final_relative_mse"]
                      for lr in lrs}
            lr_best = min(values, key=values.get)
            best[method, r] = (lr_best, values[lr_best])
            rows.append({"r": r, "method": method, "rank": rank, "relative_mse": values, "best_lr": lr_best})
            cells = " | ".join(f"**{v:.3f}**" if lr == lr_best else f"{v:.3f}" for lr, v in values.items())
            edge = " (edge of the sweep)" if lr_best in (lrs[0], lrs[-1]) else ""
            lines.append(f"| {r} | {'LoHa' if method == 'loha' else 'LoRA'} r{rank} | {cells} | {lr_best:g}{edge} "
                         f"| {values[lr_best]:.3f} |")
    lines += ["", "| r | LoHa at its best lr | LoRA 2r at its best lr | LoHa / LoRA |", "|---|---|---|---|"]
    for r in ranks:
        (la, va), (lb, vb) = best["loha", r], best["lora", r]
        lines.append(f"| {r} | {va:.3f} (lr {la:g}) | {vb:.3f} (lr {lb:g}) | {va / vb:.2f} |")
    return rows, "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path):
    """Final relative MSE against lr (log-log), drawn with Pillow: solid LoHa r, dashed LoRA 2r. Runs that
    ended worse than the untrained student (relative MSE > 1: diverged) are drawn as crosses at the top."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 480, 70, 230, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    lrs = sorted({lr for row in rows for lr in row["relative_mse"]})
    values = [min(v, 1.0) for row in rows for v in row["relative_mse"].values()]
    x_lo, x_hi = math.log10(lrs[0]) - 0.1, math.log10(lrs[-1]) + 0.1
    y_lo, y_hi = math.log10(min(values)) - 0.05, math.log10(max(values)) + 0.05
    xy = lambda lr, v: (left + (width - left - right) * (math.log10(lr) - x_lo) / (x_hi - x_lo),
                        top + (height - top - bottom) * (y_hi - math.log10(v)) / (y_hi - y_lo))
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for lr in lrs:
        x = xy(lr, values[0])[0]
        draw.line([(x, top), (x, height - bottom)], fill=(230, 230, 230))
        draw.text((x - 12, height - bottom + 6), f"{lr:g}", fill="black")
    for k in range(5):
        v = 10 ** (y_lo + (y_hi - y_lo) * k / 4)
        y = xy(lrs[0], v)[1]
        draw.line([(left, y), (width - right, y)], fill=(230, 230, 230))
        draw.text((5, y - 6), f"{v:.3f}", fill="black")
    draw.text((left, 12), "final eval MSE / initial, against the learning rate (x: diverged, > 1)", fill="black")
    draw.text(((left + width - right) // 2 - 40, height - 22), "learning rate", fill="black")
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    ranks = sorted({row["r"] for row in rows})
    for i, row in enumerate(rows):
        color = palette[ranks.index(row["r"]) % len(palette)]
        points = [xy(lr, v) for lr, v in sorted(row["relative_mse"].items()) if v <= 1.0]
        diverged = [xy(lr, 1.0) for lr, v in sorted(row["relative_mse"].items()) if v > 1.0]
        loha_line = row["method"] == "loha"
        for a, b in zip(points, points[1:]):
            if loha_line:
                draw.line([a, b], fill=color, width=3)
            else:  # dashed
                mid = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
                draw.line([a, mid], fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        for x, y in diverged:
            draw.line([(x - 5, y - 5), (x + 5, y + 5)], fill=color, width=2)
            draw.line([(x - 5, y + 5), (x + 5, y - 5)], fill=color, width=2)
        y = top + 10 + 18 * i
        draw.line([(width - right + 15, y + 6), (width - right + 40, y + 6)], fill=color, width=3 if loha_line else 1)
        draw.text((width - right + 45, y), f"{'LoHa' if loha_line else 'LoRA'} r{row['rank']} (best lr "
                                           f"{row['best_lr']:g})", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = {lr: run_one(lr, args) for lr in args.lrs}
    rows, table = summarise(runs, args.ranks)
    spectrum = f" with singular values ∝ i^-{args.teacher_decay:g}" if args.teacher_decay else ""
    title = (f"tiny UNet distillation to a full-rank teacher{spectrum}, {args.steps} Adam steps (cosine), batch 4, "
             f"LoHa r vs LoRA 2r (same parameter count); final relative MSE on held-out batches\n\n")
    (args.out / "quality-sweep.md").write_text(title + table)
    (args.out / "quality-sweep.json").write_text(json.dumps(
        {"steps": args.steps, "ranks": args.ranks, "rows": [{**row, "relative_mse": {f"{k:g}": v for k, v in
                                                                                      row["relative_mse"].items()}}
                                                             for row in rows]}, indent=2) + "\n")
    plot(rows, args.out / "quality-sweep.png")
    print(title + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
