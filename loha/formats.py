"""On-disk layouts: PEFT's LoHa folder (native), the kohya/LyCORIS single file, key maps, safe reading.

Only safetensors is ever read, and its header is validated before any tensor is allocated: no pickle is
ever opened. Loading is strict: every key must be understood and land somewhere, every shape must fit,
and nothing in the model changes until the whole file has been checked.
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
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .inject import FACTOR_NAMES, _matches, _require_adapters, adapter_modules, inject, unwrap
from .layer import LoHaError, LoHaLinear

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lycoris_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
EXPORT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}
OTHER_ALGOS = {"lora_down": "LoRA", "lora_up": "LoRA", "lora_A": "LoRA", "lora_B": "LoRA",
               "lokr_w1": "LoKr", "lokr_w2": "LoKr", "hada_t1": "LoHa with CP/Tucker (conv) factors",
               "dora_scale": "DoRA-style LoHa", "diff": "a full weight difference", "oft_blocks": "OFT"}


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


def atomic_write_bytes(dest, data: bytes):
    """Write ``data`` to a temp file beside ``dest``, fsync, then rename over ``dest``."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_path(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


def _cpu(t, dtype):
    t = t.detach().to(dtype=dtype or t.dtype)
    return t if t.is_meta else t.to("cpu").contiguous()


def _common(values: dict) -> tuple:
    """(most common value, {key: value} for the others)."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {k: v for k, v in values.items() if v != common}


def _short_targets(model, paths) -> list[str]:
    """The shortest target list (e.g. ["to_q", "to_out.0"]) that matches exactly ``paths`` in ``model``."""
    def suffix(p):
        parts = p.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]

    short = sorted({suffix(p) for p in paths})
    matched = {p for p in _linear_paths(model) if _matches(p, set(short))}
    return short if matched == set(paths) else sorted(paths)


def peft_config(model, *, base_model=None) -> dict:
    """PEFT's LoHaConfig for the adapters in ``model`` (ranks/alphas that differ go to the patterns)."""
    model = unwrap(model)
    layers = _require_adapters(model)
    r, rank_pattern = _common({p: m.rank for p, m in layers.items()})
    alpha, alpha_pattern = _common({p: m.alpha for p, m in layers.items()})
    first = next(iter(layers.values()))
    return {
        "peft_type": "LOHA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": r, "alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "rank_dropout": first.rank_dropout, "module_dropout": first.module_dropout,
        "target_modules": _short_targets(model, list(layers)), "exclude_modules": None,
        "init_weights": True, "use_effective_conv2d": False, "layers_to_transform": None,
        "layers_pattern": None, "modules_to_save": None,
    }


def save(model: nn.Module, directory, *, base_model: str | None = None, dtype=None) -> Path:
    """Write the adapters of ``model`` as a PEFT LoHa folder (adapter_config.json +
    adapter_model.safetensors), atomically. ``PeftModel.from_pretrained(model, directory)`` loads it."""
    model = unwrap(model)
    layers = _require_adapters(model)
    config = peft_config(model, base_model=base_model)
    tensors = {f"{PEFT_PREFIX}{p}.{n}": _cpu(getattr(m, n), dtype) for p, m in layers.items() for n in FACTOR_NAMES}
    metadata = {"format": "pt", "loha.config": json.dumps(config)}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / PEFT_WEIGHTS).write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    return directory


def is_sdxl_unet(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "addition_embed_type", None) == "text_time"
            and getattr(config, "layers_per_block", None) == 2 and hasattr(model, "down_blocks"))


def sgm_path(path: str) -> str:
    """diffusers UNet path -> Stability's SGM path, for the attention blocks (the rest is unchanged)."""
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.", path):
        return f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1." + path[m.end():]
    if path.startswith("mid_block.attentions.0."):
        return "middle_block.1." + path[len("mid_block.attentions.0."):]
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.", path):
        return f"output_blocks.{3 * int(m[1]) + int(m[2])}.1." + path[m.end():]
    return path


def kohya_name(component: str, model, path: str) -> str:
    """The kohya/LyCORIS module name, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q."""
    if component == "unet" and is_sdxl_unet(model):
        path = sgm_path(path)
    elif component != "unet" and not path.startswith("text_model."):
        path = "text_model." + path  # transformers 5's CLIPTextModel dropped the prefix the ecosystem uses
    return EXPORT_PREFIX[component] + path.replace(".", "_")


