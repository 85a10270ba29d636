"""forward_mode="grouped" (the default) on stacked storage: same-shape layers built and differentiated
together, chunk by chunk, saving only the inputs. Checked against float64 math and the per-layer
"merged" mode, including every way a build could go stale, and against what the optimizer, DDP,
checkpointing and saving see of the stacked Parameters."""

import contextlib
import copy
import gc

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import loha
from loha import grouped as grouped_module
from loha import layer as layer_module
from loha.grouped import _Build
from loha.inject import stacks_of
from loha.tiny_sdxl import tiny_unet
from tests.helpers import randomize_adapters, unet_inputs


class Toy(nn.Module):
    """Three 12→10 linears (one stack), one 10→18 linear and two 3×3 convs (a stack of their own each
    kind); ``skip`` leaves out b."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (nn.Linear(12, 10, dtype=dtype) for _ in range(3))
        self.d = nn.Linear(10, 18, bias=False, dtype=dtype)
        self.e, self.f = (nn.Conv2d(2, 3, 3, padding=1, dtype=dtype) for _ in range(2))
        self.skip = False

    def forward(self, x, ckpt=None):
        h = self.a(x)
        if not self.skip:
            h = h + self.b(x)
        h = h + self.c(x)
        if ckpt is not None:
            out = checkpoint(self.d, torch.tanh(h), use_reentrant=ckpt)
        else:
            out = self.d(torch.tanh(h))
        img = out.reshape(*out.shape[:-1], 2, 3, 3).flatten(0, -4)
        return out.sum() + (self.e(img) * self.f(img)).sum()


TARGETS = ["a", "b", "c", "d", "e", "f"]


@contextlib.contextmanager
def counting_saved():
    """{storage: bytes} of every tensor autograd saves inside the block, parameters excluded. A plain
    counter: it marks itself as one that lets loha's input recipes stay on."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    pack.loha_unpack_twice = True
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def toy_pair(dtype=torch.float32, use_tucker=False, **options):
    """The same adapted Toy twice: per-layer "merged" on per-layer storage, and the default grouped/stacked."""
    models = []
    for mode, stack in (("merged", False), ("grouped", True)):
        m = Toy(dtype)
        loha.inject(m, rank=3, target_modules=TARGETS, forward_mode=mode, stack=stack, use_tucker=use_tucker,
                    **options)
        randomize_adapters(m, seed=1)
        models.append(m)
    return models


def grads(model):
    """Every layer's factor gradients, whatever the storage (a stacked gradient's slice)."""
    return [None if g is None else g.clone() for layer in loha.loha_layers(model).values()
            for g in layer.factor_gradients()]


def assert_close_in_norm(xs, ys, rel=2e-2):
    """Each pair of tensors within ``rel`` relative Frobenius distance: bf16 GEMMs are close as a whole,
    not element by element."""
    for x, y in zip(xs, ys, strict=True):
        assert ((x - y).norm() / x.norm()).item() < rel


def assert_close_lists(xs, ys, rtol=1e-5, atol=1e-6):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.fixture(params=["one chunk", "layer chunks"])
def chunk_path(request, monkeypatch):
    """Both chunkings: every stack one chunk (CHUNK_BYTES large), and one layer a chunk (1 byte: a chunk is
    at least one layer), so builds, buffers and reductions cross chunk boundaries."""
    if request.param == "layer chunks":
        monkeypatch.setattr(grouped_module, "CHUNK_BYTES", 1)
    return request.param


@pytest.fixture
def count_builds(monkeypatch):
    """(builds created, chunk weights built): the grouped path really ran, and how often it built."""
    counts = {"builds": 0, "chunks": 0}
    init, build = _Build.__init__, _Build._build

    def counting_init(self, *args):
        counts["builds"] += 1
        init(self, *args)

    def counting_build(self, c, *args):
        counts["chunks"] += 1
        return build(self, c, *args)

    monkeypatch.setattr(_Build, "__init__", counting_init)
    monkeypatch.setattr(_Build, "_build", counting_build)
    return counts


# mixed: per-layer scales and rank dropout (a coefficient tensor). Two complementary cases by default, the
# cross product with -m slow.
@pytest.mark.parametrize(("chunks", "use_tucker", "mixed"), [
    pytest.param(c, t, m, marks=() if (c, t, m) in {("layer chunks", True, True), ("one chunk", False, False)}
                 else pytest.mark.slow)
    for c in ("one chunk", "layer chunks") for t in (False, True) for m in (False, True)])
