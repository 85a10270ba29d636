"""Key maps between diffusers module paths and the names the rest of the ecosystem uses.

- Stability's SGM layout (what kohya, ComfyUI, AUTOMATIC1111 and single-file checkpoints call the SDXL
  UNet's modules), for every block: resnets, attentions, down/upsamplers, conv_in/out, the time and
  label embeddings, and the norms.
- kohya/LyCORIS adapter names: ``lora_unet_<SGM path>`` (kohya, the default), ``lycoris_<diffusers path>``
  (LyCORIS's own ``save_weights``), ``lora_unet_<diffusers path>`` (accepted by ComfyUI),
  ``diffusion_model.<SGM path>`` (ComfyUI's trainer), and ``lora_te1_``/``lora_te2_`` for the CLIPs.
"""

from __future__ import annotations

import re

UNET_PREFIXES = ("lora_unet_", "lycoris_", "diffusion_model.")
TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?")
MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?")


def is_sdxl_unet(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "addition_embed_type", None) == "text_time"
            and getattr(config, "layers_per_block", None) == 2 and hasattr(model, "down_blocks"))


def _join(*parts) -> str:
    return ".".join(p for p in parts if p)


def _resnet(rest: str | None) -> str | None:
    if not rest:
        return None
    head, _, tail = rest.partition(".")
    return _join(RESNET_PARTS[head], tail) if head in RESNET_PARTS else None


def sgm_path(path: str, unet) -> str | None:
    """The SGM path of a diffusers SDXL-UNet module or parameter path, or None for a path SGM has no name
    for. ``unet`` tells which up blocks have attentions (their upsampler sits one slot later)."""
    for name, target in TOP_LEVEL.items():
        if path == name or path.startswith(name + "."):
            return target + path[len(name):]
    if m := MID.fullmatch(path):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return _join("middle_block.1", rest)
        inner = _resnet(rest)
        return None if inner is None else _join(f"middle_block.{2 * j}", inner)
    m = BLOCK.fullmatch(path)
    if m is None:
        return None
    side, i, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if side == "down":
        if kind == "downsamplers":
            return None if not rest or not rest.startswith("conv") else _join(f"input_blocks.{3 * (i + 1)}.0.op",
                                                                              rest[len("conv") + 1:])
        block = f"input_blocks.{3 * i + j + 1}"
    else:
        if kind == "upsamplers":
            has_attention = hasattr(unet.up_blocks[i], "attentions")
            return _join(f"output_blocks.{3 * i + 2}.{2 if has_attention else 1}", rest)
        block = f"output_blocks.{3 * i + j}"
    if kind == "attentions":
        return _join(f"{block}.1", rest)
    inner = _resnet(rest)
    return None if inner is None else _join(f"{block}.0", inner)


def text_path(path: str) -> str:
    """A CLIP module path with the ``text_model.`` prefix the ecosystem uses (transformers 5 dropped it)."""
    return path if path.startswith("text_model.") else "text_model." + path


def kohya_name(component: str, model, path: str, naming: str = "sgm") -> str:
    """The adapter name kohya/LyCORIS files use for ``path``: naming "sgm" (kohya, the default for an SDXL
    UNet: lora_unet_input_blocks_4_1_…) or "diffusers" (LyCORIS: lycoris_down_blocks_1_…)."""
    if component == "unet":
        if naming == "diffusers" or not is_sdxl_unet(model):
            return ("lycoris_" if naming == "diffusers" else "lora_unet_") + path.replace(".", "_")
        sgm = sgm_path(path, model)
        if sgm is None:
            raise ValueError(f"{path} has no SGM name")
        return "lora_unet_" + sgm.replace(".", "_")
    return TEXT_PREFIXES[component] + text_path(path).replace(".", "_")


def accepted_names(component: str, model, paths) -> dict[str, str]:
    """{every name a file may use for a module: its path} for the module ``paths`` of ``model``."""
    table = {}
    for path in paths:
        if component == "unet":
            flat = path.replace(".", "_")
            table[f"lora_unet_{flat}"] = path
            table[f"lycoris_{flat}"] = path
            if is_sdxl_unet(model) and (sgm := sgm_path(path, model)) is not None:
                table["lora_unet_" + sgm.replace(".", "_")] = path
                table["diffusion_model." + sgm] = path
        else:
            table[TEXT_PREFIXES[component] + text_path(path).replace(".", "_")] = path
    return table


def component_of(name: str) -> str | None:
    """Which pipeline part a kohya/LyCORIS/ComfyUI adapter name belongs to."""
    if name.startswith(UNET_PREFIXES):
        return "unet"
    return next((c for c, prefix in TEXT_PREFIXES.items() if name.startswith(prefix)), None)
