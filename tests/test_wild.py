"""Every LoHa in the wild: LyCORIS's full preset (flattened and Tucker convs, DoRA), PEFT folders with conv
targets, ComfyUI's trainer files, kohya names for every SDXL block, checked against the real peers' code."""

import copy
import logging
import re

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel

import loha
from loha.names import accepted_names, kohya_name, sgm_path
from loha.tiny_sdxl import SDXL_UNET_CONFIG, tiny_unet
from tests.helpers import randomize_adapters, run_unet, saved_lycoris, unet_inputs

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet(seed=0)


def relative_error(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


def lycoris_network(unet, preset, **kwargs):
    """LyCORIS's own network with one of its presets' UNet rules, on a diffusers UNet."""
    from lycoris import LycorisNetwork
    from lycoris.config import PRESET

    rules = PRESET[preset]
    LycorisNetwork.apply_preset({"enable_conv": rules["enable_conv"], "target_module": rules["unet_target_module"],
                                 "target_name": rules["unet_target_name"]})
    return LycorisNetwork(unet, multiplier=1.0, network_module="loha", **kwargs)


# ------------------------------------------------------------------------------ presets and counts
@pytest.fixture(scope="module")
def sdxl_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


@pytest.mark.parametrize("preset", ["full", *(pytest.param(p, marks=pytest.mark.slow) for p in (
    "attn-mlp", "full-lin", "unet-transformer-only", "unet-convblock-only"))])  # full (LyCORIS's default) always
@pytest.mark.parametrize("use_tucker", [False, True])
def test_preset_modules_and_parameters_equal_lycoris_on_the_sdxl_config(sdxl_meta, preset, use_tucker):
    """On the full SDXL config (meta device), every preset adapts the modules LyCORIS adapts, with the
    same parameter count (rank 8, conv rank 4 for kernels larger than 1×1, as LyCORIS's conv_dim)."""
    net = lycoris_network(sdxl_meta, preset, lora_dim=8, alpha=8, conv_lora_dim=4, conv_alpha=4, use_tucker=use_tucker)
    theirs = sorted(m.lora_name for m in net.loras)
    their_params = sum(p.numel() for m in net.loras for n, p in m.named_parameters() if n.startswith("hada_"))
    unet = copy.deepcopy(sdxl_meta)
    paths = loha.inject(unet, rank=8, preset=preset, conv_rank=4, use_tucker=use_tucker)
    assert sorted("lycoris_" + p.replace(".", "_") for p in paths) == theirs
    assert loha.count_parameters(unet) == their_params
    if preset == "full":  # kohya's 788 on its SGM UNet, plus conv_in, conv_out and the two add_embedding linears
        assert len(paths) == 794
        kinds = [type(unet.get_submodule(p)).__name__ for p in paths]
        assert kinds.count("LoHaConv2d") == 2 + 38 + 11 and kinds.count("LoHaLinear") == 743


def test_text_encoder_presets_follow_lycoris():
    """attn-only: q/k/v/out_proj; attn-mlp and full add the MLP's fc1/fc2, as LyCORIS's text-encoder lists do."""
    from lycoris import LycorisNetwork
    from lycoris.config import PRESET
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                               num_attention_heads=12))
    for preset, per_layer in (("attn-only", 4), ("attn-mlp", 6), ("full", 6)):
        LycorisNetwork.apply_preset({"target_module": PRESET[preset]["text_encoder_target_module"],
                                     "target_name": [], "enable_conv": False})
        net = LycorisNetwork(encoder, lora_dim=4, alpha=4, network_module="loha")
        ours = loha.preset_targets(encoder, preset)
        assert len(ours) == 12 * per_layer
        assert sorted("lycoris_" + p.replace(".", "_") for p in ours) == sorted(m.lora_name for m in net.loras)


