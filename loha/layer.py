"""The adapter modules (LoHaLinear, LoHaConv2d, DiffLayer) and their per-layer autograd Function, built on
loha.math.

Forward strategies (``forward_mode``), all computing y = op(x, W + scale·ΔW) with op = linear or conv2d:

- ``"grouped"`` (default): the factors of all adapters of one shape live in a ``LoHaStack``
  (``loha.grouped``), which builds W + ΔW for chunks of same-shape layers at once and differentiates them
  together, saving only each layer's input. Each layer hands its call to its stack.
- ``"merged"``: the same math per layer, in one hand-written Function per layer (also what runs under
  ``torch.compile`` and for adapters that are not stacked).
- ``"bypass"``: op(x, W) + op(x, scale·ΔW): ΔW keeps its own relative precision (worth it only when
  activations stay in fp32).

DoRA adapters (``dora_scale``) and bias differences (``diff_b``) are applied with plain autograd ops;
``DiffLayer`` adds full weight/bias differences (ComfyUI's ``.diff`` / ``.diff_b``) to any module.

A base weight may be stored in fp8 (``loha.fp8``): every path here upcasts it where it is used.

This file imports nothing of the package but loha.math and loha.internals.
"""

from __future__ import annotations

import math as _pymath
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import internals
from . import math as lm

FORWARD_MODES = ("grouped", "merged", "bypass")
INIT_SCHEMES = ("lycoris", "peft")
FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER_NAMES = (*FACTOR_NAMES, "hada_t1", "hada_t2")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class LoHaError(ValueError):
    """Every problem a user can cause (bad arguments, bad files, bad models) raises this type."""


def _cast(t, dtype):
    # A no-op .to() still costs a dispatcher call; on small layers those calls are the step time.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _scaled(t, coef):
    """t·coef in place; no op at all for the common coef 1 (alpha = rank)."""
    return t.mul_(coef) if isinstance(coef, torch.Tensor) or coef != 1.0 else t


def usable(weight, dtype):
    """A base weight as ops can take it: an fp8-stored one upcast to ``dtype``, any other as it is."""
    return weight.to(dtype) if weight.dtype in FP8_DTYPES else weight


class _SharedCast:
    """The last input cast to autocast's dtype, reused by the next layer that gets the same tensor: to_q, to_k
    and to_v read one fp32 norm output (CUDA autocast runs layer_norm in fp32), and each saves its input for
    its weight gradient, so one shared bf16 copy instead of three (BENCHMARKS.md, peak memory). Weak
    references only: nothing is kept alive, and an in-place change of x (its version) makes a new copy."""

    source = result = None
    version, dtype = -1, None

    @classmethod
    def to(cls, x, dtype):
        if x.dtype == dtype:
            return x
        src, res = cls.source and cls.source(), cls.result and cls.result()
        if src is x and res is not None and cls.version == x._version and cls.dtype == dtype \
                and res.requires_grad == (x.requires_grad and torch.is_grad_enabled()):
            return res
        res = x.to(dtype)
        try:
            cls.source, cls.result, cls.version, cls.dtype = weakref.ref(x), weakref.ref(res), x._version, dtype
        except TypeError:  # a tensor subclass without weak references: no sharing
            cls.source = cls.result = None
        return res


# ---------------------------------------------------------------------- inputs autograd already keeps
def saving_hooks() -> str:
    """Which saved-tensor hooks are active: "none", "checkpoint" (torch.utils.checkpoint's, which hand back on
    recompute what a layer saved), or "other" (e.g. offloading; a hook may allow one unpack per tensor).
    A hook whose pack function sets ``loha_unpack_twice = True`` (a byte counter) counts as none."""
    hooks = internals.saved_tensors_hooks_on_top()
    if hooks is None or getattr(hooks[0], "loha_unpack_twice", False):
        return "none"
    return "checkpoint" if getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint" else "other"


