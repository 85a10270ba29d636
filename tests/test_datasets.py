"""kohya datasets on the tiny pipeline: repeat folders, regularization images and their balance, the
dataset-config TOML, caption rules, masked loss, provenance, and the bad inputs each refused in one line."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import loha
import train_loha_sdxl as T
from loha import data as D
from loha.kohya_data import Subset, process_caption, read_config
from tests.test_train import EXAMPLES, adapter_weights, assert_same_weights, base_args

pytestmark = pytest.mark.usefixtures("one_thread_and_fresh_accelerate")
PICTURES = sorted(EXAMPLES.glob("*.jpg"))


def folder(root: Path, name: str, count: int, captions=True, offset=0) -> Path:
    """``count`` example images in root/name, with caption files (or none)."""
    path = root / name
    path.mkdir(parents=True)
    for i in range(count):
        picture = PICTURES[(i + offset) % len(PICTURES)]
        shutil.copy(picture, path / f"{i:02d}-{picture.name}")
        if captions:
            (path / f"{i:02d}-{picture.stem}.txt").write_text(f"{picture.stem}, photo {i}, tag{i % 3}, outdoors")
    return path


def plan_of(argv) -> T.TrainingData:
    args = T.parse_args(argv)
    return T.load_training_data(args, T.SimpleNamespace(is_main_process=False, num_processes=1))


def draws_in_epoch(data, epoch=0) -> Counter:
    batches = D.epoch_batches(data.samples, {d: 1 for d in range(len(data.datasets))}, 0, epoch)
    return Counter(data.samples[pos].sample.name for b in batches for pos, _ in b)


def kohya_balance(train_draws: int, reg: list[tuple[str, int]]) -> dict[str, int]:
    """kohya's rule, written from its description: the regularization images, in order, each take their folder's
    repeats until the epoch has as many regularization draws as training draws (those after get none); if they
    fall short, the shortfall is spread one draw at a time over them, in order, round after round."""
    first = {}
    total = 0
    for name, repeats in reg:
        if total >= train_draws:
            first[name] = 0
            continue
        first[name] = repeats
        total += repeats
    short = max(0, train_draws - total)
    rounds, rest = divmod(short, len(reg))
    return {name: n + (rounds + (i < rest) if total < train_draws else 0) for i, (name, n) in enumerate(first.items())}


@pytest.mark.parametrize("reg_counts", [(4, 2), (30, 1)])  # fewer regularization draws than training ones, more
def test_an_epoch_draws_each_image_by_its_repeats_and_balances_regularization(tmp_path, reg_counts):
    train, reg = tmp_path / "train", tmp_path / "reg"
    folder(train, "1_one", 2)
    folder(train, "3_three", 2, offset=2)
    folder(train, "10_ten", 1, offset=4)
    (train / "skipped").mkdir()  # no N_ prefix: skipped, as kohya does
    folder(reg, "1_person", reg_counts[0], captions=False)
    folder(reg, "2_other", reg_counts[1], captions=False, offset=3)
    data = plan_of(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(train), "--reg_data_dir", str(reg),
                    "--resolution", "64", "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    draws = draws_in_epoch(data)
    train_names = {s.sample.name: s.sample.subset.num_repeats for s in data.samples if not s.sample.subset.is_reg}
    assert {n: draws[n] for n in train_names} == train_names  # 1, 3 and 10 per epoch
    train_draws = sum(train_names.values())
    assert train_draws == 2 * 1 + 2 * 3 + 1 * 10
    reg_images = [(s.sample.name, s.sample.subset.num_repeats) for s in data.samples if s.sample.subset.is_reg]
    expected = kohya_balance(train_draws, reg_images)
    assert {name: draws.get(name, 0) for name, _ in reg_images} == expected
    assert sum(expected.values()) >= train_draws
    assert draws_in_epoch(data, 1) == draws  # every epoch alike; batches differ
    reg_sample = next(s for s in data.samples if s.sample.subset.is_reg)
    assert reg_sample.sample.caption == "person" and reg_sample.sample.subset.class_tokens == "person"


def test_the_documented_kohya_config_parses(tmp_path):
    """kohya's config_README example (its DreamBooth dataset), with local folders: the subset values fall back to
    their dataset's, then [general]'s, then the flags'."""
    for name in ("hoge", "fuga", "reg"):
        (tmp_path / name).mkdir()
    toml = tmp_path / "config.toml"
    toml.write_text(f"""
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{tmp_path / "hoge"}'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '{tmp_path / "fuga"}'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{tmp_path / "reg"}'
  class_tokens = 'human'
  keep_tokens = 1
""")
    datasets, overridden = read_config(toml, {"batch_size": 2, "resolution": 1024, "caption_extension": ".caption",
                                              "num_repeats": 1})
    (d,) = datasets
    assert (d.resolution, d.batch_size) == (512, 4)
    assert [(Path(s.image_dir).name, s.class_tokens, s.keep_tokens, s.is_reg, s.shuffle_caption, s.caption_extension,
             s.num_repeats) for s in d.subsets] == [
        ("hoge", "hoge girl", 2, False, True, ".txt", 1), ("fuga", "fuga boy", 3, False, True, ".txt", 1),
        ("reg", "human", 1, True, True, ".txt", 1)]
    assert overridden == {"resolution": (512, 1024), "batch_size": (4, 2)}


