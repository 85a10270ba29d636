"""Shared fixtures: an offline scratch Hugging Face home, and the tiny SDXL pipeline."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# huggingface_hub, transformers and datasets read these when first imported, which happens
# while test modules are collected, before any fixture runs: so they are set at import.
_HF_HOME = tempfile.mkdtemp(prefix="loha-tests-hf-")
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": _HF_HOME}
os.environ.update(_OFFLINE_ENV)
# MKL picks GEMM code paths by buffer alignment, so the same Linear on the same input can differ in the
# last bit between two allocations. Strict conditional-numerical-reproducibility mode (best code path
# for this CPU, alignment-independent) makes "bit for bit" checks meaningful. Set before torch loads MKL;
# subprocesses started by the tests inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def offline_hf_home():
    """Keep the session offline, with caches in a scratch HF_HOME (removed at exit)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _OFFLINE_ENV.items():
            mp.setenv(key, value)
        yield Path(_HF_HOME)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny StableDiffusionXLPipeline folder (seed 0), built once per session."""
    from loha.tiny_sdxl import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_single_file(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline written as one single-file checkpoint (A1111/ComfyUI layout), by the toolbox."""
    from loha import toolbox

    out = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    toolbox.merge(tiny_pipeline_dir, [], out, progress=False)
    return out


@pytest.fixture
def one_thread_and_fresh_accelerate():
    """One thread: these models are tiny and the test machine is shared. accelerate keeps process-wide
    state; reset it so each in-process run starts as a new process would. (The training test modules use
    it for every test.)"""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