def _input_recipe(x):
    """The autograd node x can be recomputed from without holding x, or None (then x itself is saved).

    An exact weight gradient needs each layer's input; a frozen base layer does not, so the floor never
    keeps it. But where x is the product a·b of a Mul that saved both operands (GEGLU's h·gelu(g), the
    input of ``ff.net.2``) or x = silu(n) (the input of every resnet conv), autograd keeps those operands
    for the floor's own backward anyway, and x is recomputed from them bit for bit in our backward, which
    runs before theirs. Only metadata is read here: nothing is unpacked in forward.

    Under saved-tensor hooks (checkpointing, offloading) x is saved as usual: a hook may allow one unpack per
    saved tensor (checkpointing does), and a recomputed block keeps little anyway."""
    if torch.compiler.is_compiling():  # before touching grad_fn, which dynamo cannot trace
        return None
    node = x.grad_fn
    return None if node is None or saving_hooks() != "none" else _recipe_node(node)


def _recipe_node(node):
    """node if its output can be recomputed from what it saved (``_input_recipe``), else None."""
    kind = type(node).__name__
    if kind == "SiluBackward0" or (kind == "MulBackward0" and all(f is not None for f, _ in node.next_functions)):
        return node  # a Mul saves each operand when the other needs a gradient: both do here
    return None


def keep_input(ctx, x, *others):
    """ctx.save_for_backward(x, *others), with x replaced by its recipe where there is one."""
    ctx.input_recipe = _input_recipe(x)
    ctx.save_for_backward(*((x,) if ctx.input_recipe is None else (None,)), *others)


def kept_input(ctx, saved):
    node = ctx.input_recipe
    if node is None:
        return saved
    operands = internals.recipe_operands(node)
    return F.silu(operands[0]) if len(operands) == 1 else torch.mul(*operands)


# ------------------------------------------------------------------------------------ the two ops
class LinearOp:
    """y = x·Wᵀ + b, and its backward; the weight gradient written into ``gw_out`` when given."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, g, x, weight, need_x, need_w, need_b, gw_out=None):
        grad_x = torch.matmul(g, weight) if need_x else None
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = None
        if need_w:
            x2 = x.reshape(-1, x.shape[-1])
            if gw_out is not None and gw_out.dtype == g.dtype:
                grad_w = torch.mm(g2.t(), x2, out=gw_out)
            else:
                grad_w = torch.mm(g2.t(), x2)
                grad_w = grad_w if gw_out is None else gw_out.copy_(grad_w)
        return grad_x, grad_w, g2.sum(0) if need_b else None


class Conv2dOp:
    """y = conv2d(x, W, b) with the base layer's stride, padding and dilation (groups = 1)."""

    def __init__(self, conv: nn.Conv2d):
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight_shape = tuple(conv.weight.shape)

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def backward(self, g, x, weight, need_x, need_w, need_b, gw_out=None):
        if weight is None:  # no input gradient: only the weight's shape is read
            weight = g.new_empty(1).expand(self.weight_shape)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if need_b else None, self.stride, self.padding, self.dilation,
            False, [0, 0], 1, [need_x, need_w, need_b])
        if grad_w is not None:
            grad_w = grad_w.flatten(1) if gw_out is None else gw_out.copy_(grad_w.flatten(1))
        return grad_x, grad_w, grad_b


