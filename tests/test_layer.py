"""LoHaLinear against independent float64 math: gradients, forward in every dtype, dropout, merge."""

import pytest
import torch
from torch import nn

import loha
from loha.layer import _LoHaLinearFunction

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(x, w, b, w1a, w1b, w2a, w2b, scale):
    """x·(W + s(A1B1)⊙(A2B2))ᵀ + b in float64, written as plainly as possible."""
    d = lambda t: None if t is None else t.double()
    dw = (d(w1a) @ d(w1b)) * (d(w2a) @ d(w2b)) * scale
    y = d(x) @ (d(w) + dw).T
    return y if b is None else y + d(b)


def random_layer(in_f=12, out_f=10, rank=3, bias=True, dtype=torch.float32, device="cpu", alpha=None, **kw):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias).to(device=device, dtype=dtype)
    layer = loha.LoHaLinear(base, rank, alpha, **kw)
    with torch.no_grad():
        for p in layer.factors():
            p.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("row_scale", [False, True])
def test_gradcheck_float64(merged, bias, row_scale):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if bias else None
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(5, 2), (2, 6), (5, 2), (2, 6)]]
    rows = torch.rand(5, dtype=torch.float64) + 0.5 if row_scale else None
    fn = lambda x, w, b, *f: _LoHaLinearFunction.apply(x, w, b, *f, 0.7, rows, merged)
    assert torch.autograd.gradcheck(fn, (x, w, b, *factors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["merged", "bypass", "grouped"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12), (2, 3, 4, 12)])
def test_forward_matches_float64_reference(device, mode, dtype, tol, shape):
    layer = random_layer(dtype=dtype, device=device, alpha=1.5, forward_mode=mode)
    x = torch.randn(shape, device=device).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], 10)
    ref = reference(x, layer.weight, layer.bias, *layer.factors(), 1.5 / 3)
    err = (y.double() - ref).abs().max() / ref.abs().max()
    assert err < tol


