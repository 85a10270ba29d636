"""The adapter modules (LoHaLinear, LoHaConv2d, DiffLayer) and their autograd Functions, built on loha.math.

Forward strategies (``forward_mode``), all computing y = op(x, W + scale·ΔW) with op = linear or conv2d:

- ``"grouped"`` (default): the factors of all adapters of one shape live in a ``LoHaStack`` (four or six
  stacked Parameters). W + scale·ΔW is built for a whole chunk of same-shape layers at once, summed
  once and cast to the compute dtype, and each layer then runs the plain op. A training build under a
  16-bit compute dtype runs its pair (P1, P2) and factor-gradient math in that dtype, as autocast would;
  otherwise, and always without grad, the pair stays in the factors' dtype (``_math_factors``). While
  ``KEPT_BYTES`` allows (512 MiB of built weights per step), a chunk is kept for backward: its layers'
  ops are autograd's own, differentiated in C++, and the chunk's stacked weight gradient comes back in
  one piece. Past the budget a chunk is rebuilt in backward and saves only each layer's input (not even
  that where autograd already keeps what the input is computed from: GEGLU's halves before
  ``ff.net.2``, the norm before a resnet conv); it rebuilds W + ΔW chunk by chunk, in reverse order, and
  collects every layer's weight gradient G. Either way the factor gradients of a chunk are computed in
  one batched pass, and the optimizer sees two (three) tensors per shape. This is the fastest mode;
  nothing of size out×in is kept beyond the budget, only a chunk or two in flight (BENCHMARKS.md).
- ``"merged"``: the same math per layer, in one hand-written Function per layer (also what runs under
  ``torch.compile`` and for adapters that are not stacked).
- ``"bypass"``: op(x, W) + op(x, scale·ΔW): ΔW keeps its own relative precision (worth it only when
  activations stay in fp32).

DoRA adapters (``dora_scale``) and bias differences (``diff_b``) are applied with plain autograd ops;
``DiffLayer`` adds full weight/bias differences (ComfyUI's ``.diff`` / ``.diff_b``) to any module.

This file imports nothing of the package but loha.math.
"""

from __future__ import annotations

import math as _pymath

import torch
import torch.nn.functional as F
from torch import nn

from . import math as lm

FORWARD_MODES = ("grouped", "merged", "bypass")
INIT_SCHEMES = ("lycoris", "peft")
FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER_NAMES = (*FACTOR_NAMES, "hada_t1", "hada_t2")
STACK_NAMES = ("hada_a", "hada_b", "hada_t")  # a LoHaStack's Parameters: both halves of each factor, paired

# A grouped build works on chunks of same-shape layers of about this many weight elements, twice as many
# for a 16-bit pair (a training build under bf16/fp16: the same bytes in flight): with an fp32 pair a chunk
# of 1280×1280 SDXL layers is 20 layers and the 10240×1280 GEGLU projections 2 (about 14 launched ops a
# chunk), while what a chunk holds in flight in backward (W+ΔW, P1 and P2, G) stays near 0.5 GiB either way
# (BENCHMARKS.md §2, lever 21: SDXL bf16 1.57 → 1.29 launched extra ops per layer).
# CPU and GPU alike: on CPU the smaller 2^16 that kept a chunk in L2 is slower since the backward rebuilds
# (BENCHMARKS.md §2, lever 7a), because fewer, larger chunks mean fewer ops and less Python per step.
CHUNK_ELEMENTS = 1 << 25
CACHED_CHUNKS = 2  # chunks of built weights kept in flight per stack, forward and backward alike
# Up to this many bytes of built weights (all stacks together, per training step) are kept from forward
# to backward instead of rebuilt: their layers then run the plain op on a differentiable view of the
# chunk, so autograd's own C++ backward computes their weight gradients, with no Python Function per
# layer and no rebuild (CPU tiny UNet: the step's overhead over the floor 0.45 → 0.29× PEFT LoHa's).
# Past the budget, chunks are rebuilt in backward and nothing out×in is kept (SDXL 1024² bf16: the budget
# bounds what keeping adds to saved-for-backward; BENCHMARKS.md §2, lever 17). 0 keeps nothing.
KEPT_BYTES = 512 << 20
# Where the fused CPU kernels build a chunk, its output buffer is kept in the stack between steps, up to
# this many bytes for all stacks together, and written again next step once nothing else holds it: a fresh
# multi-MB tensor each step made glibc grow and trim the heap top, about 2000 page faults a step (tiny UNet
# full preset: −6 ms, BENCHMARKS.md §2, lever 27). GPUs have torch's caching allocator and keep nothing here.
REUSED_BYTES = 512 << 20


class LoHaError(ValueError):
    """Every problem a user can cause (bad arguments, bad files, bad models) raises this type."""


