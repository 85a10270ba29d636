"""Every private torch API the project uses, in one place, so a torch upgrade that drops one fails here, by
name (``tests/test_internals.py`` checks each), instead of somewhere deep in a training step.

What each is for:
- ``saved_tensors_hooks_on_top``: whether saved-tensor hooks are active, and whose (checkpointing keeps a
  layer's built weight to hand back on recompute; other hooks get the plain, rebuilt path).
- ``any_autocast_enabled``: one cheap query on the per-layer path, where autocast is usually off.
- ``recipe_operands``: the operands an autograd node saved (``_saved_self`` / ``_saved_other``), from which a
  layer's input is recomputed instead of kept.
- ``raise_dynamo_cache_limit``: one compiled graph per bucket shape.
- the fake-tensor, dispatch-mode and dispatcher pieces the memory estimate (``loha.memory``) runs on.
"""

from __future__ import annotations

import torch

NAMES = {  # module attribute path → what uses it
    "torch._C._autograd._top_saved_tensors_default_hooks": "saved_tensors_hooks_on_top",
    "torch._C._is_any_autocast_enabled": "any_autocast_enabled",
    "torch._dynamo.config.cache_size_limit": "raise_dynamo_cache_limit",
    "torch._subclasses.fake_tensor.FakeTensorMode": "fake_mode",
    "torch._subclasses.fake_tensor.FakeTensor": "is_fake",
    "torch._subclasses.fake_tensor.unset_fake_temporarily": "unset_fake_temporarily",
    "torch.utils._python_dispatch.TorchDispatchMode": "DispatchMode",
    "torch.utils._pytree.tree_leaves": "tree_leaves",
    "torch._C._nn._parse_to": "parse_to",
    "torch._C.DispatchKey.AutocastCPU": "autocast_override",
    "torch._C._ExcludeDispatchKeyGuard": "autocast_override",
    "torch._C.DispatchKeySet": "autocast_override",
    "torch._C._dispatch_get_all_op_names": "registered_ops",
    "torch._C._dispatch_has_kernel_for_dispatch_key": "registered_ops",
}


def resolve(path: str):
    """The object at a dotted path (importing modules as needed); AttributeError names the missing part."""
    import importlib

    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(parts[:i + 1]))
            except ImportError:
                raise AttributeError(f"this torch ({torch.__version__}) has no {'.'.join(parts[:i + 1])}, "
                                     f"which loha uses for {NAMES.get(path, path)}") from None
    return obj


def saved_tensors_hooks_on_top():
    """(pack, unpack) of the innermost active saved-tensors hooks, or None."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def any_autocast_enabled() -> bool:
    return torch._C._is_any_autocast_enabled()


def recipe_operands(node) -> tuple:
    """The tensors a SiluBackward0 (its input) or MulBackward0 (both operands) node saved."""
    if type(node).__name__ == "SiluBackward0":
        return (node._saved_self,)
    return node._saved_self, node._saved_other


def raise_dynamo_cache_limit(n: int):
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, n)


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def unset_fake_temporarily():
    from torch._subclasses.fake_tensor import unset_fake_temporarily as unset

    return unset()


def is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def DispatchMode():  # noqa: N802 - returns the class, used as a base class
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_leaves(tree) -> list:
    from torch.utils._pytree import tree_leaves as leaves

    return leaves(tree)


def parse_to(*args, **kwargs):
    """(device, dtype, non_blocking, memory_format) as ``Module.to`` reads its arguments."""
    return torch._C._nn._parse_to(*args, **kwargs)


def registered_ops(key: str) -> set[str]:
    """The aten ops (``name`` or ``name.overload``) with a kernel of their own for dispatch key ``key``."""
    return {q.removeprefix("aten::") for q in torch._C._dispatch_get_all_op_names()
            if q.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(q, key)}


def below_cpu_autocast():
    """A guard under which an op runs as if CPU autocast were off (for a replacement autocast kernel)."""
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))
