"""A prediction, labelled as such: the H200 bs1 SDXL training step of each variant from its exact op count.

A GPU step at batch 1 is host-bound, so time ≈ floor + c · (extra ops per step). c is fitted by least squares
through the floor to two of the anchors others measured on one H200 (DESIGN.md; BENCHMARKS.md section 4):
PEFT LoHa 624 ms and LyCORIS LoHa 1067 ms over a 172 ms floor. PEFT LoRA (657 ms) is held out to check the
fit. Both op measures are fitted: every dispatched aten op, and launched ops only (no views/metadata).
A third fit adds the memory traffic the ops cannot hide: time ≈ floor + c · extra launched ops + extra
moved bytes / H200_BANDWIDTH (the bytes the launched ops read and write, counted by bench.py --count; at
the HBM's peak, so that term is the least time those bytes can take), c refitted to the same anchors.

    python bench/predict_gpu.py [bench/results/count-sdxl-attn.json] [--json out.json]
    python bench/predict_gpu.py bench/results/count-sdxl-full.json

c is fitted on the counts of the anchors' own harness (``--fit_on``, default bench/results/count-sdxl-anchor.json:
foreach AdamW, as the H200 runs used), by CUDA's rules, and predicts the counts given (the trainer's step;
another configuration such as the full preset, where LyCORIS cannot be counted under FakeTensorMode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ANCHORS_MS = {"floor": 172.0, "peft-loha": 624.0, "lycoris-loha": 1067.0, "peft-lora": 657.0}
CALIBRATION = ("peft-loha", "lycoris-loha")
HELD_OUT = "peft-lora"
GOALS = {"vs_floor": 1.5, "vs_peft": 0.5}
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e peak (NVIDIA's H200 datasheet)
FITS = {"all": ("all", False), "launched": ("launched", False), "launched+traffic": ("launched", True)}


def _extra(counts: dict, measure: str, traffic: bool) -> tuple[dict, dict]:
    """Each variant's extra ops over the floor, and its extra moved bytes at H200_BANDWIDTH in ms (0 without
    ``traffic``)."""
    floor = counts["floor"]
    ops = {v: c[measure] - floor[measure] for v, c in counts.items()}
    ms = {v: (c["moved_bytes"] - floor["moved_bytes"]) / H200_BANDWIDTH * 1e3 if traffic else 0.0
          for v, c in counts.items()}
    return ops, ms


def fit(counts: dict, measure: str, traffic: bool = False, predict: dict | None = None) -> dict:
    """c (ms per extra op), fitted on ``counts`` (the anchors' harness), its error on each anchor, and each
    variant's predicted step (of ``predict``'s variants, default ``counts``'), for ``measure`` "all" or
    "launched"; with ``traffic``, each variant's extra moved bytes at H200_BANDWIDTH are added first and c fits
    the rest."""
    extra, bytes_ms = _extra(counts, measure, traffic)
    dt = {v: ANCHORS_MS[v] - ANCHORS_MS["floor"] - bytes_ms[v] for v in CALIBRATION}
    c = sum(dt[v] * extra[v] for v in CALIBRATION) / sum(extra[v] ** 2 for v in CALIBRATION)
    errors = {v: (ANCHORS_MS["floor"] + c * extra[v] + bytes_ms[v]) / ANCHORS_MS[v] - 1
              for v in ANCHORS_MS if v in extra}
    if predict is not None:
        extra, bytes_ms = _extra(predict, measure, traffic)
    predicted = {v: ANCHORS_MS["floor"] + c * n + bytes_ms[v] for v, n in extra.items()}
    return {"ms_per_op": c, "predicted_ms": predicted, "traffic_ms": bytes_ms, "error_vs_anchor": errors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("counts", nargs="?", default=str(Path(__file__).parent / "results" / "count-sdxl-attn.json"))
    default_fit = Path(__file__).parent / "results" / "count-sdxl-anchor.json"
    p.add_argument("--fit_on", default=str(default_fit) if default_fit.is_file() else None,
                   help="fit c on these counts (with the anchors' variants) and predict the positional ones; "
                        "default: bench/results/count-sdxl-anchor.json, the anchors' own harness")
    p.add_argument("--json", default=None, help="also write the fits here")
    args = p.parse_args(argv)
    fit_path = args.fit_on or args.counts
    loaded = {}
    for path in {args.counts, fit_path}:
        loaded[path] = json.loads(Path(path).read_text())["counts"]
        if any("moved_bytes" not in c for c in loaded[path].values()):
            print(f"error: {path} has no moved_bytes (counted before bench.py tallied them); count it again "
                  "with bench.py --count", file=sys.stderr)
            return 1
    missing = [v for v in ANCHORS_MS if v not in loaded[fit_path]]
    if missing:
        print(f"error: {fit_path} lacks the anchor variants {missing}; count them with bench.py --count, or fit "
              "on counts that have them with --fit_on", file=sys.stderr)
        return 1
    if "floor" not in loaded[args.counts]:
        print(f"error: {args.counts} lacks the floor; count it with bench.py --count", file=sys.stderr)
        return 1
    predict = loaded[args.counts] if fit_path != args.counts else None
    fits = {name: fit(loaded[fit_path], measure, traffic, predict) for name, (measure, traffic) in FITS.items()}
    print("PREDICTION (not a measurement): H200, SDXL 1024² bf16 bs1, rank 8, from exact op counts"
          + (f" ({args.counts}, c fitted on {fit_path})" if args.fit_on else ""))
    for measure, f in fits.items():
        print(f"\nfit on {measure} ops{' (traffic at the HBM peak added)' if '+' in measure else ''}: "
              f"c = {f['ms_per_op'] * 1000:.1f} µs per extra op"
              + ("; anchors " + ", ".join(f"{v} {e:+.0%}" for v, e in f["error_vs_anchor"].items() if v != "floor")
                 + f" ({HELD_OUT} held out)" if f["error_vs_anchor"] else ""))
        peft, label = ANCHORS_MS["peft-loha"], "measured"
        print(f"| variant | predicted ms | of it, traffic ms | vs floor | vs PEFT LoHa ({label}, {peft:.0f} ms) |")
        print("|---|---|---|---|---|")
        for v, ms in f["predicted_ms"].items():
            print(f"| {v} | {ms:.0f} | {f['traffic_ms'][v]:.1f} | {ms / ANCHORS_MS['floor']:.2f}× | "
                  f"{ms / peft:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(fits, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
