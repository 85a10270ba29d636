"""Lever 10 of BENCHMARKS.md §2, a prototype that was measured and not kept: grouped mode saving nothing
out×in. Each layer's linear becomes a custom Function that saves only x and computes the input gradient
as g·W + s·(g·KRa)·KRb, with the Khatri–Rao factors KRa = W1a ⊙row W2a (out×r²) and KRb = W1b ⊙col W2b
(r²×in), instead of keeping the prebuilt W + ΔW for backward. Prints saved-for-backward bytes and
interleaved step times against loha-merged, loha-stacked and PEFT LoHa on the tiny UNet (CPU, 1 thread).

    python bench/lever10_lean_grouped.py [foreach|fused] [rounds, default 20]
"""

import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import loha  # noqa: E402
from loha.layer import _cast  # noqa: E402


class LeanLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, prebuilt, w, bias, layer):
        ctx.save_for_backward(x)
        ctx.w, ctx.layer, ctx.scale = w, layer, layer.scale
        return F.linear(x, prebuilt, bias)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        a1, b1, a2, b2 = (f.detach() for f in ctx.layer.factors())
        out_f, r = a1.shape
        kra = (a1[:, :, None] * a2[:, None, :]).reshape(out_f, r * r)
        krb = (b1[:, None, :] * b2[None, :, :]).reshape(r * r, -1)
        g2 = g.reshape(-1, g.shape[-1])
        gx = g2 @ _cast(ctx.w, g.dtype) + ((g2 @ _cast(kra, g.dtype)) @ _cast(krb, g.dtype)).mul_(ctx.scale)
        return gx.reshape(*g.shape[:-1], -1), g2.t() @ x.reshape(-1, x.shape[-1]), None, None, None


def lean_grouped_forward(self, x):
    """LoHaLinear._grouped_forward with the lean per-layer Function (no rank dropout in this benchmark)."""
    prebuilt = self._prebuilt
    self.__dict__["_prebuilt"] = None
    if prebuilt is None or not prebuilt[1].alive or prebuilt[2] != self._stamp(x.dtype):
        self._group.build(self, x.dtype)
        prebuilt = self._prebuilt
        self.__dict__["_prebuilt"] = None
    base = self._modules["base_layer"]._parameters
    bias = _cast(base["bias"], x.dtype)
    if not torch.is_grad_enabled():
        return F.linear(x, prebuilt[0], bias)
    return LeanLinear.apply(x, prebuilt[0], base["weight"], bias, self)


def main(optimizer="foreach", rounds=20) -> dict:
    """{variant: {"saved_bytes": ..., "step_median_s": ...}}; raises if the lean gradients differ."""
    torch.set_num_threads(1)
    args = bench.parse_args(["--model", "tiny", "--optimizer", optimizer])
    device, dtype = torch.device("cpu"), torch.float32
    inputs = bench.make_inputs("tiny", 1, 64, device, dtype, 0)
    variants = []
    for name in ("loha-merged", "loha-stacked", "loha-stacked-lean", "peft-loha"):
        v = bench.build_variant(name.removesuffix("-lean"), args, device, dtype)
        if name.endswith("-lean"):
            for m in loha.adapter_modules(v.unet).values():
                m._grouped_forward = types.MethodType(lean_grouped_forward, m)
        v.name = name
        variants.append(v)
    grads = []
    for v in variants[1:3]:  # the same gradients as the grouped mode it replaces
        out = v.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                     added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0]
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in v.params])
        v.optimizer.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    result = {}
    for v in variants:
        saved = bench.saved_for_backward_bytes(v, inputs, device, dtype)
        v.optimizer.zero_grad(set_to_none=True)
        result[v.name] = {"saved_bytes": saved}
        print(f"{v.name}: saved for backward {saved / 2**20:.2f} MiB")
    times = {v.name: [] for v in variants}
    for v in variants:
        for _ in range(3):
            bench.train_step(v, inputs, device, dtype)
    for _ in range(int(rounds)):
        for v in variants:
            for _ in range(5):
                start = time.process_time()
                bench.train_step(v, inputs, device, dtype)
                times[v.name].append(time.process_time() - start)
    peft = statistics.median(times["peft-loha"])
    for name, t in times.items():
        result[name]["step_median_s"] = statistics.median(t)
        print(f"{name}: step median {statistics.median(t) * 1e3:.1f} ms, {statistics.median(t) / peft:.2f}x PEFT LoHa")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:3])