@pytest.mark.parametrize("mode", ["merged", "bypass", "grouped"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_autocast_dtype(mode, autocast_dtype):
    layer = random_layer(forward_mode=mode)  # fp32 base, as frozen weights are with accelerate's autocast
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = layer(x)
        plain = layer.base_layer(x)
    assert y.dtype == plain.dtype == autocast_dtype
    ref = reference(x, layer.weight, layer.bias, *layer.factors(), 1.0)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 3e-2


@pytest.mark.parametrize("mode", ["merged", "bypass", "grouped"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_float64_autograd(mode, bias):
    layer = random_layer(bias=bias, forward_mode=mode, alpha=2.0)
    x = torch.randn(3, 4, 12, requires_grad=True)
    g = torch.randn(3, 4, 10)
    (layer(x) * g).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, *layer.factors())]
    (reference(leaves[0], layer.weight, layer.bias, *leaves[1:], 2.0 / 3) * g.double()).sum().backward()
    for ours, ref in zip([x.grad] + [p.grad for p in layer.factors()], leaves):
        assert torch.allclose(ours.double(), ref.grad, rtol=1e-4, atol=1e-5)
    assert not layer.weight.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize("init", ["lycoris", "peft"])
def test_init_is_zero_delta_and_first_step_moves_output(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = loha.LoHaLinear(base, 4, init=init)
    x = torch.randn(5, 16)
    before = base(x)
    assert torch.equal(layer(x), before)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    zero = [p for p in layer.factors() if not p.any()]
    assert len(zero) == 1  # exactly one factor starts at zero, so the rest carry gradient
    opt = torch.optim.AdamW(loha.trainable_parameters(nn.ModuleList([layer])), lr=1e-2)
    layer(x).pow(2).mean().backward()
    opt.step()
    assert (layer(x) - before).abs().max() > 1e-6


def test_factors_are_fp32_on_base_device_and_delta_weight_is_fp32():
    layer = random_layer(dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in layer.factors())
    dw = layer.delta_weight()
    assert dw.dtype == torch.float32
    ref = reference(torch.eye(12), torch.zeros(10, 12), None, *layer.factors(), 1.0).T
    assert torch.allclose(dw.double(), ref, atol=1e-5)
    meta = loha.LoHaLinear(nn.Linear(4, 3, device="meta"), 2)
    assert all(p.is_meta for p in meta.factors())


def test_rank_dropout_matches_peft_semantics():
    """Training: each output row of ΔW is kept with prob 1-p and kept rows are scaled by 1/mean(kept)."""
    layer = random_layer(rank_dropout=0.5, alpha=3)
    x = torch.randn(6, 12)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    keep = (torch.rand(10) > 0.5).float()
    keep = keep / keep.mean()
    ref = reference(x, layer.weight, None, *layer.factors(), 1.0)
    dw_rows = ref - (x.double() @ layer.weight.double().T)
    expected = x.double() @ layer.weight.double().T + dw_rows * keep.double() + layer.bias.double()
    assert torch.allclose(y.double(), expected, atol=1e-4)
    layer.eval()
    assert torch.allclose(layer(x).double(), ref + layer.bias.double(), atol=1e-4)


def test_module_dropout_skips_the_whole_adapter_only_in_training():
    layer = random_layer(module_dropout=0.5)
    x = torch.randn(3, 12)
    base, full = layer.base_layer(x), layer.eval()(x)
    layer.train()
    torch.manual_seed(0)
    outs = [layer(x) for _ in range(40)]
    skipped = sum(torch.allclose(o, base, atol=1e-6) for o in outs)
    kept = sum(torch.allclose(o, full, atol=1e-5) for o in outs)
    assert skipped + kept == 40 and 8 <= skipped <= 32


def test_fedpara_rank_of_delta_w():
    """Prop. 1: random factors reach rank min(r², out, in); LoRA with the same parameter count reaches 2r."""
    torch.manual_seed(0)
    for r, (out_f, in_f) in [(2, (64, 64)), (4, (64, 64)), (4, (40, 64)), (8, (48, 64))]:
        layer = loha.LoHaLinear(nn.Linear(in_f, out_f).double(), r, dtype=torch.float64)
        with torch.no_grad():
            for p in layer.factors():
                p.normal_()
        lora_a, lora_b = torch.randn(out_f, 2 * r), torch.randn(2 * r, in_f)
        assert lora_a.numel() + lora_b.numel() == sum(p.numel() for p in layer.factors())
        assert torch.linalg.matrix_rank(layer.delta_weight().double()) == min(r * r, out_f, in_f)
        assert torch.linalg.matrix_rank(lora_a @ lora_b) == 2 * r


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_unmerge_exact_and_refuses_nonfinite(dtype):
    layer = random_layer(dtype=dtype)
    x = torch.randn(4, 12).to(dtype)
    w0 = layer.weight.clone()
    unfused = layer(x)
    model = nn.ModuleDict({"to_q": layer})
    loha.merge(model)
    assert layer.merged and not torch.equal(layer.weight, w0)
    assert torch.allclose(layer(x).float(), unfused.float(), rtol=2e-2, atol=2e-2)
    loha.unmerge(model)
    assert torch.equal(layer.weight, w0)  # bit-exact restore
    with torch.no_grad():
        layer.hada_w1_a[0, 0] = float("inf")
    with pytest.raises(loha.LoHaError, match="NaN/Inf"):
        loha.merge(model)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_merged_forward_rounding_vs_bypass():
    """The precision trade-off, measured: with a bf16 base, the merged forward folds ΔW into W and so
    rounds it to W's precision step; bypass casts ΔW alone and keeps its relative precision. Gradients
    to the factors are identical either way (test_gradients_match_float64_autograd)."""
    torch.manual_seed(0)
    w = torch.randn(256, 256) * 0.02  # a typical attention weight scale
    w_bf16 = w.to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    weight_err, output_err = {}, {}
    for magnitude in (1e-5, 1e-4, 1e-3):
        base = nn.Linear(256, 256, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            base.weight.copy_(w_bf16)
        layer = loha.LoHaLinear(base, 4)
        with torch.no_grad():
            for p in layer.factors():
                p.normal_()
            layer.hada_w1_a.mul_(magnitude / layer.delta_weight().abs().mean())
        dw = layer.delta_weight().double()
        effective = {
            "merged": (w_bf16.double() + dw).to(torch.bfloat16).double() - w_bf16.double(),
            "bypass": dw.to(torch.bfloat16).double(),
        }
        true_out = x.double() @ (w_bf16.double() + dw).T
        for mode in ("merged", "bypass"):
            layer.forward_mode = mode
            weight_err[mode, magnitude] = ((effective[mode] - dw).norm() / dw.norm()).item()
            output_err[mode, magnitude] = (
                (layer(x).double() - true_out).norm() / (true_out - x.double() @ w_bf16.double().T).norm()
            ).item()
    # merged: ~1 at 1e-5, ~0.1 at 1e-4, ~0.01 at 1e-3 (DESIGN.md's 1.2 / 0.15 / 0.015); bypass: bf16's 2^-9
    assert weight_err["merged", 1e-5] > 0.5 and 0.03 < weight_err["merged", 1e-4] < 0.5
    assert weight_err["merged", 1e-3] < 0.05
    assert all(weight_err["bypass", m] < 0.005 for m in (1e-5, 1e-4, 1e-3))
    # ...but the bf16 output rounds the small change in y just as coarsely, so in what the next layer
    # sees the two strategies are equally precise (measured: 1.97 vs 2.01, 0.25 vs 0.26, 0.025 vs 0.025).
    # This is why "merged", the faster one, is the default.
    for m in (1e-5, 1e-4, 1e-3):
        assert abs(output_err["merged", m] - output_err["bypass", m]) < 0.1 * output_err["bypass", m]


def test_set_scale_zero_is_base_and_scale_is_linear():
    layer = random_layer()
    model = nn.ModuleDict({"to_q": layer})
    x = torch.randn(4, 12)
    base, full = layer.base_layer(x), layer(x)
    loha.set_scale(model, 0)
    assert torch.equal(layer(x), base)
    loha.set_scale(model, 2)
    assert torch.allclose(layer(x) - base, 2 * (full - base), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be an integer"),
        (dict(rank=2.5), "rank must be an integer"),
        (dict(rank=2, alpha=float("nan")), "alpha must be"),
        (dict(rank=2, alpha=0), "alpha must be"),
        (dict(rank=2, rank_dropout=1.0), "rank_dropout"),
        (dict(rank=2, module_dropout=-0.1), "module_dropout"),
        (dict(rank=2, init="xavier"), "init must be"),
        (dict(rank=2, forward_mode="fused"), "forward_mode"),
    ],
)
def test_bad_arguments_raise_loha_error(kwargs, match):
    with pytest.raises(loha.LoHaError, match=match):
        loha.LoHaLinear(nn.Linear(4, 4), **kwargs)
    with pytest.raises(loha.LoHaError, match="wraps nn.Linear"):
        loha.LoHaLinear(nn.Conv2d(4, 4, 1), 2)
