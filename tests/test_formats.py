"""Files: our PEFT folder and kohya export against the real PEFT and LyCORIS code, both directions."""

import copy
import json

import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

import loha
from loha.formats import kohya_state_dict
from loha.tiny_sdxl import SDXL_UNET_CONFIG, tiny_unet
from tests.helpers import randomize_adapters, run_unet, saved_lycoris, unet_inputs

TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@pytest.fixture(scope="module")
def base_unet():
    return tiny_unet(seed=0)


@pytest.fixture
def trained_unet(base_unet):
    unet = copy.deepcopy(base_unet)
    loha.inject(unet, rank=4, alpha=2)
    randomize_adapters(unet, seed=1)
    return unet


def test_our_folder_loads_in_real_peft(tmp_path, base_unet, trained_unet):
    from peft import PeftModel

    inputs = unet_inputs()
    expected = run_unet(trained_unet, inputs)
    loha.save(trained_unet, tmp_path / "unet", base_model="tiny/base")
    config = json.loads((tmp_path / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["r"] == 4 and config["alpha"] == 2
    assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert config["base_model_name_or_path"] == "tiny/base"
    keys = safetensors.torch.load_file(tmp_path / "unet" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and k.rsplit(".", 1)[1].startswith("hada_w") for k in keys)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_unet), tmp_path / "unet")
    got = run_unet(peft_model.get_base_model(), inputs)
    assert (got - expected).abs().max() <= 1e-5
    assert (got - run_unet(base_unet, inputs)).abs().max() > 1e-3  # PEFT really applied something


def test_mixed_ranks_go_to_rank_pattern_and_peft_agrees(tmp_path, base_unet):
    from peft import PeftModel

    unet = copy.deepcopy(base_unet)
    paths = [p for p, m in unet.named_modules() if p.endswith(("to_q", "to_v"))]
    loha.inject(unet, rank=4, alpha=4, target_modules=["to_q", "to_v"], ranks={paths[0]: 2}, alphas={paths[1]: 1.5})
    randomize_adapters(unet, seed=2)
    loha.save(unet, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {paths[0]: 2} and config["alpha_pattern"] == {paths[1]: 1.5}
    inputs = unet_inputs()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_unet), tmp_path / "a")
    assert (run_unet(peft_model.get_base_model(), inputs) - run_unet(unet, inputs)).abs().max() <= 1e-5
    fresh = copy.deepcopy(base_unet)
    loha.load(fresh, tmp_path / "a")
    assert fresh.get_submodule(paths[0]).rank == 2 and fresh.get_submodule(paths[1]).alpha == 1.5
    assert torch.equal(run_unet(fresh, inputs), run_unet(unet, inputs))


