"""The peak device memory of a training step, counted exactly on fake tensors, by a GPU's rules.

No GPU is needed and no weight is read: a model built from its config on fake tensors (shapes, dtypes and
strides, no storage) runs a step, and ``LiveBytes`` adds up the bytes of every storage from the op that
makes it to the moment it dies, rounded to 512 bytes as CUDA's caching allocator rounds every block.

Three things make a CPU run read like a CUDA one (``cuda_rules``):
- **CUDA's autocast policy.** CPU autocast keeps group_norm, layer_norm, softmax, upsampling and sums in
  bf16; CUDA runs them in fp32, and what they save and return is fp32. While measuring, every AutocastCPU
  kernel is replaced by one with CUDA's policy (``CUDA_AUTOCAST``, from torch's
  ``aten/src/ATen/autocast_mode.h``), with CUDA's cache of casts of fp32 leaf tensors that need grad.
- **Flash attention.** ``F.scaled_dot_product_attention`` calls ``aten._scaled_dot_product_flash_attention``,
  what an H100/H200 picks for SDXL's bf16 head-size-64 attention (its output layout and fp32 logsumexp).
- Fake tensors stay CPU tensors (autograd would need a CUDA device guard).

What it cannot see, so a real peak is higher by these: cuBLAS/cuDNN workspaces, kernels' internal scratch,
the allocator's block splitting and fragmentation (``GPU_OVERHEAD_BYTES`` below covers them as measured
against the H200 anchors, BENCHMARKS.md §0), and the CUDA context, which is outside the allocator.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import internals

GRANULE = 512  # CUDA's caching allocator hands out multiples of 512 bytes
# What the H200 anchors measured above this count (max_memory_allocated − fake peak: 187-318 MiB over
# eight runs, BENCHMARKS.md §0): added to an estimate before it is compared with a device's free memory.
GPU_OVERHEAD_BYTES = 320 << 20
KINDS = ("parameters", "gradients", "optimizer", "activations", "temporaries", "inputs")

# CUDA's autocast policy: op (or op.overload) → what it does with floating-point arguments.
_LOWER = """_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d
conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot
linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell
gru_cell rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention
cudnn_convolution cudnn_convolution_transpose"""
_FP32 = """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar
pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm frobenius_norm.dim nuclear_norm
nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss
kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp
upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d
_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d
upsample_bicubic2d _upsample_bicubic2d_aa rms_norm"""
_FP32_DTYPE_ARG = """prod prod.dim_int prod.dim_Dimname softmax.int softmax.Dimname log_softmax.int
log_softmax.Dimname cumprod cumprod.dimname cumsum cumsum.dimname linalg_vector_norm linalg_matrix_norm
linalg_matrix_norm.str_ord sum sum.dim_IntList sum.dim_DimnameList"""
_FP32_NORM = {"norm.Scalar": "ScalarOpt_dtype", "norm.ScalarOpt_dim": "ScalarOpt_dim_dtype",
              "norm.names_ScalarOpt_dim": "names_ScalarOpt_dim_dtype"}
_PROMOTE = "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add"
CUDA_AUTOCAST = {**dict.fromkeys(_LOWER.split(), "lower"), **dict.fromkeys(_FP32.split(), "fp32"),
                 **dict.fromkeys(_FP32_DTYPE_ARG.split(), "fp32 dtype"), **dict.fromkeys(_FP32_NORM, "fp32 norm"),
                 **dict.fromkeys(_PROMOTE.split(), "promote"), "binary_cross_entropy": "banned"}


def _overload(name: str):
    op, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, op, None)
    return None if packet is None else getattr(packet, overload or "default", None)


class CudaAutocast:
    """While active, CPU autocast follows CUDA's policy (real and fake CPU tensors alike)."""

    def __init__(self):
        self.cache = {}  # id(fp32 leaf) → (leaf, its cast): CUDA's cast cache, cleared when autocast exits
        self.library = None

    @staticmethod
    def _eligible(t) -> bool:
        return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64

    def _cast(self, value, dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, dtype) for v in value)
        if not self._eligible(value) or value.dtype == dtype:
            return value
        if (dtype != torch.float32 and value.dtype == torch.float32 and value.is_leaf and value.requires_grad
                and torch.is_autocast_cache_enabled()):
            hit = self.cache.get(id(value))
            if hit is None or hit[0] is not value:
                hit = self.cache[id(value)] = (value, value.to(dtype))
            return hit[1]
        return value.to(dtype)

    def _kernel(self, name: str, op, policy: str):
        dtype_at = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

        def kernel(_keyset, *args, **kwargs):
            with internals.below_cpu_autocast():
                tensors = [t for t in internals.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                if policy in ("lower", "fp32", "promote"):
                    dtype = torch.get_autocast_dtype("cpu") if policy == "lower" else torch.float32
                    if policy == "promote" and not any(self._eligible(t) and t.dtype == torch.float32
                                                       for t in tensors):
                        dtype = torch.get_autocast_dtype("cpu")
                    args = self._cast(args, dtype)
                    kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
                elif policy == "fp32 dtype" and tensors and self._eligible(tensors[0]):
                    if dtype_at is not None and len(args) > dtype_at:
                        if args[dtype_at] is None:
                            args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1:])
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                elif policy == "fp32 norm" and tensors and self._eligible(tensors[0]):
                    return getattr(torch.ops.aten.norm, _FP32_NORM[name])(*args, **kwargs, dtype=torch.float32)
                elif policy == "banned":
                    raise RuntimeError(f"{name} is unsafe to autocast (CUDA's policy)")
                return op(*args, **kwargs)

        return kernel

    def __enter__(self):
        import warnings

        self.library = torch.library.Library("aten", "IMPL")
        plan = {**dict.fromkeys(internals.registered_ops("AutocastCPU"), "as is"), **CUDA_AUTOCAST}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name, policy in plan.items():
                op = _overload(name)
                if op is not None:
                    self.library.impl(name, self._kernel(name, op, policy), "AutocastCPU", with_keyset=True)
        self._clear = torch.clear_autocast_cache

        def clear():  # torch.autocast's __exit__ calls it when the outermost region ends
            self.cache.clear()
            self._clear()

        torch.clear_autocast_cache = clear
        return self

    def __exit__(self, *exc):
        torch.clear_autocast_cache = self._clear
        self.cache.clear()
        self.library._destroy()
        self.library = None


