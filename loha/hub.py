"""Loading base models quietly and with errors a user can act on (shared by train_loha_sdxl.py and infer.py).

- diffusers' SDXL pipeline module imports transformers' ``CLIPImageProcessor``, which without torchvision
  resolves to its PIL twin with a notice on every run; that one import is made with that one logger quiet.
- Loading bars of local folders (nothing is downloaded) are hidden; hub downloads keep theirs.
- "Not found" with the hub offline becomes: pass a local folder, or allow downloads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path

IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


def import_sdxl_pipeline():
    """diffusers' StableDiffusionXLPipeline, imported without transformers' torchvision notice: the SDXL
    pipeline and IP-adapter modules import ``CLIPImageProcessor``/``SiglipImageProcessor`` (for features
    SDXL generation never uses), which without torchvision resolve to their PIL twins with a warning on
    every run. Only that module's logger is quieted, only for this import; its other messages are errors."""
    if importlib.util.find_spec("torchvision") is not None:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline
    logger = logging.getLogger("transformers.utils.import_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from diffusers import StableDiffusionXLPipeline
        from diffusers.loaders import ip_adapter  # noqa: F401 - the other importer of the two names
    finally:
        logger.setLevel(level)
    return StableDiffusionXLPipeline


def quiet_loading(path):
    """No transformers/diffusers loading bars while loading a local folder (nothing to wait for); a hub id
    keeps them (a download is worth watching)."""
    return quiet_bars() if Path(str(path)).is_dir() else contextlib.nullcontext()


@contextlib.contextmanager
def quiet_bars():
    """No transformers/diffusers progress bars (loading or writing model files) inside this block."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled())
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars[0]:
            transformers_logging.enable_progress_bar()
        if bars[1]:
            diffusers_logging.enable_progress_bar()


def load_error(what: str, name: str, error: BaseException) -> str:
    """One line for a model that would not load: the hub-offline case says what to do."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline and not Path(name).exists():
        return (f"cannot load {what} {name}: it is not a local folder, and HF_HUB_OFFLINE=1 forbids downloading "
                "it; pass a local diffusers folder, or unset HF_HUB_OFFLINE to download it")
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = next((line for line in lines if "stacktrace above" not in line), type(error).__name__)
    return f"cannot load {what} {name}: {text}"
