"""Finding target Linears by name, swapping LoHaLinear in and out, merge/unmerge/scale."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layer import FACTOR_NAMES, LoHaError, LoHaLinear, LoHaStack, _LayerGroup

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
STACKS_ATTRIBUTE = "loha_stacks"


def _matches(path: str, targets: set[str]) -> bool:
    """True if ``path`` equals a target or ends with "." + target (checked per dotted suffix, so a
    target list of all 560 SDXL paths costs no more than four short names)."""
    parts = path.split(".")
    return any(".".join(parts[i:]) in targets for i in range(len(parts)))


def _set_module(model: nn.Module, path: str, module: nn.Module):
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def unwrap(model: nn.Module) -> nn.Module:
    """The model behind ``torch.compile``'s wrapper, whose module paths carry no ``_orig_mod.`` prefix."""
    return getattr(model, "_orig_mod", model)


def adapter_modules(model: nn.Module) -> dict[str, LoHaLinear]:
    """{module path: LoHaLinear} for every adapter in ``model``, in module order."""
    return {path: m for path, m in unwrap(model).named_modules() if isinstance(m, LoHaLinear)}


def inject(model: nn.Module, rank: int = 8, alpha: float | None = None,
           target_modules: Iterable[str] | str = DEFAULT_TARGETS, *, ranks: dict | None = None,
           alphas: dict | None = None, **options) -> list[str]:
    """Wrap every ``nn.Linear`` whose path equals a target or ends with ``.<target>`` in a LoHaLinear.

    Everything else in ``model`` is frozen. ``alpha=None`` means alpha = rank. ``ranks``/``alphas``
    optionally override rank/alpha per module path (used when loading files with mixed ranks).
    ``options`` go to LoHaLinear: rank_dropout, module_dropout, init, forward_mode, dtype.
    Returns the injected module paths.
    """
    model = unwrap(model)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    target_modules = set(target_modules)
    if not target_modules:
        raise LoHaError("target_modules is empty; name at least one module, e.g. to_q")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoHaError(f"rank must be an integer >= 1, got {rank!r}")
    if adapter_modules(model):
        raise LoHaError("this model already has LoHa adapters; call loha.eject(model) before injecting again")
    matched = [(p, m) for p, m in model.named_modules() if p and _matches(p, target_modules)]
    if not matched:
        linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise LoHaError(f"no module matches target_modules={sorted(target_modules)[:8]}; Linear modules here include: "
                        f"{', '.join(linears[:6]) or '(none)'}")
    wrong = [f"{p} ({type(m).__name__})" for p, m in matched if not isinstance(m, nn.Linear)]
    if wrong:
        raise LoHaError(f"LoHa targets nn.Linear only, but these matched modules are not: {', '.join(wrong[:6])}; "
                        "make target_modules more specific (e.g. 'to_out.0' instead of 'to_out')")
    model.requires_grad_(False)
    ranks, alphas = ranks or {}, alphas or {}
    layers = [(p, LoHaLinear(m, ranks.get(p, rank), alphas.get(p, alpha), **options)) for p, m in matched]
    for path, layer in layers:
        _set_module(model, path, layer)
    _link_group([layer for _, layer in layers])
    return [p for p, _ in layers]


def _link_group(layers: list[LoHaLinear]) -> None:
    """One group for all adapters of a model: forward_mode="grouped" rebuilds same-shape layers together."""
    group = _LayerGroup(layers)
    for layer in layers:
        layer._group, layer._prebuilt = group, None


def eject(model: nn.Module) -> list[str]:
    """Put the original Linear objects back (unmerging first). Returns the paths that were restored."""
    paths = []
    for path, layer in adapter_modules(model).items():
        layer.unmerge()
        _set_module(unwrap(model), path, layer.base_layer)
        paths.append(path)
    if isinstance(getattr(unwrap(model), STACKS_ATTRIBUTE, None), nn.ModuleList):
        delattr(unwrap(model), STACKS_ATTRIBUTE)
    return paths