def test_grouped_gradcheck_float64(monkeypatch, chunks, use_tucker, mixed):
    """The whole grouped path (Khatri-Rao build, per-layer Functions, chunked backward) against numerical
    gradients."""
    if chunks == "layer chunks":
        monkeypatch.setattr(grouped_module, "CHUNK_BYTES", 1)
    model = Toy(torch.float64)
    loha.inject(model, rank=2, target_modules=TARGETS, use_tucker=use_tucker, dtype=torch.float64,
                rank_dropout=0.3 if mixed else 0.0, alphas={"b": 5.0} if mixed else None)
    randomize_adapters(model, seed=4)
    params = loha.trainable_parameters(model)
    assert all(p.dim() >= 3 for p in params)  # stacked
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    model.train()

    def fn(x, *_):
        torch.manual_seed(7)  # the same rank-dropout masks at every evaluation
        return model(x)

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_grouped_matches_merged_over_training_steps(count_builds, chunk_path):
    """Three SGD steps, with gradient accumulation over two micro-batches per step: every output and
    every gradient equals the per-layer mode; and the grouped path really ran, the way it was asked to."""
    merged, grouped = toy_pair()
    x = torch.randn(4, 5, 12)
    outs = {}
    for name, model in (("merged", merged), ("grouped", grouped)):
        opt = torch.optim.SGD(loha.trainable_parameters(model), lr=0.05)
        outs[name] = []
        for _ in range(3):
            for half in (x[:2], x[2:]):
                y = model(half)
                y.backward()
                outs[name].append(y.detach())
            outs[name].append(grads(model))
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            outs[name].append(model(x))
    for a, b in zip(outs["merged"], outs["grouped"]):
        assert_close_lists(a, b) if isinstance(a, list) else torch.testing.assert_close(a, b)
    assert count_builds["builds"] == 3 * 7  # 3 stacks (12→10, 10→18, conv) × (6 micro-batches + 1 no-grad)
    # each chunk is built once in forward and once more in backward for the input gradients that need it:
    # a, b, c (3 chunks or 1) and the convs (2 or 1); d's input tanh(h) needs one too, but x does not
    forward, backward = {"one chunk": (3, 2), "layer chunks": (6, 3)}[chunk_path]
    assert count_builds["chunks"] == 7 * forward + 6 * backward
    assert len(loha.trainable_parameters(grouped)) == 6 and len(loha.trainable_parameters(merged)) == 24


def test_grouped_tiny_unet_full_preset_with_mixed_ranks_alphas_and_tucker(count_builds, chunk_path):
    """The tiny UNet with the full preset (attention, MLPs, resnet convs, samplers, embeddings), Tucker
    convs, a second rank and scattered alphas: grouped/stacked equals per-layer merged."""
    unets = []
    for mode, stack in (("merged", False), ("grouped", True)):
        unet = tiny_unet(0)
        paths = loha.preset_targets(unet, "full")
        ranks = {p: 2 for p in paths[::3]}
        alphas = {p: 2.0 for p in paths[1::5]}
        loha.inject(unet, rank=4, preset="full", conv_rank=3, use_tucker=True, ranks=ranks, alphas=alphas,
                    forward_mode=mode, stack=stack)
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
    assert count_builds["builds"] == len(loha.stack(copy.deepcopy(unets[0])))


def test_second_backward_with_retain_graph_accumulates_the_same_gradients(chunk_path):
    """backward(retain_graph=True) then backward again: twice the gradients, as per-layer merged gives."""
    merged, grouped = toy_pair()
    x = torch.randn(3, 12)
    for model in (merged, grouped):
        y = model(x)
        y.backward(retain_graph=True)
        y.backward()
    assert_close_lists(grads(merged), grads(grouped))


@pytest.mark.parametrize("reentrant", [False, True])
def test_grouped_under_gradient_checkpointing(reentrant, chunk_path):
    merged, grouped = toy_pair()
    x = torch.randn(3, 12)
    for model in (merged, grouped):
        model(x, ckpt=reentrant).backward()
    assert_close_lists(grads(merged), grads(grouped))