def test_a_toml_describing_the_folder_layout_gives_the_same_epoch(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    folder(train, "3_cat", 3)
    folder(train, "2_dog", 2, offset=3)
    folder(reg, "1_animal", 5, captions=False)
    common = ["--pretrained_model_name_or_path", "x", "--resolution", "64", "--output_dir", str(tmp_path / "o"),
              "--report_to", "none"]
    by_flags = plan_of([*common, "--train_data_dir", str(train), "--reg_data_dir", str(reg)])
    toml = tmp_path / "same.toml"
    toml.write_text(f"""[[datasets]]
[[datasets.subsets]]
image_dir = "{train / '3_cat'}"
num_repeats = 3
class_tokens = "cat"
[[datasets.subsets]]
image_dir = "{train / '2_dog'}"
num_repeats = 2
class_tokens = "dog"
[[datasets.subsets]]
image_dir = "{reg / '1_animal'}"
is_reg = true
class_tokens = "animal"
""")
    by_toml = plan_of([*common, "--dataset_config", str(toml)])
    assert sorted((s.sample.name, s.sample.caption, s.draws, s.sample.subset.is_reg) for s in by_flags.samples) == \
        sorted((s.sample.name, s.sample.caption, s.draws, s.sample.subset.is_reg) for s in by_toml.samples)
    assert draws_in_epoch(by_flags) == draws_in_epoch(by_toml)


def test_caption_rules_keep_shuffle_and_drop_tags():
    """keep_tokens keeps the first tags in place, the others are shuffled and each dropped with the rate; the
    separator splits, ", " joins, the prefix and suffix take part (kohya's rules, re-stated)."""
    text = "sks dog, red collar, on grass, sunny, from side, smiling"
    tags = [t.strip() for t in text.split(",")]
    subset = Subset(shuffle_caption=True, keep_tokens=2)
    orders = set()
    for i in range(200):
        out = process_caption(text, subset, random.Random(i)).split(", ")
        assert out[:2] == tags[:2] and sorted(out[2:]) == sorted(tags[2:])
        orders.add(tuple(out))
    assert len(orders) == 24  # every order of the 4 shuffled tags
    dropping = Subset(caption_tag_dropout_rate=0.3, keep_tokens=1)
    kept = [process_caption(text, dropping, random.Random(i)).split(", ") for i in range(2000)]
    assert all(k[0] == "sks dog" for k in kept)
    rate = 1 - sum(len(k) - 1 for k in kept) / (2000 * (len(tags) - 1))
    assert abs(rate - 0.3) < 0.02
    separated = Subset(shuffle_caption=True, keep_tokens_separator="|||", caption_separator=";",
                       caption_prefix="masterpiece;")
    out = process_caption("a; b ||| c; d; e ||| f", separated, random.Random(0)).split(", ")
    assert out[:3] == ["masterpiece", "a", "b"] and out[-1] == "f" and sorted(out[3:6]) == ["c", "d", "e"]
    assert process_caption("plain caption, kept", Subset(caption_prefix="pre,"), random.Random(0)) == \
        "pre, plain caption, kept"


def test_cached_embeddings_hold_n_variants_per_shuffled_caption(tiny_pipeline_dir, tmp_path):
    """With cached text embeddings a shuffled caption has --caption_variants fixed variants, each encoded once
    (the cost: that many encoder passes and cache entries per caption); every draw uses one of them."""
    train = tmp_path / "train"
    folder(train, "2_thing", 3)
    argv = base_args(tiny_pipeline_dir, tmp_path / "o", tmp_path / "c", "--shuffle_caption", "--keep_tokens", "1",
                     "--caption_variants", "4", "--cache_latents", data=train, steps=4)
    assert T.main(argv) == 0
    entries = list((tmp_path / "c" / "text").rglob("*.safetensors"))
    args = T.parse_args(argv)
    data = T.load_training_data(args, T.SimpleNamespace(is_main_process=False, num_processes=1))
    dataset = T.SDXLTrainingSet(data, T.SimpleNamespace(vae_id="", text_id=""), args)
    variants = set(dataset.captions())
    # 3 captions x 4 variants, fewer where two variants drew the same order (3 shuffled tags: 6 orders)
    assert len(entries) == len(variants) and 3 * 2 <= len(variants) <= 3 * 4
    seen = {D.choose_caption(s.sample.caption, 0, e, s.index, 0.0, d, s.sample.subset, 4)
            for s in data.samples for e in range(6) for d in range(2)}
    assert seen <= variants and len(seen) > 3


def test_bad_dataset_inputs_are_one_line_errors_and_write_nothing(tiny_pipeline_dir, tmp_path, capsys):
    def refused(argv, *words):
        out = Path(argv[argv.index("--output_dir") + 1])
        assert T.main(argv) != 0
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: ") and all(w in line for w in words), line
        assert not out.exists() or not [p for p in out.rglob("*") if p.name != loha.runs.LOCK_FILE and p.is_file()
                                        and "logs" not in p.parts]

    zero = tmp_path / "zero"
    folder(zero, "0_never", 1)
    refused(base_args(tiny_pipeline_dir, tmp_path / "o1", tmp_path / "c", data=zero), "0_never", "0 repeats")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[general]\nshuffle_caption = true\n[[datasets]\n")
    refused([*base_args(tiny_pipeline_dir, tmp_path / "o2", tmp_path / "c", data=zero)[:2], "--dataset_config",
             str(bad_toml), *base_args(tiny_pipeline_dir, tmp_path / "o2", tmp_path / "c")[4:]],
            "bad.toml", "line 3")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{zero}'\ncolor_aug = true\n")
    refused([*base_args(tiny_pipeline_dir, tmp_path / "o3", tmp_path / "c")[:2], "--dataset_config", str(unknown),
             *base_args(tiny_pipeline_dir, tmp_path / "o3", tmp_path / "c")[4:]], "color_aug", "unknown.toml")
    empty = tmp_path / "empty"
    (empty / "5_nothing").mkdir(parents=True)
    refused(base_args(tiny_pipeline_dir, tmp_path / "o4", tmp_path / "c", data=empty), "5_nothing", "holds no images")
    uncaptioned = tmp_path / "uncaptioned"
    folder(uncaptioned, "3_", 1, captions=False)
    refused(base_args(tiny_pipeline_dir, tmp_path / "o5", tmp_path / "c", data=uncaptioned), "no caption file",
            "class tokens")
    train = tmp_path / "train"
    folder(train, "2_cat", 2)
    for reg in (train, train / "2_cat"):
        refused(base_args(tiny_pipeline_dir, tmp_path / "o6", tmp_path / "c", "--reg_data_dir", reg, data=train),
                "regularization folder", "training folder")
    masks = tmp_path / "masks"
    (masks / "2_cat").mkdir(parents=True)
    for image in (train / "2_cat").glob("*.jpg"):
        Image.new("L", (7, 5), 255).save(masks / "2_cat" / f"{image.stem}.png")
    refused(base_args(tiny_pipeline_dir, tmp_path / "o7", tmp_path / "c", "--masked_loss", "--mask_data_dir", masks,
                      data=train), "7x5", "must have its image's size")


# ---------------------------------------------------------------------------------------- masked loss
def test_the_masked_mean_is_the_weighted_mean_per_sample():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 4, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 1, 5, 6, generator=g, dtype=torch.float64)
    mask[2] = 0
    expected = []
    for b in range(3):
        num = sum(loss[b, c, i, j] * mask[b, 0, i, j] for c in range(4) for i in range(5) for j in range(6))
        den = 4 * sum(mask[b, 0, i, j] for i in range(5) for j in range(6))
        expected.append(num / den if den > 0 else 0.0)
    got = T.masked_mean(loss, mask)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def rgba_folder(root: Path, alpha_of_second) -> Path:
    """2_thing/: two RGBA PNGs with captions; the first half-transparent, the second's alpha as given."""
    path = root / "2_thing"
    path.mkdir(parents=True)
    for i, picture in enumerate(PICTURES[:2]):
        image = Image.open(picture).convert("RGB").resize((64, 64))
        alpha = Image.new("L", (64, 64), 0)
        alpha.paste(255, (0, 0, 32, 64)) if i == 0 else alpha.paste(alpha_of_second, (0, 0, 64, 64))
        image.putalpha(alpha)
        image.save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"thing {i}")
    return root


