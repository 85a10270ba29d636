"""inject/eject/merge/scale on the tiny SDXL UNet and on the full-size SDXL config (meta device)."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

import loha
from loha.tiny_sdxl import SDXL_UNET_CONFIG, tiny_unet
from tests.helpers import randomize_adapters, run_unet, unet_inputs


@pytest.fixture(scope="module")
def sdxl_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet(seed=0)


@pytest.mark.parametrize("rank,expected", [(4, 11_612_160), (8, 23_224_320), (16, 46_448_640), (32, 92_897_280)])
def test_sdxl_full_config_counts(sdxl_meta, rank, expected):
    paths = loha.inject(sdxl_meta, rank=rank)
    try:
        assert len(paths) == 560
        assert loha.count_parameters(sdxl_meta) == expected
        # independent count: 2r(in+out) per adapted Linear, from the base shapes
        assert sum(2 * rank * sum(m.weight.shape) for m in loha.adapter_modules(sdxl_meta).values()) == expected
        assert all(p.is_meta for p in loha.trainable_parameters(sdxl_meta))
    finally:
        loha.eject(sdxl_meta)


def test_inject_is_exact_at_init_freezes_base_and_ejects_identically(base_unet):
    unet = copy.deepcopy(base_unet)
    inputs = unet_inputs()
    before = run_unet(unet, inputs)
    originals = {p: m for p, m in unet.named_modules() if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    paths = loha.inject(unet, rank=4)
    assert sorted(paths) == sorted(originals)
    assert torch.equal(run_unet(unet, inputs), before)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".loha_stack.hada_a", ".loha_stack.hada_b")) for n in trainable)
    assert {id(p) for p in loha.trainable_parameters(unet)} == {id(p) for p in unet.parameters() if p.requires_grad}
    assert sorted(loha.eject(unet)) == sorted(paths)
    assert all(unet.get_submodule(p) is m for p, m in originals.items())
    assert torch.equal(run_unet(unet, inputs), before)


def test_injected_unet_matches_a_unet_with_merged_weights(base_unet):
    """Independent reference: a copy of the base UNet whose Linear weights are replaced by W + s·ΔW."""
    unet = copy.deepcopy(base_unet)
    loha.inject(unet, rank=2, alpha=3)
    randomize_adapters(unet, std=0.2)
    reference = copy.deepcopy(base_unet).double()
    with torch.no_grad():
        for path, layer in loha.adapter_modules(unet).items():
            w1a, w1b, w2a, w2b = (p.double() for p in layer.factors())
            reference.get_submodule(path).weight += (w1a @ w1b) * (w2a @ w2b) * 1.5
    inputs = unet_inputs()
    ours = run_unet(unet, inputs)
    ref = run_unet(reference, {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                               for k, v in inputs.items() if k != "added_cond_kwargs"}
                   | {"added_cond_kwargs": {k: v.double() for k, v in inputs["added_cond_kwargs"].items()}})
    assert not torch.allclose(ours, run_unet(base_unet, inputs), atol=1e-3)  # the adapters do something
    assert torch.allclose(ours.double(), ref, atol=1e-4)
    for mode in ("bypass", "merged"):
        loha.set_forward_mode(unet, mode)
        assert torch.allclose(run_unet(unet, inputs).double(), ref, atol=1e-4)
    loha.merge(unet)
    assert torch.allclose(run_unet(unet, inputs).double(), ref, atol=1e-4)
    loha.unmerge(unet)
    loha.set_scale(unet, 0)
    assert torch.equal(run_unet(unet, inputs), run_unet(base_unet, inputs))


def test_inject_errors(base_unet):
    unet = copy.deepcopy(base_unet)
    with pytest.raises(loha.LoHaError, match=r"no module matches .*Linear/Conv2d modules here include: \S+"):
        loha.inject(unet, target_modules=["to_nothing"])
    with pytest.raises(loha.LoHaError, match="not Linear|are not: .*to_out \\(ModuleList\\)"):
        loha.inject(unet, target_modules=["to_out"])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(loha.LoHaError, match="rank must be an integer >= 1"):
            loha.inject(unet, rank=bad)
    loha.inject(unet, rank=2)
    with pytest.raises(loha.LoHaError, match="already has LoHa adapters"):
        loha.inject(unet, rank=2)
    loha.eject(unet)
    for fn in (loha.merge, loha.unmerge, lambda m: loha.set_scale(m, 1)):
        with pytest.raises(loha.LoHaError, match="has no LoHa adapters"):
            fn(unet)


def test_target_matching_is_by_path_suffix():
    model = nn.ModuleDict({"a": nn.ModuleDict({"to_q": nn.Linear(2, 2), "xto_q": nn.Linear(2, 2)}),
                           "to_q": nn.Linear(2, 2)})
    assert sorted(loha.inject(model, rank=1, target_modules="to_q")) == ["a.to_q", "to_q"]
    loha.eject(model)
    assert loha.inject(model, rank=1, target_modules=["a.xto_q"]) == ["a.xto_q"]


def test_set_scale_refused_while_merged_and_merge_is_all_or_nothing(base_unet):
    unet = copy.deepcopy(base_unet)
    loha.inject(unet, rank=2)
    randomize_adapters(unet)
    loha.merge(unet)
    with pytest.raises(loha.LoHaError, match="unmerge"):
        loha.set_scale(unet, 0.5)
    loha.unmerge(unet)
    weights = {p: m.weight.clone() for p, m in loha.adapter_modules(unet).items()}
    last = list(loha.adapter_modules(unet).values())[-1]
    with torch.no_grad():
        last.hada_w2_b.fill_(float("nan"))
    with pytest.raises(loha.LoHaError, match="NaN/Inf"):
        loha.merge(unet)
    assert all(not m.merged and torch.equal(m.weight, weights[p]) for p, m in loha.adapter_modules(unet).items())


@pytest.mark.slow
def test_compiled_gradients_match_eager(base_unet):
    """torch.compile traces our autograd.Function whole (no graph breaks): same loss and gradients. With
    the defaults (stacked storage; under compile each layer runs the per-layer Function on its views)."""
    unet = copy.deepcopy(base_unet)
    loha.inject(unet, rank=4)
    randomize_adapters(unet, std=0.3)
    compiled = torch.compile(copy.deepcopy(unet))
    inputs = unet_inputs()
    grads = []
    for model in (unet, compiled):
        loss = model(**inputs).sample.pow(2).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in loha.trainable_parameters(model)]))
    (l1, g1), (l2, g2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert len(g1) == len(g2) == 4  # 2 shapes × (hada_a, hada_b)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-9