def stack(model: nn.Module) -> list[LoHaStack]:
    """Store the factors of all adapters with the same shape, rank and factor dtype as four stacked
    Parameters each (a LoHaStack; all of them registered as ``model.loha_stacks``).

    The layers still read and write their factors as views (saving, loading, merging and
    ``layer.hada_w1_a`` work as before), but ``model.parameters()`` and ``loha.trainable_parameters``
    now give the stacked tensors, and their ``.grad`` is where gradients go: the optimizer then steps
    a handful of tensors instead of four per layer, and with ``forward_mode="grouped"`` autograd
    accumulates four gradients per shape instead of four per layer. Build the optimizer after this.
    A factor that never gets a gradient (an unused layer) sits in a stack that does, so AdamW's weight
    decay reaches it, unlike per-layer storage. ``loha.unstack`` undoes it.

    Train stacked adapters with ``forward_mode="grouped"``: in the per-layer modes every layer's views
    cost a select and a stack-sized backward, and a merged training step is slower stacked than not
    (0.96× against 0.78× PEFT's step on the tiny UNet, BENCHMARKS.md). Inference is unaffected.
    """
    root = unwrap(model)
    layers = _require_adapters(root)
    if getattr(root, STACKS_ATTRIBUTE, None) is not None or any(m._stack is not None for m in layers.values()):
        raise LoHaError("this model's adapters are already stacked; call loha.unstack(model) first")
    groups: dict[tuple, list[LoHaLinear]] = {}
    for layer in layers.values():
        f = layer._storage()[0]
        key = (tuple(layer.base_layer.weight.shape), layer.rank, f.dtype, f.device)
        groups.setdefault(key, []).append(layer)
    stacks = [LoHaStack(group) for group in groups.values()]
    setattr(root, STACKS_ATTRIBUTE, nn.ModuleList(stacks))
    return stacks


def unstack(model: nn.Module) -> None:
    """Give every adapter its own Parameters again (the values are kept). Rebuild the optimizer after."""
    root = unwrap(model)
    stacks = getattr(root, STACKS_ATTRIBUTE, None)
    if not isinstance(stacks, nn.ModuleList):
        raise LoHaError("this model's adapters are not stacked; nothing to unstack")
    for s in stacks:
        s.unstack()
    delattr(root, STACKS_ATTRIBUTE)


def _require_adapters(model) -> dict[str, LoHaLinear]:
    layers = adapter_modules(model)
    if not layers:
        raise LoHaError("this model has no LoHa adapters; call loha.inject or loha.load first")
    return layers


def merge(model: nn.Module, keep_original: bool = True) -> None:
    """Fold every adapter's ΔW into its base weight (fp32 math, one cast). All-or-nothing: if any layer
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
    """Multiply every adapter's alpha/rank by ``scale``. 0 gives exactly the base model."""
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise LoHaError(f"scale must be finite, got {scale}")
    layers = _require_adapters(model)
    if any(layer.merged for layer in layers.values()):
        raise LoHaError("adapters are merged into the weights; call loha.unmerge(model) before set_scale")
    for layer in layers.values():
        layer.multiplier = scale


def set_forward_mode(model: nn.Module, mode: str) -> None:
    """Switch every adapter between the "merged", "bypass" and "grouped" forward strategies."""
    for layer in _require_adapters(model).values():
        layer.forward_mode = mode


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoHa factors of ``model`` (what an optimizer should get): four per layer, or, after
    ``loha.stack``, four per LoHaStack."""
    params, seen = [], set()
    for layer in adapter_modules(model).values():
        storage = layer._storage()  # a stack's four Parameters are shared by all its layers: listed once
        if id(storage[0]) not in seen:
            seen.add(id(storage[0]))
            params.extend(storage)
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.hada_w1_a": tensor, ...}: the adapter weights only, detached."""
    return {f"{path}.{name}": getattr(layer, name).detach()
            for path, layer in adapter_modules(model).items() for name in FACTOR_NAMES}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
