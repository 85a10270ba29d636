"""Whole SDXL checkpoints, tensor by tensor: a diffusers folder or one single-file ``.safetensors`` in the
layout AUTOMATIC1111, ComfyUI and Forge load (``model.diffusion_model.*`` for the UNet,
``conditioner.embedders.0.transformer.*`` for CLIP-L, ``conditioner.embedders.1.model.*`` for OpenCLIP
bigG with its fused ``in_proj``, ``first_stage_model.*`` for the VAE).

Nothing here holds a whole checkpoint in memory: tensors are read from their files one at a time
(safetensors maps them), and written the same way (``formats.write_safetensors``). The module structure
comes from meta-device skeletons, built from the base folder's configs or from SDXL base 1.0's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch

from . import names
from .cli import first_line
from .formats import LoHaFileError, read_header

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
PREFIX = {"unet": "model.diffusion_model.", "text_encoder": "conditioner.embedders.0.transformer.",
          "text_encoder_2": "conditioner.embedders.1.model.", "vae": "first_stage_model."}
CHECKPOINT_HEADER_BYTES = 64 * 1024 * 1024  # a whole SDXL checkpoint's header is about 300 KiB
CHECKPOINT_TENSORS = 100_000

# stabilityai/stable-diffusion-xl-base-1.0's text encoder configs (what a single file without --config is read as)
SDXL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


# ------------------------------------------------------------------------------------ skeletons
def skeletons(config: str | Path | None = None) -> dict:
    """{component: model on the meta device} (UNet and both text encoders), from a diffusers folder's
    configs, or SDXL base 1.0's when ``config`` is None: the module paths and shapes, no weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tiny_sdxl import SDXL_UNET_CONFIG

    if config is None:
        unet_config, te1, te2 = SDXL_UNET_CONFIG, CLIPTextConfig(**SDXL_CLIP_L), CLIPTextConfig(**SDXL_CLIP_G)
    else:
        folder = Path(config)
        try:
            unet_config = UNet2DConditionModel.load_config(str(folder), subfolder="unet")
            te1 = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
            te2 = CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))
        except (OSError, ValueError) as e:
            raise LoHaFileError(f"cannot read the model configs in {folder}: {first_line(e)}; give a diffusers "
                                "SDXL folder") from None
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(unet_config), "text_encoder": CLIPTextModel(te1),
                "text_encoder_2": CLIPTextModelWithProjection(te2)}


# ------------------------------------------------------------------------------ single-file keys
VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_TOP = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                "text_model.final_layer_norm.weight": "ln_final.weight",
                "text_model.final_layer_norm.bias": "ln_final.bias", "text_projection.weight": "text_projection"}
QKV = ("q_proj", "k_proj", "v_proj")


def vae_key(key: str, up_blocks: int) -> str | None:
    """diffusers AutoencoderKL key → LDM (first_stage_model) key, or None."""
    for old, new in VAE_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, kind, i, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"{side}.mid.block_{i + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        head, _, tail = rest.rpartition(".")
        return f"{side}.mid.attn_1.{VAE_ATTENTION.get(head, head)}.{tail}" if head in VAE_ATTENTION else None
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key):
        i, rest = int(m[1]), m[4]
        if m[3] is not None:
            return f"encoder.down.{i}.block.{m[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"encoder.down.{i}.downsample.{rest}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key):
        i, rest = up_blocks - 1 - int(m[1]), m[4]
        if m[3] is not None:
            return f"decoder.up.{i}.block.{m[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"decoder.up.{i}.upsample.{rest}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    return None


def openclip_key(key: str) -> tuple[str, slice | None] | None:
    """diffusers CLIPTextModelWithProjection key → (OpenCLIP key, the rows of a fused in_proj it fills) or None."""
    if key in OPENCLIP_TOP:
        return OPENCLIP_TOP[key], None
    m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        return None
    layer, module, kind = m[1], m[2], m[3]
    block = f"transformer.resblocks.{layer}"
    if module.startswith("self_attn.") and module.split(".")[1] in QKV:
        return f"{block}.attn.in_proj_{kind}", QKV.index(module.split(".")[1])
    return (f"{block}.{OPENCLIP_LAYER[module]}.{kind}", None) if module in OPENCLIP_LAYER else None


