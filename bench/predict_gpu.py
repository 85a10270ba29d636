"""A prediction, labelled as such: the H200 bs1 SDXL training step of each variant from its exact op count.

A GPU step at batch 1 is host-bound, so time ≈ floor + c · (extra ops per step). c is fitted by least squares
through the floor to two of the anchors others measured on one H200 (DESIGN.md; BENCHMARKS.md section 4):
PEFT LoHa 624 ms and LyCORIS LoHa 1067 ms over a 172 ms floor. PEFT LoRA (657 ms) is held out to check the
fit. Both op measures are fitted: every dispatched aten op, and launched ops only (no views/metadata).

    python bench/predict_gpu.py [bench/results/count-sdxl-attn.json] [--json out.json]
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


def fit(counts: dict, measure: str) -> dict:
    """c (ms per extra op) and each variant's predicted step, for ``measure`` "all" or "launched"."""
    floor = counts["floor"][measure]
    extra = {v: c[measure] - floor for v, c in counts.items()}
    dt = {v: ANCHORS_MS[v] - ANCHORS_MS["floor"] for v in CALIBRATION}
    c = sum(dt[v] * extra[v] for v in CALIBRATION) / sum(extra[v] ** 2 for v in CALIBRATION)
    predicted = {v: ANCHORS_MS["floor"] + c * n for v, n in extra.items()}
    return {"ms_per_op": c, "predicted_ms": predicted,
            "error_vs_anchor": {v: predicted[v] / ANCHORS_MS[v] - 1 for v in ANCHORS_MS if v in predicted}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("counts", nargs="?", default=str(Path(__file__).parent / "results" / "count-sdxl-attn.json"))
    p.add_argument("--json", default=None, help="also write the fits here")
    args = p.parse_args(argv)
    counts = json.loads(Path(args.counts).read_text())["counts"]
    missing = [v for v in ANCHORS_MS if v not in counts]
    if missing:
        print(f"error: {args.counts} lacks the anchor variants {missing}; count them with bench.py --count",
              file=sys.stderr)
        return 1
    fits = {m: fit(counts, m) for m in ("all", "launched")}
    print("PREDICTION (not a measurement): H200, SDXL 1024² bf16 bs1, rank 8, from exact op counts")
    for measure, f in fits.items():
        print(f"\nfit on {measure} ops: c = {f['ms_per_op'] * 1000:.1f} µs per extra op; anchors "
              + ", ".join(f"{v} {e:+.0%}" for v, e in f["error_vs_anchor"].items() if v != "floor")
              + f" ({HELD_OUT} held out)")
        print("| variant | predicted ms | vs floor | vs PEFT LoHa (624 ms) |")
        print("|---|---|---|---|")
        for v, ms in f["predicted_ms"].items():
            print(f"| {v} | {ms:.0f} | {ms / ANCHORS_MS['floor']:.2f}× | {ms / ANCHORS_MS['peft-loha']:.2f}× |")
    if args.json:
        Path(args.json).write_text(json.dumps(fits, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
