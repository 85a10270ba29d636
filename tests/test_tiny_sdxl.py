import collections
import json

import numpy as np
import pytest
import torch

from loha.tiny_sdxl import (
    MARKER,
    SDXL_UNET_CONFIG,
    TINY_UNET_CONFIG,
    build_tiny_sdxl_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
)

ATTN_SUFFIXES = tuple(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))


def attention_linear_shapes(unet) -> collections.Counter:
    return collections.Counter(
        (module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTN_SUFFIXES)
    )


def generate(pipe, prompt="a photo of a cat", seed=0):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def test_sdxl_unet_config_matches_sdxl_base():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert attention_linear_shapes(unet) == {(640, 640): 60, (1280, 1280): 360, (2048, 640): 20, (2048, 1280): 120}


def test_tiny_unet_keeps_sdxl_structure():
    unet = tiny_unet()
    assert unet.dtype == torch.float32
    shapes = attention_linear_shapes(unet)
    cross = TINY_UNET_CONFIG["cross_attention_dim"]
    assert sum(shapes.values()) == 136
    assert set(shapes) == {(64, 64), (cross, 64)}
    # kohya's SGM mapping relies on 2 attentions per down block and 3 per up block.
    names = {name for name, _ in unet.named_modules()}
    assert {"down_blocks.2.attentions.1", "up_blocks.1.attentions.2", "mid_block.attentions.0"} <= names


def test_tiny_unet_is_seeded_and_has_no_dead_path():
    unet = tiny_unet(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), tiny_unet(seed=0).state_dict().values()))
    assert not torch.equal(unet.conv_in.weight, tiny_unet(seed=1).conv_in.weight)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, TINY_UNET_CONFIG["cross_attention_dim"], generator=generator)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    added = {"text_embeds": torch.randn(2, 64, generator=generator), "time_ids": time_ids}
    out = unet(sample, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample
    out.square().mean().backward()
    dead = [name for name, p in unet.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


def test_tiny_pipeline_roundtrip_is_deterministic(tiny_pipeline_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.scheduler.config.timestep_spacing == "leading"

    image = generate(pipe)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0.01
    np.testing.assert_array_equal(image, generate(pipe))
    np.testing.assert_allclose(image, generate(tiny_sdxl_pipeline(seed=0)), atol=1e-5)
    assert np.abs(image - generate(pipe, prompt="a photo of a dog")).max() > 1e-3


def test_build_reuses_a_complete_folder(tiny_pipeline_dir, tmp_path):
    weights = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_sdxl_pipeline(tiny_pipeline_dir) == tiny_pipeline_dir
    assert weights.stat().st_mtime_ns == before

    (tmp_path / MARKER).write_text(json.dumps({"version": "stale", "seed": 0}))
    build_tiny_sdxl_pipeline(tmp_path)
    assert json.loads((tmp_path / MARKER).read_text())["version"] != "stale"
    assert (tmp_path / "model_index.json").is_file()


@pytest.mark.parametrize("tokenizer_name", ["tokenizer", "tokenizer_2"])
def test_tokenizers_roundtrip(tiny_pipeline_dir, tokenizer_name):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / tokenizer_name)
    ids = tokenizer("A photo of a cat, sks", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    words = ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ",</w>", "sks</w>"]
    assert tokenizer.convert_ids_to_tokens(ids[1:8]) == words
    assert ids[8] == tokenizer.eos_token_id
    assert ids[9:] == [tokenizer.pad_token_id] * 68
