"""python -m loha <verb>: the LoHa toolbox.

    python -m loha merge   --base sdxl/ --adapter a.safetensors --scale 0.8 --out merged.safetensors
    python -m loha extract --base sdxl/ --tuned finetuned/ --rank 8 --out extracted.safetensors
    python -m loha resize  --adapter a.safetensors --rank 4 --out smaller.safetensors
    python -m loha convert --adapter a.safetensors --to peft --out a-peft/
    python -m loha inspect --adapter a.safetensors [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from . import cli, toolbox
from .inject import PRESETS
from .layer import LoHaError

FIT_HELP = {
    "--rank": "LoHa rank of every fitted layer (ΔW reaches rank r²); give this or --target_error",
    "--target_error": "the relative error ‖ΔŴ − ΔW‖/‖ΔW‖ to reach per layer, at the smallest rank of 1, 2, 4, ... "
                      "that does; give this or --rank",
}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__.split("\n\n")[0], prog="python -m loha")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=cli.Parser, metavar="VERB")

    def verb(name, description):
        return verbs.add_parser(name, help=description, description=description, formatter_class=cli.HelpFormatter)

    def fitting(p):
        p.add_argument("--rank", type=int, default=None, help=FIT_HELP["--rank"] + "; default: none")
        p.add_argument("--target_error", type=float, default=None, help=FIT_HELP["--target_error"] + "; default: none")
        p.add_argument("--max_rank", type=int, default=64, help="the highest rank --target_error tries")
        p.add_argument("--sweeps", type=int, default=50,
                       help="alternating least-squares sweeps per fit (layers of one shape fit together)")
        p.add_argument("--naming", default="sgm", choices=["sgm", "diffusers"],
                       help="module names in the written kohya file: sgm (kohya/ComfyUI/A1111) or diffusers (LyCORIS)")

    def common(p, what="the model structure"):
        p.add_argument("--config", default=None,
                       help=f"a diffusers SDXL folder whose configs give {what}; default: SDXL base 1.0's")
        p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = verb("merge", "bake LoHa adapters into an SDXL checkpoint (a diffusers folder or a single file)")
    p.add_argument("--base", required=True, help="a diffusers SDXL folder or a single-file SDXL .safetensors")
    p.add_argument("--adapter", action="append", default=[],
                   help="a LoHa in any layout loha.load reads; repeatable (none: a diffusers --base is written as a "
                        "single .safetensors file, unchanged)")
    p.add_argument("--scale", action="append", type=float, default=None,
                   help="strength of the --adapter before it (repeatable, in the same order); default: 1 for each")
    p.add_argument("--out", required=True,
                   help="a folder (diffusers layout) or a .safetensors file (single-file layout)")
    common(p, "a single-file base's structure")

    p = verb("extract", "fit a LoHa to the difference between a fine-tuned SDXL and its base")
    p.add_argument("--base", required=True, help="the base model: a diffusers folder or a single file")
    p.add_argument("--tuned", required=True, help="the fine-tuned model, in either layout")
    p.add_argument("--out", required=True, help="the kohya/LyCORIS .safetensors file to write")
    p.add_argument("--preset", default="attn-only", choices=list(PRESETS),
                   help="which modules to fit (LyCORIS's preset names, as the trainer's --preset)")
    p.add_argument("--text_encoders", action="store_true", help="also fit the text encoders' preset modules")
    p.add_argument("--device", default="cpu", help="where to fit: cpu or cuda")
    fitting(p)
    common(p, "single-file inputs' structure")

    p = verb("resize", "refit a LoHa at a lower rank, or to a target error")
    p.add_argument("--adapter", required=True, help="a LoHa in any layout loha.load reads")
    p.add_argument("--out", required=True, help="the kohya/LyCORIS .safetensors file to write")
    fitting(p)
    common(p)

    p = verb("convert", "rewrite a LoHa in another layout or dtype")
    p.add_argument("--adapter", required=True, help="a LoHa in any layout loha.load reads")
    p.add_argument("--to", required=True, choices=["peft", "kohya", "lycoris"],
                   help="peft (a folder per component), kohya (SGM names) or lycoris (diffusers names)")
    p.add_argument("--dtype", default=None, choices=list(toolbox.DTYPES),
                   help="cast the factors; default: none (as stored, lossless)")
    p.add_argument("--out", required=True, help="the folder (peft) or .safetensors file to write")
    common(p)

    p = verb("inspect", "say what a LoHa file is")
    p.add_argument("--adapter", required=True, help="a LoHa in any layout loha.load reads")
    p.add_argument("--modules", action="store_true", help="also list every module (always in --json)")
    common(p)
    return parser


def run(args) -> dict:
    if args.verb == "merge":
        scales = args.scale or [1.0] * len(args.adapter)
        if len(scales) != len(args.adapter):
            raise LoHaError(f"{len(args.adapter)} --adapter but {len(scales)} --scale: give one --scale per adapter, "
                            "or none for 1 each")
        return toolbox.merge(args.base, list(zip(args.adapter, scales)), args.out, config=args.config)
    fit = {k: getattr(args, k) for k in ("rank", "target_error", "max_rank", "sweeps", "naming")} \
        if args.verb in ("extract", "resize") else {}
    if args.verb == "extract":
        return toolbox.extract(args.base, args.tuned, args.out, preset=args.preset, text_encoders=args.text_encoders,
                               config=args.config, device=args.device, **fit)
    if args.verb == "resize":
        return toolbox.resize(args.adapter, args.out, config=args.config, **fit)
    if args.verb == "convert":
        return toolbox.convert(args.adapter, args.out, to=args.to, dtype=args.dtype, config=args.config)
    return toolbox.inspect(args.adapter, config=args.config)


def describe(verb: str, report: dict, modules: bool = False) -> str:
    """The report for a person."""
    if verb == "inspect":
        lines = [f"{report['file']}: {report['layout']}, {report['modules']} modules",
                 f"  base model: {report['base_model'] or 'not recorded'}",
                 f"  rank {'/'.join(map(str, report['ranks'])) or '-'}, alpha "
                 f"{'/'.join(f'{a:g}' for a in report['alphas']) or '-'}, dtype {'/'.join(report['dtypes'])}, "
                 f"kinds: {', '.join(report['kinds'])}",
                 "  modules per block: " + ", ".join(f"{b} {n}" for b, n in report["blocks"].items())]
        norms = sorted(report["per_module"], key=lambda m: -m["delta_norm"])
        lines.append("  largest ‖ΔW‖: " + ", ".join(f"{m['module']} {m['delta_norm']:.3g}" for m in norms[:3]))
        if modules:
            lines += [f"    {m['component']}.{m['module']}: {m['kind']}, rank {m['rank']}, alpha {m['alpha']}, "
                      f"{m['dtype']}, ‖ΔW‖ {m['delta_norm']:.4g}" for m in report["per_module"]]
        lines += [f"  {k}: {v}" for k, v in sorted(report["metadata"].items())]
        return "\n".join(lines)
    if verb in ("extract", "resize"):
        lines = [f"  {r['component']}.{r['module']}: rank {r['rank']}, error {r['loha_error']:.4f} "
                 f"(LoRA {r['lora_error']:.4f})" for r in report["layers"]]
        lines.append(f"wrote {report['out']}: {report['parameters']:,} LoHa parameters for {len(report['layers'])} "
                     f"layers; relative error ‖ΔŴ − ΔW‖/‖ΔW‖ {report['total_loha_error']:.4f} in all (the SVD-optimal "
                     f"LoRA with the same parameter count: {report['total_lora_error']:.4f})")
        return "\n".join(lines)
    if verb == "merge":
        return (f"wrote {report['out']} ({report['layout']}): {report['adapted_tensors']} tensors adapted ("
                + ", ".join(f"{k}: {n} modules" for k, n in report["modules"].items()) + "); every other tensor "
                "copied bit for bit")
    return (f"wrote {report['out']} ({report['to']}, {report['dtype']}): "
            + ", ".join(f"{c} {n} modules" for c, n in report["modules"].items()))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except LoHaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else describe(args.verb, report, getattr(args, "modules", False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