def test_grouped_diffusers_gradient_checkpointing_matches_merged(count_builds):
    """diffusers' (non-reentrant) checkpointing recomputes each block in backward; the recomputation
    starts builds of its own, and the original build still takes every gradient."""
    unets = []
    for mode, stack in (("merged", False), ("grouped", True)):
        unet = tiny_unet(0)
        unet.enable_gradient_checkpointing()
        loha.inject(unet, rank=4, forward_mode=mode, stack=stack)
        randomize_adapters(unet, seed=3, std=0.1)
        unet.train()
        unet(**unet_inputs()).sample.square().mean().backward()
        unets.append(unet)
    assert_close_lists(grads(unets[0]), grads(unets[1]), rtol=1e-4, atol=1e-6)
    assert count_builds["builds"] > 2  # 2 stacks forward, more for the recomputed blocks


def step_without_b_then(x, loss, between=lambda model: None):
    """The toy pair after an SGD step with b skipped, ``between(model)``, and a backward of ``loss(model)`` with
    b back; asserts both got the same gradients and give the same output."""
    merged, grouped = toy_pair()
    for model in (merged, grouped):
        opt = torch.optim.SGD(loha.trainable_parameters(model), lr=0.1)
        model.skip = True
        model(x).backward()
        opt.step()
        opt.zero_grad()
        between(model)
        model.skip = False
        loss(model).backward()
    assert_close_lists(grads(merged), grads(grouped))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), grouped(x))


def test_skipped_layer_and_two_forwards_before_backward(chunk_path):
    x = torch.randn(3, 12)
    step_without_b_then(x, lambda model: model(x) + model(2 * x))


def test_a_finished_build_is_freed_at_once(chunk_path):
    """After backward the stack forgets its build and nothing links the build to itself: it goes with the
    graph, by reference counting, with its buffers; nothing of a step outlives it (the peak-memory
    measurement relies on this)."""
    import weakref

    _, grouped = toy_pair()
    x = torch.randn(3, 12)
    gc.collect()
    gc.disable()
    try:
        y = grouped(x).sum()
        builds = [weakref.ref(s.__dict__["_build"]) for s in stacks_of(grouped)]
        assert builds and all(b() is not None for b in builds)
        y.backward()
        assert all(s.__dict__["_build"] is None for s in stacks_of(grouped))
        del y
        assert all(b() is None for b in builds)
    finally:
        gc.enable()


def test_in_place_changes_between_forwards_are_seen():
    """No-grad forwards: a factor edited in place, set_scale, merge/unmerge, load_state_dict, a new base
    weight, train/eval and the grad mode all start a new build."""
    merged, grouped = toy_pair()
    x = torch.randn(2, 12)

    def same():
        with torch.no_grad():
            torch.testing.assert_close(merged(x), grouped(x))

    same()
    for model in (merged, grouped):
        model.skip = True
    same()
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
        for key, value in state.items():
            path, name = key.rsplit(".", 1)
            with torch.no_grad():
                getattr(model.get_submodule(path), name).copy_(value)
    same()
    for model in (merged, grouped):
        model.c.base_layer.weight = nn.Parameter(model.c.base_layer.weight.detach() * 2, requires_grad=False)
    same()
    y = grouped(x)  # grad mode after no-grad forwards: the result must carry a graph
    y.backward()
    assert all(p.grad is not None for p in loha.trainable_parameters(grouped))


def test_a_layer_changed_while_it_did_not_run_is_seen_by_the_next_build(chunk_path):
    """b skips a step and its base weight changes in place meanwhile: the next step's build sees b's new
    weight, and the first build's backward checks only the layers that ran in it, so b's changed weight there
    is no 'modified in place' error."""
    def change_b(model):
        with torch.no_grad():
            model.b.base_layer.weight.mul_(1.5)

    x = torch.randn(3, 12)
    step_without_b_then(x, lambda model: model(x), change_b)


def test_dropout_and_train_flags_set_after_a_build_reach_the_next_one():
    """A module dropout of 0.999 set after a step drops ΔW (the output is the base model's, as with scale 0); b
    set to eval while it skips a step runs without asking it for a mask."""
    _, grouped = toy_pair()
    x = torch.randn(3, 12)
    grouped.train()
    grouped(x).backward()
    for name in TARGETS:
        getattr(grouped, name).module_dropout = 0.999
    torch.manual_seed(0)
    with torch.no_grad():
        dropped = grouped(x)
        loha.set_scale(grouped, 0.0)
        base = grouped(x)
        loha.set_scale(grouped, 1.0)
        assert not torch.allclose(grouped.eval()(x), base)  # the adapters do change the output
    torch.testing.assert_close(dropped, base)
    grouped.train()
    grouped(x).backward()
    grouped.b.eval()
    grouped.skip = True
    grouped(x).backward()
    assert all(torch.isfinite(p.grad).all() for p in loha.trainable_parameters(grouped))


