"""forward_mode="grouped": same-shape layers rebuilt together. Checked against float64 math and
against the per-layer "merged" mode, including every way a prebuilt weight could go stale."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import loha
from loha import layer as layer_module
from loha.layer import _Build, _GroupedRebuildFunction, _LayerGroup
from loha.tiny_sdxl import tiny_unet
from tests.helpers import randomize_adapters, unet_inputs


class Toy(nn.Module):
    """Three 12→10 layers (one group) and one 10→6 layer (its own group); ``skip`` leaves out b."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (nn.Linear(12, 10, dtype=dtype) for _ in range(3))
        self.d = nn.Linear(10, 6, bias=False, dtype=dtype)
        self.skip = False

    def forward(self, x, ckpt=None):
        h = self.a(x)
        if not self.skip:
            h = h + self.b(x)
        h = h + self.c(x)
        if ckpt is not None:
            return checkpoint(self.d, torch.tanh(h), use_reentrant=ckpt)
        return self.d(torch.tanh(h))


def toy_pair(dtype=torch.float32, **options):
    """The same adapted Toy twice: per-layer "merged" and "grouped"."""
    models = []
    for mode in ("merged", "grouped"):
        m = Toy(dtype)
        loha.inject(m, rank=3, target_modules=["a", "b", "c", "d"], forward_mode=mode, **options)
        randomize_adapters(m, seed=1)
        models.append(m)
    return models


def grads(model):
    return [p.grad.clone() for p in loha.trainable_parameters(model)]


def assert_close_lists(xs, ys, rtol=1e-5, atol=1e-6):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.fixture
def count_builds(monkeypatch):
    """How many grouped rebuilds ran, and of how many layers each."""
    sizes = []
    original = _LayerGroup.build

    def counting(self, requester, dtype):
        before = {id(m) for m in self.layers if m._prebuilt is not None}
        original(self, requester, dtype)
        sizes.append(sum(m._prebuilt is not None and id(m) not in before for m in self.layers) or 1)

    monkeypatch.setattr(_LayerGroup, "build", counting)
    return sizes