def test_real_peft_folder_loads_into_ours(tmp_path, base_unet):
    from peft import LoHaConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base_unet), LoHaConfig(
        r=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    inputs = unet_inputs()
    expected = run_unet(peft_model.get_base_model(), inputs)
    ours = copy.deepcopy(base_unet)
    paths = loha.load(ours, tmp_path / "peft")
    assert len(paths) == 136
    assert (expected - run_unet(base_unet, inputs)).abs().max() > 1e-3
    assert (run_unet(ours, inputs) - expected).abs().max() <= 1e-5
    # a bare adapter_model.safetensors takes alpha from the config beside it
    bare = copy.deepcopy(base_unet)
    loha.load(bare, tmp_path / "peft" / "adapter_model.safetensors")
    assert torch.equal(run_unet(bare, inputs), run_unet(ours, inputs))


def test_real_lycoris_file_loads_into_ours(tmp_path, base_unet):
    from lycoris import LycorisNetwork

    unet = copy.deepcopy(base_unet)
    LycorisNetwork.apply_preset({"target_module": ["Attention"]})
    net = LycorisNetwork(unet, multiplier=1.0, lora_dim=4, alpha=2, network_module="loha")
    inputs, expected, keys = saved_lycoris(net, unet, tmp_path / "lycoris.safetensors")
    assert any(k.startswith("lycoris_") for k in keys)
    ours = copy.deepcopy(base_unet)
    assert len(loha.load(ours, tmp_path / "lycoris.safetensors")) == 136
    assert (expected - run_unet(base_unet, inputs)).abs().max() > 1e-3
    assert (run_unet(ours, inputs) - expected).abs().max() <= 1e-5


def _sgm_map_by_walking_blocks(unet) -> dict[str, str]:
    """SGM block index for each diffusers attention block, by walking the UNet the way SGM numbers it:
    input_blocks.0 is conv_in, then one entry per resnet(+attention) and one per downsampler; the
    output blocks have layers_per_block + 1 entries each."""
    mapping, index = {}, 1
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None):
                mapping[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
            index += 1
        index += 1 if block.downsamplers else 0
    mapping["mid_block.attentions.0."] = "middle_block.1."
    index = 0
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None):
                mapping[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
            index += 1
    return mapping


def test_kohya_keys_on_full_sdxl_follow_sgm_rule():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    paths = loha.inject(unet, rank=8)
    mapping = _sgm_map_by_walking_blocks(unet)
    expected = set()
    for path in paths:
        prefix = next(p for p in mapping if path.startswith(p))
        name = "lora_unet_" + (mapping[prefix] + path[len(prefix):]).replace(".", "_")
        expected |= {f"{name}.{n}" for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    keys = set(kohya_state_dict(unet))
    assert keys == expected and len(keys) == 560 * 5
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.hada_w1_a" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k.alpha" in keys


def test_native_kohya_round_trip_is_lossless(tmp_path, base_unet, trained_unet):
    loha.save(trained_unet, tmp_path / "native")
    a = copy.deepcopy(base_unet)
    loha.load(a, tmp_path / "native")
    loha.export_kohya(a, tmp_path / "k.safetensors", base_model="tiny/base")
    tensors, meta = loha.read_safetensors(tmp_path / "k.safetensors")
    assert meta["ss_network_args"] == '{"algo": "loha"}' and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(t.shape == () for k, t in tensors.items() if k.endswith(".alpha"))
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in tensors)
    b = copy.deepcopy(base_unet)
    loha.load(b, tmp_path / "k.safetensors")
    loha.save(b, tmp_path / "again")
    first = safetensors.torch.load_file(tmp_path / "native" / "adapter_model.safetensors")
    second = safetensors.torch.load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert loha.read_adapter(tmp_path / "k.safetensors").base_model == "tiny/base"


def test_plain_model_exports_diffusers_names_and_loads_back(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    loha.inject(model, rank=2, target_modules=["0", "2"])
    randomize_adapters(model)
    loha.export_kohya(model, tmp_path / "plain.safetensors")
    keys, meta = loha.read_safetensors(tmp_path / "plain.safetensors")
    assert {k.split(".")[0] for k in keys} == {"lora_unet_0", "lora_unet_2"} and "ss_base_model_version" not in meta
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "hada" not in k})
    loha.load(fresh, tmp_path / "plain.safetensors")
    x = torch.randn(3, 4)
    assert torch.equal(fresh(x), model(x))


def test_pipeline_with_text_encoders_round_trips_in_both_layouts(tmp_path, tiny_pipeline_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    loha.inject(pipe.unet, rank=2)
    loha.inject(pipe.text_encoder, rank=2, target_modules=TE_TARGETS)
    loha.inject(pipe.text_encoder_2, rank=3, alpha=1, target_modules=TE_TARGETS)
    for i, m in enumerate((pipe.unet, pipe.text_encoder, pipe.text_encoder_2)):
        randomize_adapters(m, seed=i)
    loha.export_kohya(pipe.unet, tmp_path / "all.safetensors", pipe.text_encoder, pipe.text_encoder_2)
    for c in ("unet", "text_encoder", "text_encoder_2"):
        loha.save(getattr(pipe, c), tmp_path / "out" / c)
    names = safetensors.torch.load_file(tmp_path / "all.safetensors")
    assert {k.split("_")[1] for k in names} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in names)
    ids = pipe.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    expected = pipe.text_encoder_2(ids).text_embeds
    for source in (tmp_path / "all.safetensors", tmp_path / "out"):
        fresh = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
        loaded = loha.load(fresh, source)
        assert {c: sorted(v) for c, v in loaded.items()} == {
            c: sorted(loha.adapter_modules(getattr(pipe, c))) for c in ("unet", "text_encoder", "text_encoder_2")}
        assert torch.equal(fresh.text_encoder_2(ids).text_embeds, expected)
        for c in loaded:
            mine, theirs = loha.adapter_state_dict(getattr(fresh, c)), loha.adapter_state_dict(getattr(pipe, c))
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(loha.LoHaFileError, match="pass the pipeline"):
        loha.load(StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir).unet, tmp_path / "all.safetensors")