# ------------------------------------------------------------------------------ per-layer Function
class _LoHaFunction(torch.autograd.Function):
    """One adapted layer ("merged" or "bypass"); saves x and the factors, recomputes P1, P2 in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, coef, merged, op, *factors):
        p1, p2 = lm.products(factors)
        shape = weight.shape
        if merged:
            y = op.forward(x, lm.add_delta(usable(weight, p1.dtype).flatten(1), p1, p2, coef, x.dtype).view(shape),
                           _cast(bias, x.dtype))
        else:
            y = op.forward(x, _cast(weight, x.dtype), _cast(bias, x.dtype))
            y = y + op.forward(x, _cast(_scaled(p1.mul_(p2), coef), x.dtype).view(shape), None)
        if ctx is not None:  # None: called directly for inference, nothing to save
            tensor_coef = coef if isinstance(coef, torch.Tensor) else None
            keep_input(ctx, x, weight, tensor_coef, *factors)
            ctx.coef, ctx.merged, ctx.op, ctx.has_bias = coef, merged, op, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, tensor_coef, *factors = ctx.saved_tensors
        x = kept_input(ctx, x)
        coef = ctx.coef if tensor_coef is None else tensor_coef
        need = ctx.needs_input_grad
        need_factors = any(need[6:])
        p1, p2 = lm.products(factors)
        shape, op = weight.shape, ctx.op
        need_b = need[2] and ctx.has_bias
        if ctx.merged:
            w_eff = lm.add_delta(usable(weight, p1.dtype).flatten(1), p1, p2, coef, g.dtype).view(shape)
            grad_x, gw, grad_b = op.backward(g, x, w_eff, need[0], need[1] or need_factors, need_b)
        else:
            grad_x, gw, grad_b = op.backward(g, x, _cast(weight, g.dtype), need[0], need[1] or need_factors, need_b)
            if need[0]:
                delta = _cast(_scaled(p1 * p2, coef), g.dtype).view(shape)
                grad_x = grad_x + op.backward(g, x, delta, True, False, False)[0]
        grad_w = _cast(gw.view(shape), weight.dtype) if need[1] else None
        grads = (None,) * len(factors)
        if need_factors:  # factor_grads works on G in place: a copy when G is also W's gradient
            g_factors = gw.to(p1.dtype, copy=True) if need[1] else _cast(gw, p1.dtype)
            grads = lm.factor_grads(g_factors, factors, p1, p2, coef)
        return (grad_x, grad_w, _cast(grad_b, weight.dtype) if grad_b is not None else None, None, None, None,
                *grads)




# ------------------------------------------------------------------------------------ the modules
class AdapterLayer(nn.Module):
    """What every adapter shares: the untouched base module as ``base_layer``, a user ``multiplier``
    (``loha.set_scale``), and merge/unmerge that fold the change into the base weights in fp32."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.multiplier = 1.0
        self.merged = False
        self._originals = None

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what callers read of the wrapped module (in_features, kernel_size, ...)
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    def _base_weight(self):
        return self._modules["base_layer"]._parameters["weight"]

    def effective_parameters(self) -> dict[str, torch.Tensor]:
        """{"weight": W', "bias": b'} in fp32 (only the ones this adapter changes)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, keep_original: bool = True):
        """Fold the adapter into the base weights (computed in fp32, cast once). Refuses non-finite results."""
        if self.merged:
            return
        new = self.effective_parameters()
        bad = [k for k, v in new.items() if not torch.isfinite(v).all()]
        if bad:
            raise LoHaError(f"merging would put NaN/Inf into the base {bad[0]}; the adapter factors or the scale "
                            "are broken, so the model was left unmerged")
        params = self.base_layer._parameters
        self._originals = {k: params[k].detach().to("cpu", copy=True) for k in new} if keep_original else None
        for k, v in new.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Restore the base weights: bit-exact from the kept copy, else by subtracting the change in fp32."""
        if not self.merged:
            return
        params = self.base_layer._parameters
        if self._originals is not None:
            for k, v in self._originals.items():
                params[k].copy_(v.to(params[k].device))
        else:
            for k, v in self.subtracted().items():
                params[k].copy_(v.to(params[k].dtype))
        self._originals = None
        self.merged = False

    def subtracted(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class LoHaLayer(AdapterLayer):
    """A frozen Linear or Conv2d plus a LoHa adapter (LoHaLinear / LoHaConv2d).

    Factors (LyCORIS/PEFT names and shapes): ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw) and the
    same for w2; with ``use_tucker`` (convs with a kernel larger than 1×1) ``hada_w1_a`` (r, out),
    ``hada_w1_b`` (r, in) and ``hada_t1`` (r, r, kh, kw), likewise for 2. ΔW = (P1 ⊙ P2)·alpha/rank.

    ``rank_dropout`` (PEFT and LyCORIS semantics): in training, each output row of ΔW is dropped with this
    probability and the kept rows are rescaled by 1/mean(kept). ``module_dropout``: in training, the whole
    adapter is skipped for a step with this probability. Both are off in eval. Init ``"lycoris"`` (default)
    W1a~N(0,0.1), W1b~N(0,1), W2a=0, W2b~N(0,1), T~N(0,0.1); ``"peft"``: kaiming-uniform with W2b = 0. Either
    way ΔW is exactly zero at step 0 and the first step moves it.
    """

    base_type: type = nn.Module

    def __init__(self, base_layer, rank: int, alpha: float | None = None, *, rank_dropout=0.0, module_dropout=0.0,
                 init="lycoris", forward_mode="grouped", dtype=torch.float32, use_tucker=False, dora=False,
                 bias_diff=False):
        if not isinstance(base_layer, self.base_type):
            raise LoHaError(f"{type(self).__name__} wraps {self.base_type.__name__}, got {type(base_layer).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LoHaError(f"rank must be an integer >= 1, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not _pymath.isfinite(alpha) or alpha <= 0:
            raise LoHaError(f"alpha must be a finite number > 0, got {alpha!r} (None means alpha = rank)")
        for name, p in (("rank_dropout", rank_dropout), ("module_dropout", module_dropout)):
            if not 0.0 <= p < 1.0:
                raise LoHaError(f"{name} must be in [0, 1), got {p!r}")
        if init not in INIT_SCHEMES:
            raise LoHaError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
        super().__init__(base_layer)
        shapes = self.factor_shapes(base_layer.weight.shape, rank, use_tucker)
        kw = dict(device=base_layer.weight.device, dtype=dtype)
        self.factor_names = TUCKER_NAMES if len(shapes) == 6 else FACTOR_NAMES
        for name, shape in zip(self.factor_names, shapes):
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **kw)))
        self.rank, self.alpha = rank, alpha
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.forward_mode = forward_mode
        self.op = self.make_op(base_layer)
        self._stack = None  # (LoHaStack, slot) once the factors live in a stack
        magnitude = None
        if dora:  # DoRA magnitude, per output row (LyCORIS's default wd_on_output); loading may replace it
            w = base_layer.weight.detach().float().flatten(1)
            magnitude = w.norm(dim=1).reshape(-1, *[1] * (base_layer.weight.dim() - 1))
        self.register_buffer("dora_scale", magnitude)
        if bias_diff and base_layer.bias is None:
            raise LoHaError("bias_diff needs a base layer with a bias")
        # a bias difference (ComfyUI's trainer writes one for every bias), filled in by loading
        self.register_buffer("diff_b", torch.zeros_like(base_layer.bias, dtype=torch.float32) if bias_diff else None)
        self.reset_parameters(init)

    @staticmethod
    def factor_shapes(weight_shape, rank, use_tucker):
        out_f, in_f, *kernel = weight_shape
        if use_tucker and any(k != 1 for k in kernel):
            return [(rank, out_f), (rank, in_f)] * 2 + [(rank, rank, *kernel)] * 2
        flat = in_f * _pymath.prod(kernel)
        return [(out_f, rank), (rank, flat)] * 2

    @property
    def use_tucker(self) -> bool:
        return len(self.factor_names) == 6

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

    @torch.no_grad()
    def reset_parameters(self, init: str = "lycoris"):
        factors = self.factors()
        if factors[0].is_meta:
            return
        w1a, w1b, w2a, w2b, *ts = factors
        if init == "lycoris":
            nn.init.normal_(w1a, std=0.1)
            nn.init.normal_(w1b, std=1.0)
            nn.init.zeros_(w2a)
            nn.init.normal_(w2b, std=1.0)
            for t in ts:
                nn.init.normal_(t, std=0.1)
        else:
            for p in (w1a, w1b, w2a, *ts):
                nn.init.kaiming_uniform_(p, a=_pymath.sqrt(5))
            nn.init.zeros_(w2b)

    def factors(self):
        """This layer's factors in file order: its Parameters, or views of its slice of a LoHaStack
        (written through by in-place edits and ``copy_``)."""
        stack = self.__dict__.get("_stack")
        if stack is None:
            p = self._parameters
            return tuple(p[n] for n in self.factor_names)
        return stack[0].layer_factors(stack[1])

    def factor_gradients(self):
        """This layer's factor gradients in file order (slices of its stack's gradients when stacked), None
        where there is none."""
        stack = self.__dict__.get("_stack")
        if stack is None:
            return tuple(f.grad for f in self.factors())
        grads = [p.grad for p in stack[0].factors()]
        if any(g is None for g in grads):
            return (None,) * len(self.factor_names)
        return stack[0].layer_factors(stack[1], grads)

    def _storage(self):
        """The Parameters that hold the factors: this layer's, or its LoHaStack's."""
        stack = self.__dict__.get("_stack")
        return self.factors() if stack is None else stack[0].factors()

    def __getattr__(self, name):
        if name in TUCKER_NAMES and self.__dict__.get("_stack") is not None:
            names = self.__dict__["factor_names"]
            if name in names:
                return self.factors()[names.index(name)]
        return super().__getattr__(name)

    def factors_fp32(self):
        return [lm.wide(f) for f in self.factors()]

    def delta_weight(self) -> torch.Tensor:
        """scale·ΔW in fp32 (or the factors' dtype if wider), in the weight's shape, without dropout."""
        return lm.delta(self.factors_fp32(), self.scale).view(self.base_layer.weight.shape)

    def effective_parameters(self):
        w = self.base_layer.weight
        w32 = lm.wide(w.detach())
        if self.dora_scale is None:  # the very sum the forward builds, so a fused model computes what it did
            p1, p2 = lm.products([f.to(w.device) for f in self.factors_fp32()])
            new = {"weight": lm.add_delta(w32.flatten(1), p1, p2, self.scale, w32.dtype).view(w.shape)}
        else:
            unscaled = w32 + lm.delta(self.factors_fp32(), self.alpha / self.rank).view(w.shape).to(w.device)
            new = {"weight": lm.dora(unscaled, self.dora_scale.to(w.device, w32.dtype), w32, self.multiplier)}
        if self.diff_b is not None:
            new["bias"] = lm.wide(self.base_layer.bias.detach()) + self.multiplier * self.diff_b.to(w32.dtype)
        return new

    def subtracted(self):
        if self.dora_scale is not None:
            raise LoHaError("a DoRA adapter merged without keep_original=True cannot be unmerged (its change is "
                            "not a sum); reload the base model")
        w = self.base_layer.weight
        out = {"weight": lm.wide(w) - self.delta_weight().to(w.device)}
        if self.diff_b is not None:
            out["bias"] = lm.wide(self.base_layer.bias) - self.multiplier * self.diff_b.to(out["weight"].dtype)
        return out

    def _row_scale(self):
        """Rank/module dropout as one per-output-row multiplier (no data-dependent branch), or None."""
        if not self.training or (self.rank_dropout == 0 and self.module_dropout == 0):
            return None
        w = self._storage()[0]
        n = self.base_layer.weight.shape[0]
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
        if internals.any_autocast_enabled():  # one query when autocast is off (the common case)
            dev = x.device.type
            if torch.is_autocast_enabled(dev):  # compute in autocast's dtype, as the layer it replaces would
                with torch.autocast(dev, enabled=False):
                    return self._compute(_SharedCast.to(x, torch.get_autocast_dtype(dev)))
        return self._compute(x)

    # The per-call paths read parameters from the module dicts directly: nn.Module.__getattr__ costs about
    # half a microsecond a lookup, and small layers are dispatch-bound (BENCHMARKS.md).
    def _compute(self, x):
        d = self.__dict__
        base = d["_modules"]["base_layer"]._parameters
        buffers = d["_buffers"]
        if buffers["dora_scale"] is not None or buffers["diff_b"] is not None:
            return self._plain_forward(x)
        stack, weight = d["_stack"], base["weight"]
        if stack is not None and d["_forward_mode"] == "grouped" and not weight.requires_grad \
                and not torch.compiler.is_compiling():
            return stack[0].run(stack[1], self, x)
        row = self._row_scale()
        coef = self.scale if row is None else (row * self.scale)[:, None]
        args = (weight, base["bias"], coef, self._forward_mode != "bypass", self.op, *self.factors())
        if not torch.is_grad_enabled():  # inference: the same math without autograd.Function's overhead
            return _LoHaFunction.forward(None, x, *args)
        return _LoHaFunction.apply(x, *args)

    def _plain_forward(self, x):
        """DoRA and bias differences: the effective weights with plain (differentiable) torch ops."""
        w = self._base_weight()
        row = self._row_scale()
        coef = self.scale if self.dora_scale is None else self.alpha / self.rank
        coef = coef if row is None else (row * coef)[:, None]
        merged = lm.wide(w) + lm.delta(self.factors_fp32(), coef).view(w.shape)
        if self.dora_scale is not None:
            merged = lm.dora(merged, self.dora_scale.to(merged.dtype), lm.wide(w), self.multiplier)
        bias = self.base_layer.bias
        if self.diff_b is not None:
            bias = lm.wide(bias) + self.multiplier * self.diff_b.to(merged.dtype)
        return self.op.forward(x, merged.to(x.dtype), _cast(bias, x.dtype))

    def extra_repr(self) -> str:
        extras = ", use_tucker=True" if self.use_tucker else ""
        extras += ", dora=True" if self.dora_scale is not None else ""
        return (f"rank={self.rank}, alpha={self.alpha:g}, forward_mode={self._forward_mode!r}, "
                f"rank_dropout={self.rank_dropout}, module_dropout={self.module_dropout}, merged={self.merged}"
                + extras)