@pytest.mark.parametrize("per_layer_scale", [False, True])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("chunk", [1 << 16, 130])  # 130 elements: one 12×10 layer per chunk
@pytest.mark.parametrize("stacked", [False, True])  # 4L per-layer factors, or a LoHaStack's four (L, ·, ·)
def test_grouped_rebuild_gradcheck_float64(monkeypatch, per_layer_scale, rows, chunk, stacked):
    monkeypatch.setattr(layer_module, "CPU_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    weights = [torch.randn(10, 12, **f64) for _ in range(3)]
    shapes = [(10, 2), (2, 12), (10, 2), (2, 12)]
    if stacked:
        factors = [torch.randn(3, *s, **f64, requires_grad=True) for s in shapes]
        layer_factors = lambda i: [f[i] for f in factors]
    else:
        factors = [torch.randn(s, **f64, requires_grad=True) for _ in range(3) for s in shapes]
        layer_factors = lambda i: factors[4 * i:4 * i + 4]
    scale = torch.tensor([0.5, 1.0, 2.0], **f64)[:, None, None] if per_layer_scale else 0.7
    row_scale = torch.rand(3, 10, **f64) + 0.5 if rows else None
    fn = lambda *f: _GroupedRebuildFunction.apply(weights, scale, row_scale, torch.float64, _Build(), *f)
    assert torch.autograd.gradcheck(fn, factors)
    # and the value against the formula written per layer
    out = fn(*factors)
    for i in range(3):
        a1, b1, a2, b2 = layer_factors(i)
        s = scale[i] if per_layer_scale else scale
        r = row_scale[i][:, None] if rows else 1.0
        torch.testing.assert_close(out[i], weights[i] + s * ((a1 * r) @ b1) * (a2 @ b2))
    if stacked:  # a layer whose output is unused gets zeros in its slice (a stack cannot be partly None)
        (out[0].sum() + out[2].square().sum()).backward()
        assert all(f.grad is not None and not f.grad[1].any() and f.grad[0].any() for f in factors)


def test_grouped_matches_merged_over_training_steps(count_builds):
    """Three SGD steps, with gradient accumulation over two micro-batches per step: every output and
    every gradient equals the per-layer mode; and the grouped path really ran (2 groups per forward)."""
    merged, grouped = toy_pair()
    x = torch.randn(4, 5, 12)
    outs = {}
    for name, model in (("merged", merged), ("grouped", grouped)):
        opt = torch.optim.SGD(loha.trainable_parameters(model), lr=0.05)
        outs[name] = []
        for _ in range(3):
            for half in (x[:2], x[2:]):
                y = model(half)
                y.square().mean().backward()
                outs[name].append(y.detach())
            outs[name].append(grads(model))
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            outs[name].append(model(x))
    assert len(outs["merged"]) == len(outs["grouped"])
    for a, b in zip(outs["merged"], outs["grouped"]):
        assert_close_lists(a, b) if isinstance(a, list) else torch.testing.assert_close(a, b)
    assert count_builds == [3, 1] * 7  # 6 micro-batches + 1 no-grad forward, each: the trio and d


def test_grouped_tiny_unet_matches_merged_with_mixed_ranks_and_alphas(count_builds):
    unets = []
    for mode in ("merged", "grouped"):
        unet = tiny_unet(0)
        paths = [p for p, m in unet.named_modules() if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
        ranks = {p: 4 for p in paths[::3]}  # a second rank: separate groups
        alphas = {p: 2.0 for p in paths[1::5]}  # a different scale inside a group: per-layer scale tensor
        loha.inject(unet, rank=8, ranks=ranks, alphas=alphas, forward_mode=mode)
        loha.set_scale(unet, 0.8)
        randomize_adapters(unet, seed=2, std=0.1)
        unets.append(unet)
    inputs = unet_inputs()
    results = []
    for unet in unets:
        out = unet(**inputs).sample
        out.square().mean().backward()
        results.append([out.detach(), *grads(unet)])
    assert_close_lists(results[0], results[1], rtol=1e-4, atol=1e-6)
    assert len(count_builds) == 4 and sum(count_builds) == 136  # (64², 64×96) × (rank 8, rank 4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_grouped_under_gradient_checkpointing(reentrant):
    merged, grouped = toy_pair()
    x = torch.randn(3, 12)
    for model in (merged, grouped):
        model(x, ckpt=reentrant).sum().backward()
    assert_close_lists(grads(merged), grads(grouped))


def test_grouped_diffusers_gradient_checkpointing_matches_merged(count_builds):
    """diffusers' (non-reentrant) checkpointing recomputes each block in backward: the first recomputed
    layer of a group rebuilds the group once, and every later recomputation uses that build."""
    unets = []
    for mode in ("merged", "grouped"):
        unet = tiny_unet(0)
        unet.enable_gradient_checkpointing()
        loha.inject(unet, rank=4, forward_mode=mode)
        randomize_adapters(unet, seed=3, std=0.1)
        unet.train()
        unet(**unet_inputs()).sample.square().mean().backward()
        unets.append(unet)
    assert_close_lists(grads(unets[0]), grads(unets[1]), rtol=1e-4, atol=1e-6)
    assert len(count_builds) == 4  # 2 groups (64×64, 64×96): once in forward, once in backward


def test_skipped_layer_and_two_forwards_before_backward():
    """A layer left out of one forward keeps an unused prebuilt weight; the next forward must not
    reuse it after an optimizer step, and two forwards sharing one backward must both count."""
    merged, grouped = toy_pair()
    x = torch.randn(3, 12)
    for model in (merged, grouped):
        opt = torch.optim.SGD(loha.trainable_parameters(model), lr=0.1)
        model.skip = True
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        model.skip = False
        (model(x).sum() + model(2 * x).sum()).backward()
    assert_close_lists(grads(merged), grads(grouped))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), grouped(x))


def test_in_place_changes_between_forwards_are_seen():
    """No-grad forwards: a factor edited in place, set_scale, merge/unmerge, load_state_dict,
    train/eval and the grad mode all invalidate what was prebuilt."""
    merged, grouped = toy_pair(rank_dropout=0.0)
    x = torch.randn(2, 12)

    def same():
        with torch.no_grad():
            torch.testing.assert_close(merged(x), grouped(x))

    same()
    for model in (merged, grouped):
        model.skip = True
    same()  # leaves b's prebuilt weight unused in the grouped model
    for model in (merged, grouped):
        model.skip = False
        with torch.no_grad():
            model.b.hada_w2_a.mul_(3.0)
    same()
    for model in (merged, grouped):
        loha.set_scale(model, 0.3)
    same()
    for model in (merged, grouped):
        loha.merge(model)
        loha.unmerge(model)
    same()
    state = {k: v + 0.01 for k, v in loha.adapter_state_dict(merged).items()}
    for model in (merged, grouped):
        model.load_state_dict(state, strict=False)
    same()
    y = grouped(x)  # grad mode after no-grad forwards: the weights it uses must carry a graph
    y.sum().backward()
    assert all(p.grad is not None for p in loha.trainable_parameters(grouped))


