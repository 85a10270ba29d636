"""Choosing target modules (by name or by LyCORIS preset), swapping adapters in and out, stacking their
factors, merge/unmerge/scale."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import math as lm
from .grouped import LoHaStack
from .layer import FACTOR_NAMES, AdapterLayer, LoHaError, LoHaLayer, adapter_for

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
STACK_ATTRIBUTE = "loha_stack"  # each LoHaStack is a child of its first layer (a root child would break nn.Sequential)


@dataclass(frozen=True)
class Preset:
    """LyCORIS's module selection (``lycoris.config.PRESET``) for the classes an SDXL pipeline has: every
    Linear and Conv2d inside a module of one of ``classes``, plus the modules named by ``names`` (regex
    from the start, as LyCORIS matches). ``conv``: whether convs with a kernel larger than 1×1 are taken
    (1×1 convs always are, at the linear rank, as in LyCORIS). ``suffixes`` instead picks by path suffix."""
    unet_classes: tuple = ()
    unet_names: tuple = ()
    text_classes: tuple = ()
    conv: bool = False
    unet_suffixes: tuple = ()


CLIP_ATTENTION = ("CLIPAttention", "CLIPSdpaAttention")
CLIP_MLP = ("CLIPMLP",)
TRANSFORMER = ("Transformer2DModel", "TimestepEmbedding")  # TimestepEmbedding: in LyCORIS's lists (for Anima)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TIME_NAMES = ("time_embedding.linear_1", "time_embedding.linear_2")
PRESETS = {
    # the seed recipe's attention linears (560 on SDXL); LyCORIS's own attn-only names no diffusers class
    "attn-only": Preset(unet_suffixes=DEFAULT_TARGETS, text_classes=CLIP_ATTENTION),
    "attn-mlp": Preset(unet_classes=TRANSFORMER, text_classes=CLIP_ATTENTION + CLIP_MLP),
    "full": Preset(unet_classes=TRANSFORMER + CONV_BLOCKS, unet_names=("conv_in", "conv_out", *TIME_NAMES),
                   text_classes=CLIP_ATTENTION + CLIP_MLP, conv=True),
    "full-lin": Preset(unet_classes=("Transformer2DModel", "ResnetBlock2D", "TimestepEmbedding"),
                       unet_names=TIME_NAMES, text_classes=CLIP_ATTENTION + CLIP_MLP),
    "unet-transformer-only": Preset(unet_classes=TRANSFORMER),
    "unet-convblock-only": Preset(unet_classes=CONV_BLOCKS, unet_names=("conv_in", "conv_out"), conv=True),
}
DEFAULT_PRESET = "attn-only"


def _matches(path: str, targets: set[str]) -> bool:
    """True if ``path`` equals a target or ends with "." + target (checked per dotted suffix, so a
    target list of all 788 SDXL paths costs no more than four short names)."""
    parts = path.split(".")
    return any(".".join(parts[i:]) in targets for i in range(len(parts)))


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind ``torch.compile``'s wrapper, whose module paths carry no ``_orig_mod.`` prefix."""
    return getattr(model, "_orig_mod", model)


def adapter_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """{module path: adapter} for every adapter (LoHa layers and full differences) in ``model``, in module order."""
    return {path: m for path, m in unwrap(model).named_modules() if isinstance(m, AdapterLayer)}


def loha_layers(model: nn.Module) -> dict[str, LoHaLayer]:
    return {path: m for path, m in adapter_modules(model).items() if isinstance(m, LoHaLayer)}


def is_text_encoder(model: nn.Module) -> bool:
    """A CLIP text encoder (transformers), which presets give their text-encoder targets."""
    names = {type(m).__name__ for m in model.modules()}
    return bool(names & set(CLIP_ATTENTION + CLIP_MLP))