def test_an_image_with_an_empty_mask_contributes_nothing(tiny_pipeline_dir, tmp_path):
    """Masked loss (masks from --mask_data_dir): the second image's mask is empty, so changing its pixels leaves
    the adapter bit for bit the same (it sits in every batch with the first); without --masked_loss the change
    shows."""
    masks = tmp_path / "masks" / "1_thing"
    masks.mkdir(parents=True)
    results = {}
    for variant in ("as is", "changed"):
        root = tmp_path / variant
        folder(root, "1_thing", 2)
        images = sorted((root / "1_thing").glob("*.jpg"))
        for i, image in enumerate(images):
            size = Image.open(image).size
            Image.new("L", size, 255 if i == 0 else 0).save(masks / f"{image.stem}.png")
        if variant == "changed":
            pixels = 255 - np.asarray(Image.open(images[1]).convert("RGB"))
            Image.fromarray(pixels).save(images[1])
        for masked in (True, False):
            out = tmp_path / f"out-{masked}-{variant}"
            flags = ["--masked_loss", "--mask_data_dir", tmp_path / "masks"] if masked else []
            argv = base_args(tiny_pipeline_dir, out, tmp_path / f"cache-{masked}-{variant}", "--train_batch_size", "2",
                             "--cache_latents", *flags, data=root, steps=2)
            assert T.main(argv) == 0
            results[masked, variant] = adapter_weights(out / "unet")
    assert_same_weights(results[True, "as is"], results[True, "changed"])
    plain = results[False, "as is"]
    assert any(not torch.equal(plain[k], results[False, "changed"][k]) for k in plain)


