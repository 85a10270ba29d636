"""LoHa layers (Linear, Conv2d flattened and Tucker) against independent float64 math: gradients, forward
in every dtype and mode, dropout, merge."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loha
from loha.layer import Conv2dOp, LinearOp, _LoHaFunction

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MODES = ["grouped", "merged", "bypass"]


def reference_delta(factors, scale, shape):
    """ΔW in float64 with loops-free but differently ordered math: Tucker via tensordot, flat via a
    sum of rank-1 outer products."""
    d = [f.double() for f in factors]
    if len(d) == 6:
        w1a, w1b, w2a, w2b, t1, t2 = d
        half = lambda wa, wb, t: torch.tensordot(wa.T, torch.tensordot(t, wb, dims=([1], [0])), dims=([1], [0]))
        p1, p2 = half(w1a, w1b, t1), half(w2a, w2b, t2)  # (out, kh, kw, in)
        return (p1 * p2 * scale).permute(0, 3, 1, 2)
    w1a, w1b, w2a, w2b = d
    p1 = sum(torch.outer(w1a[:, k], w1b[k]) for k in range(w1a.shape[1]))
    p2 = sum(torch.outer(w2a[:, k], w2b[k]) for k in range(w2a.shape[1]))
    return (p1 * p2 * scale).reshape(shape)


def reference(layer, x, factors=None):
    """op(x, W + ΔW) + b in float64."""
    factors = layer.factors() if factors is None else factors
    base = layer.base_layer
    w = base.weight.double() + reference_delta(factors, layer.scale, base.weight.shape)
    b = None if base.bias is None else base.bias.double()
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x.double(), w, b, base.stride, base.padding, base.dilation)
    return F.linear(x.double(), w, b)


KINDS = {  # name: (base layer factory, LoHa options, input shape)
    "linear": (lambda: nn.Linear(12, 10), {}, (2, 5, 12)),
    "conv3x3": (lambda: nn.Conv2d(6, 5, 3, stride=2, padding=1, dilation=1), {}, (2, 6, 9, 9)),
    "conv3x2-dilated": (lambda: nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=2), {}, (1, 4, 8, 7)),
    "conv1x1": (lambda: nn.Conv2d(6, 5, 1), {}, (2, 6, 4, 4)),
    "conv3x3-tucker": (lambda: nn.Conv2d(6, 5, 3, padding=1), {"use_tucker": True}, (2, 6, 5, 5)),
}


def random_layer(kind="linear", rank=3, bias=True, dtype=torch.float32, device="cpu", alpha=None, **kw):
    make, options, _ = KINDS[kind]
    torch.manual_seed(0)
    base = make()
    if not bias:
        base.bias = None
    base = base.to(device=device, dtype=dtype)
    cls = loha.LoHaConv2d if isinstance(base, nn.Conv2d) else loha.LoHaLinear
    layer = cls(base, rank, alpha, **{**options, **kw})
    with torch.no_grad():
        for p in layer.factors():
            p.normal_(0, 0.5)
    model = nn.ModuleDict({"layer": layer})
    loha.stack(model)  # the default storage (what grouped mode needs); the others read views
    return layer


def kind_input(kind, dtype=torch.float32, device="cpu", requires_grad=False):
    torch.manual_seed(1)
    return torch.randn(KINDS[kind][2], device=device).to(dtype).requires_grad_(requires_grad)


def _gradcheck_cases():
    """Every kind with two complementary settings by default (each flag seen both ways); the rest of the
    cross product with -m slow."""
    default = {(True, True, False), (False, False, True)}
    return [pytest.param(kind, merged, bias, row_scale,
                         marks=() if (merged, bias, row_scale) in default else pytest.mark.slow)
            for kind in KINDS for merged in (True, False) for bias in (True, False) for row_scale in (False, True)]


@pytest.mark.parametrize(("kind", "merged", "bias", "row_scale"), _gradcheck_cases())
def test_gradcheck_float64(kind, merged, bias, row_scale):
    make, options, shape = KINDS[kind]
    torch.manual_seed(1)
    base = make().double()
    op = Conv2dOp(base) if isinstance(base, nn.Conv2d) else LinearOp()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = base.weight.detach().clone().requires_grad_()
    b = base.bias.detach().clone().requires_grad_() if bias else None
    shapes = loha.LoHaLayer.factor_shapes(w.shape, 2, options.get("use_tucker", False))
    factors = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    coef = (torch.rand(w.shape[0], 1, dtype=torch.float64) + 0.5) if row_scale else 0.7
    fn = lambda x, w, b, *f: _LoHaFunction.apply(x, w, b, coef, merged, op, *f)
    assert torch.autograd.gradcheck(fn, (x, w, b, *factors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 6e-2)])
def test_forward_matches_float64_reference(device, mode, kind, dtype, tol):
    layer = random_layer(kind, dtype=dtype, device=device, alpha=1.5, forward_mode=mode)
    x = kind_input(kind, dtype, device)
    y = layer(x)
    ref = reference(layer, x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert (y.double() - ref).abs().max() / ref.abs().max() < tol


@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 4, 12)])
def test_linear_takes_any_leading_shape(shape):
    layer = random_layer("linear")
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x).double(), reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_autocast_dtype(mode, kind, autocast_dtype):
    layer = random_layer(kind, forward_mode=mode)  # fp32 base, as frozen weights are with accelerate's autocast
    x = kind_input(kind)
    with torch.autocast("cpu", dtype=autocast_dtype):
        y = layer(x)
        plain = layer.base_layer(x)
    assert y.dtype == plain.dtype == autocast_dtype
    ref = reference(layer, x)
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 3e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_float64_autograd(mode, kind, bias):
    layer = random_layer(kind, bias=bias, forward_mode=mode, alpha=2.0)
    x = kind_input(kind, requires_grad=True)
    y = layer(x)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, *layer.factors())]
    (reference(layer, leaves[0], leaves[1:]) * g.double()).sum().backward()
    ours = [x.grad, *layer.factor_gradients()]
    for mine, ref in zip(ours, leaves):
        torch.testing.assert_close(mine.double(), ref.grad, rtol=1e-4, atol=1e-5)
    assert not layer.weight.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize("init", ["lycoris", "peft"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv3x3-tucker"])
def test_init_is_zero_delta_and_first_step_moves_output(init, kind):
    make, options, _ = KINDS[kind]
    torch.manual_seed(0)
    base = make()
    cls = loha.LoHaConv2d if isinstance(base, nn.Conv2d) else loha.LoHaLinear
    model = nn.ModuleDict({"layer": cls(base, 4, init=init, **options)})
    layer = model["layer"]
    x = kind_input(kind)
    before = base(x)
    assert torch.equal(layer(x), before)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    zero = [p for p in layer.factors() if not p.any()]
    assert len(zero) == 1  # exactly one factor starts at zero, so the rest carry gradient
    opt = torch.optim.AdamW(loha.trainable_parameters(model), lr=1e-2)
    layer(x).pow(2).mean().backward()
    opt.step()
    assert (layer(x) - before).abs().max() > 1e-6


def test_factor_layouts_match_lycoris_and_peft_names_and_shapes():
    """Flattened conv: w1a (out, r), w1b (r, in·kh·kw); Tucker: w1a (r, out), w1b (r, in), t1 (r, r, kh, kw);
    a 1×1 conv is always flattened (both peers do so)."""
    conv = nn.Conv2d(320, 640, 3, padding=1)
    flat = loha.LoHaConv2d(conv, 8)
    assert [tuple(p.shape) for p in flat.factors()] == [(640, 8), (8, 2880), (640, 8), (8, 2880)]
    tucker = loha.LoHaConv2d(conv, 8, use_tucker=True)
    assert tucker.factor_names == ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    assert [tuple(p.shape) for p in tucker.factors()] == [(8, 640), (8, 320)] * 2 + [(8, 8, 3, 3)] * 2
    pointwise = loha.LoHaConv2d(nn.Conv2d(320, 640, 1), 8, use_tucker=True)
    assert not pointwise.use_tucker and pointwise.hada_w1_b.shape == (8, 320)


def test_factors_are_fp32_on_base_device_and_delta_weight_is_fp32():
    layer = random_layer(dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in layer.factors())
    dw = layer.delta_weight()
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw.double(), reference_delta(layer.factors(), 1.0, (10, 12)), atol=1e-5, rtol=1e-5)
    meta = loha.LoHaLinear(nn.Linear(4, 3, device="meta"), 2)
    assert all(p.is_meta for p in meta.factors())


@pytest.mark.parametrize("mode", MODES)
def test_rank_dropout_matches_peft_semantics(mode):
    """Training: each output row of ΔW is kept with prob 1-p and kept rows are scaled by 1/mean(kept)."""
    layer = random_layer(rank_dropout=0.5, alpha=3, forward_mode=mode)
    x = torch.randn(6, 12)
    layer.train()
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    keep = (torch.rand(10) > 0.5).double()
    keep = keep / keep.mean()
    base = x.double() @ layer.weight.double().T + layer.bias.double()
    expected = base + (reference(layer, x) - base) * keep
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(layer, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_module_dropout_skips_the_whole_adapter_only_in_training(mode):
    layer = random_layer(module_dropout=0.5, forward_mode=mode)
    x = torch.randn(3, 12)
    base, full = layer.base_layer(x), layer.eval()(x)
    layer.train()
    torch.manual_seed(0)
    outs = [layer(x) for _ in range(40)]
    skipped = sum(torch.allclose(o, base, atol=1e-6) for o in outs)
    kept = sum(torch.allclose(o, full, atol=1e-5) for o in outs)
    assert skipped + kept == 40 and 8 <= skipped <= 32


def test_fedpara_rank_of_delta_w():
    """Prop. 1: random factors reach rank min(r², out, in); LoRA with the same parameter count reaches 2r.
    For a conv, the flattened ΔW (out, in·kh·kw) reaches min(r², out, in·kh·kw)."""
    torch.manual_seed(0)
    cases = [(2, nn.Linear(64, 64)), (4, nn.Linear(64, 64)), (4, nn.Linear(64, 40)), (8, nn.Linear(64, 48)),
             (4, nn.Conv2d(8, 32, 3)), (8, nn.Conv2d(8, 80, 3)), (8, nn.Conv2d(4, 80, 3)), (3, nn.Conv2d(16, 24, 1))]
    for r, base in cases:
        cls = loha.LoHaConv2d if isinstance(base, nn.Conv2d) else loha.LoHaLinear
        layer = cls(base.double(), r, dtype=torch.float64)
        with torch.no_grad():
            for p in layer.factors():
                p.normal_()
        out_f, flat_in = base.weight.shape[0], base.weight[0].numel()
        lora_a, lora_b = torch.randn(out_f, 2 * r), torch.randn(2 * r, flat_in)
        assert lora_a.numel() + lora_b.numel() == sum(p.numel() for p in layer.factors())
        flat = layer.delta_weight().reshape(out_f, -1)
        assert torch.linalg.matrix_rank(flat) == min(r * r, out_f, flat_in)
        assert torch.linalg.matrix_rank(lora_a @ lora_b) == min(2 * r, out_f, flat_in)


@pytest.mark.parametrize("kind", ["linear", "conv3x3-tucker"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_unmerge_exact_and_refuses_nonfinite(kind, dtype):
    layer = random_layer(kind, dtype=dtype)
    x = kind_input(kind, dtype)
    w0 = layer.weight.clone()
    unfused = layer(x)
    model = nn.ModuleDict({"to_q": layer})
    loha.merge(model)
    assert layer.merged and not torch.equal(layer.weight, w0)
    assert torch.allclose(layer(x).float(), unfused.float(), rtol=2e-2, atol=2e-2)
    loha.unmerge(model)
    assert torch.equal(layer.weight, w0)  # bit-exact restore
    with torch.no_grad():
        layer.factors()[0][0, 0] = float("inf")
    with pytest.raises(loha.LoHaError, match="NaN/Inf"):
        loha.merge(model)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_merged_forward_rounding_vs_bypass():
    """The precision trade-off, measured: with a bf16 base, the merged forward folds ΔW into W and so
    rounds it to W's precision step (grouped too, from bf16 products); bypass casts ΔW alone and keeps its
    relative precision. Gradients to the factors are identical for merged and bypass
    (test_gradients_match_float64_autograd)."""
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
        loha.stack(nn.ModuleList([layer]))
        layer.forward_mode = "grouped"  # a training build's weight, read out exactly through an identity input
        effective["grouped"] = layer(torch.eye(256, dtype=torch.bfloat16)).T.detach().double() - w_bf16.double()
        true_out = x.double() @ (w_bf16.double() + dw).T
        for mode in ("merged", "bypass", "grouped"):
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
    # This is why W + ΔW (merged, and grouped, which builds the same sum) is the default.
    for m in (1e-5, 1e-4, 1e-3):
        assert abs(output_err["merged", m] - output_err["bypass", m]) < 0.1 * output_err["bypass", m]
    # grouped builds the same sum from bf16 products (autocast's precision): it rounds like merged
    # (measured: 0.715, 0.177, 0.0201 against merged's 0.715, 0.177, 0.0196 at 640², bench.py --precision)
    for m in (1e-5, 1e-4, 1e-3):
        assert weight_err["grouped", m] <= 1.1 * weight_err["merged", m]
        assert abs(output_err["grouped", m] - output_err["bypass", m]) < 0.1 * output_err["bypass", m]


@pytest.mark.parametrize("mode", MODES)
def test_set_scale_zero_is_base_and_scale_is_linear(mode):
    layer = random_layer("conv3x3", forward_mode=mode)
    model = nn.ModuleDict({"to_q": layer})
    x = kind_input("conv3x3")
    base, full = layer.base_layer(x), layer(x)
    loha.set_scale(model, 0)
    assert torch.equal(layer(x), base)
    loha.set_scale(model, 2)
    assert torch.allclose(layer(x) - base, 2 * (full - base), atol=1e-5)


def test_conv_wrapper_reads_like_the_conv_it_wraps():
    layer = random_layer("conv3x3")
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride) == (6, 5, (3, 3), (2, 2))
    assert random_layer("linear").in_features == 12


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
    with pytest.raises(loha.LoHaError, match="wraps Linear"):
        loha.LoHaLinear(nn.Conv2d(4, 4, 1), 2)
    with pytest.raises(loha.LoHaError, match="groups=1"):
        loha.LoHaConv2d(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(loha.LoHaError, match="padding_mode"):
        loha.LoHaConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), 2)
