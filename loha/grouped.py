"""The grouped engine: the factors of same-shape LoHa layers stacked in a ``LoHaStack``, built and
differentiated a chunk of layers at a time. The entry point is ``LoHaStack.run``, which every stacked
layer in forward_mode "grouped" calls with its input.

A training step through a stack is one ``_Build`` (made by the first layer that runs, joined by the
others while nothing it depends on changes). It works on chunks of consecutive layers, about
``CHUNK_BYTES`` of built weights each, in the Khatri-Rao form of ``loha.math``:

- forward: a chunk's W + ΔW is one batched GEMM with the stacked base weights as its addend (``lm.build``),
  made when the chunk's first layer runs and dropped once its last one has;
- each layer saves only its input (or a recipe for it, ``layer.keep_input``), and under checkpointing also
  its built weight: the recomputation hands back the one it built for the forward anyway;
- backward: a chunk is rebuilt for the input gradients (unless the weights came back from a
  recomputation); each layer writes its weight gradient G into the chunk's buffer, and once the chunk's
  last layer has, two GEMMs with G and a few r²-sized sums give the chunk's factor gradients, written into
  the stack's gradient. A token Function (``_GroupFunction``), an input of every layer's Function, returns
  that gradient to autograd once all layers have run.

So nothing of size out×in outlives a chunk, and a chunk is a few tens of MiB whatever the model: the peak
memory of the step is the floor's plus the factors, their optimizer state and a chunk or two in flight
(BENCHMARKS.md §0). The ops a chunk launches are shared by its layers (about 1 + 20/n extra per layer).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import math as lm
from .layer import LoHaError, LoHaLayer, _cast, keep_input, kept_input, saving_hooks, usable

STACK_NAMES = ("hada_a", "hada_b", "hada_t")  # a LoHaStack's Parameters: both halves of each factor, paired
# Built weights per chunk, in the compute dtype. Measured on SDXL 1024² bf16 (BENCHMARKS.md §2, "chunk
# bytes"): what a chunk holds in flight against the extra launched ops per layer its fixed cost spreads over.
CHUNK_BYTES = 64 << 20
SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class LoHaStack(nn.Module):
    """The factors of L LoHa layers of one kind, shape, rank, layout and factor dtype, stacked (``loha.stack``
    or ``loha.inject(stack=True)`` make them), with the two Hadamard halves side by side: ``hada_a``
    (L, 2, out, r) holds every W1a and W2a, ``hada_b`` (L, 2, r, in·k) every W1b and W2b (Tucker: (L, 2, r, out),
    (L, 2, r, in) and ``hada_t`` (L, 2, r, r, kh, kw)). The layers keep reading and writing their factors, as
    views of their slice; ``parameters()``, optimizers, DDP and gradient clipping see two (three) tensors per
    shape instead of four (six) per layer."""

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
        self.__dict__["checkpointed"] = False  # set once a layer runs under checkpointing (``_Build.forward_weight``)
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

    def run(self, slot: int, layer: LoHaLayer, x: torch.Tensor) -> torch.Tensor:
        """Layer ``slot``'s output for input x (already in the compute dtype): op(x, W + ΔW)."""
        base = layer.base_layer._parameters
        build = self._build_for(layer, slot, x.dtype, base["weight"])
        weight = build.forward_weight(slot)
        bias = _cast(base["bias"], x.dtype)
        if not build.grad:
            return layer.op.forward(x, weight, bias)
        return _GroupedLayerFunction.apply(x, build.token, base["bias"], build, slot, layer.op, weight)

    def _build_for(self, layer, slot, dtype, weight) -> _Build:
        build = self.__dict__["_build"]
        if build is None or not build.accepts(layer, slot, dtype, weight):
            build = self.__dict__["_build"] = _Build(self, dtype)
        return build

    def __getstate__(self):
        # deepcopy/pickle: a build holds tensors of a live graph, never worth copying
        return {**super().__getstate__(), "_build": None}

    def _apply(self, fn, recurse=True):
        self.__dict__["_build"] = None  # .to()/.half(): a build from before refers to the old tensors
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
        self.__dict__["_build"] = None

    def extra_repr(self) -> str:
        shape = tuple(self.layers[0].base_layer.weight.shape) if self.layers else ()
        rank = self._parameters["hada_b"].shape[2]
        return f"layers={len(self.layers)}, weight_shape={shape}, rank={rank}"