def test_an_alpha_mask_and_the_same_mask_file_train_alike(tiny_pipeline_dir, tmp_path):
    root = rgba_folder(tmp_path / "data", 128)
    masks = tmp_path / "masks" / "2_thing"
    masks.mkdir(parents=True)
    for image in (root / "2_thing").glob("*.png"):
        Image.open(image).getchannel("A").save(masks / image.name)
    weights = []
    for extra in ([], ["--mask_data_dir", str(tmp_path / "masks")]):
        out = tmp_path / f"out{len(weights)}"
        argv = base_args(tiny_pipeline_dir, out, tmp_path / f"c{len(weights)}", "--train_batch_size", "2",
                         "--masked_loss", "--random_flip", *extra, data=root, steps=3)
        assert T.main(argv) == 0
        weights.append(adapter_weights(out / "unet"))
    assert_same_weights(*weights)


def test_resume_is_bitwise_with_repeats_regularization_shuffled_captions_and_masks(tiny_pipeline_dir, tmp_path):
    root = rgba_folder(tmp_path / "data", 200)
    reg = tmp_path / "reg"
    folder(reg, "1_thing", 3, captions=False)
    common = ("--reg_data_dir", reg, "--prior_loss_weight", "0.5", "--shuffle_caption", "--caption_tag_dropout_rate",
              "0.2", "--masked_loss", "--checkpointing_steps", "2", "--random_flip")
    full = tmp_path / "full"
    assert T.main(base_args(tiny_pipeline_dir, full, tmp_path / "c", *common, data=root, steps=4)) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    assert T.main(base_args(tiny_pipeline_dir, resumed, tmp_path / "c", *common, "--resume_from_checkpoint", "latest",
                            data=root, steps=4)) == 0
    assert_same_weights(adapter_weights(full / "unet"), adapter_weights(resumed / "unet"))


