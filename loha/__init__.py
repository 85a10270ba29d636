"""LoHa (FedPara low-rank Hadamard product) adapters for PyTorch models, the SDXL UNet first.

    import loha
    paths = loha.inject(unet, rank=8)            # to_q/to_k/to_v/to_out.0 -> LoHaLinear
    optimizer = torch.optim.AdamW(loha.trainable_parameters(unet), lr=1e-4)
    loha.save(unet, "out/unet")                  # PEFT LoHa folder
    loha.export_kohya(unet, "out/my_loha.safetensors")   # ComfyUI / AUTOMATIC1111 / kohya
    loha.load(pipe.unet, "out/unet")             # any of the above, or a LyCORIS file
"""

from .formats import (
    Adapter,
    LoHaFileError,
    atomic_directory,
    atomic_write_bytes,
    export_kohya,
    load,
    read_adapter,
    read_safetensors,
    save,
)
from .inject import (
    DEFAULT_TARGETS,
    adapter_modules,
    adapter_state_dict,
    count_parameters,
    eject,
    inject,
    merge,
    set_forward_mode,
    set_scale,
    stack,
    trainable_parameters,
    unmerge,
    unstack,
)
from .layer import FORWARD_MODES, LoHaError, LoHaLinear, LoHaStack

__all__ = [
    "Adapter", "DEFAULT_TARGETS", "FORWARD_MODES", "LoHaError", "LoHaFileError", "LoHaLinear", "LoHaStack",
    "adapter_modules",
    "adapter_state_dict", "atomic_directory", "atomic_write_bytes", "count_parameters", "eject",
    "export_kohya", "inject", "load", "merge", "read_adapter", "read_safetensors", "save",
    "set_forward_mode", "set_scale", "stack", "trainable_parameters", "unmerge", "unstack",
]
__version__ = "0.1.0"