def test_rank_dropout_masks_are_applied_per_layer(monkeypatch):
    """With fixed masks, grouped equals merged in training; in eval, dropout is off in both."""
    merged, grouped = toy_pair(rank_dropout=0.5)
    g = torch.Generator().manual_seed(0)
    masks = {name: (torch.rand(10 if name != "d" else 6, generator=g) > 0.5).float() * 2 for name in "abcd"}
    for model in (merged, grouped):
        for name in "abcd":
            layer = getattr(model, name)
            monkeypatch.setattr(layer, "_row_scale", lambda mask=masks[name]: mask)
    x = torch.randn(3, 12)
    ys = []
    for model in (merged, grouped):
        ys.append(model(x))
        ys[-1].sum().backward()
    torch.testing.assert_close(ys[0], ys[1])
    assert_close_lists(grads(merged), grads(grouped))


def test_bf16_autocast_and_inference_mode_match_merged():
    merged, grouped = toy_pair()
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = merged(x), grouped(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same fp32 sum, cast once: identical
    with torch.inference_mode():
        torch.testing.assert_close(merged(x), grouped(x))


def test_bf16_base_weights_group_in_fp32_and_match_merged():
    merged, grouped = toy_pair(dtype=torch.bfloat16)
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    ys = []
    for model in (merged, grouped):
        ys.append(model(x))
        ys[-1].float().sum().backward()
    torch.testing.assert_close(ys[0], ys[1], rtol=0, atol=0)
    assert_close_lists(grads(merged), grads(grouped), rtol=1e-2, atol=1e-3)


def test_deepcopy_after_a_training_forward_and_compile_falls_back():
    _, grouped = toy_pair()
    x = torch.randn(2, 12)
    y = grouped(x)  # leaves nothing prebuilt only after every layer used its weight; force one stale
    grouped.skip = True
    grouped(x)
    twin = copy.deepcopy(grouped)  # b's prebuilt weight is a non-leaf tensor: it must not be copied
    assert twin.b._prebuilt is None
    twin.skip = False
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)
    grouped.skip = False
    compiled = torch.compile(grouped, backend="eager")  # traced: the per-layer path, no Python caches
    torch.testing.assert_close(compiled(x), y)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in loha.trainable_parameters(grouped))


def test_trainable_base_weight_and_standalone_layer_fall_back_to_merged():
    torch.manual_seed(0)
    layer = loha.LoHaLinear(nn.Linear(12, 10), 3, forward_mode="grouped")
    randomize_adapters(nn.ModuleList([layer]))
    x = torch.randn(2, 12)
    y = layer(x)  # a group of one
    layer.base_layer.weight.requires_grad_(True)
    y2 = layer(x)
    y2.sum().backward()
    assert layer.base_layer.weight.grad is not None  # the per-layer Function gives W its gradient
    torch.testing.assert_close(y, y2)


def test_factor_changed_between_forward_and_backward_is_an_error():
    _, grouped = toy_pair()
    y = grouped(torch.randn(2, 12))
    with torch.no_grad():
        grouped.a.hada_w1_b.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_layer_whose_output_is_unused_gets_no_gradient():
    """As in the per-layer mode: None, not zeros, so AdamW does not decay it (SDXL never uses the last
    CLIP-L layer's output). Its group-mates still get theirs."""
    for model in toy_pair():
        x = torch.randn(2, 12)
        (model.a(x) + model.c(x)).sum().backward()
        model.b(x)  # run after the backward: its output never reaches a loss
        assert model.b.hada_w1_a.grad is None and model.a.hada_w1_a.grad is not None
        model.zero_grad(set_to_none=True)
        y = model.a(x) + 0 * model.c(x).detach()
        model.b(x)  # in the same graph as a, but unused
        y.sum().backward()
        assert model.b.hada_w1_a.grad is None and model.c.hada_w1_a.grad is None
        assert model.a.hada_w1_a.grad is not None


def test_base_weight_made_trainable_with_a_weight_still_prebuilt():
    """b's prebuilt weight is left unused by a skipped forward; then b's W becomes trainable. b must fall
    back to the per-layer path (W gets its gradient) instead of using or rebuilding a grouped weight."""
    merged, grouped = toy_pair()
    x = torch.randn(2, 12)
    grouped.skip = True
    grouped(x)
    assert grouped.b._prebuilt is not None
    ys = []
    for model in (merged, grouped):
        model.skip = False
        model.b.base_layer.weight.requires_grad_(True)
        ys.append(model(x))
        ys[-1].sum().backward()
    torch.testing.assert_close(ys[0], ys[1])
    torch.testing.assert_close(merged.b.base_layer.weight.grad, grouped.b.base_layer.weight.grad)
    assert grouped.b._prebuilt is None