def kohya_state_dict(model: nn.Module, text_encoder: nn.Module | None = None,
                     text_encoder_2: nn.Module | None = None, *, dtype=None) -> dict[str, torch.Tensor]:
    """{kohya name + ".hada_w1_a" ...: tensor, kohya name + ".alpha": 0-dim tensor} for every adapter."""
    tensors = {}
    for component, module in (("unet", model), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is None:
            continue
        module = unwrap(module)
        for path, layer in _require_adapters(module).items():
            name = kohya_name(component, module, path)
            for n in FACTOR_NAMES:
                tensors[f"{name}.{n}"] = _cpu(getattr(layer, n), dtype)
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return tensors


def export_kohya(model: nn.Module, file, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None, *, base_model: str | None = None,
                 metadata: dict | None = None, dtype=None) -> Path:
    """One safetensors file in the kohya/LyCORIS layout, which ComfyUI, AUTOMATIC1111 and kohya load.

    An SDXL UNet gets SGM names (lora_unet_input_blocks_4_1_...); any other model plain lora_unet_<path>.
    """
    tensors = kohya_state_dict(model, text_encoder, text_encoder_2, dtype=dtype)
    layers = [m for module in (model, text_encoder, text_encoder_2) if module is not None
              for m in adapter_modules(module).values()]
    rank, _ = _common({i: m.rank for i, m in enumerate(layers)})
    alpha, _ = _common({i: m.alpha for i, m in enumerate(layers)})
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps({"algo": "loha"}),
        "ss_sd_model_name": base_model or "",
        "loha.base_model": base_model or "",
    }
    if is_sdxl_unet(unwrap(model)):
        meta.update({"ss_base_model_version": "sdxl_base_v1-0", "modelspec.sai_model_spec": "1.0.0",
                     "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models"})
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, safetensors.torch.save(tensors, metadata=meta))
    return file