def test_regularization_loss_is_weighted_and_zero_removes_it(tiny_pipeline_dir, tmp_path):
    """prior_loss_weight 0: the regularization images change nothing, so the adapter equals a run in which they
    are other pictures; at 1 it differs."""
    train = tmp_path / "train"
    folder(train, "1_thing", 2)
    runs = {}
    for weight in ("0", "1"):
        for offset in (0, 3):
            reg = tmp_path / f"reg-{weight}-{offset}"
            folder(reg, "1_thing", 2, captions=False, offset=offset)
            out = tmp_path / f"out-{weight}-{offset}"
            argv = base_args(tiny_pipeline_dir, out, tmp_path / f"c-{weight}-{offset}", "--reg_data_dir", reg,
                             "--prior_loss_weight", weight, "--train_batch_size", "2", data=train, steps=2)
            assert T.main(argv) == 0
            runs[weight, offset] = adapter_weights(out / "unet")
    assert_same_weights(runs["0", 0], runs["0", 3])
    assert any(not torch.equal(runs["1", 0][k], runs["1", 3][k]) for k in runs["1", 0])


# ------------------------------------------------------------------------------------------ provenance
def test_outputs_work_from_another_folder_and_carry_kohyas_metadata(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The run records its base as an absolute path: infer.py and inspect find it from any working folder, on the
    run's own file and on resize's; the kohya file carries kohya's training keys in kohya's value formats."""
    import infer
    from loha.__main__ import main as loha_main

    train = tmp_path / "train"
    folder(train, "3_cat", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative_model = Path("model")
    shutil.copytree(tiny_pipeline_dir, relative_model)  # the run names its base by a relative path
    out = tmp_path / "run"
    assert T.main(base_args(relative_model, out, tmp_path / "c", data=train, steps=2)) == 0
    _, metadata = loha.read_safetensors(out / "loha.safetensors")
    assert metadata["loha.base_model"] == str((work / "model").resolve())
    assert json.loads(metadata["ss_dataset_dirs"]) == {"3_cat": {"n_repeats": 3, "img_count": 2}}
    assert metadata["ss_num_train_images"] == "6" and metadata["ss_num_reg_images"] == "0"
    assert metadata["ss_steps"] == "2" and metadata["ss_resolution"] == "(64, 64)" and metadata["ss_seed"] == "0"
    assert set(json.loads(metadata["ss_tag_frequency"])["3_cat"]) >= {"outdoors", "tag0"}
    for key in ("ss_num_batches_per_epoch", "ss_num_epochs", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
                "ss_optimizer", "ss_network_args", "ss_sd_model_name"):
        assert key in metadata, key
    assert metadata["ss_optimizer"] == "torch.optim.adamw.AdamW" and metadata["ss_sd_model_name"] == "model"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resized = tmp_path / "resized.safetensors"
    assert loha_main(["resize", "--adapter", str(out / "loha.safetensors"), "--rank", "2", "--out", str(resized)]) == 0
    for file in (out / "loha.safetensors", resized, out):
        assert loha_main(["inspect", "--adapter", str(file / "unet" if file == out else file), "--json"]) == 0
        written = infer.main(["--checkpoint", str(file), "--prompt", "a cat", "--num_inference_steps", "2",
                              "--output_dir", str(tmp_path / f"img-{file.name}")])
        assert written and written[0].is_file()
    assert loha.read_safetensors(resized)[1]["loha.base_model"] == str((work / "model").resolve())
