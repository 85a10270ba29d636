"""LoHaLinear: the only place where the LoHa math lives.

ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/rank   (FedPara, arXiv 2108.06098)

The forward and backward are hand-written ``torch.autograd.Function``s (one per layer; one per group of
same-shape layers in "grouped" mode). Autograd never sees the Hadamard product. In the per-layer modes the
backward saves nothing of size out×in: it recomputes the two rank-r products P1 = W1a·W1b and
P2 = W2a·W2b from the four small factors. With G = scale·gᵀx:

    ∂W1a = (G⊙P2)·W1bᵀ   ∂W1b = W1aᵀ·(G⊙P2)   ∂W2a = (G⊙P1)·W2bᵀ   ∂W2b = W2aᵀ·(G⊙P1)

Three forward strategies give the same math:
- ``"merged"`` (default): one GEMM with W + scale·ΔW, built in fp32 and cast once to the compute dtype.
  Fastest (the adapter costs no extra GEMM over the frozen layer), but with a 16-bit base the sum is
  rounded to W's precision step: the effective ΔW is off by 0.69 / 0.16 / 0.018 (relative) at
  |ΔW| ≈ 1e-5 / 1e-4 / 1e-3 in bf16, against 0.0017 for bypass. The layer's bf16 output then rounds the
  change just as coarsely in both modes, so what the next layer sees differs by under 10% between them
  (tests/test_layer.py::test_merged_forward_rounding_vs_bypass). Gradients to the factors are exact
  either way: G does not depend on the forward strategy.
- ``"bypass"``: base(x) + x·(scale·ΔW)ᵀ. One more GEMM per layer, keeps ΔW's own relative precision
  (worth it only when activations stay in fp32).
- ``"grouped"``: the merged math, but W + scale·ΔW is rebuilt for every layer of the same shape at once
  (stacked factors, bmm, in cache-sized chunks on CPU) and each layer runs a plain ``F.linear``; the
  factor gradients of the whole group are computed in one batched backward. Far fewer ops per layer,
  which is what small, dispatch-bound layers cost (BENCHMARKS.md), at the price of keeping each layer's
  W + ΔW (out×in, in the compute dtype) for backward, as a trainable Linear would. Under ``torch.compile`` it runs as
  ``"merged"`` (the compiler fuses the per-layer ops anyway).

Storage: each layer owns its four factors, unless ``loha.stack`` has moved the factors of all same-shape
layers into a ``LoHaStack`` (four (L, ·, ·) Parameters); the layers then see views of their slice. The
grouped rebuild takes a whole stack as it is, so autograd and the optimizer handle four tensors per
shape instead of four per layer.

This file imports nothing of the package.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

FORWARD_MODES = ("merged", "bypass", "grouped")
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


FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def _is_stacked(factors):
    """True for a LoHaStack's four (L, ·, ·) Parameters, False for 4L per-layer (2-D) factors."""
    return len(factors) == 4 and factors[0].dim() == 3


def _stack_factors(factors):
    """4L per-layer factors (w1a, w1b, w2a, w2b, w1a, ...) → four stacked (L, ·, ·) tensors; four
    already stacked ones (a LoHaStack's Parameters) are returned as they are."""
    if _is_stacked(factors):
        return list(factors)
    return [torch.stack(factors[i::4]) for i in range(4)]


# The group is processed in chunks of about this many elements per (chunk, out, in) tensor. On CPU
# 256 KiB in fp32, so the few tensors of that size in flight stay in L2 cache (BENCHMARKS.md §2); on
# GPU large chunks keep the launch count low while bounding the transient memory.
CPU_CHUNK_ELEMENTS = 1 << 16
GPU_CHUNK_ELEMENTS = 1 << 24  # 64 MiB in fp32: bounds the transient memory of an SDXL-sized group