# ------------------------------------------------------------------------------ reading a checkpoint
@dataclass
class Tensor:
    """Where one diffusers-named tensor of a checkpoint is: a file and key (stored with this dtype and
    shape), the third of a fused in_proj (q, k or v) it is, if it is one; ``transpose``/``squeeze`` undo
    the single-file layout."""
    file: Path
    key: str
    stored_dtype: torch.dtype
    stored_shape: tuple
    third: int | None = None
    transpose: bool = False
    squeeze: bool = False

    @property
    def shape(self) -> tuple:
        shape = self.stored_shape
        if self.third is not None:
            shape = (shape[0] // 3, *shape[1:])
        if self.transpose:
            shape = shape[::-1]
        return (shape[0], math.prod(shape[1:])) if self.squeeze else shape

    def load(self) -> torch.Tensor:
        with safetensors.safe_open(str(self.file), "pt") as f:
            t = f.get_tensor(self.key)
        if self.third is not None:
            t = t.chunk(3)[self.third]
        if self.transpose:
            t = t.T
        if self.squeeze:
            t = t.reshape(t.shape[0], -1)
        return t.contiguous()


@dataclass
class Checkpoint:
    """An SDXL base model on disk: ``tensors[component][diffusers key]`` says where each tensor is."""
    path: Path
    kind: str  # "diffusers" or "single"
    tensors: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # a single file's own {key: Tensor}, every tensor


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]  # variants (x.fp16.safetensors) only when alone
    return plain or files


def open_checkpoint(path, skeleton: dict) -> Checkpoint:
    """Index a diffusers folder or a single file; nothing is loaded. Pickles (.ckpt, .bin) are refused."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LoHaFileError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        ckpt = Checkpoint(path, "diffusers")
        for component in COMPONENTS:
            folder = path / component
            files = _safetensors_files(folder) if folder.is_dir() else []
            if not files:
                if any(folder.glob("*.bin")):
                    raise LoHaFileError(f"{folder} holds only pickled weights (.bin), which are never opened; "
                                        "convert them to safetensors first")
                raise LoHaFileError(f"{folder} has no .safetensors weights")
            index = {}
            for file in files:
                index.update(indexed(file))
            ckpt.tensors[component] = index
        return ckpt
    header, metadata, _ = read_header(path, max_header=CHECKPOINT_HEADER_BYTES, max_tensors=CHECKPOINT_TENSORS)
    raw = indexed(path, header)
    if not any(k.startswith(PREFIX["unet"]) for k in header):
        raise LoHaFileError(f"{path.name} is not a single-file SDXL checkpoint: no {PREFIX['unet']}* keys (an adapter "
                            "file? merge takes it as --adapter)")
    ckpt = Checkpoint(path, "single", metadata=metadata, raw=raw)
    for component, (names_, _) in single_file_names(skeleton).items():
        index = {}
        for diffusers_key, (ldm_key, third, transpose, squeeze) in names_.items():
            if ldm_key in raw:
                stored = raw[ldm_key]
                index[diffusers_key] = Tensor(path, ldm_key, stored.stored_dtype, stored.stored_shape, third,
                                              transpose, squeeze)
        ckpt.tensors[component] = index
    return ckpt


def indexed(file: Path, header: dict | None = None) -> dict[str, Tensor]:
    """{key: Tensor} for every tensor of one safetensors file, from its (checked) header."""
    from .formats import DTYPE_NAMES

    if header is None:
        header, _, _ = read_header(file, max_header=CHECKPOINT_HEADER_BYTES, max_tensors=CHECKPOINT_TENSORS)
    by_name = {n: d for d, n in DTYPE_NAMES.items()}
    return {key: Tensor(file, key, by_name[info["dtype"]], tuple(info["shape"])) for key, info in header.items()}


def single_file_names(skeleton: dict) -> dict:
    """{component: ({diffusers key: (single-file key, third of in_proj, transpose, squeeze)}, prefix)} for the
    UNet and both text encoders of ``skeleton`` (the VAE's keys: vae_key)."""
    out = {}
    unet = skeleton["unet"]
    out["unet"] = ({k: (PREFIX["unet"] + names.sgm_path(k, unet), None, False, False)
                    for k in unet.state_dict()}, PREFIX["unet"])
    te1 = skeleton["text_encoder"]
    out["text_encoder"] = ({k: (PREFIX["text_encoder"] + names.text_path(k), None, False, False)
                            for k in te1.state_dict() if not k.endswith("position_ids")}, PREFIX["text_encoder"])
    te2 = {}
    for k in skeleton["text_encoder_2"].state_dict():
        mapped = openclip_key(k)
        if mapped is not None:
            te2[k] = (PREFIX["text_encoder_2"] + mapped[0], mapped[1], k == "text_projection.weight", False)
    out["text_encoder_2"] = (te2, PREFIX["text_encoder_2"])
    return out


def vae_up_blocks(folder: Path) -> int:
    try:
        return len(json.loads((folder / "vae" / "config.json").read_text())["up_block_types"])
    except (OSError, ValueError, KeyError, TypeError):
        return 4