# ----------------------------------------------------------------------------------- LyCORIS files
@pytest.mark.parametrize("case", ["full", "full+tucker", "full+dora", "attn-mlp+dora-on-input"])
def test_real_lycoris_files_load_and_match_lycoris_forward(tmp_path, base_unet, case):
    """LyCORIS builds, randomizes and saves the network itself (alpha != rank, conv_dim != dim); the file
    loads strictly into ours and gives LyCORIS's own forward within 1e-5 relative."""
    preset = case.split("+")[0]
    options = dict(lora_dim=4, alpha=2, conv_lora_dim=3, conv_alpha=1.5, use_tucker="tucker" in case,
                   weight_decompose="dora" in case, wd_on_out=case != "attn-mlp+dora-on-input")
    unet = copy.deepcopy(base_unet)
    net = lycoris_network(unet, preset, **options)
    inputs, expected, keys = saved_lycoris(net, unet, tmp_path / "lycoris.safetensors")
    assert ("dora" in case) == any(k.endswith(".dora_scale") for k in keys)
    assert ("tucker" in case) == any(k.endswith(".hada_t1") for k in keys)
    ours = copy.deepcopy(base_unet)
    paths = loha.load(ours, tmp_path / "lycoris.safetensors")
    assert len(paths) == len(net.loras)
    assert relative_error(expected, run_unet(base_unet, inputs)) > 1e-3  # the adapter does something
    assert relative_error(run_unet(ours, inputs), expected) < 1e-5
    merged = copy.deepcopy(ours)
    loha.merge(merged)
    assert relative_error(run_unet(merged, inputs), expected) < 1e-5
    loha.unmerge(merged)
    loha.set_scale(merged, 0)
    assert torch.equal(run_unet(merged, inputs), run_unet(base_unet, inputs))


def test_dora_strength_interpolates_as_comfyui_does(base_unet):
    """DoRA at scale s: W + s·(D(W + ΔW) − W) (ComfyUI's strength; LyCORIS's multiplier at 1), written here
    from the definition D(V) = V·m/‖V‖ (norm per output row)."""
    layer = loha.LoHaConv2d(torch.nn.Conv2d(4, 6, 3, padding=1).double(), 2, alpha=3, dora=True,
                            dtype=torch.float64)
    with torch.no_grad():
        for f in layer.factors():
            f.normal_()
        layer.dora_scale.mul_(1.3)
    model = torch.nn.ModuleDict({"c": layer})
    w = layer.base_layer.weight.detach()
    v = w + (layer.factors()[0] @ layer.factors()[1] * (layer.factors()[2] @ layer.factors()[3])).view(w.shape) * 1.5
    d = v * layer.dora_scale / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    conv = lambda weight: torch.nn.functional.conv2d(x, weight, layer.base_layer.bias, padding=1)
    for s in (0.0, 0.5, 1.0, 1.7):
        loha.set_scale(model, s)
        torch.testing.assert_close(layer(x), conv(w + s * (d - w)), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------- PEFT folders
@pytest.mark.parametrize("effective", [False, True])
def test_real_peft_conv_folders_load_into_ours(tmp_path, base_unet, effective):
    from peft import LoHaConfig, get_peft_model

    paths = loha.preset_targets(base_unet, "full")
    peft_model = get_peft_model(copy.deepcopy(base_unet), LoHaConfig(
        r=4, alpha=8, target_modules=paths, use_effective_conv2d=effective, init_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    keys = safetensors.torch.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert effective == any(k.endswith("hada_t1") for k in keys)
    inputs = unet_inputs()
    expected = run_unet(peft_model.get_base_model(), inputs)
    ours = copy.deepcopy(base_unet)
    assert sorted(loha.load(ours, tmp_path / "peft")) == sorted(paths)
    assert relative_error(run_unet(ours, inputs), expected) < 1e-5


@pytest.mark.parametrize("use_tucker", [False, True])
def test_our_conv_folders_load_in_real_peft(tmp_path, base_unet, use_tucker):
    from peft import PeftModel

    unet = copy.deepcopy(base_unet)
    loha.inject(unet, rank=4, alpha=2, preset="full", conv_rank=3, use_tucker=use_tucker)
    randomize_adapters(unet, seed=5, std=0.3)
    loha.save(unet, tmp_path / "unet")
    inputs = unet_inputs()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_unet), tmp_path / "unet")
    assert relative_error(run_unet(peft_model.get_base_model(), inputs), run_unet(unet, inputs)) < 1e-5


# ------------------------------------------------------------------------ our files in LyCORIS itself
@pytest.mark.parametrize("use_tucker", [False, True])
def test_our_full_preset_export_loads_in_lycoris(tmp_path, base_unet, use_tucker):
    """Our full-preset adapter in LyCORIS's diffusers naming: lycoris.create_lycoris_from_weights builds it
    on a diffusers UNet, and LyCORIS's forward equals ours. The default SGM naming round-trips in ours."""
    from lycoris import create_lycoris_from_weights

    unet = copy.deepcopy(base_unet)
    loha.inject(unet, rank=4, alpha=2, preset="full", conv_rank=3, conv_alpha=1.5, use_tucker=use_tucker)
    randomize_adapters(unet, seed=6, std=0.3)
    inputs = unet_inputs()
    ours = run_unet(unet, inputs)
    loha.export_kohya(unet, tmp_path / "lycoris.safetensors", naming="diffusers")
    target = copy.deepcopy(base_unet)
    network, _ = create_lycoris_from_weights(1.0, str(tmp_path / "lycoris.safetensors"), target)
    network.apply_to()
    assert len(network.loras) == len(loha.adapter_modules(unet)) == 263
    assert relative_error(run_unet(target, inputs), ours) < 1e-5
    loha.export_kohya(unet, tmp_path / "kohya.safetensors")
    names = safetensors.torch.load_file(tmp_path / "kohya.safetensors")
    assert "lora_unet_input_blocks_1_0_in_layers_2.hada_w1_a" in names  # SGM names for the resnets too
    again = copy.deepcopy(base_unet)
    loha.load(again, tmp_path / "kohya.safetensors")
    assert torch.equal(run_unet(again, inputs), ours)


# -------------------------------------------------------------------------------- names, both ways
def test_sgm_names_of_every_parameter_match_diffusers_single_file_converter(sdxl_meta):
    """diffusers' own SGM → diffusers checkpoint converter, fed a checkpoint named by our sgm_path, puts every
    tensor back at the diffusers path it came from: every block, norm and bias of the SDXL UNet."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for unet in (sdxl_meta, tiny_unet()):
        names = [n for n, _ in unet.named_parameters()]
        checkpoint = {"model.diffusion_model." + sgm_path(n, unet): torch.full((1,), float(i))
                      for i, n in enumerate(names)}
        converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
        assert sorted(converted) == sorted(names)
        assert all(converted[n].item() == i for i, n in enumerate(names))


def test_kohya_names_of_every_preset_module_match_diffusers_lora_conversion(base_unet):
    """diffusers' kohya → diffusers LoRA converter, fed our SGM stems, lands on our module paths (after its
    legacy attention-processor names are spelled the current way)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    paths = loha.preset_targets(base_unet, "full")
    state = {}
    for p in paths:
        stem = kohya_name("unet", base_unet, p)
        state.update({f"{stem}.lora_down.weight": torch.zeros(1, 1), f"{stem}.lora_up.weight": torch.zeros(1, 1),
                      f"{stem}.alpha": torch.tensor(1.0)})
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, base_unet.config))

    def spelled_now(key):
        key = re.sub(r"\.(lora\.)?(down|up)\.weight$", "", key[len("unet."):])
        key = re.sub(r"\.processor\.to_([qkv])_lora$", r".to_\1", key)
        return re.sub(r"\.processor\.to_out_lora$", ".to_out.0", key)

    assert sorted({spelled_now(k) for k in converted if k.startswith("unet.")}) == sorted(paths)
    stems = {kohya_name("unet", base_unet, p) for p in paths}
    for expected in ("lora_unet_input_blocks_0_0", "lora_unet_input_blocks_3_0_op", "lora_unet_time_embed_0",
                     "lora_unet_label_emb_0_2", "lora_unet_out_2", "lora_unet_output_blocks_2_2_conv",
                     "lora_unet_middle_block_2_emb_layers_1", "lora_unet_input_blocks_4_0_skip_connection",
                     "lora_unet_output_blocks_0_1_proj_in", "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"):
        assert expected in stems