@contextlib.contextmanager
def flash_attention():
    """F.scaled_dot_product_attention → CUDA's flash-attention op, as an H100/H200 runs SDXL's attention
    (unmasked, no dropout, head size ≤ 256); anything else keeps torch's own."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or enable_gqa or query.dim() != 4 or query.shape[-1] > 256:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, is_causal, False,
                                                                   scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def cuda_rules(flash: bool = True):
    """CUDA's autocast policy and (``flash``) its attention kernel, on CPU tensors."""
    with CudaAutocast(), flash_attention() if flash else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def fake_moves():
    """``module.to(device)`` on fake parameters goes through ``swap_tensors``, which fake tensors' weak
    references forbid (PEFT and LyCORIS call it on modules already in place): here a move to the CPU, where
    everything under the fake mode already is, only changes the dtype, in place."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, *_ = internals.parse_to(*args, **kwargs)
        if device is not None and device.type != "cpu":
            return original(self, *args, **kwargs)
        if dtype is not None:
            for t in (*self.parameters(), *self.buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(dtype)
        return self

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


@dataclass
class Peak:
    """The peak's bytes, what they were (``KINDS``) and where in the step it happened (phase, op)."""
    total: int = 0
    split: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    at: tuple = ("", "")

    def as_dict(self) -> dict:
        return {"bytes": self.total, "split": dict(self.split), "at": list(self.at)}


