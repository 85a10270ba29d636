"""fp8 storage for a frozen model's Linear and Conv2d weights (``--base_precision fp8``): float8_e4m3fn in
memory, computed in the compute dtype.

``store_fp8(model)`` converts every frozen ``nn.Linear`` and ``nn.Conv2d`` weight in place (the Parameter
object stays, its data becomes fp8) and gives the module a forward that upcasts the weight for the op and
again in backward, so nothing of its compute-dtype copy is kept between them: the SDXL UNet's 4.78 GiB of
bf16 weights take 2.4 GiB. Norms, biases and embeddings keep their dtype (kohya's ``--fp8_base`` does the
same). An adapted layer's weight is upcast where the grouped build makes W + ΔW anyway, chunk by chunk
(``loha.grouped``), and in every other path of ``loha.layer`` (``usable``).
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import Conv2dOp, LinearOp, LoHaError, _cast

FP8 = torch.float8_e4m3fn


class _Fp8Function(torch.autograd.Function):
    """y = op(x, W upcast, b): saves nothing of size out×in (W stays fp8 in the module); backward upcasts again
    for the input gradient. The weight is frozen, so its gradient is never asked for."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.save_for_backward(weight)
        ctx.op, ctx.x_shape = op, x.shape
        return op.forward(x, weight.to(x.dtype), _cast(bias, x.dtype))

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        w = weight.to(g.dtype)
        if isinstance(ctx.op, LinearOp):
            grad_x = torch.matmul(g, w)
        else:
            op = ctx.op
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, op.stride, op.padding, op.dilation)
        return grad_x, None, None, None


def _forward(module, x, op):
    if torch.is_autocast_enabled(x.device.type):  # the dtype autocast would run the op in
        dev = x.device.type
        with torch.autocast(dev, enabled=False):
            return _Fp8Function.apply(x.to(torch.get_autocast_dtype(dev)), module.weight, module.bias, op)
    return _Fp8Function.apply(x, module.weight, module.bias, op)


class Fp8Linear(nn.Linear):
    """An nn.Linear whose frozen weight is stored in fp8."""

    def forward(self, x):
        return _forward(self, x, LinearOp())


class Fp8Conv2d(nn.Conv2d):
    """An nn.Conv2d (groups 1, zero padding) whose frozen weight is stored in fp8."""

    def forward(self, x):
        return _forward(self, x, Conv2dOp(self))


def store_fp8(model: nn.Module) -> int:
    """Store every frozen Linear and Conv2d weight of ``model`` in fp8 (in place); returns how many. A module
    with a trainable weight is refused: fp8 storage is for a frozen base."""
    count = 0
    for path, module in model.named_modules():
        kind = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d}.get(type(module))
        if kind is None:
            continue
        if module.weight.requires_grad:
            raise LoHaError(f"{path} has a trainable weight; fp8 storage is for a frozen base (freeze it first)")
        if kind is Fp8Conv2d and (module.groups != 1 or module.padding_mode != "zeros"
                                  or isinstance(module.padding, str)):
            continue  # a grouped or specially padded conv keeps its dtype
        module.weight.data = module.weight.data.to(FP8)
        module.__class__ = kind
        count += 1
    return count