def _cast(t, dtype):
    # A no-op .to() still costs a dispatcher call; on small layers those calls are the step time.
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _scaled(t, coef):
    """t·coef in place; no op at all for the common coef 1 (alpha = rank)."""
    return t.mul_(coef) if isinstance(coef, torch.Tensor) or coef != 1.0 else t


# ---------------------------------------------------------------------- inputs autograd already keeps
_top_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _plain_saving() -> bool:
    """True unless saved-tensor hooks that may unpack a tensor only once are active (checkpointing)."""
    hooks = _top_saved_tensor_hooks(False) if _top_saved_tensor_hooks is not None else ("unknown",)
    return hooks is None or getattr(hooks[0], "loha_unpack_twice", False)


def _input_recipe(x):
    """The autograd node x can be recomputed from without holding x, or None (then x itself is saved).

    An exact weight gradient needs each layer's input; a frozen base layer does not, so the floor never
    keeps it. But where x is the product a·b of a Mul that saved both operands (GEGLU's h·gelu(g), the
    input of ``ff.net.2``) or x = silu(n) (the input of every resnet conv), autograd keeps those operands
    for the floor's own backward anyway, and x is recomputed from them bit for bit in our backward, which
    runs before theirs. Only metadata is read here: nothing is unpacked in forward.

    Under saved-tensor hooks (non-reentrant checkpointing, offloading) x is saved as usual: a hook may
    allow one unpack per saved tensor (checkpointing does), and a recomputed block keeps little anyway.
    A hook whose pack function sets ``loha_unpack_twice = True`` (bench.py's byte counter) keeps it."""
    if torch.compiler.is_compiling():  # before touching grad_fn, which dynamo cannot trace
        return None
    node = x.grad_fn
    return None if node is None or not _plain_saving() else _recipe_node(node)


def _recipe_node(node):
    """node if its output can be recomputed from what it saved (``_input_recipe``), else None."""
    kind = type(node).__name__
    if kind == "SiluBackward0" or (kind == "MulBackward0" and all(f is not None for f, _ in node.next_functions)):
        return node  # a Mul saves each operand when the other needs a gradient: both do here
    return None


def _keep_input(ctx, x, *others):
    """ctx.save_for_backward(x, *others), with x replaced by its recipe where there is one."""
    ctx.input_recipe = _input_recipe(x)
    ctx.save_for_backward(*((x,) if ctx.input_recipe is None else (None,)), *others)


def _kept_input(ctx, saved):
    node = ctx.input_recipe
    if node is None:
        return saved
    if type(node).__name__ == "SiluBackward0":
        return F.silu(node._saved_self)
    return torch.mul(node._saved_self, node._saved_other)


# ------------------------------------------------------------------------------------ the two ops
class _LinearOp:
    """y = x·Wᵀ + b, and its backward."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, g, x, weight, need_x, need_w, need_b):
        grad_x = torch.matmul(g, weight) if need_x else None
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = torch.mm(g2.t(), x.reshape(-1, x.shape[-1])) if need_w else None
        return grad_x, grad_w, g2.sum(0) if need_b else None


class _Conv2dOp:
    """y = conv2d(x, W, b) with the base layer's stride, padding and dilation (groups = 1)."""

    def __init__(self, conv: nn.Conv2d):
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def backward(self, g, x, weight, need_x, need_w, need_b):
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if need_b else None, self.stride, self.padding, self.dilation,
            False, [0, 0], 1, [need_x, need_w, need_b])
        return grad_x, None if grad_w is None else grad_w.flatten(1), grad_b


