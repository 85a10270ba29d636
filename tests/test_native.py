"""The fused CPU kernels (loha/native.cpp): against float64 autograd of the LoHa formula, against the torch
form of loha.math, where they serve and where they must not, and how a missing compiler degrades."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loha
from loha import layer as layer_module
from loha import math as lm
from loha import native
from loha.layer import _Build
from tests.helpers import randomize_adapters

COMPILER = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler here: the torch form is all there is")


def test_the_kernels_build_where_there_is_a_compiler():
    """Not a skip in disguise: with a compiler present, the build must succeed (every test below relies on it)."""
    assert native.library() is not None
    assert {1, 2, 4, 8, 16} <= native.ranks()


def factors(n, out, inner, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2, out, r, generator=g) * 0.3
    b = torch.randn(n, 2, r, inner, generator=g) * 0.3
    return a, b, g


def reference(weights, gs, a, b, coef):
    """W + coef·(W1a·W1b)⊙(W2a·W2b) and its factor gradients, float64 autograd on the formula as written."""
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    coef = coef.double() if isinstance(coef, torch.Tensor) else coef
    delta = coef * (a64[:, 0] @ b64[:, 0]) * (a64[:, 1] @ b64[:, 1])
    built = torch.stack(weights).double() + delta
    g = torch.stack([torch.zeros_like(weights[0]) if x is None else x for x in gs]).double()
    delta.backward(g)
    return built, a64.grad, b64.grad


@pytest.mark.parametrize("r", [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16])
@pytest.mark.parametrize("shape", [(3, 10, 12), (2, 64, 48), (1, 1, 17), (2, 5, 16)])
def test_kernels_match_float64_autograd_for_every_compiled_rank(r, shape):
    """Widths below, at and past the vector blocks (the scalar tail), one-row layers, scalar and per-row coef."""
    n, out, inner = shape
    a, b, g = factors(n, out, inner, r, seed=r)
    weights = [torch.randn(out, inner, generator=g) for _ in range(n)]
    gs = [torch.randn(out, inner, generator=g) for _ in range(n)]
    for coef in (0.75, torch.rand(n, out, 1, generator=g) + 0.5):
        built, da, db = reference(weights, gs, a, b, coef)
        torch.testing.assert_close(lm.fused_weights(weights, a, b, coef).double(), built, rtol=1e-5, atol=1e-5)
        ga, gb = lm.fused_grads(gs, a, b, coef)
        torch.testing.assert_close(ga.double(), da, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gb.double(), db, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lanes, rows", [(16, 4), (8, 1), (4, 2), (4, 1)])
def test_the_gradient_kernel_of_every_target_matches_float64_autograd(tmp_path, monkeypatch, lanes, rows):
    """The kernel's vector width and rows a block depend on the target (AVX-512, AVX2, NEON, SSE): each shape,
    built here with -D whatever this CPU is, against the formula; rows and columns past the blocks included."""
    target = tmp_path / "kernels.so"
    assert native._compile(COMPILER, target, (f"-DLOHA_LANES={lanes}", f"-DLOHA_ROWS={rows}")) is None
    monkeypatch.setattr(native, "library", lambda: native._load(target))
    for r in (1, 3, 8, 16):
        for n, out, inner in ((2, 10, 40), (1, 5, 17), (3, 9, 8), (1, 1, 3)):
            a, b, g = factors(n, out, inner, r, seed=r + out)
            gs = [torch.randn(out, inner, generator=g) for _ in range(n)]
            for coef in (0.75, torch.rand(n, out, 1, generator=g) + 0.5):
                _, da, db = reference([torch.zeros(out, inner)] * n, gs, a, b, coef)
                ga, gb = lm.fused_grads(gs, a, b, coef)
                torch.testing.assert_close(ga.double(), da, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(gb.double(), db, rtol=1e-4, atol=1e-5)


def test_a_missing_gradient_counts_as_zero_and_threads_split_layers_exactly():
    a, b, g = factors(5, 24, 40, 8)
    gs = [torch.randn(24, 40, generator=g) for _ in range(5)]
    gs[2] = None
    _, da, db = reference([torch.zeros(24, 40)] * 5, gs, a, b, 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lm.fused_grads(gs, a, b, 0.5)
        torch.set_num_threads(3)  # layers 0-1, 2-3, 4 on three workers: each layer is computed the same way
        three = lm.fused_grads(gs, a, b, 0.5)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[0].double(), da, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one[1].double(), db, rtol=1e-4, atol=1e-5)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert torch.all(one[0][2] == 0) and torch.all(one[1][2] == 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_gets_a_fresh_worker_pool():
    """A child forked after the kernels ran on several threads must not wait on its parent's pool threads."""
    a, b, g = factors(4, 8, 16, 2)
    weights = [torch.randn(8, 16, generator=g) for _ in range(4)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = lm.fused_weights(weights, a, b, 0.5)
        assert native._pool is not None
        code = ("import os, sys, torch\nfrom loha import math as lm, native\ntorch.set_num_threads(2)\n"
                "a, b = torch.randn(4, 2, 8, 2), torch.randn(4, 2, 2, 16)\nws = [torch.randn(8, 16)] * 4\n"
                "lm.fused_weights(ws, a, b, 0.5)\npid = os.fork()\n"
                "if pid == 0:\n    lm.fused_weights(ws, a, b, 0.5)\n"
                "    os._exit(0 if native._pool is not None else 3)\n"
                "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(lm.fused_weights(weights, a, b, 0.5), expected, rtol=0, atol=0)


def test_where_the_kernels_serve():
    a, b, _ = factors(2, 8, 8, 4)
    assert lm.fused(a, b) and lm.fused(torch.nn.Parameter(a), b)
    assert not lm.fused(a.bfloat16(), b.bfloat16())  # 16-bit pairs keep the torch form
    assert not lm.fused(a, b, t=torch.zeros(2, 2, 4, 4, 3, 3))  # Tucker cores: the einsum chain
    assert not lm.fused(*factors(2, 8, 8, 32)[:2])  # a rank not compiled in
    assert not lm.fused(a.double(), b.double())

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Counting():  # op counts (bench --count) must see the torch form, which is the GPU's
        assert not lm.fused(a, b)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as fake:
        assert not lm.fused(fake.from_tensor(a), fake.from_tensor(b))


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(20, 18), torch.nn.Linear(20, 18)
        self.c, self.d = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        h = torch.tanh(self.a(x)) * self.b(x)
        img = h.reshape(-1, 2, 3, 3)
        return (self.c(img) * self.d(img)).sum()


def toy_model(**options):
    model = Toy()
    loha.inject(model, rank=4, target_modules=["a", "b", "c", "d"], **options)
    randomize_adapters(model, seed=3)
    return model.train()


def grouped_step(use_native, **options):
    """One training step of the Toy in the library's default mode: (loss, factor gradients, each build's fused)."""
    seen = []
    init = _Build.__init__

    def recording(self, *args):
        init(self, *args)
        seen.append(self.fused)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "serves", native.serves if use_native else lambda a, b: False)
        mp.setattr(_Build, "__init__", recording)
        model = toy_model(**options)
        loss = model(torch.randn(3, 20, generator=torch.Generator().manual_seed(1)))
        loss.backward()
    grads = [g.clone() for layer in loha.loha_layers(model).values() for g in layer.factor_gradients()]
    return loss.detach(), grads, seen


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("options", [{}, {"rank_dropout": 0.3, "alpha": 2.0}])
def test_a_grouped_step_with_the_kernels_equals_the_torch_form(monkeypatch, kept, options):
    """The library default (grouped, stacked) with and without the kernels, kept and rebuilt chunks, with a
    per-row coefficient (rank dropout): the same loss and factor gradients."""
    if not kept:
        monkeypatch.setattr(layer_module, "KEPT_BYTES", 0)
    torch.manual_seed(5)
    loss0, grads0, seen0 = grouped_step(False, **options)
    torch.manual_seed(5)  # the same dropout masks
    loss1, grads1, seen1 = grouped_step(True, **options)
    assert seen0 and not any(seen0) and all(seen1)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-5)
    for x, y in zip(grads1, grads0, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def built_pointers(monkeypatch):
    """The data pointer of every fused build's output, in call order."""
    seen = []
    fused_weights = lm.fused_weights

    def recording(*args, **kwargs):
        out = fused_weights(*args, **kwargs)
        seen.append(out.data_ptr())
        return out

    monkeypatch.setattr(lm, "fused_weights", recording)
    return seen


def toy_input(seed):
    return torch.randn(3, 20, generator=torch.Generator().manual_seed(seed))


def test_a_base_weight_of_another_shape_is_an_error_not_a_read_past_its_end():
    """The build kernel reads each base weight as out × in·k floats: one replaced by a smaller tensor (here b's
    18 × 20 by 9 × 20) is refused with the shape in the message, before the kernel runs."""
    model = toy_model()
    x = torch.randn(3, 20)
    model(x).backward()
    model.b.base_layer.weight = torch.nn.Parameter(torch.randn(9, 20), requires_grad=False)
    with pytest.raises(ValueError, match=r"base weight of shape \(9, 20\).*18×20"):
        model(x)


@pytest.mark.parametrize("kept", [True, False])
def test_fused_builds_write_again_into_the_buffer_of_the_step_before(monkeypatch, kept):
    """Three training steps: from the second on, each chunk's build reuses the first step's buffer, and the
    losses and gradients equal those of a model whose builds always get a fresh tensor (REUSED_BYTES = 0)."""
    if not kept:
        monkeypatch.setattr(layer_module, "KEPT_BYTES", 0)
    results = []
    for budget in (0, layer_module.REUSED_BYTES):
        monkeypatch.setattr(layer_module, "REUSED_BYTES", budget)
        seen = built_pointers(monkeypatch)
        model = toy_model()
        opt = torch.optim.SGD(loha.trainable_parameters(model), lr=0.5)
        steps = []
        for i in range(3):
            loss = model(toy_input(i))
            loss.backward()
            steps.append((loss.detach(), [p.grad.clone() for p in loha.trainable_parameters(model)]))
            opt.step()
            opt.zero_grad()
        results.append(steps)
        per_step = len(seen) // 3
        assert per_step >= 2 and len(seen) == 3 * per_step  # two stacks (linears, convs), rebuilt chunks twice
        if budget:
            assert seen[per_step:2 * per_step] == seen[:per_step] == seen[2 * per_step:]
            assert layer_module._Reused.total > 0
        monkeypatch.undo()
        if not kept:
            monkeypatch.setattr(layer_module, "KEPT_BYTES", 0)
    for (loss0, grads0), (loss1, grads1) in zip(*results, strict=True):
        assert torch.equal(loss0, loss1)
        for x, y in zip(grads0, grads1, strict=True):
            assert torch.equal(x, y)


def test_a_buffer_still_in_use_is_never_written_again(monkeypatch):
    """The pool hands back a buffer only when no view of it is alive. And in a model: two forwards before one
    backward, with rank dropout so that the two builds differ: the first graph's saved weights must survive
    the second build, so the gradients equal those of fresh tensors every build (REUSED_BYTES = 0)."""
    pool = layer_module._Reused()
    t = pool.get(0, (2, 3, 4))
    view = t[1]
    other = pool.get(0, (2, 3, 4))
    assert other is not t and other.data_ptr() != t.data_ptr()
    del view
    assert pool.get(0, (2, 3, 4)) is t
    pool.release()

    results = []
    for budget in (0, layer_module.REUSED_BYTES):
        monkeypatch.setattr(layer_module, "REUSED_BYTES", budget)
        torch.manual_seed(7)
        model = toy_model(rank_dropout=0.5)
        for _ in range(2):  # the second round finds the first round's buffers in the pool
            (model(toy_input(1)) + 2 * model(toy_input(2))).backward()
        results.append([p.grad.clone() for p in loha.trainable_parameters(model)])
    for x, y in zip(*results, strict=True):
        assert torch.equal(x, y)


def test_a_resized_chunk_replaces_its_buffer_in_the_pool():
    """Chunks resized (CHUNK_ELEMENTS changed between steps): the old buffer leaves the pool and its bytes
    its count, and the new shape is kept and reused from then on."""
    before = layer_module._Reused.total
    pool = layer_module._Reused()
    old = pool.get(0, (2, 3, 4))
    assert pool.nbytes == old.nbytes and layer_module._Reused.total == before + old.nbytes
    new = pool.get(0, (4, 3, 4))
    assert new.shape == (4, 3, 4) and pool.buffers[0] is new
    assert pool.nbytes == new.nbytes and layer_module._Reused.total == before + new.nbytes
    del new
    assert pool.get(0, (4, 3, 4)) is pool.buffers[0]
    pool.release()
    assert layer_module._Reused.total == before


def test_inference_mode_builds_do_not_fill_the_pool_and_training_follows(monkeypatch):
    """A build under inference_mode makes inference tensors, which training could not save for backward: they
    never enter the pool, and the training step after them runs and keeps its own buffers."""
    model = toy_model()
    with torch.inference_mode():
        expected = model(toy_input(1))
    from loha.inject import stacks_of

    assert all(s.__dict__["_reused"] is None or not s.__dict__["_reused"].buffers for s in stacks_of(model))
    loss = model(toy_input(1))
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected)
    assert all(s.__dict__["_reused"].buffers for s in stacks_of(model))


