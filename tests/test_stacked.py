"""loha.stack: the factors of same-shape adapters stored as four stacked Parameters per shape. Checked
against the per-layer storage (values, gradients, optimizer steps, files); the float64 gradcheck of the
rebuild fed stacked Parameters is tests/test_grouped.py::test_grouped_rebuild_gradcheck_float64."""

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import loha
from loha.layer import FACTOR_NAMES, _GroupedRebuildFunction
from loha.tiny_sdxl import tiny_unet
from tests.helpers import randomize_adapters, unet_inputs
from tests.test_grouped import Toy, assert_close_lists


def adapted_unet(mode="merged", seed=2, checkpointing=False):
    """The tiny UNet with mixed ranks (two stacks per shape) and mixed alphas, randomized factors."""
    unet = tiny_unet(0)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    paths = [p for p, m in unet.named_modules() if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    loha.inject(unet, rank=8, ranks={p: 4 for p in paths[::3]}, alphas={p: 2.0 for p in paths[1::5]},
                forward_mode=mode)
    randomize_adapters(unet, seed=seed, std=0.1)
    return unet.train()


def layer_grads(model):
    """Every layer's four factor gradients, whatever the storage (a stacked grad's slice)."""
    out = []
    for layer in loha.adapter_modules(model).values():
        if layer._stack is None:
            out += [f.grad for f in layer.factors()]
        else:
            stack, i = layer._stack
            out += [getattr(stack, name).grad[i] for name in FACTOR_NAMES]
    return out


@pytest.fixture
def rebuild_inputs(monkeypatch):
    """For every grouped rebuild: how many factor tensors it was given (4 = a stack's, 4L = per layer)."""
    counts = []
    original = _GroupedRebuildFunction.apply

    def recording(*args):
        counts.append(len(args) - 5)
        return original(*args)

    monkeypatch.setattr(_GroupedRebuildFunction, "apply", recording)
    return counts


def test_stack_keeps_every_value_and_writes_through():
    unet = adapted_unet()
    before = {k: v.clone() for k, v in loha.adapter_state_dict(unet).items()}
    count = loha.count_parameters(unet)
    expected = {}  # (64², 64×96) × (rank 8, rank 4): four stacks, 136 layers in all
    for m in loha.adapter_modules(unet).values():
        key = (tuple(m.base_layer.weight.shape), m.rank)
        expected[key] = expected.get(key, 0) + 1
    stacks = loha.stack(unet)
    assert len(expected) == 4 and sum(expected.values()) == 136
    assert sorted(len(s.layers) for s in stacks) == sorted(expected.values())
    for s in stacks:
        key = (tuple(s.layers[0].base_layer.weight.shape), s.layers[0].rank)
        assert all((tuple(m.base_layer.weight.shape), m.rank) == key for m in s.layers)
        (out_f, in_f), rank = key
        assert s.hada_w1_a.shape == (expected[key], out_f, rank) and s.hada_w1_b.shape == (expected[key], rank, in_f)
    assert len(loha.trainable_parameters(unet)) == 16 and loha.count_parameters(unet) == count
    assert {id(p) for p in loha.trainable_parameters(unet)} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert not any(".to_" in n and "hada" in n for n, _ in unet.named_parameters())  # no per-layer copies left
    after = loha.adapter_state_dict(unet)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    layer = loha.adapter_modules(unet)[path]
    stack, i = layer._stack
    neighbour = layer_path(unet, stack.layers[i - 1])
    with torch.no_grad():
        layer.hada_w2_b.mul_(3.0)  # an in-place edit of a layer's factor lands in its slice, and only there
    torch.testing.assert_close(stack.hada_w2_b[i], 3 * before[f"{path}.hada_w2_b"])
    assert torch.equal(stack.hada_w2_b[i - 1], before[f"{neighbour}.hada_w2_b"])
    after = loha.adapter_state_dict(unet)
    loha.unstack(unet)
    assert not hasattr(unet, "loha_stacks") and len(loha.trainable_parameters(unet)) == 4 * 136
    again = loha.adapter_state_dict(unet)
    assert all(torch.equal(again[k], after[k]) for k in after)
    assert all(isinstance(f, nn.Parameter) for m in loha.adapter_modules(unet).values() for f in m.factors())


def layer_path(model, layer):
    return next(p for p, m in loha.adapter_modules(model).items() if m is layer)


def test_stacked_grouped_trains_like_per_layer_merged(rebuild_inputs):
    """AdamW (with weight decay) over three steps of two accumulated micro-batches: the stacked grouped
    UNet ends where the per-layer merged one does, and every rebuild took a stack's four tensors."""
    unets = [adapted_unet("merged"), adapted_unet("grouped")]
    loha.set_scale(unets[1], 0.8)
    loha.set_scale(unets[0], 0.8)
    loha.stack(unets[1])
    results = []
    for unet in unets:
        opt = torch.optim.AdamW(loha.trainable_parameters(unet), lr=1e-2, weight_decay=0.1)
        trace = []
        for step in range(3):
            for seed in (step, step + 10):
                out = unet(**unet_inputs(seed=seed)).sample
                out.square().mean().backward()
                trace.append(out.detach())
            trace += [g.clone() for g in layer_grads(unet)]
            opt.step()
            opt.zero_grad()
        trace += list(loha.adapter_state_dict(unet).values())
        results.append(trace)
    assert_close_lists(results[0], results[1], rtol=1e-4)
    assert rebuild_inputs == [4] * 4 * 6  # 4 stacks, 6 forwards, never 4L per-layer factors


def test_stacked_views_in_per_layer_modes_and_partial_groups(rebuild_inputs):
    """Stacked storage also works where the factors are used per layer (merged, bypass, one layer of a
    stack switched to merged, torch.compile): gradients reach the stack through the views."""
    reference = adapted_unet("merged")
    reference(**unet_inputs()).sample.square().mean().backward()
    expected = layer_grads(reference)
    for mode in ("merged", "bypass", "grouped"):
        unet = adapted_unet(mode)
        loha.stack(unet)
        if mode == "grouped":
            odd = loha.adapter_modules(unet)["mid_block.attentions.0.transformer_blocks.0.attn2.to_q"]
            odd.forward_mode = "merged"
        unet(**unet_inputs()).sample.square().mean().backward()
        assert_close_lists(expected, layer_grads(unet), rtol=1e-4)
    # the odd layer's stack-mates were rebuilt from per-layer views (a partial group); the rest whole
    assert sorted(rebuild_inputs) == sorted([4, 4, 4, 4 * (len(odd._stack[0].layers) - 1)])


def test_stacked_toy_under_compile_and_checkpointing():
    torch.manual_seed(0)
    models = []
    for stacked in (False, True):
        m = Toy()
        loha.inject(m, rank=3, target_modules=["a", "b", "c", "d"], forward_mode="grouped")
        randomize_adapters(m, seed=1)
        if stacked:
            loha.stack(m)
        models.append(m)
    x = torch.randn(3, 12)
    models[0](x).sum().backward()
    compiled = torch.compile(models[1], backend="aot_eager")  # grouped runs as merged there, on the views
    compiled(x).sum().backward()
    assert_close_lists(layer_grads(models[0]), layer_grads(models[1]), rtol=1e-4)
    for m in models:
        for p in loha.trainable_parameters(m):
            p.grad = None
        m(x, ckpt=False).sum().backward()  # non-reentrant checkpointing around the last layer
    assert_close_lists(layer_grads(models[0]), layer_grads(models[1]), rtol=1e-4)


def test_stacked_diffusers_gradient_checkpointing_matches_merged():
    unets = [adapted_unet("merged", checkpointing=True), adapted_unet("grouped", checkpointing=True)]
    loha.stack(unets[1])
    for unet in unets:
        unet(**unet_inputs()).sample.square().mean().backward()
    assert_close_lists(layer_grads(unets[0]), layer_grads(unets[1]), rtol=1e-4)


def read(path):
    """(tensors, metadata) of a safetensors file (its metadata's byte order is not stable)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_files_and_loading_are_the_same_stacked(tmp_path):
    """A stacked model saves the same tensors and metadata as before stacking, and loading into it writes through its
    views: the next forward (no stale grouped weight) equals a per-layer model loaded from the same file."""
    unet = adapted_unet("grouped")
    loha.save(unet, tmp_path / "before")
    loha.export_kohya(unet, tmp_path / "before.safetensors")
    loha.stack(unet)
    loha.save(unet, tmp_path / "after")
    loha.export_kohya(unet, tmp_path / "after.safetensors")
    for a, b in (("before/adapter_model.safetensors", "after/adapter_model.safetensors"),
                 ("before.safetensors", "after.safetensors")):
        (ta, ma), (tb, mb) = read(tmp_path / a), read(tmp_path / b)
        assert ma == mb and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) and ta[k].is_contiguous() for k in ta)
    other = adapted_unet("merged", seed=7)
    loha.save(other, tmp_path / "other")
    inputs = unet_inputs()
    unet(**inputs).sample.sum().backward()  # a training step's grouped rebuild from the old values
    loha.load(unet, tmp_path / "other")
    expected = other(**inputs).sample
    torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-4, atol=1e-6)  # rebuilt from the new
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=1e-4, atol=1e-6)


def test_deepcopy_and_dtype_changes_follow_the_stacks():
    unet = adapted_unet("grouped")
    loha.stack(unet)
    twin = copy.deepcopy(unet)
    for layer in loha.adapter_modules(twin).values():
        assert any(layer._stack[0] is s for s in twin.loha_stacks)  # the copy's layers use the copy's stacks
    with torch.no_grad():
        for p in loha.trainable_parameters(twin):
            p.zero_()
    assert all(p.any() for p in loha.trainable_parameters(unet))
    twin.double()  # module conversions replace the stacks' tensors; the layers' views follow
    layer = next(iter(loha.adapter_modules(twin).values()))
    assert layer.hada_w1_a.dtype == torch.float64 and not layer.hada_w1_a.any()
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in unet_inputs().items()}
    inputs["added_cond_kwargs"] = {k: v.double() for k, v in inputs["added_cond_kwargs"].items()}
    twin(**inputs).sample.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in loha.trainable_parameters(twin))


def test_stack_errors_and_eject():
    unet = adapted_unet()
    with pytest.raises(loha.LoHaError, match="not stacked"):
        loha.unstack(unet)
    loha.stack(unet)
    with pytest.raises(loha.LoHaError, match="already stacked"):
        loha.stack(unet)
    with pytest.raises(loha.LoHaError, match="no LoHa adapters"):
        loha.stack(tiny_unet(0))
    loha.eject(unet)
    assert not hasattr(unet, "loha_stacks") and not loha.adapter_modules(unet)
    assert isinstance(unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_q"), nn.Linear)
    mixed = adapted_unet()
    next(iter(loha.adapter_modules(mixed).values())).hada_w1_a.requires_grad_(False)
    with pytest.raises(loha.LoHaError, match="same requires_grad"):
        loha.stack(mixed)
    assert not hasattr(mixed, "loha_stacks") and len(loha.trainable_parameters(mixed)) == 4 * 136  # untouched


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_stacked_equals_unstacked_grouped_under_bf16_autocast(base_dtype):
    """Mixed precision as the trainer runs it (fp32 factors, bf16 autocast, a bf16 or fp32 base): the
    stack's rebuild computes the same numbers as the per-layer grouped one, bit for bit."""
    models = []
    for stacked in (False, True):
        torch.manual_seed(0)
        m = Toy(base_dtype)
        loha.inject(m, rank=3, target_modules=["a", "b", "c", "d"], forward_mode="grouped", rank_dropout=0.3)
        randomize_adapters(m, seed=1)
        if stacked:
            loha.stack(m)
        models.append(m)
    outs = []
    for m in models:
        torch.manual_seed(5)  # the same rank-dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(torch.randn(4, 12, dtype=base_dtype, generator=torch.Generator().manual_seed(3)))
        y.float().square().sum().backward()
        outs.append(y)
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(layer_grads(models[0]), layer_grads(models[1])))


@pytest.mark.parametrize("mode", ["merged", "bypass", "grouped"])
@pytest.mark.parametrize("stacked", [False, True])
def test_no_graph_breaks_under_compile(mode, stacked):
    """The layer compiles whole in every mode and storage (fullgraph=True raises on any graph break),
    and the compiled gradients equal eager ones (aot_eager: the graph, without inductor's CPU codegen)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = Toy()
        loha.inject(m, rank=3, target_modules=["a", "b", "c", "d"], forward_mode=mode)
        randomize_adapters(m, seed=1)
        if stacked:
            loha.stack(m)
        models.append(m)
    x = torch.randn(3, 12)
    torch._dynamo.reset()
    torch.compile(models[0], fullgraph=True, backend="aot_eager")(x).sum().backward()
    models[1](x).sum().backward()
    assert_close_lists(layer_grads(models[0]), layer_grads(models[1]), rtol=1e-5)
