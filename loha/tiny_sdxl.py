"""SDXL base 1.0's UNet config, and a tiny random-weight SDXL pipeline for offline tests.

Nothing here downloads anything. ``SDXL_UNET_CONFIG`` builds the real architecture on the
meta device, for counting modules and parameters. ``build_tiny_sdxl_pipeline`` writes a
complete, seeded ``StableDiffusionXLPipeline`` folder that ``from_pretrained`` loads
offline. The tiny model keeps SDXL's structure: the same block types, two layers per block
(so kohya's SGM key mapping holds), two CLIP text encoders whose hidden sizes add up to the
cross-attention width, the ``text_time`` micro-conditioning, an 8x VAE with SDXL's scaling
factor, and SDXL's Euler scheduler.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, less `_class_name` and the like.
SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": (
        5,
        10,
        20,
    ),  # diffusers' historical name: this is the number of heads
    "block_out_channels": (320, 640, 1280),
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + 1280 pooled text
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "upcast_attention": None,
    "use_linear_projection": True,
}

# Stand-ins for CLIP ViT-L (768) and OpenCLIP bigG (1280, also its projection size).
TE1_HIDDEN = 32
TE2_HIDDEN = 64
ADD_TIME_DIM = 8

TINY_UNET_CONFIG: dict = {
    **SDXL_UNET_CONFIG,
    "addition_time_embed_dim": ADD_TIME_DIM,
    "attention_head_dim": (2, 4, 4),  # heads; head size 16
    "block_out_channels": (32, 64, 64),
    "cross_attention_dim": TE1_HIDDEN + TE2_HIDDEN,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 6 * ADD_TIME_DIM + TE2_HIDDEN,
    "sample_size": 8,  # latent size: the pipeline's default image is 64x64
    "transformer_layers_per_block": (1, 1, 2),
}

TINY_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,  # 4 blocks -> vae_scale_factor 8
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.13025,  # SDXL's
    "force_upcast": True,  # as SDXL's VAE: it overflows in fp16
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (Euler's keys).
SDXL_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

# Bump on any change to what is saved: a folder stamped with another version is rebuilt.
VERSION = "tiny-sdxl-1"
MARKER = "tiny_sdxl_version.json"

# Words given whole-word BPE merges: the captions of examples/data and common prompt words.
_CAPTION_WORDS = (
    "a an the of in on at with and photo picture painting drawing style portrait close up "
    "black white red orange green blue small large man woman person cat dog astronaut space "
    "suit flag shuttle coffee cup espresso saucer wooden table rocket launch pad tower dusk "
    "camera tripod field galaxies deep brick wall face tabby sks token"
)


def _byte_chars() -> list[str]:
    """CLIP's (GPT-2's) byte -> printable character table, in CLIP's vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer built in memory.

    Its vocabulary holds the 256 byte symbols (bare and word-final), whole-word merges for a
    few dozen caption words, and ``<|startoftext|>``/``<|endoftext|>`` last, as in CLIP.
    """
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in _CAPTION_WORDS.split():
        # Join what the merges so far leave of the word, left to right. The new merges rank
        # below all older ones, so the words already added still end as one token.
        symbols = _apply_merges([*word[:-1], word[-1] + "</w>"], merges)
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            vocab_list.append(symbols[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """BPE: repeatedly join the adjacent pair whose merge ranks first."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _clip_config(tokenizer, hidden: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # SDXL reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _reinit_zero_weights(model: torch.nn.Module) -> None:
    """Give any all-zero Linear/Conv weight small random values.

    A guard: diffusers 0.42.1 zero-initialises none, but if a version zeroes an output
    projection, that path would be dead and an adapter's change there would not show.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.02)


def tiny_unet(seed: int = 0):
    """A seeded fp32 ``UNet2DConditionModel(**TINY_UNET_CONFIG)``, for fast unit tests."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        _reinit_zero_weights(unet)
    return unet.float()


def tiny_sdxl_pipeline(seed: int = 0):
    """The tiny ``StableDiffusionXLPipeline`` in memory: seeded random weights, fp32."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .hub import import_sdxl_pipeline

    StableDiffusionXLPipeline = import_sdxl_pipeline()
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")  # as SDXL's second tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, TE1_HIDDEN, TE1_HIDDEN))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, TE2_HIDDEN, TE2_HIDDEN))
        for model in (vae, text_encoder, text_encoder_2):
            _reinit_zero_weights(model)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_unet(seed),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def build_tiny_sdxl_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to ``directory`` (safetensors) and return its path.

    A folder already stamped with the same ``VERSION`` and seed is reused as it is.
    """
    directory = Path(directory)
    marker = directory / MARKER
    stamp = {"version": VERSION, "seed": seed}
    if _read_stamp(marker) == stamp and (directory / "model_index.json").is_file():
        return directory
    marker.unlink(missing_ok=True)  # a half-written folder must not look complete
    from .hub import quiet_bars

    with quiet_bars():  # a few KiB, written in milliseconds: no "Writing model shards" bars
        tiny_sdxl_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    marker.write_text(json.dumps(stamp) + "\n")
    return directory


def _read_stamp(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