class LoHaLinear(LoHaLayer):
    """A frozen ``nn.Linear`` plus a LoHa adapter."""

    base_type = nn.Linear

    @staticmethod
    def make_op(base_layer):
        return LinearOp()


class LoHaConv2d(LoHaLayer):
    """A frozen ``nn.Conv2d`` (any kernel, stride, padding, dilation; groups = 1) plus a LoHa adapter."""

    base_type = nn.Conv2d

    @staticmethod
    def make_op(base_layer):
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros" or isinstance(base_layer.padding, str):
            raise LoHaError(f"LoHa on Conv2d needs groups=1 and numeric zero padding; this conv has "
                            f"groups={base_layer.groups}, padding={base_layer.padding!r}, "
                            f"padding_mode={base_layer.padding_mode!r}")
        return Conv2dOp(base_layer)


class DiffLayer(AdapterLayer):
    """Full differences for a module's weight and/or bias (ComfyUI's trainer writes ``.diff`` for every
    1-D weight, i.e. the norms, and ``.diff_b`` for every bias): weight + multiplier·diff."""

    def __init__(self, base_layer, diff=None, diff_b=None):
        super().__init__(base_layer)
        self.register_buffer("diff", None if diff is None else diff.detach().clone())
        self.register_buffer("diff_b", None if diff_b is None else diff_b.detach().clone())

    def effective_parameters(self):
        new = {}
        for name, d in (("weight", self.diff), ("bias", self.diff_b)):
            if d is not None:
                base = lm.wide(self.base_layer._parameters[name].detach())
                new[name] = base + self.multiplier * d.to(base.device, base.dtype)
        return new

    def subtracted(self):
        out = {}
        for name, d in (("weight", self.diff), ("bias", self.diff_b)):
            if d is not None:
                base = lm.wide(self.base_layer._parameters[name])
                out[name] = base - self.multiplier * d.to(base.device, base.dtype)
        return out

    def forward(self, *args, **kwargs):
        if self.merged or self.multiplier == 0:
            return self.base_layer(*args, **kwargs)
        changed = {k: v.to(self.base_layer._parameters[k].dtype) for k, v in self.effective_parameters().items()}
        return torch.func.functional_call(self.base_layer, changed, args, kwargs)


ADAPTER_TYPES = {nn.Linear: LoHaLinear, nn.Conv2d: LoHaConv2d}


def adapter_for(module: nn.Module) -> type[LoHaLayer] | None:
    """The LoHa class for a module (exact Linear and Conv2d subclasses too), or None."""
    return next((cls for base, cls in ADAPTER_TYPES.items() if isinstance(module, base)), None)


