"""On-disk layouts: PEFT's LoHa folder (native), the kohya/LyCORIS/ComfyUI single file, safe reading.

Only safetensors is ever read, and its header is validated before any tensor is allocated: no pickle is
ever opened. Loading is strict: every key must be understood and land somewhere, every shape must fit,
and nothing in the model changes until the whole file has been checked. Writing is atomic and
deterministic (the same adapter gives the same bytes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from . import names
from .cli import first_line
from .inject import (
    _matches,
    _require_adapters,
    _set_module,
    adapter_modules,
    inject,
    is_text_encoder,
    loha_layers,
    unwrap,
)
from .layer import TUCKER_NAMES, AdapterLayer, DiffLayer, LoHaError, LoHaLayer, adapter_for

FACTOR_NAMES = TUCKER_NAMES[:4]
PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# What an adapter file may hold. The largest real SDXL LoHa (ComfyUI's trainer: every Linear/Conv2d with
# factors and alpha, every bias and norm with a difference, about 7,000 tensors, a 1 MiB header) is far
# below both bounds; a file over them is a size bomb and is refused from its first bytes.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 50_000
MAX_DELTA = 1e3  # |scale·ΔW| beyond this (SDXL's weights are below 10) is a broken or crafted adapter
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL",
               torch.int16: "I16"}
KEY_SUFFIXES = (*TUCKER_NAMES, "alpha", "dora_scale", "diff", "diff_b")
OTHER_ALGOS = {"lora_down": "LoRA", "lora_up": "LoRA", "lora_A": "LoRA", "lora_B": "LoRA",
               "lokr_w1": "LoKr", "lokr_w2": "LoKr", "oft_blocks": "OFT", "oft_diag": "OFT"}


class LoHaFileError(LoHaError):
    """An adapter file or folder that cannot be used as it is."""


# --------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_directory(dest):
    """Yield a temp folder beside ``dest``; on success fsync it and move it to ``dest`` atomically.

    A crash leaves ``dest`` either as it was or complete, never half-written. Replacing an existing
    ``dest`` is one atomic exchange (Linux renameat2); where that is unavailable it takes two renames,
    and a crash between them leaves the previous version whole in a ``.<name>.old-*`` sibling.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_path(f)
        old = None
        if dest.exists() and _exchange_paths(tmp, dest):
            old = tmp  # now holds the previous version
        else:
            if dest.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
        _fsync_path(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange_paths(a, b) -> bool:
    """Swap two existing paths in one atomic step (renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_file(dest):
    """Yield an open binary file beside ``dest``; on success fsync it and rename it over ``dest``."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_path(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(dest, data: bytes):
    """Write ``data`` to a temp file beside ``dest``, fsync, then rename over ``dest``."""
    with atomic_file(dest) as f:
        f.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


@dataclass
class Lazy:
    """A tensor to write that is made only when its bytes are written (its dtype and shape known before)."""
    dtype: torch.dtype
    shape: tuple
    make: object  # () -> torch.Tensor

    def __call__(self) -> torch.Tensor:
        t = self.make()
        if t.dtype != self.dtype or tuple(t.shape) != tuple(self.shape):
            raise LoHaError(f"internal: a tensor came out {t.dtype} {list(t.shape)}, announced as {self.dtype} "
                            f"{list(self.shape)}")
        return t


def _layout(tensors: dict, metadata: dict | None) -> tuple[bytes, list[str]]:
    """The header (keys and metadata sorted, padded to 8 bytes) and the tensor order it describes."""
    specs, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        dtype, shape = (t.dtype, tuple(t.shape)) if isinstance(t, (torch.Tensor, Lazy)) else _made(t)
        if dtype not in DTYPE_NAMES:
            raise LoHaError(f"cannot write {name}: dtype {dtype} has no safetensors name")
        size = math.prod(shape) * dtype.itemsize
        specs[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = {"__metadata__": dict(sorted(metadata.items())), **specs} if metadata else specs
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, list(specs)


def _made(make) -> tuple:
    t = make()
    return t.dtype, tuple(t.shape)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, deterministically: header keys and metadata sorted, tensors in name
    order (safetensors' own writer orders the metadata by a per-process hash, so two identical runs
    would write different files)."""
    header, order = _layout(tensors, metadata)
    return b"".join([header, *(bytes(_tensor_bytes(tensors[n])) for n in order)])


def write_safetensors(dest, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors_bytes`` streamed to ``dest`` atomically, one tensor at a time: ``tensors`` maps names to
    tensors, to ``Lazy`` entries, or to zero-argument callables that make one (called twice: for the header,
    then for its bytes), so a whole checkpoint is never in memory at once."""
    header, order = _layout(tensors, metadata)
    with atomic_file(dest) as f:
        f.write(header)
        for name in order:
            f.write(_tensor_bytes(tensors[name]() if callable(tensors[name]) else tensors[name]))
    return Path(dest)


def _cpu(t, dtype):
    t = t.detach().to(dtype=dtype or t.dtype)
    return t if t.is_meta else t.to("cpu").contiguous()


def _common(values: dict) -> tuple:
    """(most common value, {key: value} for the others)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {k: v for k, v in values.items() if v != common}


def _target_paths(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules()
            if p and not p.endswith(".base_layer") and (adapter_for(m) is not None or isinstance(m, LoHaLayer))}


def _short_targets(model, paths) -> list[str]:
    """The shortest target list (e.g. ["to_q", "to_out.0"]) that matches exactly ``paths`` in ``model``."""
    def suffix(p):
        parts = p.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    short = sorted({suffix(p) for p in paths})
    matched = {p for p in _target_paths(model) if _matches(p, set(short))}
    return short if matched == set(paths) else sorted(paths)


def entries_of(model) -> dict[str, ModuleWeights]:
    """{module path: ModuleWeights} of every adapter in ``model``, detached: what every writer writes."""
    out = {}
    for path, layer in _require_adapters(unwrap(model)).items():
        if isinstance(layer, LoHaLayer):
            out[path] = ModuleWeights(tuple(f.detach() for f in layer.factors()), layer.alpha,
                                      None if layer.dora_scale is None else layer.dora_scale.detach(), None,
                                      None if layer.diff_b is None else layer.diff_b.detach())
        else:
            out[path] = ModuleWeights(None, diff=None if layer.diff is None else layer.diff.detach(),
                                      diff_b=None if layer.diff_b is None else layer.diff_b.detach())
    return out


def _is_wide(model, path) -> bool:
    module = _base_of(model.get_submodule(path))
    return isinstance(module, nn.Conv2d) and any(k != 1 for k in module.kernel_size)


def _peft_incompatible(model, entries) -> str | None:
    bad = next((p for p, mw in entries.items() if mw.factors is None or mw.dora_scale is not None
                or mw.diff_b is not None), None)
    if bad:
        return (f"{bad} has DoRA or full differences, which PEFT's LoHa cannot hold; write it as a kohya/LyCORIS "
                "file instead")
    wide = {mw.tucker for p, mw in entries.items() if _is_wide(model, p)}
    if len(wide) > 1:
        return "these adapters mix Tucker and flattened conv factors, which one PEFT config cannot describe"
    return None


def peft_config(model, entries=None, *, base_model=None, rank_dropout=0.0, module_dropout=0.0) -> dict:
    """PEFT's LoHaConfig for these adapters (ranks/alphas that differ go to the patterns); ``model`` names
    the modules (a live model, or a meta skeleton)."""
    model = unwrap(model)
    entries = entries_of(model) if entries is None else entries
    r, rank_pattern = _common({p: mw.rank for p, mw in entries.items()})
    alpha, alpha_pattern = _common({p: mw.alpha for p, mw in entries.items()})
    return {
        "peft_type": "LOHA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": r, "alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "rank_dropout": rank_dropout, "module_dropout": module_dropout,
        "target_modules": _short_targets(model, list(entries)), "exclude_modules": None,
        "init_weights": True, "use_effective_conv2d": any(mw.tucker for mw in entries.values()),
        "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    }


def write_peft(directory, model, entries: dict[str, ModuleWeights], *, base_model=None, dtype=None,
               rank_dropout=0.0, module_dropout=0.0) -> Path:
    """A PEFT LoHa folder for ``entries`` (module paths of ``model``), atomically."""
    problem = _peft_incompatible(model, entries)
    if problem:
        raise LoHaError(problem)
    config = peft_config(model, entries, base_model=base_model, rank_dropout=rank_dropout,
                         module_dropout=module_dropout)
    tensors = {}
    for path, mw in entries.items():
        names_ = TUCKER_NAMES if mw.tucker else FACTOR_NAMES
        tensors.update({f"{PEFT_PREFIX}{path}.{n}": _cpu(f, dtype) for n, f in zip(names_, mw.factors)})
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        metadata = {"format": "pt", "loha.config": json.dumps(config)}
        (tmp / PEFT_WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata))
    return directory


def save(model: nn.Module, directory, *, base_model: str | None = None, dtype=None) -> Path:
    """Write the adapters of ``model`` as a PEFT LoHa folder (adapter_config.json +
    adapter_model.safetensors), atomically. ``PeftModel.from_pretrained(model, directory)`` loads it."""
    model = unwrap(model)
    layers = list(loha_layers(model).values())
    first = layers[0] if layers else None
    return write_peft(directory, model, entries_of(model), base_model=base_model, dtype=dtype,
                      rank_dropout=getattr(first, "rank_dropout", 0.0),
                      module_dropout=getattr(first, "module_dropout", 0.0))


def kohya_tensors(parts, *, dtype=None, naming: str = "sgm") -> dict[str, torch.Tensor]:
    """{name + ".hada_w1_a" ...: tensor, name + ".alpha": 0-dim tensor, ...} for ``parts``, a list of
    (component, model that names the modules, entries): factors (and hada_t1/t2), alpha, dora_scale, and
    diff/diff_b for full differences. ``naming`` "sgm" (kohya's lora_unet_input_blocks_…, the default) or
    "diffusers" (LyCORIS's lycoris_down_blocks_…)."""
    if naming not in ("sgm", "diffusers"):
        raise LoHaError(f"naming must be 'sgm' or 'diffusers', got {naming!r}")
    tensors = {}
    for component, model, entries in parts:
        for path, mw in entries.items():
            name = names.kohya_name(component, model, path, naming)
            if mw.factors is not None:
                names_ = TUCKER_NAMES if mw.tucker else FACTOR_NAMES
                tensors.update({f"{name}.{n}": _cpu(f, dtype) for n, f in zip(names_, mw.factors)})
                tensors[f"{name}.alpha"] = torch.tensor(mw.alpha, dtype=torch.float32)
            for extra in ("dora_scale", "diff", "diff_b"):
                t = getattr(mw, extra)
                if t is not None:
                    tensors[f"{name}.{extra}"] = _cpu(t, dtype)
    return tensors


def kohya_state_dict(model: nn.Module, text_encoder: nn.Module | None = None,
                     text_encoder_2: nn.Module | None = None, *, dtype=None, naming: str = "sgm"
                     ) -> dict[str, torch.Tensor]:
    """``kohya_tensors`` of a model's (and its text encoders') live adapters."""
    return kohya_tensors(_parts(model, text_encoder, text_encoder_2), dtype=dtype, naming=naming)


def _parts(model, text_encoder=None, text_encoder_2=None):
    return [(c, unwrap(m), entries_of(m)) for c, m in
            (("unet", model), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)) if m is not None]


def network_args(parts) -> dict:
    """kohya's ss_network_args for these adapters: algo, conv_dim/conv_alpha, use_tucker, dora_wd."""
    args = {"algo": "loha"}
    wide = [mw for _, model, entries in parts for p, mw in entries.items()
            if mw.factors is not None and _is_wide(model, p)]
    if wide:
        args["conv_dim"] = str(_common({i: mw.rank for i, mw in enumerate(wide)})[0])
        args["conv_alpha"] = f"{_common({i: mw.alpha for i, mw in enumerate(wide)})[0]:g}"
        args["use_tucker"] = str(any(mw.tucker for mw in wide))
    if any(mw.dora_scale is not None for _, _, entries in parts for mw in entries.values()):
        args["dora_wd"] = "True"
    return args


def write_kohya(file, parts, *, base_model: str | None = None, metadata: dict | None = None, dtype=None,
                naming: str = "sgm", preset: str | None = None) -> Path:
    """One kohya/LyCORIS safetensors file for ``parts`` (see kohya_tensors), with kohya's metadata."""
    tensors = kohya_tensors(parts, dtype=dtype, naming=naming)
    every = [mw for _, _, entries in parts for mw in entries.values()]
    lohas = [mw for mw in every if mw.factors is not None]
    rank = _common(dict(enumerate(mw.rank for mw in lohas)))[0] if lohas else 1
    alpha = _common(dict(enumerate(mw.alpha for mw in lohas)))[0] if lohas else 1.0
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps({**network_args(parts), **({"preset": preset} if preset else {})},
                                      sort_keys=True),
        # kohya's name is the file's or folder's own (a path on the trainer's machine means nothing elsewhere);
        # loha.base_model keeps the absolute path or hub id another folder on this machine can load
        "ss_sd_model_name": Path(base_model).name if base_model and Path(base_model).is_absolute()
        else base_model or "",
        "loha.base_model": base_model or "",
    }
    unet = next((m for c, m, _ in parts if c == "unet"), None)
    if unet is not None and names.is_sdxl_unet(unet):
        meta.update({"ss_base_model_version": "sdxl_base_v1-0", "modelspec.sai_model_spec": "1.0.0",
                     "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models"})
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, safetensors_bytes(tensors, meta))
    return file


def export_kohya(model: nn.Module, file, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, *, base_model: str | None = None,
                 metadata: dict | None = None, dtype=None, naming: str = "sgm", preset: str | None = None) -> Path:
    """One safetensors file in the kohya/LyCORIS layout, which ComfyUI, AUTOMATIC1111 and kohya load.

    An SDXL UNet gets SGM names by default (lora_unet_input_blocks_4_1_…; ``naming="diffusers"`` gives
    LyCORIS's lycoris_down_blocks_1_…); any other model plain lora_unet_<path>. ``preset`` (the LyCORIS
    preset the adapters came from) goes into ``ss_network_args`` with conv_dim/conv_alpha/use_tucker.
    """
    return write_kohya(file, _parts(model, text_encoder, text_encoder_2), base_model=base_model,
                       metadata=metadata, dtype=dtype, naming=naming, preset=preset)


# --------------------------------------------------------------------------------------- reading
def _refuse_pickle(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoHaFileError(f"{path.name}: '{path.suffix}' files are Python pickles, which can run code when "
                            "opened; this tool reads only .safetensors (convert the file in a sandbox you trust)")


def read_header(path, *, max_header=MAX_HEADER_BYTES, max_tensors=MAX_TENSORS) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, data start) of a safetensors file, checked against its size and the
    bounds before anything is allocated: no tensor is read."""
    path = Path(path)
    _refuse_pickle(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            # Pickle/zip magic is also a valid header length (0x80 in the low byte: 1 file in 256), so it
            # only names the error once the bytes fail as safetensors. Nothing is unpickled either way.
            pickled = LoHaFileError(f"{path.name} is a PyTorch pickle/zip file, not safetensors; it was not opened")
            looks_pickled = head[:2] == b"PK" or head[:1] == b"\x80"
            if len(head) < 8:
                raise LoHaFileError(f"{path.name} is not a safetensors file: only {size} bytes long")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                if looks_pickled:
                    raise pickled
                raise LoHaFileError(f"{path.name} is truncated or not safetensors: its header claims {n} bytes "
                                    f"but the file has {size}")
            if n > max_header:
                raise LoHaFileError(f"{path.name}: its header claims {n} bytes, over the {max_header >> 20} MiB "
                                    f"that any real adapter needs (about 1 MiB at most); refused as a size bomb")
            raw = f.read(n)
            if looks_pickled and not raw.lstrip()[:1] == b"{":
                raise pickled
    except OSError as e:
        raise LoHaFileError(f"cannot read {path}: {e.strerror or e}") from None
    count = raw.count(b'"data_offsets"')  # an upper bound on the entries, before any parsing
    if count > max_tensors:
        raise LoHaFileError(f"{path.name} holds {count:,} tensors, over the {max_tensors:,} that any real "
                            "adapter has (the largest, ComfyUI's full trainer output, about 7,000); refused as "
                            "a size bomb")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: crafted deep nesting
        raise LoHaFileError(f"{path.name} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise LoHaFileError(f"{path.name} is not a valid safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoHaFileError(f"{path.name}: __metadata__ must map strings to strings")
    _check_layout(path.name, header, size - 8 - n)
    return header, metadata, 8 + n


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, after checking its header against its size and bounds."""
    path = Path(path)
    _, metadata, _ = read_header(path)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error type and others for damaged files
        raise LoHaFileError(f"{path.name} is damaged: {first_line(e)}") from None
    return tensors, metadata


def _check_layout(name, header, data_len):
    spans = []
    for key, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise LoHaFileError(f"{name}: tensor entry {key!r} is malformed")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise LoHaFileError(f"{name}: tensor {key!r} has dtype {dtype!r}; adapters use F16, BF16 or F32")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise LoHaFileError(f"{name}: tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise LoHaFileError(f"{name}: tensor {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise LoHaFileError(f"{name}: tensor {key!r} points past the end of the file (truncated download?)")
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise LoHaFileError(f"{name}: tensor {key!r} claims shape {shape} but holds {end - begin} bytes")
        spans.append((begin, end, key))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise LoHaFileError(f"{name}: tensors {a!r} and {b!r} overlap; the file is corrupt or crafted")


@dataclass
class ModuleWeights:
    """One module's part of an adapter file: LoHa factors (flat: w1a, w1b, w2a, w2b; Tucker: + t1, t2) with
    alpha and an optional DoRA ``dora_scale``, and/or full differences ``diff`` (weight) and ``diff_b`` (bias)."""
    factors: tuple | None
    alpha: float = 1.0
    dora_scale: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    keys: dict = field(default_factory=dict)  # suffix -> the file's key, for messages

    @property
    def rank(self) -> int:
        return self.factors[1].shape[0]

    @property
    def tucker(self) -> bool:
        return self.factors is not None and len(self.factors) == 6

    @property
    def weight_shape(self) -> tuple:
        """(out, in·k) for flat factors, (out, in, kh, kw) for Tucker ones."""
        f = self.factors
        if self.tucker:
            return (f[0].shape[1], f[1].shape[1], *f[4].shape[2:])
        return (f[0].shape[0], f[1].shape[1])

    @property
    def w1a(self):
        return self.factors[0]

    @property
    def w1b(self):
        return self.factors[1]


@dataclass
class Adapter:
    """A parsed adapter file: per component ("unet", "text_encoder", "text_encoder_2"), module name ->
    weights. ``style`` is "peft" (names are module paths) or "kohya" (kohya/LyCORIS/ComfyUI names)."""
    style: str
    components: dict
    metadata: dict
    source: str
    named: bool = True  # False: a one-model PEFT folder/file, whose part is the model it is loaded into

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model") or None


def _group(tensors: dict, source: str, strip) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"hada_w1_a": t, ..., "alpha": t}}; anything else is an error naming the keys."""
    modules, unknown = {}, []
    for key, t in tensors.items():
        if not key.isprintable():  # names end up in messages: no newlines or terminal escapes from a file
            raise LoHaFileError(f"{source}: tensor name {_short(key)} contains control characters")
        name, _, suffix = key.rpartition(".")
        if suffix in KEY_SUFFIXES and name:
            modules.setdefault(strip(name), {})[suffix] = (key, t)
        else:
            unknown.append(key)
    if unknown:
        for marker, algo in OTHER_ALGOS.items():
            if any(marker in k for k in unknown):
                raise LoHaFileError(f"{source} holds {algo} weights (e.g. {unknown[0]}), not a LoHa; "
                                    "load it with a tool made for that format")
        raise LoHaFileError(f"{source}: unexpected keys {unknown[:3]}{' …' if len(unknown) > 3 else ''}; "
                            "this is not a LoHa file this tool understands")
    return modules


def _abs_max(t) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _module_weights(name, parts, alpha, source, allow_nonfinite) -> ModuleWeights:
    keys = {s: k for s, (k, _) in parts.items()}
    parts = {s: t for s, (_, t) in parts.items()}
    has_factors = any(n in parts for n in TUCKER_NAMES)
    extras = {k: parts.get(k) for k in ("dora_scale", "diff", "diff_b")}
    for suffix, t in extras.items():
        if t is not None and not t.dtype.is_floating_point:
            raise LoHaFileError(f"{source}: module {name} has a non-float {suffix}")
    if not has_factors:
        if extras["diff"] is None and extras["diff_b"] is None:
            raise LoHaFileError(f"{source}: module {name} has only {sorted(parts)}, no LoHa factors or differences "
                                "(incomplete or damaged file)")
        if extras["dora_scale"] is not None or "alpha" in parts:
            what = "dora_scale" if extras["dora_scale"] is not None else "alpha"
            raise LoHaFileError(f"{source}: module {name} has {what} but no LoHa factors (incomplete or damaged file)")
        mw = ModuleWeights(None, diff=extras["diff"], diff_b=extras["diff_b"], keys=keys)
        _check_finite(name, [t for t in (mw.diff, mw.diff_b) if t is not None], source, allow_nonfinite)
        return mw
    if extras["diff"] is not None:
        raise LoHaFileError(f"{source}: module {name} has both LoHa factors and a full weight difference (diff); "
                            "not a layout any tool writes")
    wanted = TUCKER_NAMES if "hada_t1" in parts or "hada_t2" in parts else FACTOR_NAMES
    missing = [n for n in wanted if n not in parts]
    if missing:
        raise LoHaFileError(f"{source}: module {name} is missing {', '.join(missing)} (incomplete or damaged file)")
    factors = tuple(parts[n] for n in wanted)
    if not all(t.dtype.is_floating_point for t in factors):
        raise LoHaFileError(f"{source}: module {name} has non-float factors")
    w1a, w1b, w2a, w2b = factors[:4]
    shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(wanted, factors))
    if len(factors) == 4:
        ok = (w1a.ndim == w1b.ndim == w2a.ndim == w2b.ndim == 2 and w1a.shape == w2a.shape
              and w1b.shape == w2b.shape and w1a.shape[1] == w1b.shape[0] and w1a.shape[1] > 0)
        out_f, rank, in_f = (w1a.shape[0], w1a.shape[1], w1b.shape[1]) if ok else (0, 0, 0)
    else:
        t1, t2 = factors[4:]
        ok = (w1a.ndim == w1b.ndim == 2 and w1a.shape == w2a.shape and w1b.shape == w2b.shape and t1.ndim == 4
              and t1.shape == t2.shape and w1a.shape[0] == w1b.shape[0] == t1.shape[0] == t1.shape[1] > 0)
        out_f, rank, in_f = (w1a.shape[1], w1a.shape[0], w1b.shape[1]) if ok else (0, 0, 0)
    if not ok:
        raise LoHaFileError(f"{source}: module {name} has factor shapes that disagree: {shapes}")
    if rank > max(out_f, in_f):
        raise LoHaFileError(f"{source}: module {name} claims rank {rank} for a {in_f}->{out_f} layer; implausible")
    if "alpha" in parts:
        a = parts["alpha"]
        if a.numel() != 1:
            raise LoHaFileError(f"{source}: module {name} has a non-scalar alpha of shape {list(a.shape)}")
        alpha = float(a.reshape(()).item())
    if alpha is None:
        raise LoHaFileError(f"{source}: module {name} has no alpha; the file is incomplete")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoHaFileError(f"{source}: module {name} has alpha {alpha}; alpha must be a finite number > 0")
    checked = [*factors, *(t for t in (extras["dora_scale"], extras["diff_b"]) if t is not None)]
    _check_finite(name, checked, source, allow_nonfinite)
    mw = ModuleWeights(factors, alpha, extras["dora_scale"], None, extras["diff_b"], keys)
    if not allow_nonfinite:
        _check_magnitude(name, mw, source)
    return mw


def _check_finite(name, tensors, source, allow_nonfinite):
    if not allow_nonfinite and not all(torch.isfinite(t).all() for t in tensors):
        raise LoHaFileError(f"{source}: module {name} has NaN/Inf values (a diverged run?); "
                            "pass allow_nonfinite=True only if you know why")


def _check_magnitude(name, mw: ModuleWeights, source):
    """Refuse a scale that makes ΔW absurd: a cheap bound from the factors' largest entries first, the exact
    max|scale·ΔW| only when the bound is over ``MAX_DELTA``."""
    scale = mw.alpha / mw.rank
    f = [t.double() for t in mw.factors]
    terms = mw.rank ** 2 if mw.tucker else mw.rank  # summands of one entry of P1 (and of P2)
    bound = scale * terms ** 2 * math.prod(_abs_max(t) for t in f)
    if math.isfinite(bound) and bound <= MAX_DELTA:
        return
    from .math import delta

    peak = _abs_max(delta(f, scale))
    if not math.isfinite(peak) or peak > MAX_DELTA:
        raise LoHaFileError(f"{source}: module {name}: alpha {mw.alpha:g} at rank {mw.rank} makes |ΔW| reach "
                            f"{peak:.3g} (base weights are below 10), which drowns the model or overflows; the "
                            "file is broken or crafted")


PATTERN_KEY = re.compile(r"[\w.\-]+")  # module-path-like: no regex syntax that can backtrack


def _positive_number(value, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_peft_config(config: dict, source: str):
    """A config comes from strangers too: refuse values of the wrong type, and rank/alpha patterns with
    regex syntax (a crafted pattern could backtrack for hours) before anything uses them."""
    for key, integer in (("r", True), ("alpha", False)):
        if config.get(key) is not None and not _positive_number(config[key], integer):
            raise LoHaFileError(f"{source}: config {key}={_short(config[key])} is not a positive "
                                f"{'integer' if integer else 'number'}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise LoHaFileError(f"{source}: config {key} must be a JSON object, got {type(patterns).__name__}")
        for pattern, value in patterns.items():
            if not PATTERN_KEY.fullmatch(pattern) or not _positive_number(value, integer):
                raise LoHaFileError(f"{source}: config {key} entry {_short(pattern)}: {_short(value)} is not a module "
                                    f"name mapped to a positive {'integer' if integer else 'number'}")


def _peft_value(config: dict, key: str, path: str):
    """config[key] ("r" or "alpha") for module ``path``, unless its rank_pattern/alpha_pattern names it."""
    for pattern, value in (config.get("rank_pattern" if key == "r" else "alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", path):
            return value
    return config.get(key)


def _read_peft_config(file: Path) -> dict:
    try:
        if file.stat().st_size > 10 * 1024 * 1024:
            raise LoHaFileError(f"{file}: implausibly large config")
        config = json.loads(file.read_text())
    except OSError as e:
        raise LoHaFileError(f"cannot read {file}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LoHaFileError(f"{file} is not valid JSON") from None
    if not isinstance(config, dict):
        raise LoHaFileError(f"{file} is not a JSON object")
    if config.get("peft_type") != "LOHA":
        raise LoHaFileError(f"{file} describes a PEFT {_short(config.get('peft_type'))} adapter, not LOHA")
    return config


def _read_peft(weights: Path, config: dict | None, allow_nonfinite, alpha) -> tuple[dict, dict]:
    tensors, metadata = read_safetensors(weights)
    if config is None and "loha.config" in metadata:
        with contextlib.suppress(ValueError, RecursionError):
            config = json.loads(metadata["loha.config"])
    if not isinstance(config, dict):
        config = {"alpha": alpha} if alpha is not None else None
    if config is None:
        raise LoHaFileError(f"{weights.name} has no {PEFT_CONFIG} beside it, so its alpha is unknown; put the "
                            "config next to it or pass alpha=")
    _check_peft_config(config, weights.name)
    bad = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if bad:
        raise LoHaFileError(f"{weights.name}: keys {bad[:3]} do not start with {PEFT_PREFIX!r}; not a PEFT file")
    modules = {}
    for name, parts in _group(tensors, weights.name, lambda n: n[len(PEFT_PREFIX):]).items():
        if any(s in parts for s in ("dora_scale", "diff", "diff_b", "alpha")):
            extra = next(s for s in ("dora_scale", "diff", "diff_b", "alpha") if s in parts)
            raise LoHaFileError(f"{weights.name}: module {name} has a {extra} key, which PEFT LoHa folders never hold")
        mw = _module_weights(name, parts, _peft_value(config, "alpha", name), weights.name, allow_nonfinite)
        declared = _peft_value(config, "r", name)
        if declared is not None and declared != mw.rank:
            raise LoHaFileError(f"{weights.name}: module {name} has rank {mw.rank} but the config says r={declared}")
        modules[name] = mw
    meta = {"base_model": config.get("base_model_name_or_path") or metadata.get("loha.base_model")}
    return modules, meta


def _read_kohya(file: Path, allow_nonfinite) -> Adapter:
    tensors, metadata = read_safetensors(file)
    components, unknown = {}, []
    for name, parts in _group(tensors, file.name, lambda n: n).items():
        component = names.component_of(name)
        if component is None:
            unknown.append(name)
            continue
        components.setdefault(component, {})[name] = _module_weights(name, parts, None, file.name, allow_nonfinite)
    if unknown:
        if (any(n.startswith("lora_te_") for n in unknown)
                or metadata.get("ss_base_model_version", "").startswith(("sd_v1", "sd_v2"))):
            raise LoHaFileError(f"{file.name} was made for Stable Diffusion 1.x/2.x (lora_te_ keys or "
                                "ss_base_model_version): this LoHa was trained for a different base model; "
                                "SDXL files use lora_te1_/lora_te2_")
        known = [*names.UNET_PREFIXES, *names.TEXT_PREFIXES.values()]
        raise LoHaFileError(f"{file.name}: module names {unknown[:3]} have none of the known prefixes "
                            f"{known}; not a kohya/LyCORIS/ComfyUI LoHa file")
    base = metadata.get("loha.base_model") or metadata.get("ss_sd_model_name") or None
    return Adapter("kohya", components, {"base_model": base, **metadata}, file.name)


def read_adapter(path, *, allow_nonfinite: bool = False, alpha: float | None = None) -> Adapter:
    """Parse and validate any supported adapter path without touching a model.

    Accepts a training output dir or checkpoint-N dir (with unet/ and optionally text_encoder/,
    text_encoder_2/), a PEFT LoHa folder, a bare PEFT adapter_model.safetensors, or a kohya/LyCORIS/
    ComfyUI file.
    """
    path = Path(path)
    try:
        is_dir = path.is_dir()
        path.stat()
    except OSError as e:
        raise LoHaFileError(f"cannot open {path}: {e.strerror or e}") from None
    if is_dir:
        if (path / PEFT_CONFIG).is_file() or (path / PEFT_WEIGHTS).is_file():
            modules, meta = _read_peft_dir(path, allow_nonfinite)
            named = path.name in COMPONENTS
            return Adapter("peft", {path.name if named else "unet": modules}, meta, str(path), named)
        subdirs = [c for c in COMPONENTS if (path / c).is_dir()]
        if subdirs and not (path / "model_index.json").is_file():
            components, meta = {}, {}
            for c in subdirs:
                components[c], m = _read_peft_dir(path / c, allow_nonfinite)
                meta = meta or m
            return Adapter("peft", components, meta, str(path))
        if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file() or (
                (path / "config.json").is_file() and any(path.glob("diffusion_pytorch_model*"))):
            raise LoHaFileError(f"{path} is a base model (a diffusers pipeline or model folder), not an adapter; "
                                "pass it as --pretrained_model_name_or_path (loha.load(pipe, ...) takes the adapter: a "
                                "training output folder, a PEFT LoHa folder or a .safetensors LoHa file)")
        found = sorted(p.name for p in path.iterdir())[:8]
        raise LoHaFileError(f"{path} holds no adapter: expected {PEFT_CONFIG} + {PEFT_WEIGHTS} or a unet/ "
                            f"subfolder, found {found or 'nothing'}")
    if not path.is_file():
        raise LoHaFileError(f"{path} is not a regular file")
    header, _, _ = read_header(path)
    if header and all(k.startswith(PEFT_PREFIX) for k in header):
        sibling = path.parent / PEFT_CONFIG
        config = _read_peft_config(sibling) if sibling.is_file() else None
        modules, meta = _read_peft(path, config, allow_nonfinite, alpha)
        named = path.parent.name in COMPONENTS
        return Adapter("peft", {path.parent.name if named else "unet": modules}, meta, str(path), named)
    return _read_kohya(path, allow_nonfinite)


def _read_peft_dir(path: Path, allow_nonfinite):
    if not (path / PEFT_CONFIG).is_file():
        raise LoHaFileError(f"{path} has no {PEFT_CONFIG}; a PEFT LoHa folder needs it for rank and alpha")
    if not (path / PEFT_WEIGHTS).is_file():
        raise LoHaFileError(f"{path} has no {PEFT_WEIGHTS}" + (
            " (only adapter_model.bin, a pickle, which is refused)" if (path / "adapter_model.bin").exists() else ""))
    return _read_peft(path / PEFT_WEIGHTS, _read_peft_config(path / PEFT_CONFIG), allow_nonfinite, None)


# --------------------------------------------------------------------------------------- applying
def _module_paths(model) -> list[str]:
    return [p for p, _ in model.named_modules() if p and not p.endswith(".base_layer")]


def _resolve(adapter: Adapter, component: str, model) -> dict[str, ModuleWeights]:
    """Map the file's module names for ``component`` to module paths in ``model``; two names for one module
    (e.g. an SGM and a diffusers name) are refused, naming both."""
    modules = adapter.components[component]
    if adapter.style == "peft":
        if component == "unet":
            return dict(modules)
        present = dict(model.named_modules())
        return {_text_model_alias(name, present): mw for name, mw in modules.items()}
    table = names.accepted_names(component, model, _module_paths(model))
    unknown = [n for n in modules if n not in table]
    if unknown:
        hint = ("an SD 1.5 / 2.x or other non-SDXL LoHa?" if component == "unet" and names.is_sdxl_unet(model)
                else "this LoHa was trained for a different base model")
        more = f" (and {unknown[1]!r})" if len(unknown) > 1 else ""
        raise LoHaFileError(f"{adapter.source}: {len(unknown)} module names in the file do not exist in this "
                            f"{component}: no module {unknown[0]!r}{more}; {hint}")
    resolved, origin = {}, {}
    for name, mw in modules.items():
        path = table[name]
        if path in resolved:
            raise LoHaFileError(f"{adapter.source} names the module {path} twice, as {origin[path]!r} and {name!r}; "
                                "which one is meant is ambiguous, so the file is refused")
        resolved[path], origin[path] = mw, name
    return resolved


def _text_model_alias(name: str, present) -> str:
    """CLIP paths with or without "text_model." (transformers 4 vs 5 CLIPTextModel), whichever exists."""
    if name in present:
        return name
    alias = name[len("text_model."):] if name.startswith("text_model.") else "text_model." + name
    return alias if alias in present else name


def _base_of(module):
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _check_fits(entries: dict[str, ModuleWeights], model, source: str, component: str):
    all_modules = dict(model.named_modules())
    absent = [p for p in entries if p not in all_modules]
    if absent:
        raise LoHaFileError(f"{source}: {len(absent)} modules in the file do not exist in this {component}, e.g. "
                            f"{absent[:2]}; this LoHa was trained for a different base model")
    for path, mw in entries.items():
        base = _base_of(all_modules[path])
        if mw.factors is not None:
            if adapter_for(base) is None:
                raise LoHaFileError(f"{source} adapts {path} ({type(base).__name__}), which is not Linear or Conv2d; "
                                    "LoHa factors fit only those")
            w = base.weight
            fits = (tuple(w.shape) == mw.weight_shape and isinstance(base, nn.Conv2d)) if mw.tucker else (
                w.shape[0] == mw.weight_shape[0] and w[0].numel() == mw.weight_shape[1])
            if not fits:
                raise LoHaFileError(f"this LoHa was trained for a different base model: {path} has weight "
                                    f"{list(w.shape)} here but {list(mw.weight_shape)} in {source}")
            if mw.dora_scale is not None:
                d = mw.dora_scale
                if d.dim() != w.dim() or not (tuple(d.shape) == (w.shape[0], *[1] * (w.dim() - 1))
                                              or tuple(d.shape) == (1, w.shape[1], *[1] * (w.dim() - 2))):
                    raise LoHaFileError(f"{source}: {path} has dora_scale {list(d.shape)}, which fits neither its "
                                        f"rows nor its columns of {list(w.shape)}")
        for label, t, target in (("diff", mw.diff, "weight"), ("diff_b", mw.diff_b, "bias")):
            if t is None:
                continue
            have = getattr(base, target, None)
            if not isinstance(have, torch.Tensor) or tuple(have.shape) != tuple(t.shape):
                shape = list(have.shape) if isinstance(have, torch.Tensor) else "none"
                raise LoHaFileError(f"this LoHa was trained for a different base model: {path}.{target} is {shape} "
                                    f"here but {label} is {list(t.shape)} in {source}")
    current = adapter_modules(model)
    if any(layer.merged for layer in current.values()):
        raise LoHaFileError(f"the adapters in this {component} are merged into its weights; call "
                            "loha.unmerge(model) before loading new adapter weights")
    if current:
        missing = sorted(set(current) - set(entries))
        extra = sorted(set(entries) - set(current))
        if missing or extra:
            raise LoHaFileError(
                f"{source} does not match the adapters already in this {component}: "
                + (f"{len(missing)} adapted modules have no weights in the file, e.g. {missing[:2]}; "
                   if missing else "")
                + (f"{len(extra)} file modules are not adapted here, e.g. {extra[:2]}; " if extra else "")
                + "call loha.eject(model) first to load a different adapter")
        for path, mw in entries.items():
            layer = current[path]
            if not _same_structure(layer, mw):
                raise LoHaFileError(f"{source}: {path} has a different adapter layout or rank in the file than here; "
                                    "call loha.eject(model) first to load a different adapter")


def _same_structure(layer, mw: ModuleWeights) -> bool:
    if mw.factors is None:
        return isinstance(layer, DiffLayer) and (layer.diff is None) == (mw.diff is None) and (
            layer.diff_b is None) == (mw.diff_b is None)
    return (isinstance(layer, LoHaLayer) and layer.rank == mw.rank and layer.use_tucker == mw.tucker
            and (layer.dora_scale is None) == (mw.dora_scale is None) and (layer.diff_b is None) == (mw.diff_b is None))


def _apply(entries: dict[str, ModuleWeights], model, options):
    if not adapter_modules(model):
        lohas = {p: mw for p, mw in entries.items() if mw.factors is not None}
        if lohas:
            layouts = {p: {"use_tucker": mw.tucker, "dora": mw.dora_scale is not None,
                           "bias_diff": mw.diff_b is not None} for p, mw in lohas.items()}
            inject(model, rank=_common({p: mw.rank for p, mw in lohas.items()})[0], target_modules=list(lohas),
                   ranks={p: mw.rank for p, mw in lohas.items()}, alphas={p: mw.alpha for p, mw in lohas.items()},
                   layouts=layouts, **options)
        modules = dict(model.named_modules())
        for path, mw in entries.items():
            if mw.factors is None:
                _set_module(model, path, DiffLayer(modules[path], mw.diff, mw.diff_b))
    layers = adapter_modules(model)
    with torch.no_grad():
        for path, mw in entries.items():
            layer = layers[path]
            if mw.factors is not None:
                for param, t in zip(layer.factors(), mw.factors):
                    param.copy_(t)
                layer.alpha = mw.alpha
            if mw.dora_scale is not None:  # its orientation (per output row or input column) is the file's
                layer.dora_scale = mw.dora_scale.detach().to(torch.float32).clone()
            for name in ("diff", "diff_b"):
                t = getattr(mw, name)
                if t is not None:
                    getattr(layer, name).copy_(t)
    return list(entries)


def load(target, path, *, component: str | None = None, allow_nonfinite: bool = False,
         alpha: float | None = None, **options):
    """Load any supported LoHa into ``target`` (injecting if needed), strictly.

    ``target`` is a model (a UNet or a text encoder; ``component`` says which part of a multi-part file
    to take, default "unet") or a pipeline with ``.unet`` (and ``.text_encoder``/``.text_encoder_2``),
    which gets every part the file holds. ``path`` may also be an ``Adapter`` already parsed by
    ``read_adapter``, so a caller that inspected the file does not read it twice. Returns the loaded module
    paths (a dict per component for a pipeline). ``options`` go to the layers when injecting.
    """
    adapter = path if isinstance(path, Adapter) else read_adapter(path, allow_nonfinite=allow_nonfinite, alpha=alpha)
    if isinstance(target, nn.Module):
        if not adapter.named:  # one model's PEFT weights: they belong to whatever part they are loaded into
            component = component or ("text_encoder" if is_text_encoder(unwrap(target)) else "unet")
            adapter = replace(adapter, components={component: next(iter(adapter.components.values()))})
        elif component is None and len(adapter.components) == 1:
            component = next(iter(adapter.components))
        component = component or "unet"
        if component not in COMPONENTS:
            raise LoHaError(f"component must be one of {COMPONENTS}, got {component!r}")
        others = sorted(set(adapter.components) - {component})
        if others or component not in adapter.components:
            raise LoHaFileError(f"{adapter.source} holds weights for {sorted(adapter.components)}, but one model was "
                                f"given as {component!r}; pass the pipeline (loha.load(pipe, path)) or component=")
        models = {component: unwrap(target)}
        text = is_text_encoder(models[component])
        if text != (component != "unet"):
            given = f"a text encoder ({type(models[component]).__name__})" if text else \
                f"not a text encoder ({type(models[component]).__name__})"
            raise LoHaFileError(f"{adapter.source} holds {component} weights, but the model given is {given}; load "
                                "it into the matching model (component= names the part), or pass the pipeline")
    else:
        missing = [c for c in adapter.components if not isinstance(getattr(target, c, None), nn.Module)]
        if missing:
            raise LoHaFileError(f"{adapter.source} holds weights for {missing} but the pipeline has no such model")
        models = {c: unwrap(getattr(target, c)) for c in adapter.components}
    plan = {}
    for c, model in models.items():  # validate every part before changing anything
        entries = _resolve(adapter, c, model)
        _check_fits(entries, model, adapter.source, c)
        plan[c] = entries
    loaded = {c: _apply(entries, models[c], options) for c, entries in plan.items()}
    return loaded if not isinstance(target, nn.Module) else loaded[component]