def test_the_pool_keeps_to_its_budget_and_is_released_with_its_model(monkeypatch):
    import gc

    from loha.inject import stacks_of

    gc.collect()  # earlier tests' models and their pools
    before = layer_module._Reused.total
    monkeypatch.setattr(layer_module, "REUSED_BYTES", before)  # no room: every build allocates, nothing is kept
    model = toy_model()
    model(toy_input(1)).backward()
    assert layer_module._Reused.total == before
    monkeypatch.setattr(layer_module, "REUSED_BYTES", before + (1 << 20))
    model(toy_input(1)).backward()
    kept = layer_module._Reused.total - before
    assert 0 < kept == sum(s.__dict__["_reused"].nbytes for s in stacks_of(model)) <= 1 << 20
    model.float()  # .to()/.float() forget builds and buffers made for the old tensors
    assert layer_module._Reused.total == before
    model(toy_input(1)).backward()
    assert layer_module._Reused.total == before + kept
    del model
    gc.collect()
    assert layer_module._Reused.total == before


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_no_compiler_warns_once_and_training_runs_as_torch_ops(tmp_path):
    code = ("import warnings, torch, loha\nfrom loha import math as lm\nwarnings.simplefilter('always')\n"
            "a, b = torch.randn(1, 2, 4, 2), torch.randn(1, 2, 2, 4)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    print(lm.fused(a, b), lm.fused(a, b))\n"
            "print(len(w)); print(w[0].message if w else '')\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4)); loha.inject(m, rank=2, target_modules=['0'])\n"
            "m(torch.randn(2, 4)).sum().backward(); print('trained')")
    run = run_python(code, CXX=str(tmp_path / "no-such-compiler"), LOHA_CACHE_DIR=str(tmp_path / "cache"))
    assert run.returncode == 0, run.stderr
    fused, count, message, trained = run.stdout.splitlines()
    assert fused == "False False" and count == "1" and trained == "trained"
    assert "could not build the fused CPU kernels" in message and "LOHA_NATIVE=0" in message
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind


def test_loha_native_0_turns_them_off_without_a_build(tmp_path):
    run = run_python("import torch\nfrom loha import math as lm\n"
                     "print(lm.fused(torch.randn(1, 2, 4, 2), torch.randn(1, 2, 2, 4)))",
                     LOHA_NATIVE="0", LOHA_CACHE_DIR=str(tmp_path / "cache"))
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr
    assert not (tmp_path / "cache").exists()


def test_a_built_library_is_reused_and_a_rebuild_replaces_it_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LOHA_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    native.ranks.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.library() is not None
        (built,) = tmp_path.glob("native-*.so")
        stamp = built.stat().st_mtime_ns
        native.library.cache_clear()
        monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("rebuilt an existing library"))
        assert native.library() is not None and built.stat().st_mtime_ns == stamp
        assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temporary file left
    finally:
        native.library.cache_clear()
        native.ranks.cache_clear()
