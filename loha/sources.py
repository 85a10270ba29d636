"""Where an SDXL base model comes from, for every tool that reads one (trainer, infer.py, the toolbox): a
diffusers folder, a hub id, or a single-file checkpoint in the A1111/ComfyUI layout (Pony, Illustrious,
NoobAI, Juggernaut and most other community models ship as one), read through diffusers' own single-file
loader. A single file's diffusers config comes from ``--config`` (a diffusers folder or hub id), otherwise
from SDXL base 1.0's in the local Hugging Face cache.

Also what an adapter records of its base (``provenance``): an absolute path or hub id, the file name, and
kohya's hashes of a single file (``ss_sd_model_hash``: sha256 of 64 KiB at 1 MiB, 8 hex digits, as
AUTOMATIC1111's old model hash; ``ss_new_sd_model_hash``: sha256 of the whole file), so that another folder
or another machine can find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import CHECKPOINT_HEADER_BYTES, CHECKPOINT_TENSORS, PREFIX
from .formats import LoHaFileError, read_header
from .hub import load_error, quiet_loading
from .layer import LoHaError

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Source:
    """A base model: ``name`` as given; ``single`` a single-file checkpoint (then ``config`` is the diffusers
    folder or hub id its configs, tokenizers and scheduler come from)."""
    name: str
    single: bool = False
    config: str | None = None
    revision: str | None = None
    variant: str | None = None
    cache_dir: str | None = None

    @property
    def configs(self) -> str:
        """The diffusers folder or hub id the components' configs are read from."""
        return self.config if self.single else self.name

    @property
    def hub(self) -> dict:
        return dict(revision=None if self.single else self.revision, cache_dir=self.cache_dir)


def is_single_file(name) -> bool:
    return Path(str(name)).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) and not Path(str(name)).is_dir()


def check_single_file(path: Path, what: str, prefix: str | None = PREFIX["unet"]):
    """Refuse a pickle, a missing file or a file that is not a safetensors checkpoint, reading only its header
    (with the adapter loader's size bounds) before anything is allocated."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoHaError(f"{what} {path} is a pickle ({path.suffix}), which is never loaded (it can run code); use "
                        "its .safetensors version, or convert it with a tool you trust")
    if not path.is_file():
        raise LoHaError(f"{what} {path} does not exist")
    try:
        header, _, _ = read_header(path, max_header=CHECKPOINT_HEADER_BYTES, max_tensors=CHECKPOINT_TENSORS)
    except LoHaFileError as e:
        raise LoHaError(f"{what} {path}: {e}") from None
    if prefix is not None and not any(k.startswith(prefix) for k in header):
        raise LoHaError(f"{what} {path} is not a single-file SDXL checkpoint (no {prefix}* tensors; an adapter "
                        "file?)")


def default_config(cache_dir=None) -> str:
    """SDXL base 1.0's configs, from the hub or the local cache; offline without them, one line saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return snapshot_download(SDXL_BASE, cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=["*.json", "*.txt", "tokenizer*/*"])
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise LoHaError(f"a single-file checkpoint needs diffusers configs, and {SDXL_BASE}'s are not in the local "
                        "cache" + (" (HF_HUB_OFFLINE=1)" if offline else "") + "; pass --config with a diffusers "
                        "SDXL folder or hub id") from None


def resolve(name: str, *, config=None, revision=None, variant=None, cache_dir=None, what="the base model") -> Source:
    """A checked Source for ``name``; nothing is loaded."""
    name = str(name)
    if is_single_file(name):
        check_single_file(Path(name), what)
        if config is not None and not Path(config).is_dir() and not HUB_ID.fullmatch(str(config)):
            raise LoHaError(f"--config {config} is neither a folder here nor a hub id like org/name")
        return Source(str(Path(name).resolve()), True, str(config) if config else default_config(cache_dir),
                      revision, variant, cache_dir)
    if not Path(name).is_dir() and not HUB_ID.fullmatch(name):
        raise LoHaError(f"cannot load {what} {name}: it is neither a folder here, a .safetensors file, nor a hub id "
                        "like org/name")
    return Source(str(Path(name).resolve()) if Path(name).is_dir() else name, False, None, revision, variant,
                  cache_dir)