class _Build:
    """One grouped pass through a stack's layers, forward and backward (see the module docstring).

    A layer joins it if its slot is unused here and nothing the build depends on has changed (grad mode,
    dtype, the layer's scale and train flag, its base weight and the factors, by identity and in-place
    version); otherwise the stack starts a new build. Its math runs in the compute dtype when it trains
    under 16-bit autocast (the factors cast once), else in the factors' dtype; W + ΔW is summed once and
    cast once to the compute dtype either way.

    Two shapes of work. Chunked (the default): a chunk's weights are built at once, and in backward its
    layers' G are gathered and reduced together. Per layer (a build started under checkpointing, where the
    backward of one block runs between the recomputations of others, and what a chunk held would sit
    through them): each layer builds only its own weight, in forward, in the recomputation and again for
    its input gradient, and turns its G at once into its rows of M and N (r²-sized); a chunk then shares
    only its Khatri-Rao factors and its reduction."""

    def __init__(self, stack: LoHaStack, dtype: torch.dtype):
        layers = stack.layers
        self.stack, self.dtype = stack, dtype
        self.params = stack.factors()
        self.grad = torch.is_grad_enabled()
        p = self.params[0]
        self.math = dtype if self.grad and dtype in SIXTEEN_BIT else torch.promote_types(p.dtype, dtype)
        self.weights = [m.base_layer._parameters["weight"] for m in layers]
        self.weight_versions = [w._version for w in self.weights]
        self.scales = [m.scale for m in layers]
        self.training = [m.training for m in layers]
        self.version = self._factor_version()
        shape = self.weights[0].shape
        self.shape, self.flat = shape, (shape[0], self.weights[0][0].numel())
        size = max(1, CHUNK_BYTES // (self.weights[0].numel() * dtype.itemsize))
        self.chunks = [slice(i, min(i + size, len(layers))) for i in range(0, len(layers), size)]
        self.size = size
        self.coef = self._coefficients(layers)
        self.layerwise = [False] * len(self.chunks)  # chunks with a layer built per layer (checkpointing)
        self.used = [False] * len(layers)
        self.forward_cache = {}  # chunk → its built weights (unbound)
        self.kr_cache = {}  # chunk → its Khatri-Rao factors, for layers built one by one
        self.forward_left = [s.stop - s.start for s in self.chunks]
        self.expected = [0] * len(self.chunks)  # layers of each chunk that ran forward and will write a G
        self.rebuilds = [0] * len(self.chunks)  # ... whose backward needs the weight again
        self.backward_started = False
        self.backward = None  # the state of a backward under way
        self.token = _GroupFunction.apply(self, *self.params) if self.grad and p.requires_grad else None

    # ------------------------------------------------------------------------------------- forward
    def _coefficients(self, layers):
        """scale per layer, times the rank/module dropout mask of the layers in training: one float when every
        layer has the same scale and none drops out, else (L, out, 1) in the math dtype."""
        dropping = [m.training and (m.rank_dropout > 0 or m.module_dropout > 0) for m in layers]
        if len(set(self.scales)) == 1 and not any(dropping):
            return self.scales[0]
        out, device = self.shape[0], self.params[0].device
        coef = torch.tensor(self.scales, device=device, dtype=self.math)[:, None, None].expand(-1, out, 1)
        if any(dropping):
            ones = torch.ones(out, device=device, dtype=self.math)
            coef = coef * torch.stack([_cast(m._row_scale(), self.math) if d else ones
                                       for m, d in zip(layers, dropping)])[:, :, None]
        return coef.contiguous()

    def _factor_version(self) -> int:
        # version counters only grow: their sum is unchanged exactly when none of them changed
        return sum(p._version for p in self.params)

    def accepts(self, layer, slot, dtype, weight) -> bool:
        return (not self.used[slot] and not self.backward_started and self.dtype is dtype
                and self.grad is torch.is_grad_enabled() and self.scales[slot] == layer.scale
                and self.training[slot] is layer.training and self.weights[slot] is weight
                and self.weight_versions[slot] == weight._version and self.version == self._factor_version())

    def _chunk_coef(self, sl):
        return self.coef[sl] if isinstance(self.coef, torch.Tensor) else self.coef

    def _matrices(self, sl):
        """The chunk's paired matrices (A, B) (``lm.matrices``), in the factors' precision."""
        return lm.matrices(*(p.detach()[sl] for p in self.params))

    def _khatri_rao(self, c):
        """The chunk's (K, R), computed in the factors' precision and rounded once to the math dtype: no copy of
        the whole stack's factors is kept (they would sit through the step: 44 MiB on SDXL's attention)."""
        sl = self.chunks[c]
        with torch.no_grad():
            return lm.khatri_rao(*self._matrices(sl), self._chunk_coef(sl), dtype=self.math)

    @torch.no_grad()
    def _build(self, c, kr=None):
        """Chunk c's W + ΔW per layer, (n, *weight shape) in the compute dtype. Without grad (inference) from the
        pair P1, P2 in the factors' precision, the very sums ``loha.merge`` folds in, so a fused model computes
        what an unfused one does, bit for bit; a training build in the Khatri-Rao form, which writes no pair."""
        sl = self.chunks[c]
        flat = [w.reshape(self.flat) for w in self.weights[sl]]
        if not self.grad:
            weights = torch.stack([usable(w, self.math) for w in flat])
            pair = lm.half(*(_cast(p.detach()[sl], self.math) for p in self.params))
            return lm.add_delta(weights, pair[:, 0], pair[:, 1], self._chunk_coef(sl), self.dtype).view(-1, *self.shape)
        k, r = kr or self._khatri_rao(c)
        if len(flat) == 1 and flat[0].dtype == self.math:  # one layer: no stack, and W is not written
            built = torch.baddbmm(flat[0].unsqueeze(0), k, r)
        else:
            stacked = torch.stack(flat, out=flat[0].new_empty((len(flat), *self.flat), dtype=self.math))
            built = lm.build(stacked, k, r)  # fp8 or other weights widened by the stack itself
        return _cast(built, self.dtype).view(-1, *self.shape)

    @torch.no_grad()
    def _build_one(self, slot, kr):
        """One layer's W + ΔW from its chunk's Khatri-Rao factors (per-layer builds)."""
        j = slot - self.chunks[slot // self.size].start
        flat = usable(self.weights[slot], self.math).reshape(self.flat)
        return _cast(torch.addmm(flat, kr[0][j], kr[1][j]), self.dtype).view(self.shape)

    def forward_weight(self, slot):
        """The layer's W + ΔW for its forward (no grad): a view of its chunk's, built on first need (layers run
        in slot order, so a chunk is done when the next one starts); or, under checkpointing, its own. A stack
        that has run under checkpointing once builds layer by layer from then on, also outside the
        checkpointed blocks (proj_in, samplers), so that no chunk sits in memory while blocks recompute."""
        self.used[slot] = True
        c = slot // self.size
        checkpointing = self.grad and saving_hooks() == "checkpoint"
        if checkpointing:
            self.stack.__dict__["checkpointed"] = True
        self.forward_left[c] -= 1
        done = self.forward_left[c] == 0
        if checkpointing or (self.grad and self.stack.__dict__.get("checkpointed")):
            self.layerwise[c] = True
            kr = self.kr_cache.get(c)
            if kr is None:
                self.kr_cache.clear()
                kr = self.kr_cache[c] = self._khatri_rao(c)
            if done:
                self.kr_cache.pop(c, None)
            return self._build_one(slot, kr)
        built = self.forward_cache.get(c)
        if built is None:
            self.forward_cache.clear()
            built = self.forward_cache[c] = self._build(c).unbind(0)
        if done:
            self.forward_cache.pop(c, None)
        return built[slot - self.chunks[c].start]

    def ran(self, slot, rebuild: bool, deposits: bool):
        """A layer's Function ran forward with grad. ``rebuild``: its backward needs the weight again;
        ``deposits``: it will write a G."""
        c = slot // self.size
        self.expected[c] += deposits
        self.rebuilds[c] += rebuild

    # ------------------------------------------------------------------------------------ backward
    def _start_backward(self):
        if self.backward is not None:
            return
        self.backward_started = True
        self.forward_cache.clear()
        self.kr_cache.clear()
        if self.stack.__dict__.get("_build") not in (self, None) and self.stack.__dict__["_build"].backward_started:
            self.stack.__dict__["_build"] = None  # a checkpoint's recomputation made that one: done by now
        self.backward = {"kr": {}, "weights": {}, "left": list(self.rebuilds), "g": {}, "have": {},
                         "pieces": [None] * len(self.chunks)}

    def _check_unchanged(self, slots, factors):
        """Raise if the base weight of any of ``slots`` or (``factors``) any factor changed in place since forward."""
        if (factors and self.version != self._factor_version()) or any(
                self.weight_versions[i] != self.weights[i]._version for i in slots):
            raise RuntimeError("a LoHa factor or base weight was modified in place between the forward and the "
                               "backward (e.g. optimizer.step() before loss.backward()); run backward first")

    def _backward_kr(self, c):
        kr = self.backward["kr"].get(c)
        if kr is None:
            self._check_unchanged((), factors=True)
            kr = self.backward["kr"][c] = self._khatri_rao(c)
        return kr

    def backward_weight(self, slot):
        """The layer's W + ΔW again, for its input gradient: its chunk's, rebuilt once and dropped after its last
        such use, or per layer its own."""
        self._start_backward()
        self._check_unchanged((slot,), factors=False)
        c = slot // self.size
        kr, state = self._backward_kr(c), self.backward
        if self.layerwise[c]:
            return self._build_one(slot, kr)
        built = state["weights"].get(c)
        if built is None:
            built = state["weights"][c] = self._build(c, kr).unbind(0)
        state["left"][c] -= 1
        if state["left"][c] == 0:
            del state["weights"][c]
        return built[slot - self.chunks[c].start]

    def gradient_slot(self, slot):
        """Where a chunked build's layer writes its G: its row of the chunk's buffer (n, out, in·k), math dtype;
        None per layer (the layer's G is reduced in ``deposit``)."""
        self._start_backward()
        c = slot // self.size
        if self.layerwise[c]:
            return None
        buffers = self.backward["g"]
        if c not in buffers:
            sl = self.chunks[c]
            buffers[c] = self.weights[sl.start].new_empty((sl.stop - sl.start, *self.flat), dtype=self.math)
        return buffers[c][slot - self.chunks[c].start]

    def deposit(self, slot, g):
        """The layer's G is written (chunked: into its row; per layer: ``g``, turned into its rows of M and N)."""
        c = slot // self.size
        state = self.backward
        if self.layerwise[c]:
            j = slot - self.chunks[c].start
            k, r = self._backward_kr(c)
            if c not in state["g"]:
                state["g"][c] = (k.new_empty(k.shape), r.new_empty(r.shape))
            m, n = state["g"][c]
            g = _cast(g.reshape(self.flat), self.math)
            torch.mm(g, r[j].T, out=m[j])
            torch.mm(k[j].T, g, out=n[j])
        have = state["have"].setdefault(c, set())
        have.add(slot)
        if len(have) == self.expected[c]:
            self._reduce(c)

    def _reduce(self, c):
        """Chunk c's factor gradients (its piece of the stack's), from its G or its layers' M and N."""
        state = self.backward
        sl = self.chunks[c]
        buffers = state["g"].pop(c)
        have = state["have"].get(c, set())
        for i in range(sl.start, sl.stop):
            if i not in have:  # a layer that ran no backward (its output unused): zero G
                for t in (buffers if self.layerwise[c] else (buffers,)):
                    t[i - sl.start].zero_()
        k, r = self._backward_kr(c)
        state["kr"].pop(c)
        m, n = buffers if self.layerwise[c] else lm.khatri_rao_mn(buffers, k, r)
        a, b = self._matrices(sl)
        coef, dtype = self._chunk_coef(sl), self.params[0].dtype
        da, db = lm.khatri_rao_grads(m, n, a, b, coef, dtype=dtype)
        if len(self.params) == 3:  # Tucker: through the cores, in the factors' precision
            da, db, dt = lm.matrices_grads(da, db, *(p.detach()[sl] for p in self.params))
            state["pieces"][c] = (da, db, dt)
        else:
            state["pieces"][c] = (da, db)

    def finish(self):
        """The stack's factor gradients: each chunk's piece (zeros where no layer wrote a G), put together only
        now, at the end of the backward, when the activations are gone: a stack-sized gradient made at the first
        chunk would sit through the whole backward (the full preset's peak: +0.1 GiB)."""
        self._start_backward()
        state = self.backward
        for c in list(state["g"]):
            self._reduce(c)
        pieces = state["pieces"]
        self.backward = None  # a second backward (retain_graph) starts afresh
        if self.stack.__dict__.get("_build") is self:
            self.stack.__dict__["_build"] = None  # a finished build takes no layer: nothing of it outlives the step
        if not any(pieces):
            return (None,) * len(self.params)
        grads = []
        for i, p in enumerate(self.params):
            parts = [piece[i] if piece else p.new_zeros((s.stop - s.start, *p.shape[1:]))
                     for piece, s in zip(pieces, self.chunks)]
            grads.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return tuple(grads)


class _GroupFunction(torch.autograd.Function):
    """Links a build to autograd: its output (an empty token) is an input of every layer's Function, so
    its backward runs once all of them have, and returns the stack's gradients. It holds its build weakly
    (the layers' Functions hold it while the graph lives): build → token → node → build would be a cycle
    that only the garbage collector frees."""

    @staticmethod
    def forward(ctx, build, *params):
        ctx.build = weakref.ref(build)
        ctx.set_materialize_grads(False)
        return params[0].new_empty(0)

    @staticmethod
    def backward(ctx, _):
        build = ctx.build()
        return (None, *((None,) * (len(ctx.needs_input_grad) - 1) if build is None else build.finish()))


class _GroupedLayerFunction(torch.autograd.Function):
    """One layer of a grouped build: op(x, W + ΔW) with the build's weight for it. Saves x only (or its recipe);
    the weight is built again in backward where the input gradient needs it, and G goes to the build."""

    @staticmethod
    def forward(ctx, x, token, bias, build, slot, op, weight):
        keep_input(ctx, x)
        ctx.build, ctx.slot, ctx.op, ctx.has_bias = build, slot, op, bias is not None
        build.ran(slot, rebuild=x.requires_grad, deposits=token is not None)
        return op.forward(x, weight, _cast(bias, x.dtype))

    @staticmethod
    def backward(ctx, g):
        x = kept_input(ctx, ctx.saved_tensors[0])
        build, need = ctx.build, ctx.needs_input_grad
        weight = build.backward_weight(ctx.slot) if need[0] else None  # only G: no rebuild
        gw_out = build.gradient_slot(ctx.slot) if need[1] else None
        grad_x, gw, grad_b = ctx.op.backward(g, x, weight, need[0], need[1], need[2] and ctx.has_bias, gw_out)
        if need[1]:
            build.deposit(ctx.slot, gw)
        return grad_x, None, grad_b, None, None, None, None
