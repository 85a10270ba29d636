"""Does torch.compile give the tiny SDXL UNet the same weight gradients as eager on this device?

With torch 2.13 on CPU it does not (inductor; tests/test_train.py::test_inductor_cpu_weight_gradients_are_wrong),
which is why train_loha_sdxl.py refuses --compile on CPU. Run this on a GPU before relying on --compile there:

    python bench/compile_check.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loha  # noqa: E402
from bench import make_inputs  # noqa: E402
from loha.tiny_sdxl import tiny_unet  # noqa: E402


def worst_relative_error(device: str, adapter: bool, backend: str = "inductor") -> float:
    """Max over trainable tensors of max|g_compiled - g_eager| / max|g_eager|, input latents without grad."""
    unet = tiny_unet(0).requires_grad_(False).train()
    if adapter:
        loha.inject(unet, rank=4)
    else:
        for path, module in unet.named_modules():
            if path.endswith("to_q"):
                module.weight.requires_grad_(True)
    unet.to(device)
    inputs = make_inputs("tiny", 1, 64, torch.device(device), torch.float32, seed=0)
    target = inputs.pop("target")
    grads = []
    for model in (unet, torch.compile(copy.deepcopy(unet), backend=backend)):
        torch.nn.functional.mse_loss(model(**inputs).sample, target).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad and p.grad is not None])
    return max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(*grads))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__} on {args.device}")
    for adapter in (False, True):
        what = "LoHa factors (merged)" if adapter else "plain to_q weights"
        err = worst_relative_error(args.device, adapter)
        verdict = "matches eager" if err < 1e-3 else "WRONG: do not train with --compile here"
        print(f"{what}: worst relative gradient error compiled vs eager {err:.2e} ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