def test_fp32_autocast_off_and_inference_mode_match_merged():
    """Without a 16-bit compute dtype the grouped build is merged's math in the factors' fp32 (the Khatri-Rao
    GEMM instead of the pair: the same sums in another order); and without grad it is so under 16-bit autocast
    too: W + ΔW summed in fp32 and cast once, so the fused model's weights up to that one rounding."""
    merged, grouped = toy_pair()
    x = torch.randn(4, 12)
    torch.testing.assert_close(merged(x), grouped(x))
    with torch.inference_mode():
        torch.testing.assert_close(merged(x), grouped(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(merged(x), grouped(x))


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_16bit_autocast_builds_w_plus_delta_once_in_one_gemm(compute, base_dtype):
    """The grouped training build's precision under 16-bit autocast, read out exactly (an identity input makes
    the layer's output its built weight, transposed): each element is W + s·K·R accumulated in fp32 and
    rounded once, K and R the Khatri-Rao products of the fp32 factors rounded once to the compute dtype,
    checked against float64 math; so within half a step of the float64 W + ΔW plus the products' rounding."""
    layers = nn.ModuleList(nn.Linear(48, 40, bias=False, dtype=base_dtype) for _ in range(3))
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(40, 48) * 0.02)  # |W| ~ 0.02: the 16-bit step there ~1e-4
    loha.inject(layers, rank=4, target_modules=["0", "1", "2"], alpha=2.0)
    randomize_adapters(layers, seed=1, std=0.1)  # |ΔW| ~ 1e-4, a few steps of W
    eye = torch.eye(48)
    with torch.autocast("cpu", dtype=compute):  # a training build (grad mode): inference works in fp32
        built = [layer(eye).T.detach() for layer in layers]
    unit, c = torch.finfo(compute).eps / 2, compute
    rnd = lambda t: t.to(c).double()  # noqa: E731
    for layer, got in zip(layers, built):
        w1a, w1b, w2a, w2b = (f.detach().double() for f in layer.factors())
        w = rnd(layer.weight.double()) if base_dtype != torch.float32 else layer.weight.double()
        # each Khatri-Rao product of the fp32 factors rounded to the compute dtype, the GEMM summed in fp32
        k = rnd(w1a[:, :, None] * w2a[:, None, :]).flatten(1)
        r = rnd(w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
        expected = (rnd(w) + 0.5 * k @ r).to(c)
        assert got.dtype == c
        assert (got != expected).float().mean() < 0.01  # elsewhere a tie broken by fp32 accumulation
        exact1, exact2 = w1a @ w1b, w2a @ w2b
        truth = w + 0.5 * exact1 * exact2
        size = (w1a.abs() @ w1b.abs()) * (w2a.abs() @ w2b.abs())  # Σ |K||R| per element
        bound = unit * truth.abs() + 0.5 * 2.1 * unit * size + (unit * w.abs() if base_dtype == torch.float32 else 0)
        assert ((got.double() - truth).abs() <= bound + torch.finfo(c).smallest_normal * unit).all()
        assert not torch.equal(got, w.to(c))  # ΔW is there


@pytest.mark.parametrize("alphas", [None, {"b": 5.0}])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_bf16_mixed_precision_matches_merged(base_dtype, chunk_path, alphas):
    """As the trainer runs it (fp32 factors, bf16 autocast, a bf16 or fp32 base): merged keeps its pair
    in fp32, grouped builds it in bf16, so outputs agree to bf16 rounding and gradients to what bf16 G
    gives; the gradients come back in the factors' fp32. With per-layer alphas the coefficient is a bf16
    tensor too."""
    merged, grouped = toy_pair(dtype=base_dtype, alphas=alphas)
    x = torch.randn(4, 12, dtype=base_dtype)
    ys = []
    for model in (merged, grouped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys.append(model(x))
        ys[-1].float().backward()
    torch.testing.assert_close(ys[0], ys[1])  # bf16's default tolerance
    assert_close_in_norm(grads(merged), grads(grouped))
    assert all(p.grad.dtype == torch.float32 for p in loha.trainable_parameters(grouped))


def test_deepcopy_after_a_training_forward_and_compile_falls_back():
    _, grouped = toy_pair()
    x = torch.randn(2, 12)
    y = grouped(x)
    twin = copy.deepcopy(grouped)  # a live build is never copied
    assert all(s._build is None for s in stacks_of(twin))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)
    compiled = torch.compile(grouped, backend="eager")  # traced: the per-layer path, no Python caches
    torch.testing.assert_close(compiled(x), y)
    compiled(x).backward()
    assert all(p.grad is not None for p in loha.trainable_parameters(grouped))


def test_trainable_base_weight_falls_back_to_the_per_layer_function():
    merged, grouped = toy_pair()
    x = torch.randn(2, 12)
    ys = []
    for model in (merged, grouped):
        model.b.base_layer.weight.requires_grad_(True)
        ys.append(model(x))
        ys[-1].backward()
    torch.testing.assert_close(ys[0], ys[1])
    torch.testing.assert_close(merged.b.base_layer.weight.grad, grouped.b.base_layer.weight.grad)
    assert_close_lists(grads(merged), grads(grouped))


@pytest.mark.parametrize("what", ["factor", "base weight"])
def test_factor_changed_between_forward_and_backward_is_an_error(chunk_path, what):
    _, grouped = toy_pair()
    y = grouped(torch.randn(2, 12, requires_grad=True))
    with torch.no_grad():
        (grouped.a.hada_w1_b if what == "factor" else grouped.d.base_layer.weight).add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.backward()


def test_layer_whose_output_is_unused_gets_zeros_in_its_slice(chunk_path):
    """A stacked Parameter cannot be partly None: an unused layer (SDXL never reads the last CLIP-L
    layer) gets zeros in its slice, and its stack-mates their gradients; per-layer storage gives None."""
    merged, grouped = toy_pair()
    x = torch.randn(2, 12)
    for model in (merged, grouped):
        y = model.a(x) + 0 * model.c(x).detach()
        model.b(x)  # in the same forward, but unused
        y.sum().backward()
    gm, gg = grads(merged), grads(grouped)
    a, b, c = slice(0, 4), slice(4, 8), slice(8, 12)
    assert all(t is None for t in gm[b] + gm[c])
    assert all(not t.any() for t in gg[b] + gg[c])
    assert_close_lists(gm[a], gg[a])


def test_frozen_adapter_still_gives_the_input_its_gradient(chunk_path):
    merged, grouped = toy_pair()
    x = torch.randn(2, 12)
    xs = []
    for model in (merged, grouped):
        for p in loha.trainable_parameters(model):
            p.requires_grad_(False)
        xi = x.clone().requires_grad_()
        model(xi).backward()
        xs.append(xi.grad)
    torch.testing.assert_close(xs[0], xs[1])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_nothing_of_size_out_by_in_is_saved(chunk_path, checkpointing):
    """What autograd keeps between forward and backward, counted with saved_tensors_hooks: the grouped layers
    save their inputs and nothing of size out×in, no more than the per-layer Function (which saves the
    factors too); under checkpointing nothing at all leaves the recomputed block."""
    def saved_bytes(model, x):
        with counting_saved() as seen:
            y = model(x, ckpt=False) if checkpointing else model(x)
        y.backward()
        return sum(seen.values())

    merged, grouped = toy_pair()
    x = torch.randn(3, 12)
    mine, theirs = saved_bytes(grouped, x), saved_bytes(merged, x)
    assert mine <= theirs
    inputs = 3 * 12 * 4 + 3 * 10 * 4 + 2 * 3 * 2 * 3 * 3 * 4  # x (shared by a, b, c), tanh(h), img (e and f)
    weights = sum(m.base_layer.weight.numel() * 4 for m in loha.loha_layers(grouped).values())
    assert mine < inputs + weights / 2


def test_stack_keeps_every_value_and_writes_through(tmp_path):
    unet = tiny_unet(0)
    loha.inject(unet, rank=4, stack=False)
    randomize_adapters(unet, seed=5)
    before = {k: v.clone() for k, v in loha.adapter_state_dict(unet).items()}
    loha.save(unet, tmp_path / "before")
    stacks = loha.stack(unet)
    assert len(stacks) == 2 and len(loha.trainable_parameters(unet)) == 4
    after = loha.adapter_state_dict(unet)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    loha.save(unet, tmp_path / "after")
    assert (tmp_path / "before/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "after/adapter_model.safetensors").read_bytes()
    layer = next(iter(loha.loha_layers(unet).values()))
    with torch.no_grad():
        layer.hada_w1_a.fill_(0.5)  # a view: writes through to the stack
    assert torch.all(layer._stack[0].hada_a[layer._stack[1], 0] == 0.5)
    loha.load(unet, tmp_path / "before")  # loading into a stacked model writes through the views too
    assert all(torch.equal(before[k], v) for k, v in loha.adapter_state_dict(unet).items())
    loha.unstack(unet)
    assert len(loha.trainable_parameters(unet)) == 544
    assert all(torch.equal(before[k], v) for k, v in loha.adapter_state_dict(unet).items())


def test_deepcopy_and_dtype_changes_follow_the_stacks():
    _, grouped = toy_pair()
    twin = copy.deepcopy(grouped).double()
    x = torch.randn(2, 12, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loha.trainable_parameters(twin))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), grouped.double()(x))


def test_stack_errors_and_eject():
    model = Toy()
    loha.inject(model, rank=2, target_modules=TARGETS)
    with pytest.raises(loha.LoHaError, match="already stacked"):
        loha.stack(model)
    loha.unstack(model)
    with pytest.raises(loha.LoHaError, match="not stacked"):
        loha.unstack(model)
    model.a.hada_w1_a.requires_grad_(False)
    with pytest.raises(loha.LoHaError, match="frozen and some are not"):
        loha.stack(model)
    model.a.hada_w1_a.requires_grad_(True)
    loha.stack(model)
    assert sorted(loha.eject(model)) == sorted(TARGETS)
    assert not any(isinstance(m, (loha.LoHaStack, loha.LoHaLayer)) for m in model.modules())
    with pytest.raises(loha.LoHaError, match="no LoHa adapters"):
        loha.stack(model)


def test_nn_sequential_models_run_with_stacks():
    """Stacks hang under their first layer, so a Sequential's forward (which calls every child) still works."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    ref = copy.deepcopy(model)
    loha.inject(model, rank=2, target_modules=["0", "2"])
    torch.testing.assert_close(model(torch.ones(1, 4)), ref(torch.ones(1, 4)))


@pytest.mark.parametrize(("mode", "stack"), [
    pytest.param(m, s, marks=() if (m, s) in {("grouped", True), ("merged", False), ("bypass", True)}
                 else pytest.mark.slow) for m in ("grouped", "merged", "bypass") for s in (False, True)])
def test_no_graph_breaks_under_compile(mode, stack):
    """The layer compiles whole in every mode and storage (fullgraph=True raises on any graph break),
    with eager-equal gradients (aot_eager: the graph autograd would run, without inductor's CPU codegen)."""
    torch._dynamo.reset()
    model = Toy()
    loha.inject(model, rank=2, target_modules=TARGETS, forward_mode=mode, stack=stack)
    randomize_adapters(model, seed=6)
    x = torch.randn(2, 12)
    model(x).backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).backward()
    assert_close_lists(eager, grads(model))


@pytest.mark.parametrize(("mode", "checkpointing"), [("grouped", False), ("grouped", True), ("merged", False)])
def test_inputs_autograd_already_keeps_are_recomputed_bit_for_bit(monkeypatch, mode, checkpointing):
    """ff.net.2 takes GEGLU's h·gelu(g) and each resnet conv silu(norm(x)): autograd keeps h, gelu(g) and
    norm(x) for the floor's own backward, so those inputs are recomputed instead of held. Gradients are
    bit-identical to saving every input, with diffusers' checkpointing too, and the bytes saved drop by
    exactly those inputs."""
    original = layer_module._input_recipe
    hits = []

    def counted(x):
        node = original(x)
        hits.append(node is not None)
        return node

    def run(recipes):
        monkeypatch.setattr(layer_module, "_input_recipe", counted if recipes else (lambda x: None))
        unet = tiny_unet(0)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        loha.inject(unet, rank=4, preset="full", conv_rank=3, forward_mode=mode, stack=mode == "grouped")
        randomize_adapters(unet, seed=4, std=0.1)
        unet.train()
        with counting_saved() as seen:
            out = unet(**unet_inputs()).sample
        out.square().mean().backward()
        return [out.detach(), *grads(unet)], sum(seen.values())

    (kept, kept_bytes), (recomputed, recomputed_bytes) = run(False), run(True)
    assert len(kept) == len(recomputed) and all(torch.equal(a, b) for a, b in zip(kept, recomputed))
    unet = tiny_unet(0)
    ff2 = [m for p, m in unet.named_modules() if p.endswith("ff.net.2")]
    convs = [m for p, m in unet.named_modules() if p.endswith(("conv1", "conv2")) and ".resnets." in p]
    if checkpointing:  # inside checkpointed blocks x is saved as usual (checkpointing unpacks only once)
        assert recomputed_bytes <= kept_bytes
    else:  # every one of them (and a few embedding linears) recomputes
        assert sum(hits) >= len(ff2) + len(convs) and recomputed_bytes < kept_bytes


def test_a_recomputed_input_modified_in_place_fails_as_autograd_does():
    """The recipe reads autograd's own saved operands, so an in-place change between forward and backward
    raises autograd's error instead of giving a silently wrong gradient."""
    model = nn.Sequential(nn.Linear(6, 5))
    loha.inject(model, rank=2, target_modules=["0"])
    randomize_adapters(model, seed=1)
    h = torch.randn(3, 6, requires_grad=True)
    gate = torch.randn(3, 6, requires_grad=True)
    act = torch.nn.functional.gelu(gate)
    y = model(h * act)
    with torch.no_grad():
        act.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bf16_factor_gradients_against_float64_and_peft_loha():
    """The price of the 16-bit pair, measured against exact gradients: with a loss linear in the outputs
    (a fixed, bf16-exact upstream gradient r), G = rᵀx does not depend on the forward's rounding, so float64
    math gives the factor gradients exactly. Under bf16 autocast PEFT LoHa (bf16 products forward, fp32
    backward) and merged (fp32 pair) are off by G's own rounding, about 0.2 %; grouped, whose backward
    runs on the bf16 pair in bf16 GEMMs like an autocast Linear's, about 0.5 % (BENCHMARKS.md §3)."""
    from peft import LoHaConfig, get_peft_model

    torch.manual_seed(0)
    rank, alpha, names = 4, 2.0, ["0", "1", "2"]
    base = nn.ModuleList(nn.Linear(64, 48, bias=False, dtype=torch.bfloat16) for _ in names)
    xs = [torch.randn(2, 10, 64).bfloat16() for _ in names]
    rs = [torch.randn(2, 10, 48).bfloat16().float() for _ in names]
    values = [[torch.randn(shape) * 0.3 for shape in ((48, rank), (rank, 64)) * 2] for _ in names]
    exact = []
    for x, r, (a1, b1, a2, b2) in zip(xs, rs, values):
        a1, b1, a2, b2 = (v.double() for v in (a1, b1, a2, b2))
        g = (r.double().flatten(0, 1).T @ x.double().flatten(0, 1)) * (alpha / rank)
        d1, d2 = g * (a2 @ b2), g * (a1 @ b1)
        exact.append([d1 @ b1.T, a1.T @ d1, d2 @ b2.T, a2.T @ d2])
    errors = {}
    for name in ("grouped", "merged", "peft"):
        model = copy.deepcopy(base)
        if name == "peft":
            model = get_peft_model(model, LoHaConfig(r=rank, alpha=alpha, target_modules=names, init_weights=False))
            layers = list(model.base_model.model)
            params = [[getattr(m, f)["default"] for f in layer_module.FACTOR_NAMES] for m in layers]
        else:
            loha.inject(model, rank=rank, alpha=alpha, target_modules=names, forward_mode=name,
                        stack=name == "grouped")
            layers = list(model)
            params = [list(m.factors()) for m in layers]
        with torch.no_grad():
            for ps, vs in zip(params, values):
                for p, v in zip(ps, vs):
                    p.copy_(v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ys = [m(x) for m, x in zip(layers, xs)]
        sum((y.float() * r).sum() for y, r in zip(ys, rs)).backward()
        got = [[p.grad for p in ps] for ps in params] if name == "peft" else [m.factor_gradients() for m in layers]
        errors[name] = max(((g.double() - e).norm() / e.norm()).item()
                           for gs, es in zip(got, exact) for g, e in zip(gs, es))
    assert errors["merged"] < 3e-3 and errors["peft"] < 3e-3  # G's bf16 rounding (measured 0.20 %)
    assert errors["grouped"] < 1e-2 and errors["grouped"] < 4 * errors["peft"]  # measured 0.53 %