# --------------------------------------------------------------------------------------- reading
def _refuse_pickle(path: Path):
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoHaFileError(f"{path.name}: '{path.suffix}' files are Python pickles, which can run code when "
                            "opened; this tool reads only .safetensors (convert the file in a sandbox you trust)")


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, after checking its header against its size."""
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
            if n > size - 8 or n > MAX_HEADER_BYTES:
                if looks_pickled:
                    raise pickled
                raise LoHaFileError(f"{path.name} is truncated or not safetensors: its header claims {n} bytes "
                                    f"but the file has {size}")
            raw = f.read(n)
            if looks_pickled and not raw.lstrip()[:1] == b"{":
                raise pickled
    except OSError as e:
        raise LoHaFileError(f"cannot read {path}: {e.strerror or e}") from None
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
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error type and others for damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoHaFileError(f"{path.name} is damaged: {reason}") from None
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
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def factors(self):
        return self.w1a, self.w1b, self.w2a, self.w2b


@dataclass
class Adapter:
    """A parsed adapter file: per component ("unet", "text_encoder", "text_encoder_2"), module name ->
    weights. ``style`` is "peft" (names are module paths) or "kohya" (names are kohya/LyCORIS names)."""
    style: str
    components: dict
    metadata: dict
    source: str

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
        if suffix in FACTOR_NAMES or suffix == "alpha":
            modules.setdefault(strip(name), {})[suffix] = t
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


def _module_weights(name, parts, alpha, source, allow_nonfinite) -> ModuleWeights:
    missing = [n for n in FACTOR_NAMES if n not in parts]
    if missing:
        raise LoHaFileError(f"{source}: module {name} is missing {', '.join(missing)} (incomplete or damaged file)")
    w1a, w1b, w2a, w2b = (parts[n] for n in FACTOR_NAMES)
    if not all(t.dtype.is_floating_point for t in (w1a, w1b, w2a, w2b)):
        raise LoHaFileError(f"{source}: module {name} has non-float factors")
    if not (w1a.ndim == w1b.ndim == w2a.ndim == w2b.ndim == 2 and w1a.shape == w2a.shape
            and w1b.shape == w2b.shape and w1a.shape[1] == w1b.shape[0] and w1a.shape[1] > 0):
        raise LoHaFileError(f"{source}: module {name} has factor shapes that disagree: hada_w1_a {list(w1a.shape)}, "
                            f"hada_w1_b {list(w1b.shape)}, hada_w2_a {list(w2a.shape)}, hada_w2_b {list(w2b.shape)}")
    out_f, rank, in_f = w1a.shape[0], w1a.shape[1], w1b.shape[1]
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
    if not allow_nonfinite and not all(torch.isfinite(t).all() for t in (w1a, w1b, w2a, w2b)):
        raise LoHaFileError(f"{source}: module {name} has NaN/Inf factor values (a diverged run?); "
                            "pass allow_nonfinite=True only if you know why")
    return ModuleWeights(w1a, w1b, w2a, w2b, alpha)


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
        prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            unknown.append(name)
            continue
        components.setdefault(KOHYA_PREFIXES[prefix], {})[name] = _module_weights(
            name, parts, None, file.name, allow_nonfinite)
    if unknown:
        if (any(n.startswith("lora_te_") for n in unknown)
                or metadata.get("ss_base_model_version", "").startswith(("sd_v1", "sd_v2"))):
            raise LoHaFileError(f"{file.name} was made for Stable Diffusion 1.x/2.x (lora_te_ keys or "
                                "ss_base_model_version): this LoHa was trained for a different base model; "
                                "SDXL files use lora_te1_/lora_te2_")
        raise LoHaFileError(f"{file.name}: module names {unknown[:3]} have none of the known prefixes "
                            f"{sorted(KOHYA_PREFIXES)}; not a kohya/LyCORIS LoHa file")
    base = metadata.get("loha.base_model") or metadata.get("ss_sd_model_name") or None
    return Adapter("kohya", components, {"base_model": base, **metadata}, file.name)


def read_adapter(path, *, allow_nonfinite: bool = False, alpha: float | None = None) -> Adapter:
    """Parse and validate any supported adapter path without touching a model.

    Accepts a training output dir or checkpoint-N dir (with unet/ and optionally text_encoder/,
    text_encoder_2/), a PEFT LoHa folder, a bare PEFT adapter_model.safetensors, or a kohya/LyCORIS file.
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
            return Adapter("peft", {"unet": modules}, meta, str(path))
        subdirs = [c for c in COMPONENTS if (path / c).is_dir()]
        if subdirs:
            components, meta = {}, {}
            for c in subdirs:
                components[c], m = _read_peft_dir(path / c, allow_nonfinite)
                meta = meta or m
            return Adapter("peft", components, meta, str(path))
        found = sorted(p.name for p in path.iterdir())[:8]
        raise LoHaFileError(f"{path} holds no adapter: expected {PEFT_CONFIG} + {PEFT_WEIGHTS} or a unet/ "
                            f"subfolder, found {found or 'nothing'}")
    if not path.is_file():
        raise LoHaFileError(f"{path} is not a regular file")
    _refuse_pickle(path)
    tensors_peek = _peek_keys(path)
    if tensors_peek and all(k.startswith(PEFT_PREFIX) for k in tensors_peek):
        sibling = path.parent / PEFT_CONFIG
        config = _read_peft_config(sibling) if sibling.is_file() else None
        modules, meta = _read_peft(path, config, allow_nonfinite, alpha)
        return Adapter("peft", {"unet": modules}, meta, str(path))
    return _read_kohya(path, allow_nonfinite)


def _read_peft_dir(path: Path, allow_nonfinite):
    if not (path / PEFT_CONFIG).is_file():
        raise LoHaFileError(f"{path} has no {PEFT_CONFIG}; a PEFT LoHa folder needs it for rank and alpha")
    if not (path / PEFT_WEIGHTS).is_file():
        raise LoHaFileError(f"{path} has no {PEFT_WEIGHTS}" + (
            " (only adapter_model.bin, a pickle, which is refused)" if (path / "adapter_model.bin").exists() else ""))
    return _read_peft(path / PEFT_WEIGHTS, _read_peft_config(path / PEFT_CONFIG), allow_nonfinite, None)


