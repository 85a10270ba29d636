"""The fused CPU kernels of the stacked LoHa build and gradients (``native.cpp``), for ``loha.math``.

Compiled on first use with the system's C++ compiler (about 2 s) into a per-user cache, loaded with ctypes:
no torch headers, no build step at install. Where they cannot serve (no compiler, ``LOHA_NATIVE=0``, a GPU,
16-bit or fake tensors, a dispatch mode counting ops, a rank not compiled in) ``loha.math`` runs its torch
form, which is also what every test compares them with. One warning names a failed build; nothing else
changes then.

Environment: ``LOHA_NATIVE=0`` turns them off; ``LOHA_CACHE_DIR`` is where the library is kept (default
``$XDG_CACHE_HOME/loha`` or ``~/.cache/loha``); ``CXX`` picks the compiler.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.cpp")
_FLAGS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler has no -march=native (old Apple clang)
_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_ARGS = [_i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _f32, _ptr]


def cache_dir() -> Path:
    root = os.environ.get("LOHA_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loha"


def _machine_key() -> str:
    """What a -march=native binary depends on: the CPU's feature flags (Linux) or its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(compiler: str, target: Path, defines=()) -> str | None:
    """Builds the library at ``target`` (written under a temporary name, then renamed: a concurrent or
    interrupted build never leaves a half-written file there). Returns None, or the compiler's last line.
    ``defines``: extra ``-D`` flags (the tests build the kernel shapes of other targets with them)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = "no compiler output"
    for flags in _FLAGS:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp")
        os.close(fd)
        try:
            run = subprocess.run([compiler, *flags, *defines, "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", tmp],
                                 capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(tmp, target)
                return None
            error = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
        except (OSError, subprocess.SubprocessError) as e:
            error = str(e)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return error


@functools.cache
def library():
    """The loaded kernels, or None where they are off or cannot be built (warned once)."""
    if os.environ.get("LOHA_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        warnings.warn("loha: no C++ compiler found, so the fused CPU kernels are off and CPU training runs "
                      "as torch ops (slower, same results); install g++ or clang, or set LOHA_NATIVE=0",
                      stacklevel=3)
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, repr(_FLAGS), _machine_key()]).encode())
    target = cache_dir() / f"native-{key.hexdigest()[:16]}.so"
    try:
        error = None if target.exists() else _compile(compiler, target)
    except OSError as e:
        error = str(e)
    if error is None:
        try:
            return _load(target)
        except OSError as e:
            error = str(e)
    warnings.warn(f"loha: could not build the fused CPU kernels ({error}); CPU training runs as torch ops "
                  f"(slower, same results); set LOHA_NATIVE=0 to skip the attempt", stacklevel=3)
    return None


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    for name in ("loha_build", "loha_grads"):
        getattr(lib, name).argtypes = _ARGS if name == "loha_build" else [*_ARGS, _ptr]
        getattr(lib, name).restype = ctypes.c_int
    return lib


@functools.cache
def ranks() -> frozenset[int]:
    lib = library()
    if lib is None:
        return frozenset()
    table = (ctypes.c_int * 64)()
    count = lib.loha_ranks(table, len(table))
    return frozenset(table[: min(count, len(table))])


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a FakeTensor, a functional tensor or another subclass


def serves(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernels take these stacked factors (n, 2, out, r) / (n, 2, r, in): real fp32 CPU tensors
    with no dispatch mode active (a mode that counts or fakes ops must see the torch form), a rank compiled in."""
    return (type(a) in _PLAIN and type(b) in _PLAIN and a.device.type == "cpu"
            and a.dtype == torch.float32 and b.dtype == torch.float32 and a.dim() == 4
            and torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling()
            and a.shape[-1] in ranks())


_pool: ThreadPoolExecutor | None = None


def _forget_pool():  # a forked child inherits the pool's bookkeeping but none of its threads
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _parallel(call, n: int):
    """call(start, stop) over the n layers, split over torch's thread count (ctypes releases the GIL)."""
    workers = min(n, torch.get_num_threads())
    if workers <= 1:
        return [call(0, n)]
    global _pool
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="loha-native")
    bounds = [n * k // workers for k in range(workers + 1)]
    return list(_pool.map(call, bounds[:-1], bounds[1:]))


def _pointers(mats) -> array.array:
    """The matrices' addresses as a C array of pointers (at ``.buffer_info()[0]``; keep it alive meanwhile)."""
    return array.array("Q", [m.data_ptr() for m in mats])


def _coef_rows(coef, n, out):
    """(scalar, per-row tensor or None) for the kernels from a float or an (n, out, 1) tensor."""
    if isinstance(coef, torch.Tensor):
        return 0.0, coef.to(torch.float32).expand(n, out, 1).reshape(n, out).contiguous()
    return float(coef), None


def _dense(t):
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def _run(kernel, mats, a, b, coef, outputs):
    """One kernel over the n layers of stacked factors a (n, 2, out, r), b (n, 2, r, in): ``mats`` the n
    fp32 (out, in) inputs (W or G), ``outputs`` the kernel's per-layer-strided outputs, split over threads."""
    n, _, out, r = a.shape
    inner = b.shape[-1]
    a, b = a.contiguous(), b.contiguous()
    table = _pointers(mats)  # alive until the calls return
    mats_at = table.buffer_info()[0]
    c, rows = _coef_rows(coef, n, out)
    rows_at = rows.data_ptr() if rows is not None else 0
    steps = [(t.data_ptr(), t.nbytes // n) for t in (a, b, *outputs)]  # base address, bytes per layer

    def call(s, e):
        a_at, b_at, *outs_at = (at + s * step for at, step in steps)
        return kernel(e - s, out, inner, r, mats_at + 8 * s, a_at, b_at, rows_at and rows_at + 4 * s * out, c,
                      *outs_at)

    if any(_parallel(call, n)):
        raise RuntimeError(f"loha native kernels: rank {r} is not compiled in")


def build(weights, a, b, coef, out=None) -> torch.Tensor:
    """W + coef·P1⊙P2 for each layer, stacked (n, out, in): ``weights`` n fp32 matrices (out, in) or conv
    kernels (out, in/groups, kh, kw), read as (out, in·kh·kw); written into ``out`` when given."""
    shape = (a.shape[0], a.shape[2], b.shape[-1])
    if out is None:
        built = torch.empty(shape, dtype=torch.float32)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"loha native build: out must be a contiguous float32 tensor of shape {shape}")
    else:
        built = out
    mats = [_dense(w) for w in weights]
    wrong = next((m for m in mats if m.numel() != shape[1] * shape[2]), None)
    if wrong is not None:  # the kernel would read past its end
        raise ValueError(f"loha native build: a base weight of shape {tuple(wrong.shape)} where the adapter's "
                         f"factors need {shape[1]}×{shape[2]} elements; give the layer a weight of its own shape")
    _run(library().loha_build, mats, a, b, coef, (built,))
    return built


def grads(gs, a, b, coef) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂A, ∂B) of the stacked factors from each layer's G (n tensors shaped like the weights, None: zero)."""
    zero = None
    mats = []
    for g in gs:
        if g is None:
            zero = torch.zeros(a.shape[2], b.shape[-1], dtype=torch.float32) if zero is None else zero
            g = zero
        mats.append(_dense(g))
    da, db = torch.empty(a.shape, dtype=torch.float32), torch.empty(b.shape, dtype=torch.float32)
    _run(library().loha_grads, mats, a, b, coef, (da, db))
    return da, db
