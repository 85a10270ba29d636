"""LoHaLinear: the only place where the LoHa math lives.

ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/rank   (FedPara, arXiv 2108.06098)

The forward and backward are one hand-written ``torch.autograd.Function``. Autograd never sees the
Hadamard product, and the backward saves nothing of size out×in: it recomputes the two rank-r products
P1 = W1a·W1b and P2 = W2a·W2b from the four small factors. With G = scale·gᵀx:

    ∂W1a = (G⊙P2)·W1bᵀ   ∂W1b = W1aᵀ·(G⊙P2)   ∂W2a = (G⊙P1)·W2bᵀ   ∂W2b = W2aᵀ·(G⊙P1)

Two forward strategies give the same math:
- ``"merged"`` (default): one GEMM with W + scale·ΔW, built in fp32 and cast once to the compute dtype.
  Fastest (the adapter costs no extra GEMM over the frozen layer), but with a 16-bit base the sum is
  rounded to W's precision step: the effective ΔW is off by 0.69 / 0.16 / 0.018 (relative) at
  |ΔW| ≈ 1e-5 / 1e-4 / 1e-3 in bf16, against 0.0017 for bypass. The layer's bf16 output then rounds the
  change just as coarsely in both modes, so what the next layer sees differs by under 10% between them
  (tests/test_layer.py::test_merged_forward_rounding_vs_bypass). Gradients to the factors are exact
  either way: G does not depend on the forward strategy.
- ``"bypass"``: base(x) + x·(scale·ΔW)ᵀ. One more GEMM per layer, keeps ΔW's own relative precision
  (worth it only when activations stay in fp32).

This file imports nothing of the package.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FORWARD_MODES = ("merged", "bypass")
INIT_SCHEMES = ("lycoris", "peft")


class LoHaError(ValueError):
    """Every problem a user can cause (bad arguments, bad files, bad models) raises this type."""


def _products(w1a, w1b, w2a, w2b, row_scale):
    """P1 and P2 in the factors' dtype; rank/module dropout scales P1's rows via W1a (out×r, cheap)."""
    a1 = w1a if row_scale is None else w1a * row_scale[:, None]
    return a1, torch.mm(a1, w1b), torch.mm(w2a, w2b)


def _cast(t, dtype):
    # A no-op .to() still costs a dispatcher call; on small layers those calls are the step time.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _scaled(t, scale):
    """t·scale in place; alpha = rank (the default) makes scale 1, and then it is no op at all."""
    return t if scale == 1.0 else t.mul_(scale)


def _effective_weight(weight, p1, p2, scale, dtype):
    """W + scale·P1⊙P2, summed in the wider of W's and the factors' dtypes, cast once to ``dtype``."""
    wide = p1.dtype if weight.dtype == p1.dtype else torch.promote_types(weight.dtype, p1.dtype)
    return _cast(torch.addcmul(_cast(weight, wide), p1, p2, value=scale), dtype)


class _LoHaLinearFunction(torch.autograd.Function):
    # Written for few kernel launches per layer: on GPU and CPU alike, an adapted SDXL attention linear
    # is small enough that launches and dispatch, not FLOPs, set the step time (BENCHMARKS.md).
    @staticmethod
    def forward(ctx, x, weight, bias, w1a, w1b, w2a, w2b, scale, row_scale, merged):
        _, p1, p2 = _products(w1a, w1b, w2a, w2b, row_scale)
        if merged:
            y = F.linear(x, _effective_weight(weight, p1, p2, scale, x.dtype), _cast(bias, x.dtype))
        else:
            y = F.linear(x, _cast(weight, x.dtype), _cast(bias, x.dtype))
            y += F.linear(x, _cast(_scaled(p1.mul_(p2), scale), x.dtype))
        if ctx is not None:  # None: called directly for inference, nothing to save
            ctx.save_for_backward(x, weight, w1a, w1b, w2a, w2b, row_scale)
            ctx.scale, ctx.merged, ctx.has_bias = scale, merged, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        scale = ctx.scale
        a1, p1, p2 = _products(w1a, w1b, w2a, w2b, row_scale)
        grad_x = grad_w = grad_b = g1a = g1b = g2a = g2b = None
        if need[0]:
            if ctx.merged:
                grad_x = g @ _effective_weight(weight, p1, p2, scale, g.dtype)
            else:
                grad_x = g @ _cast(weight, g.dtype)
                grad_x += g @ _cast(_scaled(p1 * p2, scale), g.dtype)
        g2 = g.reshape(-1, g.shape[-1])
        if need[2] and ctx.has_bias:
            grad_b = _cast(g2.sum(0), weight.dtype)
        need_factors = need[3] or need[4] or need[5] or need[6]
        if need[1] or need_factors:
            gx = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]))  # out×in, the only activation-sized product
            if need[1]:
                grad_w = _cast(gx, weight.dtype)
            if need_factors:
                # scale·gᵀx in the factors' dtype; in place, unless gx is also the returned grad_w
                G = gx.to(p1.dtype) * scale if need[1] else _scaled(_cast(gx, p1.dtype), scale)
                gp2 = G * p2
                del p2
                g1a = F.linear(gp2, w1b)  # gp2·W1bᵀ without a transpose op
                g1b = torch.mm(a1.t(), gp2)
                del gp2
                gp1 = G.mul_(p1)
                g2a = F.linear(gp1, w2b)
                g2b = torch.mm(w2a.t(), gp1)
                if row_scale is not None:
                    g1a = g1a * row_scale[:, None]
        return grad_x, grad_w, grad_b, g1a, g1b, g2a, g2b, None, None, None


class LoHaLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoHa adapter. The base module is kept intact as ``base_layer``.

    ``rank_dropout`` (PEFT and LyCORIS semantics): in training, each output row of ΔW is dropped with
    this probability and the kept rows are rescaled by 1/mean(kept). ``module_dropout``: in training, the
    whole adapter is skipped for a step with this probability. Both are off in eval. There is no neuron
    (input) dropout for LoHa in PEFT, LyCORIS or kohya, and none here.

    Init: ``"lycoris"`` (default) W1a~N(0,0.1), W1b~N(0,1), W2a=0, W2b~N(0,1), as LyCORIS and kohya do, so
    the learning rates people already use for LoHa carry over; ``"peft"``: kaiming-uniform W1a, W1b,
    W2a and W2b=0, as PEFT does. Either way ΔW is exactly zero at step 0 and the first step moves it.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float | None = None, *, rank_dropout=0.0,
                 module_dropout=0.0, init="lycoris", forward_mode="merged", dtype=torch.float32):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise LoHaError(f"LoHaLinear wraps nn.Linear, got {type(base_layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoHaError(f"rank must be an integer >= 1, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise LoHaError(f"alpha must be a finite number > 0, got {alpha!r} (None means alpha = rank)")
        for name, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise LoHaError(f"{name} must be in [0, 1), got {p!r}")
        if init not in INIT_SCHEMES:
            raise LoHaError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
        self.base_layer = base_layer.requires_grad_(False)
        out_f, in_f = base_layer.weight.shape
        kw = dict(device=base_layer.weight.device, dtype=dtype)
        self.hada_w1_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.hada_w2_a = nn.Parameter(torch.empty(out_f, rank, **kw))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.rank, self.alpha = rank, alpha
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.forward_mode = forward_mode
        self.multiplier = 1.0
        self.merged = False
        self._original_weight = None
        self.reset_parameters(init)

    # -- what callers of the wrapped Linear may read -------------------------------------------
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    @property
    def scale(self) -> float:
        """alpha/rank times the user multiplier (set_scale)."""
        return self.alpha / self.rank * self.multiplier

    @property
    def forward_mode(self) -> str:
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: str):
        if mode not in FORWARD_MODES:
            raise LoHaError(f"forward_mode must be one of {FORWARD_MODES}, got {mode!r}")
        self._forward_mode = mode

    def reset_parameters(self, init: str = "lycoris"):
        if self.hada_w1_a.is_meta:
            return
        with torch.no_grad():
            if init == "lycoris":
                nn.init.normal_(self.hada_w1_a, std=0.1)
                nn.init.normal_(self.hada_w1_b, std=1.0)
                nn.init.zeros_(self.hada_w2_a)
                nn.init.normal_(self.hada_w2_b, std=1.0)
            else:
                for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                nn.init.zeros_(self.hada_w2_b)

    def factors(self):
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b

    def delta_weight(self) -> torch.Tensor:
        """scale·ΔW in fp32 (or the factors' dtype if wider), without dropout."""
        w1a, w1b, w2a, w2b = (f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
                              for f in self.factors())
        return (w1a @ w1b) * (w2a @ w2b) * self.scale

    def _row_scale(self):
        """Rank/module dropout as one per-output-row multiplier (no data-dependent branch)."""
        if not self.training or (self.rank_dropout == 0 and self.module_dropout == 0):
            return None
        w = self.hada_w1_a
        if self.rank_dropout > 0:
            row = (torch.rand(w.shape[0], device=w.device) > self.rank_dropout).to(w.dtype)
            row = row / row.mean().clamp_min(1e-12)
        else:
            row = torch.ones(w.shape[0], device=w.device, dtype=w.dtype)
        if self.module_dropout > 0:
            row = row * (torch.rand((), device=w.device) >= self.module_dropout).to(w.dtype)
        return row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.multiplier == 0:
            return self.base_layer(x)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # compute in autocast's dtype, as the Linear it replaces would
            with torch.autocast(dev, enabled=False):
                return self._apply_function(x.to(torch.get_autocast_dtype(dev)))
        return self._apply_function(x)

    def _apply_function(self, x):
        base = self.base_layer
        if not torch.is_grad_enabled():  # inference: the same math without autograd.Function's overhead
            return _LoHaLinearFunction.forward(None, x, base.weight, base.bias, *self.factors(), self.scale,
                                               self._row_scale(), self._forward_mode == "merged")
        return _LoHaLinearFunction.apply(x, base.weight, base.bias, *self.factors(), self.scale,
                                         self._row_scale(), self._forward_mode == "merged")

    # -- merge / unmerge -----------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, keep_original: bool = True):
        """Fold scale·ΔW into the base weight (in fp32, cast once). Refuses non-finite results."""
        if self.merged:
            return
        w = self.base_layer.weight
        merged = w.float() + self.delta_weight().to(w.device)
        if not torch.isfinite(merged).all():
            raise LoHaError("merging would put NaN/Inf into the base weight; the adapter factors or "
                            "the scale are broken, so the model was left unmerged")
        self._original_weight = w.detach().to("cpu", copy=True) if keep_original else None
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore the base weight: bit-exact from the kept copy, else by subtracting ΔW in fp32."""
        if not self.merged:
            return
        w = self.base_layer.weight
        if self._original_weight is not None:
            w.copy_(self._original_weight.to(w.device))
        else:
            w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self._original_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, forward_mode={self._forward_mode!r}, "
                f"rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}, merged={self.merged}")