def _peek_keys(path: Path) -> list[str]:
    """Tensor names from a header (validated by read_safetensors later; errors surface there)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                return []
            header = json.loads(f.read(n))
        return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return []


# --------------------------------------------------------------------------------------- applying
def _linear_paths(model) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules()
            if p and not p.endswith(".base_layer") and isinstance(m, (nn.Linear, LoHaLinear))}


def _resolve(adapter: Adapter, component: str, model) -> dict[str, ModuleWeights]:
    """Map the file's module names for ``component`` to module paths in ``model``."""
    modules = adapter.components[component]
    if adapter.style == "peft":
        if component == "unet":
            return dict(modules)
        present = dict(model.named_modules())
        return {_text_model_alias(name, present): mw for name, mw in modules.items()}
    table = {}
    for path, _ in model.named_modules():
        if not path or path.endswith(".base_layer"):
            continue
        flat = path.replace(".", "_")
        prefixes = ["lora_unet_", "lycoris_"] if component == "unet" else [EXPORT_PREFIX[component]]
        for prefix in prefixes:
            table[prefix + flat] = path
        table[kohya_name(component, model, path)] = path
    unknown = [n for n in modules if n not in table]
    if unknown:
        raise LoHaFileError(f"{adapter.source}: {len(unknown)} modules in the file do not exist in this "
                            f"{component}, e.g. {unknown[:2]}; this LoHa was trained for a different base model")
    return {table[n]: mw for n, mw in modules.items()}


def _text_model_alias(name: str, present) -> str:
    """CLIP paths with or without "text_model." (transformers 4 vs 5 CLIPTextModel), whichever exists."""
    if name in present:
        return name
    alias = name[len("text_model."):] if name.startswith("text_model.") else "text_model." + name
    return alias if alias in present else name


def _check_fits(entries: dict[str, ModuleWeights], model, source: str, component: str):
    linears = _linear_paths(model)
    all_modules = dict(model.named_modules())
    absent = [p for p in entries if p not in all_modules]
    if absent:
        raise LoHaFileError(f"{source}: {len(absent)} modules in the file do not exist in this {component}, e.g. "
                            f"{absent[:2]}; this LoHa was trained for a different base model")
    not_linear = [f"{p} ({type(all_modules[p]).__name__})" for p in entries if p not in linears]
    if not_linear:
        raise LoHaFileError(f"{source} adapts modules that are not Linear layers, e.g. {not_linear[:2]}; "
                            "only Linear (attention/projection) LoHa is supported")
    for path, mw in entries.items():
        out_f, in_f = linears[path].weight.shape
        if (mw.w1a.shape[0], mw.w1b.shape[1]) != (out_f, in_f):
            raise LoHaFileError(f"this LoHa was trained for a different base model: {path} is {in_f}->{out_f} "
                                f"here but {mw.w1b.shape[1]}->{mw.w1a.shape[0]} in {source}")
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
            if current[path].rank != mw.rank:
                raise LoHaFileError(f"{source}: {path} has rank {mw.rank} in the file but {current[path].rank} here")


def _apply(entries: dict[str, ModuleWeights], model, options):
    if not adapter_modules(model):
        ranks = {p: mw.rank for p, mw in entries.items()}
        alphas = {p: mw.alpha for p, mw in entries.items()}
        inject(model, rank=_common(ranks)[0], target_modules=list(entries),
               ranks=ranks, alphas=alphas, **options)
    layers = adapter_modules(model)
    with torch.no_grad():
        for path, mw in entries.items():
            layer = layers[path]
            for param, t in zip(layer.factors(), mw.factors()):
                param.copy_(t)
            layer.alpha = mw.alpha
    return list(entries)


def load(target, path, *, component: str | None = None, allow_nonfinite: bool = False,
         alpha: float | None = None, **options):
    """Load any supported LoHa into ``target`` (injecting if needed), strictly.

    ``target`` is a model (a UNet or a text encoder; ``component`` says which part of a multi-part file
    to take, default "unet") or a pipeline with ``.unet`` (and ``.text_encoder``/``.text_encoder_2``),
    which gets every part the file holds. ``path`` may also be an ``Adapter`` already parsed by
    ``read_adapter``, so a caller that inspected the file does not read it twice. Returns the loaded module
    paths (a dict per component for a pipeline). ``options`` go to LoHaLinear when injecting.
    """
    adapter = path if isinstance(path, Adapter) else read_adapter(path, allow_nonfinite=allow_nonfinite, alpha=alpha)
    if isinstance(target, nn.Module):
        component = component or "unet"
        if component not in COMPONENTS:
            raise LoHaError(f"component must be one of {COMPONENTS}, got {component!r}")
        others = sorted(set(adapter.components) - {component})
        if others or component not in adapter.components:
            raise LoHaFileError(f"{adapter.source} holds weights for {sorted(adapter.components)}, but one model was "
                                f"given as {component!r}; pass the pipeline (loha.load(pipe, path)) or component=")
        models = {component: unwrap(target)}
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