def test_strict_loading_errors(tmp_path, base_unet, trained_unet):
    loha.save(trained_unet, tmp_path / "good")
    tensors = safetensors.torch.load_file(tmp_path / "good" / "adapter_model.safetensors")
    config = (tmp_path / "good" / "adapter_config.json").read_text()

    def folder(name, new_tensors):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(config)
        safetensors.torch.save_file(new_tensors, tmp_path / name / "adapter_model.safetensors")
        return tmp_path / name

    misnamed = folder("misnamed", {k.replace("to_q", "to_query"): v for k, v in tensors.items()})
    with pytest.raises(loha.LoHaFileError, match="do not exist in this unet.*different base model"):
        loha.load(copy.deepcopy(base_unet), misnamed)
    partial = folder("partial", {k: v for k, v in tensors.items() if not k.endswith("to_k.hada_w2_b")})
    with pytest.raises(loha.LoHaFileError, match="is missing hada_w2_b"):
        loha.load(copy.deepcopy(base_unet), partial)
    other = copy.deepcopy(base_unet)
    loha.inject(other, rank=4, target_modules=["to_q"])
    with pytest.raises(loha.LoHaFileError, match="does not match the adapters already"):
        loha.load(other, tmp_path / "good")
    wide = folder("wide", {k: (torch.zeros(v.shape[0], 7) if k.endswith("hada_w1_b") or k.endswith("hada_w2_b")
                               else v) for k, v in tensors.items()})
    with pytest.raises(loha.LoHaFileError, match="trained for a different base model"):
        loha.load(copy.deepcopy(base_unet), wide)
    nan = folder("nan", {k: v.clone().fill_(float("nan")) if "hada_w1_a" in k else v for k, v in tensors.items()})
    untouched = copy.deepcopy(base_unet)
    with pytest.raises(loha.LoHaFileError, match="NaN/Inf"):
        loha.load(untouched, nan)
    assert not loha.adapter_modules(untouched)  # nothing injected by a failed load
    loha.load(untouched, nan, allow_nonfinite=True)
    merged = copy.deepcopy(base_unet)
    loha.load(merged, tmp_path / "good")
    loha.merge(merged)
    with pytest.raises(loha.LoHaFileError, match="merged into its weights; call loha.unmerge"):
        loha.load(merged, tmp_path / "good")
    sd1 = {f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{n}": torch.ones(4, 4) for n in
           ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    safetensors.torch.save_file(sd1, tmp_path / "sd15.safetensors")
    with pytest.raises(loha.LoHaFileError, match="Stable Diffusion 1.x/2.x.*trained for a different base model"):
        loha.load(copy.deepcopy(base_unet), tmp_path / "sd15.safetensors")
    (tmp_path / "w.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(loha.LoHaFileError, match="pickle"):
        loha.load(copy.deepcopy(base_unet), tmp_path / "w.pt")
    with pytest.raises(loha.LoHaFileError, match="cannot open"):
        loha.load(copy.deepcopy(base_unet), tmp_path / "missing")


def test_a_torch_compiled_model_saves_and_loads_with_plain_paths(tmp_path, base_unet, trained_unet):
    """torch.compile wraps the model and prefixes every path with _orig_mod.; files must not carry it."""
    compiled = torch.compile(trained_unet)  # a lazy wrapper: nothing is compiled until it is called
    assert all(not p.startswith("_orig_mod") for p in loha.adapter_modules(compiled))
    loha.save(compiled, tmp_path / "unet")
    loha.export_kohya(compiled, tmp_path / "k.safetensors")
    keys = safetensors.torch.load_file(tmp_path / "unet" / "adapter_model.safetensors")
    assert keys.keys() == {f"base_model.model.{k}" for k in loha.adapter_state_dict(trained_unet)}
    kohya = safetensors.torch.load_file(tmp_path / "k.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in kohya)
    fresh = torch.compile(copy.deepcopy(base_unet))
    assert sorted(loha.load(fresh, tmp_path / "unet")) == sorted(loha.adapter_modules(trained_unet))
    loha.eject(fresh)
    assert not loha.adapter_modules(fresh)
