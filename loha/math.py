"""The LoHa math, once: pure functions that every module type (Linear, Conv2d) and every forward mode calls.

    ΔW = (W1a·W1b) ⊙ (W2a·W2b) · scale              FedPara (arXiv 2108.06098), scale = alpha/rank
    Tucker (conv): Pk[p, c, h, w] = Σ_ij Tk[i, j, h, w]·Wkb[j, c]·Wka[i, p]    (LyCORIS / PEFT layout:
                   Wka (r, out), Wkb (r, in), Tk (r, r, kh, kw))

Every matrix here is *flat*: a weight (out, in, kh, kw) is handled as (out, in·kh·kw), the layout
LyCORIS's flattened conv factors use. Each function also takes leading batch dimensions (L layers of
one shape at once). ``coef`` is the per-output-row multiplier of ΔW: the scale, times the rank/module
dropout mask when training; a float or a tensor broadcastable to (…, out, 1). With G = ∂L/∂(W + ΔW):

    ∂P1 = (coef·G) ⊙ P2      ∂P2 = (coef·G) ⊙ P1      ∂Wka = ∂Pk·Wkbᵀ      ∂Wkb = Wkaᵀ·∂Pk

The Khatri-Rao form (what the grouped engine runs): with Pk = Ak·Bk, row i of P1 ⊙ P2 is
Σ_kl A1[i,k]·A2[i,l]·(B1[k,:] ⊙ B2[l,:]), so ΔW = K·R with K = A1 ⊙row A2 (out, r²) and R = B1 ⊙col B2
(r², in): W + ΔW is one GEMM with W as its addend, and neither P1 nor P2 is ever written. Backward needs
only M = G·Rᵀ (out, r²) and N = Kᵀ·G (r², in):

    ∂A1[i,k] = Σ_l M[i,kl]·A2[i,l]     ∂A2[i,l] = Σ_k M[i,kl]·A1[i,k]      (∂B from N likewise)
"""

from __future__ import annotations

import torch


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


# ------------------------------------------------------------------------------ the Khatri-Rao form
def matrices(a, b, t=None):
    """Paired factors (stacked storage: dim -3 is the half, 0 or 1; dim -5 for Tucker cores) as the matrices
    (A, B) with Pk = Ak·Bk: A (…, 2, out, r), B (…, 2, r, in·k). Tucker: A = Wkaᵀ, Bk = Tk contracted with Wkb."""
    if t is None:
        return a, b
    right = torch.einsum("...ijhw,...jc->...ichw", t, b)
    return a.transpose(-1, -2), right.flatten(-3)


def matrices_grads(da, db, a, b, t=None):
    """(∂a, ∂b) or (∂a, ∂b, ∂t) from the gradients of ``matrices``' A and B."""
    if t is None:
        return da, db
    db = db.unflatten(-1, (b.shape[-1], *t.shape[-2:]))  # (…, r, in, kh, kw)
    return (da.transpose(-1, -2), torch.einsum("...ijhw,...ichw->...jc", t, db),
            torch.einsum("...ichw,...jc->...ijhw", db, b))


def khatri_rao(a, b, coef=1.0, dtype=None):
    """(K, R) with ΔW = K·R, from paired matrices A (…, 2, out, r), B (…, 2, r, in): K (…, out, r²) is
    coef·(A1 ⊙row A2), R (…, r², in) is B1 ⊙col B2; each product computed in the matrices' precision and
    written straight into ``dtype`` (default: theirs), rounded once."""
    dtype = dtype or a.dtype
    k = a.new_empty((*a.shape[:-3], a.shape[-2], a.shape[-1], a.shape[-1]), dtype=dtype)
    r = b.new_empty((*b.shape[:-3], b.shape[-2], b.shape[-2], b.shape[-1]), dtype=dtype)
    torch.mul(a[..., 0, :, :, None], a[..., 1, :, None, :], out=k)
    torch.mul(b[..., 0, :, None, :], b[..., 1, None, :, :], out=r)
    if isinstance(coef, torch.Tensor) or coef != 1.0:
        k.mul_(coef.unsqueeze(-1) if isinstance(coef, torch.Tensor) else coef)
    return k.flatten(-2), r.flatten(-3, -2)


