"""The optimizers and learning-rate schedules SDXL LoHa recipes use, from their own packages (none is written
here), and how they meet stacked factor storage.

An optimizer that works element by element (AdamW, Lion) steps on the stacked tensors: stacked or not, each
element gets the same update. One whose update depends on a tensor's shape or on sums over tensors
(Adafactor factors its second moment over a matrix's rows and columns and clips by its RMS; bitsandbytes'
8-bit AdamW quantizes its state in blocks of the flattened tensor and keeps small tensors in 32 bits;
Prodigy and DAdaptation keep sums over all parameters) steps on ``LayerViews``: a leaf Parameter per layer
factor, in the order per-layer storage lists them, sharing the stack's memory (the optimizer's in-place
update writes through) and handed its slice of the stack's gradient before each step. So every optimizer
steps on exactly the tensors, in exactly the order, that per-layer storage would give it.
"""

from __future__ import annotations

import ast
import importlib

from torch import nn

from .inject import loha_layers, trainable_parameters
from .layer import LoHaError

# name → (module, class, pip package, whether it must step on per-layer tensors)
OPTIMIZERS = {
    "AdamW": ("torch.optim", "AdamW", None, False),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", True),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", True),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers", True),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch", False),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation", True),
}
ADAM_FAMILY = ("AdamW", "AdamW8bit")  # what --adam_beta1/--adam_beta2/--adam_epsilon/--adam_weight_decay set
ONE_STEP_SIZE = ("Prodigy", "DAdaptAdam")  # adapt one step size: their param groups' nonzero lrs must be equal
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
             "piecewise_constant", "adafactor")


def canonical(name: str) -> str:
    """The optimizer's name as OPTIMIZERS spells it, whatever the case (kohya's --optimizer_type is free-form)."""
    for known in OPTIMIZERS:
        if known.lower() == name.lower():
            return known
    raise LoHaError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def optimizer_class(name: str):
    module, cls, package, _ = OPTIMIZERS[canonical(name)]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise LoHaError(f"--optimizer {canonical(name)} needs `pip install {package}`") from None


def parse_args(items) -> dict:
    """kohya's --optimizer_args: ``key=value`` with Python literals (``betas=(0.9,0.99)``, ``decouple=True``)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise LoHaError(f"--optimizer_args takes key=value pairs, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise LoHaError(f"--optimizer_args {item!r}: {value!r} is not a Python literal (a number, True, a "
                            "tuple, a quoted string)") from None
    return out


def relative_step(name: str, options: dict) -> bool:
    """Whether this is Adafactor with its own relative step size (transformers' default), which takes no
    learning rate and runs under the ``adafactor`` schedule."""
    return canonical(name) == "Adafactor" and options.get("relative_step", True)


class LayerViews:
    """Per-layer leaf Parameters over stacked factors (see the module docstring). ``groups``: param groups,
    each with ``models`` (the models whose adapters it trains, in order) instead of ``params``."""

    def __init__(self, groups: list[dict]):
        self.pairs = []  # (stacked Parameter, layer slot, half, view)
        self.stacks = {}  # id → each stacked Parameter once
        self.groups = []
        for group in groups:
            params = []
            for model in group["models"]:
                for layer in loha_layers(model).values():
                    stack = layer.__dict__.get("_stack")
                    if stack is None:
                        params += layer.factors()
                        continue
                    owner, slot = stack
                    views = [nn.Parameter(f.detach(), requires_grad=f.requires_grad) for f in layer.factors()]
                    stacked = owner.factors()
                    # file order (w1a, w1b, w2a, w2b[, t1, t2]) → (stacked tensor, half)
                    where = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
                    self.pairs += [(stacked[s], slot, h, v) for (s, h), v in zip(where, views)]
                    self.stacks.update((id(t), t) for t in stacked)
                    params += views
            self.groups.append({k: v for k, v in group.items() if k != "models"} | {"params": params})

    def hand_gradients(self):
        """Each view's gradient: its slice of its stack's (None where the stack has none)."""
        for stacked, slot, half, view in self.pairs:
            view.grad = None if stacked.grad is None else stacked.grad[slot, half]

    def clear_stack_gradients(self):
        """The stacks' own gradients, which the optimizer on the views never clears."""
        for stacked in self.stacks.values():
            stacked.grad = None


def make(name: str, groups: list[dict], options: dict):
    """The optimizer ``name`` on ``groups`` (each with ``models`` and its ``lr``), and the LayerViews it steps
    on (None when it steps on the stored tensors)."""
    cls = optimizer_class(name)
    per_layer = OPTIMIZERS[canonical(name)][3]
    views = LayerViews(groups) if per_layer else None
    if views:
        params = views.groups
    else:
        params = [{k: v for k, v in g.items() if k != "models"}
                  | {"params": [p for m in g["models"] for p in trainable_parameters(m)]} for g in groups]
    if relative_step(name, options):
        params = [{k: v for k, v in g.items() if k != "lr"} for g in params]
        options = {"lr": None, **options}
    elif canonical(name) == "AdamW":
        options = {"fused": True, **options}
    try:
        optimizer = cls(params, **options)
    except (TypeError, ValueError) as e:
        raise LoHaError(f"--optimizer {canonical(name)} with these --optimizer_args: {e}") from None
    return optimizer, views


def make_schedule(name: str, optimizer, *, warmup_steps: int, total_steps: int, num_cycles: int, power: float,
                  step_rules: str | None, initial_lr: float):
    """diffusers' schedules by name, and ``adafactor`` (transformers' AdafactorSchedule: it reports the step
    size Adafactor chose itself, for logging)."""
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer, initial_lr)
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(name, optimizer, step_rules=step_rules, num_warmup_steps=warmup_steps,
                             num_training_steps=total_steps, num_cycles=num_cycles, power=power)
    except ValueError as e:
        raise LoHaError(f"--lr_scheduler {name}: {e}") from None


__all__ = ["OPTIMIZERS", "SCHEDULES", "LayerViews", "canonical", "make", "make_schedule", "optimizer_class",
           "parse_args", "relative_step"]