def _chunks(n, out_in, device):
    size = max(1, (CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS) // out_in)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _GroupedRebuildFunction(torch.autograd.Function):
    """W + scale·(W1a·W1b)⊙(W2a·W2b) for L layers of one shape: L (out, in) tensors in ``dtype``.

    ``weights`` are the L frozen W, ``scale`` a float or an (L, 1, 1) tensor,
    ``row_scale`` None or (L, out). The sum is taken in the factors' dtype (or W's, if wider) and cast
    once to ``dtype``. The backward gets every layer's gᵀx and returns the 4L factor gradients with
    the same formulas as the per-layer Function. A layer whose output got no gradient (its result was
    not used, e.g. CLIP's last layer under SDXL's penultimate-layer conditioning) gets None, not zeros,
    exactly as in the per-layer mode, so AdamW leaves it alone (no weight decay on it).

    ``factors`` may also be the four (L, ·, ·) Parameters of a LoHaStack whose layers are exactly this
    group: then nothing is stacked or unbound, and autograd gets four gradients instead of 4L (a layer
    with no gradient gets zeros in its slice: a stacked Parameter cannot be partly None).
    """

    @staticmethod
    def forward(ctx, weights, scale, row_scale, dtype, build, *factors):
        a1, b1, a2, b2 = _stack_factors(factors)
        if row_scale is not None:
            a1 = a1 * row_scale[:, :, None]
        wide = a1.dtype if weights[0].dtype == a1.dtype else torch.promote_types(weights[0].dtype, a1.dtype)
        count, out_f, in_f = len(weights), a1.shape[1], b1.shape[2]
        result = torch.empty((count, out_f, in_f), dtype=dtype, device=a1.device)
        per_layer = isinstance(scale, torch.Tensor)
        value = 1.0 if per_layer else scale
        for sl in _chunks(count, out_f * in_f, a1.device):
            p1 = torch.bmm(a1[sl], b1[sl])
            if per_layer:
                p1.mul_(scale[sl])
            p2 = torch.bmm(a2[sl], b2[sl])
            w = weights[sl]
            if dtype == wide == weights[0].dtype:
                torch.stack(w, out=result[sl]).addcmul_(p1, p2, value=value)
            else:
                result[sl].copy_(torch.stack([_cast(x, wide) for x in w]).addcmul_(p1, p2, value=value))
        if ctx is not None:
            # Kept as attributes, not save_for_backward: a rebuild may run inside a non-reentrant
            # checkpoint's recomputation but not in its first forward (or the other way round), and a
            # differing count of saved tensors would fail the checkpoint's check. The factors are leaf
            # parameters; their versions are checked by hand in backward, as autograd would.
            ctx.factors, ctx.versions = factors, [f._version for f in factors]
            ctx.row_scale, ctx.scale, ctx.build = row_scale, scale, build
            ctx.set_materialize_grads(False)
        return result.unbind(0)

    @staticmethod
    def backward(ctx, *layer_grads):
        factors, row_scale = ctx.factors, ctx.row_scale
        if [f._version for f in factors] != ctx.versions:
            raise RuntimeError("a LoHa factor was modified in place between the forward and the backward "
                               "(e.g. optimizer.step() before loss.backward()); run backward first")
        scale_t = ctx.scale if isinstance(ctx.scale, torch.Tensor) else None
        ctx.build.alive = False  # this build's graph is being consumed: its weights must not be reused
        present = next((t for t in layer_grads if t is not None), None)
        if present is None:
            return (None,) * (5 + len(factors))
        w1a, w1b, w2a, w2b = _stack_factors(factors)
        a1 = w1a if row_scale is None else w1a * row_scale[:, :, None]
        grads = [torch.empty_like(t) for t in (w1a, w1b, w2a, w2b)]
        g1a, g1b, g2a, g2b = grads
        for sl in _chunks(len(w1a), present.shape[0] * present.shape[1], present.device):
            p1, p2 = torch.bmm(a1[sl], w1b[sl]), torch.bmm(w2a[sl], w2b[sl])
            G = torch.stack([present.new_zeros(()).expand_as(present) if t is None else t
                             for t in layer_grads[sl]])  # our own copy: in place is fine
            G = _cast(G, p1.dtype)
            if scale_t is not None or ctx.scale != 1.0:
                G.mul_(scale_t[sl] if scale_t is not None else ctx.scale)
            gp1 = G * p1
            gp2 = G.mul_(p2)
            torch.bmm(gp2, w1b[sl].transpose(1, 2), out=g1a[sl])
            torch.bmm(a1[sl].transpose(1, 2), gp2, out=g1b[sl])
            torch.bmm(gp1, w2b[sl].transpose(1, 2), out=g2a[sl])
            torch.bmm(w2a[sl].transpose(1, 2), gp1, out=g2b[sl])
        if row_scale is not None:
            g1a.mul_(row_scale[:, :, None])
        if _is_stacked(factors):
            return (None, None, None, None, None, *grads)
        per_layer = itertools.chain.from_iterable(
            (None,) * 4 if t is None else factor_grads
            for t, factor_grads in zip(layer_grads, zip(*(g.unbind(0) for g in grads))))
        return (None, None, None, None, None, *per_layer)


class _Build:
    """One grouped rebuild; ``alive`` turns False once autograd has run its backward (its graph is gone)."""

    __slots__ = ("alive",)

    def __init__(self):
        self.alive = True


class _LayerGroup:
    """The LoHaLinear layers of one model (``loha.inject`` links them). A ``"grouped"`` layer that has no
    valid prebuilt W + ΔW asks the group to rebuild it for every member with the same key at once.

    A prebuilt weight is used at most once, and only if nothing it was built from has changed since:
    the factors' and W's in-place version counters, the scale, grad mode, train/eval, compute dtype,
    and, in grad mode, that its graph has not been through backward yet. Anything else rebuilds."""

    def __init__(self, layers=()):
        self.layers = list(layers)

    def build(self, requester, dtype):
        key = requester._group_key()
        members = [m for m in self.layers if m is requester or m._group_key() == key]
        if requester not in members:  # a layer that is not (or no longer) in this group: a group of its own
            members = [requester]
        w, f = requester._base_weight(), requester._storage()[0]
        scales = [m.scale for m in members]
        if len(set(scales)) == 1:
            scale = scales[0]
        else:
            scale = torch.tensor(scales, device=f.device, dtype=f.dtype)[:, None, None]
        rows = [m._row_scale() for m in members]  # in the factors' dtype, as the per-layer path uses them
        row_scale = None
        if any(r is not None for r in rows):
            row_scale = torch.stack([torch.ones(w.shape[0], device=f.device, dtype=f.dtype) if r is None else r
                                     for r in rows])
        stack = requester.__dict__.get("_stack")
        if stack is not None and len(stack[0].layers) == len(members) and all(
                a is b for a, b in zip(stack[0].layers, members)):
            factors = stack[0].factors()  # four (L, ·, ·) Parameters: no stacking, four gradients
        else:
            factors = [f for m in members for f in m.factors()]
        weights = [m._base_weight() for m in members]
        build = _Build()
        if torch.is_grad_enabled():
            built = _GroupedRebuildFunction.apply(weights, scale, row_scale, dtype, build, *factors)
        else:
            built = _GroupedRebuildFunction.forward(None, weights, scale, row_scale, dtype, build, *factors)
        for m, weight in zip(members, built):
            m.__dict__["_prebuilt"] = (weight, build, m._stamp(dtype))


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
        self._stack = None  # (LoHaStack, index) once loha.stack has moved the factors into one
        self._group = _LayerGroup([self])  # loha.inject links all layers of a model into one group
        self._prebuilt = None  # "grouped" mode: (W + ΔW for this layer, its _Build, the _stamp it was built for)
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
        """(W1a, W1b, W2a, W2b): this layer's Parameters, or, once ``loha.stack`` has moved them into a
        LoHaStack, views of its slice there (written through by in-place edits and ``copy_``)."""
        stack = self.__dict__.get("_stack")
        if stack is None:
            p = self._parameters
            return p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"]
        p, i = stack[0]._parameters, stack[1]
        return p["hada_w1_a"][i], p["hada_w1_b"][i], p["hada_w2_a"][i], p["hada_w2_b"][i]

    def _storage(self):
        """The four Parameters that hold the factors: this layer's, or its LoHaStack's (for dtype, device,
        in-place versions and data pointers; a slice view would cost an op per call)."""
        stack = self.__dict__.get("_stack")
        return self.factors() if stack is None else stack[0].factors()

    def __getattr__(self, name):
        if name in FACTOR_NAMES and self.__dict__.get("_stack") is not None:
            return self.factors()[FACTOR_NAMES.index(name)]
        return super().__getattr__(name)

    def delta_weight(self) -> torch.Tensor:
        """scale·ΔW in fp32 (or the factors' dtype if wider), without dropout."""
        w1a, w1b, w2a, w2b = (f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
                              for f in self.factors())
        return (w1a @ w1b) * (w2a @ w2b) * self.scale

    def _row_scale(self):
        """Rank/module dropout as one per-output-row multiplier (no data-dependent branch)."""
        if not self.training or (self.rank_dropout == 0 and self.module_dropout == 0):
            return None
        w = self._storage()[0]
        n = w.shape[-2]
        if self.rank_dropout > 0:
            row = (torch.rand(n, device=w.device) > self.rank_dropout).to(w.dtype)
            row = row / row.mean().clamp_min(1e-12)
        else:
            row = torch.ones(n, device=w.device, dtype=w.dtype)
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

    # The per-call paths below read parameters from the module dicts directly: nn.Module.__getattr__
    # costs about half a microsecond a lookup, and small layers are dispatch-bound (BENCHMARKS.md).
    def _base_weight(self):
        return self._modules["base_layer"]._parameters["weight"]

    def _group_key(self):
        """Layers with equal keys are rebuilt together in "grouped" mode; None: this one cannot be."""
        w = self._base_weight()
        if self._forward_mode != "grouped" or self.merged or self.multiplier == 0 or w.requires_grad:
            return None
        return (w.shape, w.dtype, w.device, self.rank, self._storage()[0].dtype)

    def _stamp(self, dtype):
        """Everything a prebuilt W + ΔW depends on; a prebuilt weight is used only if this still matches."""
        w, f = self._base_weight(), self._storage()
        return (dtype, torch.is_grad_enabled(), self.training, self.alpha / self.rank * self.multiplier,
                w._version, f[0]._version, f[1]._version, f[2]._version, f[3]._version, w.data_ptr(),
                f[0].data_ptr())

    def _grouped_forward(self, x):
        prebuilt = self._prebuilt
        self.__dict__["_prebuilt"] = None  # a prebuilt weight is used at most once
        if prebuilt is None or not prebuilt[1].alive or prebuilt[2] != self._stamp(x.dtype):
            self._group.build(self, x.dtype)
            prebuilt = self._prebuilt
            self.__dict__["_prebuilt"] = None
        return F.linear(x, prebuilt[0], _cast(self._modules["base_layer"]._parameters["bias"], x.dtype))

    def __getstate__(self):
        # deepcopy/pickle: a prebuilt weight is a non-leaf tensor of a live graph, never worth copying
        return {**super().__getstate__(), "_prebuilt": None}

    def _apply_function(self, x):
        mode = self._forward_mode
        if mode == "grouped" and not torch.compiler.is_compiling():
            if self._group_key() is not None:
                return self._grouped_forward(x)
            self.__dict__["_prebuilt"] = None  # no longer groupable (e.g. W made trainable): drop what was built
        base = self._modules["base_layer"]._parameters
        args = (base["weight"], base["bias"], *self.factors(),
                self.alpha / self.rank * self.multiplier, self._row_scale(), mode != "bypass")
        if not torch.is_grad_enabled():  # inference: the same math without autograd.Function's overhead
            return _LoHaLinearFunction.forward(None, x, *args)
        return _LoHaLinearFunction.apply(x, *args)

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


class LoHaStack(nn.Module):
    """The factors of L LoHaLinear layers of one shape, rank and factor dtype as four (L, ·, ·) Parameters
    (``loha.stack`` makes them). The layers keep reading and writing their factors, as views of their
    slice; what changes is what ``parameters()``, optimizers, DDP and gradient clipping see: four tensors
    per shape instead of four per layer. With ``forward_mode="grouped"`` the group's rebuild then takes
    the stacked Parameters as they are and autograd accumulates four gradients, not 4L (BENCHMARKS.md)."""

    def __init__(self, layers: list[LoHaLinear]):
        super().__init__()
        needs = {f.requires_grad for m in layers for f in m.factors()}
        if len(needs) != 1:
            raise LoHaError("some of these adapters' factors are frozen and some are not; stack them with "
                            "the same requires_grad")
        trainable = needs.pop()
        with torch.no_grad():
            for k, name in enumerate(FACTOR_NAMES):
                stacked = torch.stack([m.factors()[k] for m in layers])
                self.register_parameter(name, nn.Parameter(stacked, requires_grad=trainable))
        self.__dict__["layers"] = list(layers)  # plain references: the layers live in the model's tree
        for i, m in enumerate(layers):
            for name in FACTOR_NAMES:
                del m._parameters[name]
            m.__dict__["_stack"] = (self, i)
            m.__dict__["_prebuilt"] = None

    def factors(self):
        p = self._parameters
        return p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"]

    def unstack(self):
        """Give every layer its own Parameters again (copies of its slice), and forget the layers."""
        for m in self.layers:
            params = [nn.Parameter(f.detach().clone(), requires_grad=s.requires_grad)
                      for f, s in zip(m.factors(), self.factors())]
            m.__dict__["_stack"] = None
            m.__dict__["_prebuilt"] = None
            for name, param in zip(FACTOR_NAMES, params):
                m.register_parameter(name, param)
        self.__dict__["layers"] = []

    def extra_repr(self) -> str:
        out_f, rank = self.hada_w1_a.shape[1:]
        return f"layers={len(self.layers)}, out_features={out_f}, in_features={self.hada_w1_b.shape[2]}, rank={rank}"