# ------------------------------------------------------------------------------ per-layer Function
class _LoHaFunction(torch.autograd.Function):
    """One adapted layer ("merged" or "bypass"); saves x and the factors, recomputes P1, P2 in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, coef, merged, op, *factors):
        p1, p2 = lm.products(factors)
        shape = weight.shape
        if merged:
            y = op.forward(x, lm.add_delta(weight.flatten(1), p1, p2, coef, x.dtype).view(shape), _cast(bias, x.dtype))
        else:
            y = op.forward(x, _cast(weight, x.dtype), _cast(bias, x.dtype))
            y = y + op.forward(x, _cast(_scaled(p1.mul_(p2), coef), x.dtype).view(shape), None)
        if ctx is not None:  # None: called directly for inference, nothing to save
            tensor_coef = coef if isinstance(coef, torch.Tensor) else None
            _keep_input(ctx, x, weight, tensor_coef, *factors)
            ctx.coef, ctx.merged, ctx.op, ctx.has_bias = coef, merged, op, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, tensor_coef, *factors = ctx.saved_tensors
        x = _kept_input(ctx, x)
        coef = ctx.coef if tensor_coef is None else tensor_coef
        need = ctx.needs_input_grad
        need_factors = any(need[6:])
        p1, p2 = lm.products(factors)
        shape, op = weight.shape, ctx.op
        need_b = need[2] and ctx.has_bias
        if ctx.merged:
            w_eff = lm.add_delta(weight.flatten(1), p1, p2, coef, g.dtype).view(shape)
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


# ----------------------------------------------------------------------------- the grouped mode
class _Build:
    """One grouped forward through a LoHaStack's layers, and its backward.

    A layer joins the current build if its slot is unused there and nothing the build depends on has
    changed (grad mode, dtype, scale, train/eval, the factors' and W's in-place versions); otherwise
    it starts a new one. Forward: built weights by chunk. A grad build keeps a chunk for backward while
    ``KEPT_BYTES`` allows (``_KeptChunkFunction``: autograd differentiates each layer's op and hands the
    chunk's stacked G back); other chunks are freed once used. Backward of those: each layer's rebuilt
    weight for its input gradient, its G deposited, a chunk's factor gradients computed when its last
    layer has deposited, and everything left over in ``finish``, which ``_GroupFunction`` (the token every
    such layer takes) calls. A build of one chunk is direct: kept, that chunk returns the stack's gradients
    itself, and the token is made only for a chunk that is not kept."""

    def __init__(self, stack, dtype):
        layers = stack.layers
        self.stack, self.layers, self.dtype = stack, layers, dtype
        self.params = stack.factors()
        self.grad = torch.is_grad_enabled()
        self.math = _math_factors(self.params, dtype) if self.grad else self.params
        # what the build depends on per layer: the stack's snapshot of it (LoHaStack.snapshot), which accepts()
        # checks for each layer that runs, so a layer that changed gets a build from a new one
        self.weights, self.weight_versions, self.scales, self.training, dropping, fp32 = stack.snapshot()
        # fp32 on CPU: the compiled kernels build W + ΔW and the gradients without writing the pair
        self.fused = dtype is torch.float32 and fp32 and lm.fused(*self.math)
        self.swapped, self.flat = self.math, None
        if self.grad and not self.fused:
            with torch.no_grad():  # a grad build's pairs are (P2, P1), the order lm.pair_grads multiplies G by
                self.swapped = lm.swapped(*self.math)
        self.version = self._factor_version()
        self.used = [False] * len(layers)
        size = max(1, CHUNK_ELEMENTS * max(1, 4 // self.math[0].dtype.itemsize) // self.weights[0].numel())
        self.chunk = size
        self.chunks = [slice(i, min(i + size, len(layers))) for i in range(0, len(layers), size)]
        self.coef = self._coefficients(dropping)
        self.forward_cache, self.backward_cache = {}, {}
        self.kept = {}  # chunk → its kept weights (views of a _KeptChunkFunction output) while layers are left
        self.holds, self.weights_saved = {}, set()  # kept chunks' _Held, and those a layer's op saved
        self.forward_left = [s.stop - s.start for s in self.chunks]
        self.expected = [0] * len(self.chunks)  # layers of each chunk that ran forward in grad mode
        self.deposits = [dict() for _ in self.chunks]
        self.pieces = [None] * len(self.chunks)  # each chunk's factor gradients, once computed
        self.backward_started = False
        self.wants = self.grad and any(p.requires_grad for p in self.params)  # a frozen stack wants none
        # A build of one chunk makes no token up front: kept, its chunk's Function takes the stacked factors
        # and returns their gradients itself, with no _GroupFunction and no finish (lever 31: −1.8 ms a step,
        # tiny UNet full preset, whose 23 builds are all one chunk). The token comes on first need (layer_token).
        self.direct = len(self.chunks) == 1
        self.token = None if self.direct or not self.grad else _GroupFunction.apply(self, *self.params)

    def layer_token(self):
        """The token a layer of a chunk rebuilt in backward takes (``_GroupedLayerFunction``), made on first
        need in a direct build, so the gradients of its deposits reach autograd through ``finish``."""
        if self.token is None:
            self.token = _GroupFunction.apply(self, *self.params)
        return self.token

    def _coefficients(self, dropping):
        """scale per layer, times the rank/module dropout mask of the layers in training (``dropping``): one
        float when every layer has the same scale and none drops out, else (L, out, 1) in the pair's dtype."""
        layers, p = self.layers, self.math[0]
        if len(set(self.scales)) == 1 and not any(dropping):
            return self.scales[0]
        out = self.weights[0].shape[0]
        coef = torch.tensor(self.scales, device=p.device, dtype=p.dtype)[:, None, None].expand(-1, out, 1)
        if any(dropping):
            coef = coef * torch.stack([m._row_scale() if d else torch.ones(out, device=p.device, dtype=p.dtype)
                                       for m, d in zip(layers, dropping)])[:, :, None]
        return coef.contiguous()

    def _factor_version(self) -> int:
        # version counters only grow: their sum is unchanged exactly when none of them changed
        p = self.params  # two or three stacks: no generator (it is checked once per layer call)
        return p[0]._version + p[1]._version + (p[2]._version if len(p) > 2 else 0)

    def accepts(self, layer, slot, dtype, weight) -> bool:
        return (not self.used[slot] and not self.backward_started and self.dtype is dtype
                and self.grad is torch.is_grad_enabled() and self.scales[slot] == layer.scale
                and self.training[slot] is layer.training and self.weights[slot] is weight
                and self.weight_versions[slot] == weight._version and self.version == self._factor_version())

    def _build(self, c):
        """(each layer's W + ΔW in the compute dtype, the pair) for chunk ``c``: the weights stacked,
        (n, *weight shape), the pair flat, (n, 2, out, in·k): the stack holds both halves side by side, so one
        matmul (or one Tucker chain) builds both. In a grad build the pair is (P2, P1), built from the halves
        swapped once per build (``self.swapped``; P2 ⊙ P1 is the same W + ΔW, bit for bit), so forward,
        rebuild and ``lm.pair_grads`` share one order and no chunk flips its factors."""
        sl = self.chunks[c]
        coef = self.coef[sl] if isinstance(self.coef, torch.Tensor) else self.coef
        if self.fused:  # no pair: the gradients recompute it in registers
            a, b = (f[sl] for f in self.math)
            out = self.stack.reused_buffer(c, (a.shape[0], a.shape[2], b.shape[-1]))
            built = lm.fused_weights(self.weights[sl], a, b, coef=coef, out=out)
            return built.view(-1, *self.weights[sl.start].shape), None
        if self.flat is None:  # the weights as (out, in·k), once per build, only where the torch form runs
            self.flat = [w if w.dim() == 2 else w.flatten(1) for w in self.weights]
        flat = self.flat[sl]
        weights = flat[0].unsqueeze(0) if len(flat) == 1 else torch.stack(flat)  # one layer: no copy
        pair = lm.half(*(f[sl] for f in self.swapped))
        built = lm.add_delta(weights, pair[:, 0], pair[:, 1], coef, self.dtype)
        return built.view(-1, *self.weights[sl.start].shape), pair

    def _keeps(self, c) -> bool:
        sl = self.chunks[c]
        nbytes = (sl.stop - sl.start) * self.weights[0].numel() * self.dtype.itemsize
        return self.wants and _Held.total + nbytes <= KEPT_BYTES and _plain_saving()

    @staticmethod
    def _evict(cache):
        if len(cache) >= CACHED_CHUNKS:
            del cache[next(iter(cache))]

    def forward_weight(self, slot, x):
        """(the layer's W + ΔW for forward on input x, whether the layer runs ``_GroupedLayerFunction``, which
        rebuilds it in backward): a view of a kept chunk (it requires grad) for the plain op, or for that
        Function either such a view, to which it returns its G (a layer of a kept chunk that does not save
        its weight), or, in a grad build, a tensor without grad, whose G it deposits with the build. A chunk
        is unbound once, so a layer's lookup is a tuple index, not a select op.

        Not every layer of a kept chunk takes the kept view: under a hook that unpacks once (checkpointing)
        none does, since its recomputation could not either; and where x has an input recipe, the plain op
        would save x, which the rebuilt path does not, so x's bytes count against the budget too. The op
        saves its weight only when x requires grad: a kept chunk none of whose layers saved it (cross-
        attention's to_k/to_v) is freed after forward and stops counting against the budget."""
        self.used[slot] = True
        c = slot // self.chunk
        built = self.forward_cache.get(c) or self.kept.get(c)
        if built is None:
            if self._keeps(c):
                kept = _KeptChunkFunction.apply(self, c, *(self.params if self.direct else (self.token,)))
                built = self.kept[c] = kept if self.fused else kept.unbind(0)
            else:
                self._evict(self.forward_cache)
                with torch.no_grad():
                    built = self.forward_cache[c] = self._build(c)[0].unbind(0)
        plain = c in self.kept and _plain_saving()
        if plain and x.grad_fn is not None and _recipe_node(x.grad_fn) is not None:
            plain = _Held.total + x.nbytes <= KEPT_BYTES
            if plain:
                self.holds[c].add(x.nbytes)
        if plain and x.requires_grad:
            self.weights_saved.add(c)
        rebuilt = self.grad and not plain
        weight = built[slot - self.chunks[c].start]
        if rebuilt and c not in self.kept:  # a forward_cache chunk, built without grad: its G is deposited
            self.expected[c] += 1
        left = self.forward_left[c] = self.forward_left[c] - 1
        if left == 0:
            self.forward_cache.pop(c, None)
            if self.kept.pop(c, None) is not None and c not in self.weights_saved:
                self.holds.pop(c).release()
        return weight, rebuilt

    def backward_weight(self, slot):
        self._start_backward()
        self._check_unchanged((slot,), factors=False)
        c = slot // self.chunk
        cached = self.backward_cache.get(c)
        if cached is None:
            self._check_unchanged((), factors=True)
            self._evict(self.backward_cache)
            built, pair = self._build(c)
            cached = self.backward_cache[c] = built.unbind(0), pair
        return cached[0][slot - self.chunks[c].start]

    def _start_backward(self):
        if not self.backward_started:
            self.backward_started = True
            self.forward_cache.clear()
            self.kept.clear()

    def _check_unchanged(self, slots, factors):
        """Raise if the base weight of any of ``slots`` or (``factors``) any factor changed in place since forward."""
        if (factors and self.version != self._factor_version()) or any(
                self.weight_versions[i] != self.weights[i]._version for i in slots):
            raise RuntimeError("a LoHa factor or base weight was modified in place between the forward and the "
                               "backward (e.g. optimizer.step() before loss.backward()); run backward first")

    def deposit(self, slot, g):
        c = slot // self.chunk
        self.deposits[c][slot] = g
        if len(self.deposits[c]) == self.expected[c]:
            self._chunk_grads(c)

    def _chunk_grads(self, c):
        sl, deposits = self.chunks[c], self.deposits[c]
        if not deposits:
            return
        cached = self.backward_cache.pop(c, None)
        self.deposits[c] = {}
        self.expected[c] = 0
        if self.fused:  # each layer's G as it is: no stack, no pair
            self._add_grads(c, self._factor_grads(c, [deposits.get(i) for i in range(sl.start, sl.stop)], None))
            return
        _, pair = cached or self._build(c)
        present = next(iter(deposits.values()))
        if sl.stop - sl.start == 1:
            g = present.unsqueeze(0)
        else:
            zero = None if len(deposits) == sl.stop - sl.start else present.new_zeros(()).expand_as(present)
            g = torch.stack([deposits.get(i, zero) for i in range(sl.start, sl.stop)])
        self._add_grads(c, self._factor_grads(c, g, pair))

    def kept_grads(self, c, g):
        """A kept chunk's factor gradients from its G: stacked (n, *weight shape), the products recomputed, or
        fused, each layer's (None for a layer without one). A direct build returns the stack's gradients (its
        one chunk's, in the factors' dtype); otherwise they are added to the chunk's piece for ``finish``."""
        self._start_backward()
        sl = self.chunks[c]
        self._check_unchanged([i for i in range(sl.start, sl.stop) if self.used[i]], factors=True)
        cached = self.backward_cache.pop(c, None)  # rebuilt for a layer that returned its G here
        if self.fused:
            grads = self._factor_grads(c, g, None)
        else:
            pair = cached[1] if cached is not None else lm.half(*(f[sl] for f in self.swapped))
            grads = self._factor_grads(c, g.flatten(2) if g.dim() > 3 else g, pair)
        if self.direct:
            return tuple(_cast(d, p.dtype) for d, p in zip(grads, self.params))
        self._add_grads(c, grads)
        return None

    def _factor_grads(self, c, g, pair):
        """Chunk c's factor gradients from its G: stacked (n, out, in·k) with the pair (n, 2, out, in·k), or,
        fused, a sequence of each layer's G (shaped like its weight; None for a layer without one), no pair."""
        sl = self.chunks[c]
        coef = self.coef[sl] if isinstance(self.coef, torch.Tensor) else self.coef
        if self.fused:
            return lm.fused_grads(g, *(f[sl] for f in self.math), coef=coef)
        return lm.pair_grads(_cast(g, pair.dtype), pair, *(f[sl] for f in self.math), coef=coef)

    def _add_grads(self, c, grads):
        old = self.pieces[c]
        self.pieces[c] = grads if old is None else [a + b for a, b in zip(old, grads)]

    def finish(self):
        """The stack's factor gradients: every chunk with deposits computed, the others zero."""
        self.backward_started = True
        self.token = None  # token → its node → ctx → this build: a cycle only the garbage collector would free
        for c in range(len(self.chunks)):
            self._chunk_grads(c)
        self.forward_cache.clear()
        self.kept.clear()
        self.backward_cache.clear()
        if all(p is None for p in self.pieces):
            return (None,) * len(self.params)
        pieces = [p if p is not None else [torch.zeros_like(f[s]) for f in self.math]
                  for p, s in zip(self.pieces, self.chunks)]
        self.pieces = [None] * len(self.chunks)
        grads = pieces[0] if len(pieces) == 1 else [torch.cat(parts) for parts in zip(*pieces)]
        return tuple(_cast(g, p.dtype) for g, p in zip(grads, self.params))


def _math_factors(params, dtype):
    """The stacked factors a training build runs on: cast once per build to a 16-bit compute dtype (what
    autocast does to PEFT's and LyCORIS's products), else as they are. A 16-bit pair halves the bytes of
    every pass over it (built, summed into W, multiplied by G, read by both gradient GEMMs: SDXL full
    preset +304 → +156 GB a step, BENCHMARKS.md §2 lever 20); W + ΔW is still summed with one rounding
    (``lm.add_delta``), and the gradients return in the factors' dtype. Builds without grad keep the
    factors' precision: written and read once there, the pair costs little, and an unfused model then
    computes exactly the weights ``merge`` folds in."""
    if dtype not in (torch.bfloat16, torch.float16) or params[0].dtype.itemsize <= dtype.itemsize:
        return params
    with torch.no_grad():
        return tuple(p.to(dtype) for p in params)


class _GroupFunction(torch.autograd.Function):
    """Links a build to autograd: its output (an empty token) is an input of every layer's Function, so
    its backward runs once all of them have, and returns the stack's gradients."""

    @staticmethod
    def forward(ctx, build, *params):
        ctx.build = build
        ctx.set_materialize_grads(False)
        return params[0].new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return (None, *ctx.build.finish())


class _Held:
    """Bytes of built weights kept for backward, counted model-wide against ``KEPT_BYTES`` until the chunk's
    backward has run, or its graph is freed without one."""

    total = 0

    def __init__(self, nbytes):
        self.nbytes = 0
        self.add(nbytes)

    def add(self, nbytes):
        self.nbytes += nbytes
        _Held.total += nbytes

    def release(self):
        _Held.total -= self.nbytes
        self.nbytes = 0

    __del__ = release


_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Reused:
    """A stack's fp32 output buffers of fused chunk builds, kept between steps (``REUSED_BYTES``). A buffer is
    written again only when its storage has no other user: no view of it is alive (a kept chunk's outputs,
    a cached chunk, a graph that was never backpropagated), so nothing that read the old weights can see
    the new ones; otherwise the build gets a fresh tensor, as without the pool."""

    total = 0

    def __init__(self):
        self.buffers, self.nbytes = {}, 0

    def get(self, c, shape):
        t = self.buffers.get(c)
        if t is not None and t.shape != shape:  # the chunks were resized (CHUNK_ELEMENTS): forget the old one
            del self.buffers[c]
            self.nbytes -= t.nbytes
            _Reused.total -= t.nbytes
            t = None
        if t is not None and _use_count(t.untyped_storage()._cdata) == 2:  # t and this wrapper
            return t
        fresh = torch.empty(shape, dtype=torch.float32)
        # an inference tensor could not be saved for backward later: such builds never fill the pool
        if t is None and not torch.is_inference_mode_enabled() and _Reused.total + fresh.nbytes <= REUSED_BYTES:
            self.buffers[c] = fresh
            self.nbytes += fresh.nbytes
            _Reused.total += fresh.nbytes
        return fresh

    def release(self):
        _Reused.total -= self.nbytes
        self.buffers, self.nbytes = {}, 0

    __del__ = release


class _KeptChunkFunction(torch.autograd.Function):
    """A chunk of built weights kept from forward to backward: its layers run the plain op on them and the
    backward turns their weight gradients into the chunk's factor gradients. Its inputs: the build's token,
    which orders it before the stack's ``_GroupFunction`` (that returns the gradients), or in a direct build
    (one chunk) the stacked factors, whose gradients it returns itself. Built (n, *weight shape); its output
    is that tensor, whose views the layers take and whose gradient autograd stacks, or, fused, those views as
    n outputs: their gradients come back apart, as the kernel reads them, without a stack (a 12 MB copy a
    step, tiny UNet full preset)."""

    @staticmethod
    def forward(ctx, build, c, *inputs):
        ctx.build, ctx.c, ctx.inputs = build, c, len(inputs)
        ctx.set_materialize_grads(False)
        built = build._build(c)[0]  # its pair is recomputed in backward: held, it would cost 4× the budget
        ctx.held = build.holds[c] = _Held(built.nbytes)
        return built.unbind(0) if build.fused else built

    @staticmethod
    def backward(ctx, *g):
        ctx.held.release()
        build = ctx.build
        if not any(x is not None for x in g):
            return (None,) * (2 + ctx.inputs)
        grads = build.kept_grads(ctx.c, g if build.fused else g[0])
        return None, None, *(grads or (None,))  # direct: the stack's gradients; else the token's None


class _GroupedLayerFunction(torch.autograd.Function):
    """One layer of a grouped build: op(x, built W + ΔW), the weight rebuilt in backward; saves x only. Its G
    goes to the weight (a kept chunk's view) or, deposited, to the build (the token then needs grad)."""

    @staticmethod
    def forward(ctx, x, token, bias, build, slot, op, weight):
        _keep_input(ctx, x)
        ctx.build, ctx.slot, ctx.op, ctx.has_bias = build, slot, op, bias is not None
        return op.forward(x, weight, _cast(bias, x.dtype))

    @staticmethod
    def backward(ctx, g):
        x = _kept_input(ctx, ctx.saved_tensors[0])
        build, need = ctx.build, ctx.needs_input_grad
        weight = build.backward_weight(ctx.slot)
        grad_x, gw, grad_b = ctx.op.backward(g, x, weight, need[0], need[1] or need[6], need[2] and ctx.has_bias)
        if need[1]:
            build.deposit(ctx.slot, gw)
        return grad_x, None, grad_b, None, None, None, gw.view(weight.shape) if need[6] else None


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


_SNAPSHOT_STATE = frozenset({"training", "alpha", "rank", "multiplier", "rank_dropout", "module_dropout"})


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

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in _SNAPSHOT_STATE:  # the stack's snapshot of it is stale (train(), set_scale, dropout rates)
            stack = self.__dict__.get("_stack")
            if stack is not None:
                stack[0].__dict__["_snapshot"] = None

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
        if torch._C._is_any_autocast_enabled():  # one query when autocast is off (the common case)
            dev = x.device.type
            if torch.is_autocast_enabled(dev):  # compute in autocast's dtype, as the layer it replaces would
                with torch.autocast(dev, enabled=False):
                    return self._compute(_cast(x, torch.get_autocast_dtype(dev)))
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
            build = stack[0].build_for(self, stack[1], x.dtype, weight)
            bias, (built, rebuilt) = base["bias"], build.forward_weight(stack[1], x)
            if rebuilt:  # the weight rebuilt in backward; its G goes to a kept chunk's view, or with the token
                token = None if built.requires_grad else build.layer_token()
                return _GroupedLayerFunction.apply(x, token, bias, build, stack[1], self.op, built)
            return self.op.forward(x, built, _cast(bias, x.dtype))  # no grad, or a kept chunk
        row = self._row_scale()
        coef = self.scale if row is None else (row * self.scale)[:, None]
        args = (base["weight"], base["bias"], coef, self._forward_mode != "bypass", self.op, *self.factors())
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
        return _LinearOp()


class LoHaConv2d(LoHaLayer):
    """A frozen ``nn.Conv2d`` (any kernel, stride, padding, dilation; groups = 1) plus a LoHa adapter."""

    base_type = nn.Conv2d

    @staticmethod
    def make_op(base_layer):
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros" or isinstance(base_layer.padding, str):
            raise LoHaError(f"LoHa on Conv2d needs groups=1 and numeric zero padding; this conv has "
                            f"groups={base_layer.groups}, padding={base_layer.padding!r}, "
                            f"padding_mode={base_layer.padding_mode!r}")
        return _Conv2dOp(base_layer)


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


class LoHaStack(nn.Module):
    """The factors of L LoHa layers of one kind, shape, rank, layout and factor dtype, stacked (``loha.stack``
    or ``loha.inject(stack=True)`` make them), with the two Hadamard halves side by side: ``hada_a``
    (L, 2, out, r) holds every W1a and W2a, ``hada_b`` (L, 2, r, in·k) every W1b and W2b (Tucker: (L, 2, r, out),
    (L, 2, r, in) and ``hada_t`` (L, 2, r, r, kh, kw)). The layers keep reading and writing their factors, as
    views of their slice; ``parameters()``, optimizers, DDP and gradient clipping see two (three) tensors per
    shape instead of four (six) per layer, and a grouped build makes both halves with one matmul."""

    def __init__(self, layers: list[LoHaLayer]):
        super().__init__()
        needs = {f.requires_grad for m in layers for f in m.factors()}
        if len(needs) != 1:
            raise LoHaError("some of these adapters' factors are frozen and some are not; stack them with "
                            "the same requires_grad")
        trainable = needs.pop()
        tucker = layers[0].use_tucker
        with torch.no_grad():
            # in file order (w1a, w1b, w2a, w2b, t1, t2): a pairs (w1a, w2a), b (w1b, w2b), t (t1, t2)
            for name, (first, second) in zip(STACK_NAMES[:3 if tucker else 2], ((0, 2), (1, 3), (4, 5))):
                stacked = torch.stack([torch.stack([m.factors()[first], m.factors()[second]]) for m in layers])
                self.register_parameter(name, nn.Parameter(stacked, requires_grad=trainable))
        self.__dict__["factor_names"] = layers[0].factor_names
        self.__dict__["layers"] = list(layers)  # plain references: the layers live in the model's tree
        self.__dict__["_build"] = None
        self.__dict__["_reused"] = None
        self.__dict__["_snapshot"] = None
        for i, m in enumerate(layers):
            for name in m.factor_names:
                del m._parameters[name]
            m.__dict__["_stack"] = (self, i)

    def factors(self):
        """The stacked Parameters: (hada_a, hada_b) or (hada_a, hada_b, hada_t)."""
        p = self._parameters
        return tuple(p[n] for n in STACK_NAMES if n in p)

    def layer_factors(self, i, tensors=None):
        """Layer ``i``'s factors in file order (w1a, w1b, w2a, w2b[, t1, t2]) as views of ``tensors``
        (default: the stacked Parameters; their gradients give the layer's gradients)."""
        a, b, *t = self.factors() if tensors is None else tensors
        return (a[i, 0], b[i, 0], a[i, 1], b[i, 1], *((t[0][i, 0], t[0][i, 1]) if t else ()))

    def reused_buffer(self, c, shape) -> torch.Tensor:
        """An fp32 tensor of ``shape`` for chunk c's fused build: the one kept from an earlier step when free."""
        if _use_count is None or REUSED_BYTES <= 0:
            return torch.empty(shape, dtype=torch.float32)
        reused = self.__dict__.get("_reused")  # absent in a stack pickled before the pool existed
        if reused is None:
            reused = self.__dict__["_reused"] = _Reused()
        return reused.get(c, shape)

    def snapshot(self):
        """What a build depends on per layer, read once and kept until a layer differs from it: (base weights,
        their versions, scales, train flags, whether each drops out, whether every weight is fp32).

        Read at every build, it cost about 1.1 of the 3.1 ms a step the tiny UNet's 23 builds took to set up
        (263 layers' dicts and weights, cold in cache mid-step; BENCHMARKS.md §2, lever 30). Each layer that
        runs is checked against it (``_Build.accepts``: weight identity and version, scale, train flag),
        ``build_for`` takes a new one when the layer that starts a build differs, and setting a layer's train
        flag, scale or dropout rates (``LoHaLayer.__setattr__``), ``.to()`` and ``unstack`` drop it."""
        snap = self.__dict__.get("_snapshot")  # absent in a stack pickled before it existed
        if snap is None:
            weights, versions, scales, training, dropping = [], [], [], [], []
            for m in self.layers:  # read from the module dicts: nn.Module.__getattr__ costs ~0.5 µs a lookup
                d = m.__dict__
                w = d["_modules"]["base_layer"]._parameters["weight"]
                weights.append(w)
                versions.append(w._version)
                scales.append(d["alpha"] / d["rank"] * d["multiplier"])  # LoHaLayer.scale
                training.append(d["training"])
                dropping.append(d["training"] and (d["rank_dropout"] > 0 or d["module_dropout"] > 0))
            fp32 = all(w.dtype == torch.float32 for w in weights)
            snap = self.__dict__["_snapshot"] = (weights, versions, scales, training, dropping, fp32)
        return snap

    def build_for(self, layer, slot, dtype, weight) -> _Build:
        build = self.__dict__["_build"]
        if build is None or not build.accepts(layer, slot, dtype, weight):
            build = _Build(self, dtype)
            if not build.accepts(layer, slot, dtype, weight):  # this layer changed since the snapshot
                self.__dict__["_snapshot"] = None
                build = _Build(self, dtype)
            self.__dict__["_build"] = build
        return build

    def __getstate__(self):
        # deepcopy/pickle: a build holds tensors of a live graph, never worth copying
        return {**super().__getstate__(), "_build": None, "_reused": None, "_snapshot": None}

    def _forget_builds(self):
        self.__dict__["_build"] = None
        self.__dict__["_reused"] = None
        self.__dict__["_snapshot"] = None

    def _apply(self, fn, recurse=True):
        self._forget_builds()  # .to()/.half(): a build and buffers from before refer to the old tensors
        return super()._apply(fn, recurse)

    def unstack(self):
        """Give every layer its own Parameters again (copies of its slice), and forget the layers."""
        trainable = self.factors()[0].requires_grad
        for m in self.layers:
            params = [nn.Parameter(f.detach().clone(), requires_grad=trainable) for f in m.factors()]
            m.__dict__["_stack"] = None
            for name, param in zip(self.factor_names, params):
                m.register_parameter(name, param)
        self.__dict__["layers"] = []
        self._forget_builds()

    def extra_repr(self) -> str:
        shape = tuple(self.layers[0].base_layer.weight.shape) if self.layers else ()
        rank = self._parameters["hada_b"].shape[2]
        return f"layers={len(self.layers)}, weight_shape={shape}, rank={rank}"