def build(weights, k, r):
    """W + K·R for stacked weights (n, out, in·k), in their dtype: written into ``weights`` (a scratch stack)."""
    return weights.baddbmm_(k, r)


def khatri_rao_mn(g, k, r):
    """(M, N) = (G·Rᵀ, Kᵀ·G): ∂L/∂K and ∂L/∂R from G (…, out, in), batched or for one layer."""
    return torch.matmul(g, r.transpose(-1, -2)), torch.matmul(k.transpose(-1, -2), g)


def khatri_rao_grads(m, n, a, b, coef=1.0, dtype=torch.float32):
    """(∂A, ∂B) in ``dtype`` from (M, N) (``khatri_rao_mn``; n layers, (n, out, r²) and (n, r², in)) for the
    paired matrices A (n, 2, out, r), B (n, 2, r, in) whose ``khatri_rao`` took ``coef``. Sums over r on
    tensors of r² × (out or in) per layer, each written into its half of the result."""
    if isinstance(coef, torch.Tensor) or coef != 1.0:
        m = m * coef  # K carries coef, so ∂(A1 ⊙row A2) = coef·∂K
    m = m.unflatten(-1, (a.shape[-1], a.shape[-1]))  # (n, out, k, l)
    n = n.unflatten(-2, (b.shape[-2], b.shape[-2]))  # (n, k, l, in)
    a1, a2, b1, b2 = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    da, db = a.new_empty(a.shape, dtype=dtype), b.new_empty(b.shape, dtype=dtype)
    torch.sum(m * a2[:, :, None, :], -1, dtype=dtype, out=da[:, 0])
    torch.sum(m * a1[:, :, :, None], -2, dtype=dtype, out=da[:, 1])
    torch.sum(n * b2[:, None, :, :], 2, dtype=dtype, out=db[:, 0])
    torch.sum(n * b1[:, :, None, :], 1, dtype=dtype, out=db[:, 1])
    return da, db


def delta_norms(a, b, t=None):
    """‖ΔW‖_F of each layer of stacked paired factors (n, 2, …), without building ΔW: with ΔW = K·R (the
    Khatri-Rao form), ‖K·R‖² = Σ (KᵀK) ⊙ (R·Rᵀ), two r²×r² Gram matrices per layer. In the factors' precision
    (fp32 or wider)."""
    k, r = khatri_rao(*matrices(a, b, t))
    gram_k = torch.matmul(k.transpose(-1, -2), k)
    gram_r = torch.matmul(r, r.transpose(-1, -2))
    return (gram_k * gram_r).sum(dim=(-1, -2)).clamp_min(0).sqrt()


def wide(t):
    """t in fp32, or as it is when already fp32/fp64: the precision merges, DoRA and fits are computed in (16-bit
    and fp8 storage are widened)."""
    return t.float() if t.is_floating_point() and t.dtype.itemsize < 4 else t


def dora(merged, dora_scale, weight, multiplier=1.0):
    """DoRA on a merged weight V = W + ΔW (any shape): D(V) = V·m/‖V‖, with the norm per output row when
    ``dora_scale`` is (out, 1, …) (LyCORIS ``wd_on_output``) or per input column when it is (1, in, …).
    ``multiplier`` m gives W + m·(D(V) − W), so 0 is the base weight and 1 is D(V) (ComfyUI's strength)."""
    dims = tuple(d for d in range(merged.dim()) if dora_scale.shape[d] == 1)
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(merged.dtype).eps
    decomposed = merged * (dora_scale.to(merged.dtype) / norm)
    return decomposed if multiplier == 1.0 else weight + multiplier * (decomposed - weight)
