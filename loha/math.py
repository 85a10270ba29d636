"""The LoHa math, once: pure functions that every module type (Linear, Conv2d) and every forward mode calls.

    ΔW = (W1a·W1b) ⊙ (W2a·W2b) · scale              FedPara (arXiv 2108.06098), scale = alpha/rank
    Tucker (conv): Pk[p, c, h, w] = Σ_ij Tk[i, j, h, w]·Wkb[j, c]·Wka[i, p]    (LyCORIS / PEFT layout:
                   Wka (r, out), Wkb (r, in), Tk (r, r, kh, kw))

Every matrix here is *flat*: a weight (out, in, kh, kw) is handled as (out, in·kh·kw), the layout
LyCORIS's flattened conv factors use. Each function also takes a leading batch dimension (L layers of
one shape at once). ``coef`` is the per-output-row multiplier of ΔW: the scale, times the rank/module
dropout mask when training; a float or a tensor broadcastable to (…, out, 1). With G = ∂L/∂(W + ΔW):

    ∂P1 = (coef·G) ⊙ P2      ∂P2 = (coef·G) ⊙ P1      ∂Wka = ∂Pk·Wkbᵀ      ∂Wkb = Wkaᵀ·∂Pk
"""

from __future__ import annotations

import torch

from . import native


def half(wa, wb, t=None):
    """Pk = Wka·Wkb (flat), or the Tucker chain, flattened to (…, out, in·kh·kw)."""
    if t is None:
        return torch.matmul(wa, wb)
    p = torch.einsum("...ijhw,...jc,...ip->...pchw", t, wb, wa)
    return p.flatten(-3)


def half_grads(dp, wa, wb, t=None):
    """The gradients of ``half`` for the upstream gradient ``dp`` (flat): (∂Wka, ∂Wkb) or (∂Wka, ∂Wkb, ∂Tk)."""
    if t is None:
        return torch.matmul(dp, wb.transpose(-1, -2)), torch.matmul(wa.transpose(-1, -2), dp)
    dp = dp.unflatten(-1, (wb.shape[-1], *t.shape[-2:]))  # (…, out, in, kh, kw)
    side = torch.einsum("...ip,...pchw->...ichw", wa, dp)  # ∂P pulled back through Wka
    return (torch.einsum("...ijhw,...jc,...pchw->...ip", t, wb, dp),
            torch.einsum("...ijhw,...ichw->...jc", t, side),
            torch.einsum("...jc,...ichw->...ijhw", wb, side))


def products(factors):
    """(P1, P2) from the factors in file order: (w1a, w1b, w2a, w2b) or (w1a, w1b, w2a, w2b, t1, t2)."""
    w1a, w1b, w2a, w2b, t1, t2 = (*factors, None, None)[:6]
    return half(w1a, w1b, t1), half(w2a, w2b, t2)


def delta(factors, coef=1.0):
    """coef·ΔW, flat, in the factors' dtype."""
    p1, p2 = products(factors)
    return p1.mul_(p2).mul_(coef) if isinstance(coef, torch.Tensor) or coef != 1.0 else p1.mul_(p2)


def add_delta(weight, p1, p2, coef, dtype):
    """W + coef·P1⊙P2 summed in the wider of W's and the products' dtypes, then cast once to ``dtype``."""
    if isinstance(coef, torch.Tensor):
        p1 = p1 * coef
        coef = 1.0
    total = torch.addcmul(weight, p1, p2, value=coef)  # promotes a 16-bit W to the fp32 products
    return total if total.dtype == dtype else total.to(dtype)


def factor_grads(g, factors, p1, p2, coef=1.0):
    """The factor gradients, in file order, from G (flat, the products' dtype; modified in place)."""
    t1, t2 = (*factors[4:], None, None)[:2]
    if isinstance(coef, torch.Tensor) or coef != 1.0:
        g.mul_(coef)
    dp1 = g * p2
    dp2 = g.mul_(p1)
    first, second = half_grads(dp1, factors[0], factors[1], t1), half_grads(dp2, factors[2], factors[3], t2)
    grads = (*first[:2], *second[:2])
    return grads if t1 is None else (*grads, first[2], second[2])


def swapped(a, b, t=None):
    """Paired factors (the stacked storage: index 0 of dim -3 is half 1, index 1 half 2; of dim -5 for Tucker
    cores) with the halves exchanged: ``half`` of them gives (P2, P1), which builds the same W + ΔW (the
    product is symmetric) and is what ``pair_grads`` multiplies G by. Copies of the small factors only."""
    return (a.flip(-3), b.flip(-3)) if t is None else (a.flip(-3), b.flip(-3), t.flip(-5))


def pair_grads(g, p_swapped, a, b, t=None, coef=1.0):
    """The gradients of paired halves from G; ``p_swapped`` = (P2, P1) stacked on dim -3 (``half`` of
    ``swapped`` factors), overwritten: ∂P = coef·G ⊙ (P2, P1) in one in-place multiply, so one matmul serves
    both halves. Returns (∂A, ∂B) or (∂A, ∂B, ∂T)."""
    if isinstance(coef, torch.Tensor) or coef != 1.0:
        g = g * coef
    dp = p_swapped.mul_(g.unsqueeze(-3))
    if t is not None:
        return half_grads(dp, a, b, t)
    # ∂A as (B·∂Pᵀ)ᵀ: the same product as half_grads', 2-3× faster on CPU (MKL). Its transposed layout costs
    # one copy per stack when autograd accumulates it; per layer (factor_grads) it would cost two per layer.
    return torch.matmul(b, dp.transpose(-1, -2)).transpose(-1, -2), torch.matmul(a.transpose(-1, -2), dp)


def fused(a, b, t=None) -> bool:
    """Whether ``fused_weights`` / ``fused_grads`` serve these stacked factors (n, 2, out, r) / (n, 2, r, in):
    fp32 on CPU without a Tucker core, where the compiled kernels (``loha/native.cpp``) are available."""
    return t is None and native.serves(a, b)


def fused_weights(weights, a, b, coef=1.0, out=None):
    """W + coef·P1⊙P2 per layer, stacked (n, out, in·k), from n fp32 weights (any shape, read flat):
    ``add_delta`` of ``half``, computed in one pass that never writes the pair (``fused`` says where).
    ``coef`` as in ``pair_grads``; ``out``: a contiguous fp32 (n, out, in·k) tensor to write it into."""
    return native.build(weights, a, b, coef, out)


def fused_grads(gs, a, b, coef=1.0):
    """(∂A, ∂B) of paired factors from each layer's G (n tensors shaped like the weights, read flat; None
    for zero): ``pair_grads`` with the pair recomputed in registers instead of read from memory."""
    return native.grads(gs, a, b, coef)


def wide(t):
    """t in fp32, or as it is when already fp32/fp64: the precision merges, DoRA and fits are computed in."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def dora(merged, dora_scale, weight, multiplier=1.0):
    """DoRA on a merged weight V = W + ΔW (any shape): D(V) = V·m/‖V‖, with the norm per output row when
    ``dora_scale`` is (out, 1, …) (LyCORIS ``wd_on_output``) or per input column when it is (1, in, …).
    ``multiplier`` m gives W + m·(D(V) − W), so 0 is the base weight and 1 is D(V) (ComfyUI's strength)."""
    dims = tuple(d for d in range(merged.dim()) if dora_scale.shape[d] == 1)
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(merged.dtype).eps
    decomposed = merged * (dora_scale.to(merged.dtype) / norm)
    return decomposed if multiplier == 1.0 else weight + multiplier * (decomposed - weight)