def test_unknown_and_ambiguous_module_names_are_refused(tmp_path, base_unet):
    factors = {n: torch.ones(s) for n, s in zip(loha.layer.FACTOR_NAMES, [(32, 2), (2, 32), (32, 2), (2, 32)])}
    factors["alpha"] = torch.tensor(2.0)
    sd15 = {f"lora_unet_input_blocks_1_1_proj_in.{n}": t for n, t in factors.items()}  # SDXL has no attention there
    safetensors.torch.save_file(sd15, tmp_path / "sd15.safetensors")
    with pytest.raises(loha.LoHaFileError, match=r"do not exist in this unet: no module "
                                                 r"'lora_unet_input_blocks_1_1_proj_in'; an SD 1\.5 / 2\.x"):
        loha.load(copy.deepcopy(base_unet), tmp_path / "sd15.safetensors")
    path = "down_blocks.1.attentions.0.proj_in"
    width = base_unet.get_submodule(path).weight.shape
    factors = {n: torch.ones(s) for n, s in zip(loha.layer.FACTOR_NAMES,
                                                [(width[0], 2), (2, width[1]), (width[0], 2), (2, width[1])])}
    factors["alpha"] = torch.tensor(2.0)
    twice = {f"{name}.{n}": t.clone() for name in ("lora_unet_input_blocks_4_1_proj_in",
                                                   "lycoris_" + path.replace(".", "_")) for n, t in factors.items()}
    safetensors.torch.save_file(twice, tmp_path / "twice.safetensors")
    with pytest.raises(loha.LoHaFileError, match=r"names the module down_blocks\.1\.attentions\.0\.proj_in twice, "
                                                 r"as 'lora_unet_input_blocks_4_1_proj_in' and 'lycoris_"):
        loha.load(copy.deepcopy(base_unet), tmp_path / "twice.safetensors")
    table = accepted_names("unet", base_unet, [path])
    assert set(table) == {"lora_unet_input_blocks_4_1_proj_in", "diffusion_model.input_blocks.4.1.proj_in",
                          "lycoris_down_blocks_1_attentions_0_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"}


