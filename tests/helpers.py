"""Small shared test helpers: tiny-UNet inputs and random adapter weights."""

import torch

import loha
from loha.tiny_sdxl import TINY_UNET_CONFIG


def unet_inputs(batch=2, size=8, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = TINY_UNET_CONFIG
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(
        sample=torch.randn(batch, 4, size, size, generator=g),
        timestep=torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, pooled, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)},
    )


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def randomize_adapters(model, seed=0, std=0.3):
    """Non-zero factors, so a file that loads as zeros would be caught. Layer by layer, in module order,
    so stacked and per-layer storage of the same adapters get the same values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in loha.loha_layers(model).values():
            for f in layer.factors():
                f.copy_(torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.dtype) * std)


def randomize_lycoris(net, seed=3, std=0.3):
    """Non-zero factors in a real LyCORIS network (its LoHa factors start with one half zero), and a
    changed DoRA magnitude where there is one, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "dora_scale" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


def saved_lycoris(net, unet, path, seed=3):
    """Apply a real LyCORIS network to ``unet``, randomize it, and save it with LyCORIS's own writer:
    (the inputs, LyCORIS's own output for them, the file's tensors)."""
    import safetensors.torch

    net.apply_to()
    randomize_lycoris(net, seed=seed)
    inputs = unet_inputs()
    expected = run_unet(unet, inputs)
    net.save_weights(str(path), torch.float32, {})
    return inputs, expected, safetensors.torch.load_file(path)