def load_components(source: Source, dtype, vae_dtype=None, *, need_vae=True) -> dict:
    """{tokenizer, tokenizer_2, text_encoder, text_encoder_2, unet, vae (unless ``need_vae`` is False),
    scheduler_config}: every SDXL component in ``dtype`` (the VAE in ``vae_dtype``), loaded as a hub model is."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from .hub import import_sdxl_pipeline

    configs, hub = source.configs, source.hub
    out = {}
    try:
        with quiet_loading(configs):
            out["tokenizer"] = AutoTokenizer.from_pretrained(configs, subfolder="tokenizer", **hub)
            out["tokenizer_2"] = AutoTokenizer.from_pretrained(configs, subfolder="tokenizer_2", **hub)
            out["scheduler_config"] = DDPMScheduler.load_config(configs, subfolder="scheduler", **hub)
        if source.single:
            pipeline = import_sdxl_pipeline()
            with quiet_loading(configs):
                pipe = pipeline.from_single_file(source.name, config=configs, dtype=dtype, cache_dir=source.cache_dir,
                                                 local_files_only=_offline(), tokenizer=out["tokenizer"],
                                                 tokenizer_2=out["tokenizer_2"])
            for key in ("text_encoder", "text_encoder_2", "unet", "vae"):
                out[key] = getattr(pipe, key)
            if need_vae and vae_dtype is not None:
                out["vae"] = out["vae"].to(vae_dtype)
        else:
            weights = dict(variant=source.variant, dtype=dtype, **hub)
            with quiet_loading(configs):
                out["text_encoder"] = CLIPTextModel.from_pretrained(configs, subfolder="text_encoder", **weights)
                out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(configs, subfolder="text_encoder_2",
                                                                                    **weights)
                out["unet"] = UNet2DConditionModel.from_pretrained(configs, subfolder="unet", **weights)
                if need_vae:
                    out["vae"] = AutoencoderKL.from_pretrained(configs, subfolder="vae",
                                                               **{**weights, "dtype": vae_dtype or dtype})
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LoHaError(load_error("the model", source.name, e)) from None
    if not need_vae:
        out.pop("vae", None)
    return out


def load_vae(name: str, dtype, *, config=None, cache_dir=None):
    """A separate VAE: a diffusers folder, hub id, or single .safetensors file (its config from ``config``'s
    vae/ folder, else SDXL base 1.0's)."""
    from diffusers import AutoencoderKL

    try:
        if is_single_file(name):
            check_single_file(Path(name), "--pretrained_vae_model_name_or_path", prefix=None)
            configs = config or default_config(cache_dir)
            with quiet_loading(configs):
                return AutoencoderKL.from_single_file(name, config=configs, subfolder="vae", dtype=dtype,
                                                      cache_dir=cache_dir, local_files_only=_offline())
        with quiet_loading(name):
            return AutoencoderKL.from_pretrained(name, cache_dir=cache_dir, dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LoHaError(load_error("the VAE", name, e)) from None


def component_configs(source: Source) -> dict:
    """{unet, vae, text_encoder, text_encoder_2, scheduler}: the components' configs only (no weights), for a
    plan or a memory estimate."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    configs, hub = source.configs, source.hub
    try:
        with quiet_loading(configs):
            return {"unet": dict(UNet2DConditionModel.load_config(configs, subfolder="unet", **hub)),
                    "vae": dict(AutoencoderKL.load_config(configs, subfolder="vae", **hub)),
                    "text_encoder": CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder", **hub),
                    "text_encoder_2": CLIPTextConfig.from_pretrained(configs, subfolder="text_encoder_2", **hub),
                    "scheduler": dict(DDPMScheduler.load_config(configs, subfolder="scheduler", **hub))}
    except (OSError, ValueError) as e:
        raise LoHaError(load_error("the model configs of", configs, e)) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------ provenance
def legacy_hash(path: Path) -> str:
    """AUTOMATIC1111's old model hash, as kohya writes it (ss_sd_model_hash): 8 hex digits of the sha256 of the
    64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def file_sha256(path: Path, cache_dir=None) -> str:
    """sha256 of a whole file (ss_new_sd_model_hash, A1111's current model hash), remembered per (path, size,
    modification time) so a run does not read a 7 GB checkpoint twice."""
    stat = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()
    memo = Path(cache_dir) / "file-hashes" / f"{key}.txt" if cache_dir else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    if memo is not None:
        from .formats import atomic_write_bytes

        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(memo, value.encode())
    return value


def provenance(name: str | None, vae: str | None = None, cache_dir=None) -> dict[str, str]:
    """The base model (and VAE) as an adapter file records it: kohya's ss_sd_model_name (the file's or folder's
    own name), ss_sd_model_hash / ss_new_sd_model_hash for a single file, and loha.base_model, an absolute path or
    a hub id that another folder or machine can use (with the name and hashes to find it again elsewhere)."""
    out = {}
    for key, value in (("sd_model", name), ("vae", vae)):
        if not value:
            continue
        path = Path(value)
        if path.exists():
            out[f"ss_{key}_name"] = path.name
            if path.is_file():
                out[f"ss_{key}_hash"] = legacy_hash(path)
                out[f"ss_new_{key}_hash"] = file_sha256(path, cache_dir)
            value = str(path.resolve())
        else:
            out[f"ss_{key}_name"] = value
        out["loha.base_model" if key == "sd_model" else "loha.vae"] = value
    return out


def unreachable_base_note(recorded: str | None, metadata: dict) -> str:
    """What to tell a user whose adapter names a base that is not here: which base it was made for (name, hash)
    and how to pass it."""
    name = Path(recorded).name if recorded else metadata.get("ss_sd_model_name")
    digest = metadata.get("ss_new_sd_model_hash") or metadata.get("ss_sd_model_hash")
    made_for = f"{name}" + (f" (sha256 {digest[:12]}…)" if digest and len(digest) > 12 else
                            f" (hash {digest})" if digest else "")
    where = f", recorded at {recorded}," if recorded and recorded != name else ""
    return (f"this adapter was made for the base model {made_for}{where} which is not found here; pass it with "
            "--pretrained_model_name_or_path (a diffusers folder, hub id or .safetensors file)")


def found(recorded: str | None) -> bool:
    """Whether a recorded base can be loaded from here: an existing folder or file, or a hub id."""
    if not recorded:
        return False
    path = Path(recorded)
    if path.exists():
        return True
    return HUB_ID.fullmatch(recorded) is not None and not recorded.endswith(".safetensors") and not path.is_absolute()