# --------------------------------------------------------------------------------- ComfyUI's trainer
def comfyui_trainer_file(unet, seed=0):
    """What comfy_extras/nodes_train.py saves, written from its description: for every weighted module,
    keys under ``diffusion_model.<SGM path>``: LoHa factors and alpha for every weight of 2+ dimensions,
    ``.diff`` for every 1-D weight (the norms), ``.diff_b`` for every bias. And the float64 weights that
    adapter means: W + (alpha/rank)·ΔW, and the differences added."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.2
    tensors, expected = {}, {}
    for path, module in unet.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        key = "diffusion_model." + sgm_path(path, unet)
        if weight.dim() >= 2:
            out_f, flat = weight.shape[0], weight[0].numel()
            w1a, w1b, w2a, w2b = rnd(out_f, 2), rnd(2, flat), rnd(out_f, 2), rnd(2, flat)
            tensors.update({f"{key}.hada_w1_a": w1a, f"{key}.hada_w1_b": w1b, f"{key}.hada_w2_a": w2a,
                            f"{key}.hada_w2_b": w2b, f"{key}.alpha": torch.tensor(1.0)})
            expected[f"{path}.weight"] = weight.double() + ((w1a @ w1b) * (w2a @ w2b) * 0.5).view(weight.shape)
        else:
            tensors[f"{key}.diff"] = d = rnd(*weight.shape)
            expected[f"{path}.weight"] = weight.double() + d
        if getattr(module, "bias", None) is not None:
            tensors[f"{key}.diff_b"] = d = rnd(*module.bias.shape)
            expected[f"{path}.bias"] = module.bias.double() + d
    return {k: v.float() for k, v in tensors.items()}, expected


def test_comfyui_trainer_files_apply_every_key(tmp_path, base_unet):
    """Every factor, alpha, .diff and .diff_b of a ComfyUI-trained file lands (strictly), and the UNet then
    computes what a copy with those float64 weights computes, unfused and fused."""
    tensors, expected = comfyui_trainer_file(base_unet)
    safetensors.torch.save_file(tensors, tmp_path / "comfy.safetensors")
    ours = copy.deepcopy(base_unet)
    loaded = loha.load(ours, tmp_path / "comfy.safetensors")
    adapters = loha.adapter_modules(ours)
    assert len(loaded) == len(adapters) == len({k.rsplit(".", 1)[0] for k in tensors})
    norms = [m for m in base_unet.modules() if getattr(m, "weight", None) is not None and m.weight.dim() == 1]
    assert sum(isinstance(m, loha.DiffLayer) for m in adapters.values()) == len(norms) > 90
    reference = copy.deepcopy(base_unet).double()
    reference.load_state_dict({**reference.state_dict(), **expected})
    inputs = unet_inputs()
    double = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items() if k != "added_cond_kwargs"}
    double["added_cond_kwargs"] = {k: v.double() for k, v in inputs["added_cond_kwargs"].items()}
    want = run_unet(reference, double)
    assert relative_error(run_unet(ours, inputs).double(), want) < 1e-4
    loha.merge(ours)
    assert relative_error(run_unet(ours, inputs).double(), want) < 1e-4
    loha.unmerge(ours)
    assert torch.equal(run_unet(ours.eval(), inputs), run_unet(ours, inputs))
    loha.set_scale(ours, 0)
    assert torch.equal(run_unet(ours, inputs), run_unet(base_unet, inputs))
    loha.export_kohya(ours, tmp_path / "again.safetensors")  # and back out, every kind of key kept
    again = safetensors.torch.load_file(tmp_path / "again.safetensors")
    assert {k.rsplit(".", 1)[1] for k in again} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha",
                                                    "diff", "diff_b"}
    assert len(again) == len(tensors)