def _is_wide_conv(module) -> bool:
    return isinstance(module, nn.Conv2d) and any(k != 1 for k in module.kernel_size)


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """The module paths a preset adapts in ``model`` (a UNet, or a CLIP text encoder), in module order."""
    if preset not in PRESETS:
        raise LoHaError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    rules = PRESETS[preset]
    text = is_text_encoder(model)
    if not text and rules.unet_suffixes:
        return [p for p, m in model.named_modules() if p and _matches(p, set(rules.unet_suffixes))
                and adapter_for(m) is not None]
    classes = set(rules.text_classes if text else rules.unet_classes)
    names = () if text else rules.unet_names
    chosen = {}
    for path, module in model.named_modules():
        if type(module).__name__ in classes and not any(re.match(n, path) for n in names):
            inside = ((f"{path}.{sub}" if sub else path, m) for sub, m in module.named_modules())
        elif path and any(re.match(n, path) for n in names):
            inside = [(path, module)]
        else:
            continue
        for p, m in inside:
            if adapter_for(m) is not None and (rules.conv or not _is_wide_conv(m)):
                chosen.setdefault(p, m)
    return list(chosen)


def inject(model: nn.Module, rank: int = 8, alpha: float | None = None,
           target_modules: Iterable[str] | str | None = None, *, preset: str | None = None,
           conv_rank: int | None = None, conv_alpha: float | None = None, use_tucker: bool = False,
           stack: bool = True, ranks: dict | None = None, alphas: dict | None = None,
           layouts: dict | None = None, **options) -> list[str]:
    """Wrap target modules in LoHa adapters (``nn.Linear`` → LoHaLinear, ``nn.Conv2d`` → LoHaConv2d).

    Targets: ``target_modules`` (paths equal to a name or ending with ``.<name>``), or ``preset`` — one of
    ``loha.PRESETS``, LyCORIS's names and module sets: ``"attn-only"`` (the default: to_q/to_k/to_v/to_out.0;
    q/k/v/out_proj in a CLIP text encoder), ``"attn-mlp"``, ``"full"``, ``"full-lin"``,
    ``"unet-transformer-only"``, ``"unet-convblock-only"``. Convs with a kernel larger than 1×1 get
    ``conv_rank``/``conv_alpha`` (LyCORIS's conv_dim/conv_alpha; default: rank/alpha) and, with
    ``use_tucker``, Tucker factors; 1×1 convs and Linears get ``rank``/``alpha``. ``alpha=None`` means
    alpha = rank.

    Everything else in ``model`` is frozen. ``stack=True`` (default) stores the factors of same-shape
    adapters as stacked Parameters (``loha.stack``), which the default ``forward_mode="grouped"`` needs.
    ``ranks``/``alphas``/``layouts`` override rank, alpha and ``{"use_tucker": …, "dora": …}`` per path
    (loading uses them). ``options`` go to the layers: rank_dropout, module_dropout, init, forward_mode,
    dtype. Returns the injected module paths.
    """
    model = unwrap(model)
    if target_modules is not None and preset is not None:
        raise LoHaError("give target_modules or preset, not both")
    for name, value in (("rank", rank), ("conv_rank", conv_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LoHaError(f"{name} must be an integer >= 1, got {value!r}")
    if adapter_modules(model):
        raise LoHaError("this model already has LoHa adapters; call loha.eject(model) before injecting again")
    modules = dict(model.named_modules())
    if target_modules is None:
        paths = preset_targets(model, preset or DEFAULT_PRESET)
        if not paths:
            raise LoHaError(f"preset {preset or DEFAULT_PRESET!r} selects no module of this "
                            f"{type(model).__name__}; give target_modules instead")
    else:
        targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
        if not targets:
            raise LoHaError("target_modules is empty; name at least one module, e.g. to_q")
        paths = [p for p in modules if p and _matches(p, targets)]
        if not paths:
            layers = [p for p, m in modules.items() if adapter_for(m) is not None]
            raise LoHaError(f"no module matches target_modules={sorted(targets)[:8]}; Linear/Conv2d modules here "
                            f"include: {', '.join(layers[:6]) or '(none)'}")
        wrong = [f"{p} ({type(modules[p]).__name__})" for p in paths if adapter_for(modules[p]) is None]
        if wrong:
            raise LoHaError(f"LoHa targets nn.Linear and nn.Conv2d only, but these matched modules are not: "
                            f"{', '.join(wrong[:6])}; make target_modules more specific (e.g. 'to_out.0')")
    model.requires_grad_(False)
    ranks, alphas, layouts = ranks or {}, alphas or {}, layouts or {}
    layers = []
    for path in paths:
        base = modules[path]
        wide = _is_wide_conv(base)
        layout = {"use_tucker": use_tucker and wide, **layouts.get(path, {})}
        layer_rank = ranks.get(path, (conv_rank or rank) if wide else rank)
        layer_alpha = alphas.get(path, (alpha if conv_alpha is None else conv_alpha) if wide else alpha)
        layers.append((path, adapter_for(base)(base, layer_rank, layer_alpha, **layout, **options)))
    for path, layer in layers:
        _set_module(model, path, layer)
    if stack:
        _stack(model)
    return [p for p, _ in layers]


def eject(model: nn.Module) -> list[str]:
    """Put the original modules back (unmerging first). Returns the paths that were restored."""
    root = unwrap(model)
    if stacks_of(root):
        unstack(root)
    paths = []
    for path, layer in adapter_modules(root).items():
        layer.unmerge()
        _set_module(root, path, layer.base_layer)
        paths.append(path)
    return paths


def stack(model: nn.Module) -> list[LoHaStack]:
    """Store the factors of all LoHa adapters with the same kind, shape, rank, layout and factor dtype as
    stacked Parameters each (a LoHaStack, registered under its first layer as ``loha_stack``; ``loha.inject`` does it
    by default); this is for models injected with ``stack=False`` (or unstacked).

    The layers still read and write their factors as views (saving, loading, merging and
    ``layer.hada_w1_a`` work as before), but ``model.parameters()`` and ``loha.trainable_parameters`` give
    the stacked tensors, and their ``.grad`` is where gradients go. Build the optimizer after this. A factor
    that never gets a gradient (an unused layer) sits in a stack that does, so AdamW's weight decay reaches
    it, unlike per-layer storage. ``loha.unstack`` undoes it.
    """
    root = unwrap(model)
    _require_adapters(root)
    if stacks_of(root):
        raise LoHaError("this model's adapters are already stacked; call loha.unstack(model) first")
    return _stack(root)


def stacks_of(model: nn.Module) -> list[LoHaStack]:
    """The LoHaStacks of ``model``'s adapters, in module order."""
    found = {}
    for layer in loha_layers(model).values():
        if layer._stack is not None:
            found.setdefault(id(layer._stack[0]), layer._stack[0])
    return list(found.values())


def _stack(root) -> list[LoHaStack]:
    groups: dict[tuple, list[LoHaLayer]] = {}
    for layer in loha_layers(root).values():
        if layer.dora_scale is not None or layer.diff_b is not None:
            continue  # applied with plain ops, per layer
        f = layer._storage()[0]
        key = (type(layer), tuple(layer.base_layer.weight.shape), layer.rank, layer.factor_names, f.dtype, f.device,
               f.requires_grad)
        groups.setdefault(key, []).append(layer)
    stacks = []
    for group in groups.values():
        stacked = LoHaStack(group)
        group[0].add_module(STACK_ATTRIBUTE, stacked)
        stacks.append(stacked)
    return stacks


def unstack(model: nn.Module) -> None:
    """Give every adapter its own Parameters again (the values are kept). Rebuild the optimizer after."""
    stacks = stacks_of(unwrap(model))
    if not stacks:
        raise LoHaError("this model's adapters are not stacked; nothing to unstack")
    for s in stacks:
        owner = s.layers[0]
        s.unstack()
        del owner._modules[STACK_ATTRIBUTE]


def _require_adapters(model) -> dict[str, AdapterLayer]:
    layers = adapter_modules(model)
    if not layers:
        raise LoHaError("this model has no LoHa adapters; call loha.inject or loha.load first")
    return layers


def merge(model: nn.Module, keep_original: bool = True) -> None:
    """Fold every adapter into its base weights (fp32 math, one cast). All-or-nothing: if any layer
    would get a non-finite weight, the layers merged so far are unmerged and LoHaError is raised."""
    done = []
    try:
        for path, layer in _require_adapters(model).items():
            try:
                layer.merge(keep_original=keep_original)
            except LoHaError as e:
                raise LoHaError(f"{path}: {e}") from None
            done.append(layer)
    except LoHaError:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Restore the base weights merged by ``merge`` (bit-exact when the originals were kept)."""
    for layer in _require_adapters(model).values():
        layer.unmerge()


def set_scale(model: nn.Module, scale: float) -> None:
    """Multiply every adapter's effect by ``scale`` (LoHa: alpha/rank × scale). 0 gives exactly the base model."""
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise LoHaError(f"scale must be finite, got {scale}")
    layers = _require_adapters(model)
    if any(layer.merged for layer in layers.values()):
        raise LoHaError("adapters are merged into the weights; call loha.unmerge(model) before set_scale")
    for layer in layers.values():
        layer.multiplier = scale


def set_forward_mode(model: nn.Module, mode: str) -> None:
    """Switch every LoHa adapter between the "grouped", "merged" and "bypass" forward strategies."""
    for layer in _require_adapters(model).values():
        if isinstance(layer, LoHaLayer):
            layer.forward_mode = mode


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoHa factors of ``model`` (what an optimizer should get): four (six with Tucker) per layer, or
    per LoHaStack when stacked."""
    params, seen = [], set()
    for layer in loha_layers(model).values():
        storage = layer._storage()  # a stack's Parameters are shared by all its layers: listed once
        if id(storage[0]) not in seen:
            seen.add(id(storage[0]))
            params.extend(storage)
    return params


@torch.no_grad()
def scale_weight_norms(model: nn.Module, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Max-norm regularization (kohya's --scale_weight_norms, LyCORIS's apply_max_norm): every LoHa layer whose
    ‖scale·ΔW‖_F exceeds ``max_norm`` gets its a and b factors (both halves) multiplied by
    (max_norm/‖scale·ΔW‖)^¼, so that its ΔW's norm becomes ``max_norm``; Tucker cores are left as they are.
    DoRA layers are left alone (their change is not a product of factors). Returns (how many layers were
    scaled, every layer's norm after scaling), as tensors on the factors' device: reading them waits for it."""
    if not max_norm > 0:
        raise LoHaError(f"max_norm must be > 0, got {max_norm}")
    groups = [(s.factors(), s.layers) for s in stacks_of(model)]
    for layer in loha_layers(model).values():
        if layer._stack is None and layer.dora_scale is None:
            f = layer.factors()
            groups.append(((torch.stack([f[0], f[2]])[None], torch.stack([f[1], f[3]])[None],
                            *([torch.stack([f[4], f[5]])[None]] if len(f) == 6 else [])), [layer]))
    scaled, after = torch.zeros((), dtype=torch.int64), []
    for (a, b, *t), layers in groups:
        scales = torch.tensor([abs(layer.scale) for layer in layers], device=a.device, dtype=a.dtype)
        norms = lm.delta_norms(a, b, t[0] if t else None) * scales
        ratio = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
        factor = ratio.pow(0.25).view(-1, 1, 1, 1)
        if len(layers) == 1 and layers[0]._stack is None:  # a per-layer adapter: scale its own Parameters
            f = layers[0].factors()
            for p in f[:4]:
                p.mul_(factor[0, 0])
        else:
            a.mul_(factor)
            b.mul_(factor)
        scaled = scaled.to(ratio.device) + (ratio < 1).sum()
        after.append(norms * ratio)
    return scaled, torch.cat(after) if after else torch.zeros(0)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.hada_w1_a": tensor, ...}: every adapter tensor (factors, dora_scale, diff, diff_b), detached."""
    out = {}
    for path, layer in adapter_modules(model).items():
        if isinstance(layer, LoHaLayer):
            out.update({f"{path}.{n}": f.detach() for n, f in zip(layer.factor_names, layer.factors())})
        for name in ("dora_scale", "diff", "diff_b"):
            t = getattr(layer, name, None)
            if t is not None:
                out[f"{path}.{name}"] = t.detach()
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


__all__ = ["DEFAULT_TARGETS", "FACTOR_NAMES", "PRESETS", "TEXT_ENCODER_TARGETS", "inject", "eject", "stack",
           "unstack", "stacks_of", "merge", "unmerge", "set_scale", "set_forward_mode", "trainable_parameters",
           "adapter_state_dict", "count_parameters", "scale_weight_norms", "adapter_modules", "loha_layers",
           "preset_targets"]
