"""Finding target Linears by name, swapping LoHaLinear in and out, merge/unmerge/scale."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layer import LoHaError, LoHaLinear, _LayerGroup

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


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
    return paths


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
    """The LoHa factors of ``model`` (what an optimizer should get)."""
    return [p for layer in adapter_modules(model).values() for p in layer.factors()]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.hada_w1_a": tensor, ...}: the adapter weights only, detached."""
    return {f"{path}.{name}": getattr(layer, name).detach()
            for path, layer in adapter_modules(model).items() for name in FACTOR_NAMES}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))