class LiveBytes:
    """A dispatch mode that counts the live bytes of every storage: made by an op (counted as ``phase``'s
    kind, ``activations`` in forward, ``temporaries`` in backward, ``optimizer`` in the optimizer step) or
    registered with ``track`` before, and dropped when the storage dies. A parameter's gradient is counted
    as ``gradients`` once it lands in ``.grad`` (``watch_gradients``). ``peak`` is the highest total since
    ``reset_peak``. Checked against real CPU tensors in tests/test_memory.py."""

    def __init__(self, granule: int = GRANULE):
        self.granule = granule
        self.live, self.kinds = 0, dict.fromkeys(KINDS, 0)
        self.storages = {}  # storage → [bytes, kind]
        self.phase = "activations"
        self.peak = Peak()
        self.last_op = ""
        self.mode = _make_mode(self)

    def track(self, tensors, kind: str):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), kind)

    def _add(self, storage, kind):
        key = weakref.ref(storage)
        if key in self.storages:
            return
        nbytes = -(-storage.nbytes() // self.granule) * self.granule
        self.storages[key] = [nbytes, kind]
        self.live += nbytes
        self.kinds[kind] += nbytes
        weakref.finalize(storage, self._drop, key)

    def _drop(self, key):
        entry = self.storages.pop(key, None)
        if entry is not None:
            self.live -= entry[0]
            self.kinds[entry[1]] -= entry[0]

    def retag(self, tensor, kind):
        entry = self.storages.get(weakref.ref(tensor.untyped_storage()))
        if entry is not None and entry[1] != kind:
            self.kinds[entry[1]] -= entry[0]
            self.kinds[kind] += entry[0]
            entry[1] = kind

    def watch_gradients(self, params):
        """Count each parameter's ``.grad`` as a gradient once it is accumulated; returns the hook handles."""
        return [p.register_post_accumulate_grad_hook(lambda p: self.retag(p.grad, "gradients"))
                for p in params if p.requires_grad]

    def reset_peak(self):
        self.peak = Peak(self.live, dict(self.kinds), (self.phase, "start"))

    def _update(self):
        if self.live > self.peak.total:
            self.peak = Peak(self.live, dict(self.kinds), (self.phase, self.last_op))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _make_mode(tracker: LiveBytes):
    class Mode(internals.DispatchMode()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tracker.last_op = str(func)
            for t in internals.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    tracker._add(t.untyped_storage(), tracker.phase)
            tracker._update()
            return out

    return Mode()


def fake_model(make, dtype):
    """``make()`` (a module constructor) on the meta device (outside any fake mode), cast to ``dtype`` there, then
    materialised as fake tensors under the active FakeTensorMode: the full SDXL UNet in a second, no memory."""
    with internals.unset_fake_temporarily(), torch.device("meta"):
        model = nn.Module.to(make(), dtype)
    return model.to_empty(device="cpu")


def optimizer_state(optimizer) -> list:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def step_peak(models, params, optimizer, run_step, inputs, during=None) -> Peak:
    """The peak of one steady-state training step: ``run_step(tracker)`` (forward, backward and optimizer step,
    setting ``tracker.phase``) under a LiveBytes tracker and the context ``during``, after the optimizer's state
    was made by a first update from zero gradients (what the first real step leaves behind). ``models``: the
    module, or list of modules, whose parameters and buffers are on the device."""
    models = models if isinstance(models, (list, tuple)) else [models]
    if optimizer is not None and params:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tracker = LiveBytes()
    tracker.track([t for m in models for t in (*m.parameters(), *m.buffers())] + list(params), "parameters")
    if optimizer is not None:
        tracker.track(optimizer_state(optimizer), "optimizer")
    tracker.track([t for t in internals.tree_leaves(inputs) if isinstance(t, torch.Tensor)], "inputs")
    hooks = tracker.watch_gradients(params)
    try:
        with tracker, during or contextlib.nullcontext():
            tracker.reset_peak()
            run_step(tracker)
    finally:
        for h in hooks:
            h.remove()
    return tracker.peak


def optimizer_state_layout(name: str, p: torch.Tensor, options: dict) -> list[tuple[tuple, torch.dtype]]:
    """The (shape, dtype) of each state tensor optimizer ``name`` keeps for ``p`` once it has stepped, as its own
    package allocates them: bitsandbytes' AdamW8bit (two uint8 buffers and an fp32 absmax per 256-element block,
    fp32 below ``min_8bit_size``), Prodigy (s and p0 over every ``slice_p``-th element, two moments), DAdaptAdam
    (s and two moments), transformers' Adafactor (factored second moment over rows and columns of a matrix, a
    first moment only with ``beta1``)."""
    n, shape, dt = p.numel(), tuple(p.shape), p.dtype
    if name == "AdamW8bit":
        if n < options.get("min_8bit_size", 4096):
            return [(shape, torch.float32)] * 2
        blocks = -(-n // 256)
        return [((n,), torch.uint8)] * 2 + [((blocks,), torch.float32)] * 2
    if name == "Prodigy":
        sliced = (-(-n // options.get("slice_p", 1)),)
        return [(sliced, dt)] * 2 + [(shape, dt)] * (2 if options.get("betas", (0.9,))[0] > 0 else 1)
    if name == "DAdaptAdam":
        return [(shape, dt)] * 3
    if name == "Adafactor":
        moments = [(shape, dt)] if options.get("beta1") is not None else []
        if len(shape) >= 2:
            return moments + [(shape[:-1], dt), (shape[:-2] + shape[-1:], dt)]
        return moments + [(shape, dt)]
    raise ValueError(f"no state layout for optimizer {name!r}")


class StandInOptimizer(torch.optim.Optimizer):
    """The memory of an optimizer whose step cannot run on fake tensors (it reads scalars with .item(), or calls
    kernels of its own): the state the real one keeps after its first step (``optimizer_state_layout``), made at
    once, and in each step one temporary of each tensor's size while it is updated, as the real ones update in
    place tensor by tensor. Its updates change nothing: it is for counting bytes, never for training."""

    def __init__(self, params, name: str, options: dict):
        super().__init__(params, {})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {f"state{i}": torch.zeros(shape, dtype=dtype, device=p.device)
                                 for i, (shape, dtype) in enumerate(optimizer_state_layout(name, p, options))}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    update = p.grad * 1.0
                    p.sub_(update, alpha=0.0)
