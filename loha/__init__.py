"""LoHa (FedPara low-rank Hadamard product) adapters for PyTorch models, the SDXL UNet first.

    import loha
    paths = loha.inject(unet, rank=8)                    # the 560 attention linears ("attn-only")
    paths = loha.inject(unet, rank=8, preset="full", conv_rank=4)   # LyCORIS's full preset, convs too
    optimizer = torch.optim.AdamW(loha.trainable_parameters(unet), lr=1e-4, fused=True)
    loha.save(unet, "out/unet")                          # PEFT LoHa folder
    loha.export_kohya(unet, "out/my_loha.safetensors")   # ComfyUI / AUTOMATIC1111 / kohya
    loha.load(pipe.unet, "out/unet")                     # any of the above, or a LyCORIS/ComfyUI file
"""

from .formats import (
    Adapter,
    LoHaFileError,
    atomic_directory,
    atomic_file,
    atomic_write_bytes,
    export_kohya,
    load,
    read_adapter,
    read_safetensors,
    safetensors_bytes,
    save,
    write_safetensors,
)
from .grouped import LoHaStack
from .inject import (
    DEFAULT_PRESET,
    DEFAULT_TARGETS,
    PRESETS,
    TEXT_ENCODER_TARGETS,
    adapter_modules,
    adapter_state_dict,
    count_parameters,
    eject,
    inject,
    loha_layers,
    merge,
    preset_targets,
    scale_weight_norms,
    set_forward_mode,
    set_scale,
    stack,
    trainable_parameters,
    unmerge,
    unstack,
)
from .layer import FORWARD_MODES, DiffLayer, LoHaConv2d, LoHaError, LoHaLayer, LoHaLinear

__all__ = [
    "Adapter", "DEFAULT_PRESET", "DEFAULT_TARGETS", "DiffLayer", "FORWARD_MODES", "LoHaConv2d", "LoHaError",
    "LoHaFileError", "LoHaLayer", "LoHaLinear", "LoHaStack", "PRESETS", "TEXT_ENCODER_TARGETS", "adapter_modules",
    "adapter_state_dict", "atomic_directory", "atomic_file", "atomic_write_bytes", "count_parameters", "eject",
    "export_kohya", "inject", "load", "loha_layers", "merge", "preset_targets", "read_adapter", "read_safetensors",
    "safetensors_bytes", "save", "scale_weight_norms", "set_forward_mode", "set_scale", "stack",
    "trainable_parameters", "unmerge", "unstack", "write_safetensors",
]
__version__ = "0.2.0"
