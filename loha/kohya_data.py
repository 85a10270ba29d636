"""kohya sd-scripts' dataset conventions, re-derived from their documentation and behaviour (never copied):

- the folder layout: ``train_data_dir/10_sks dog/`` holds images used 10 times per epoch, and ``sks dog`` is the
  caption of those that have no caption file (kohya's class tokens). A subfolder without the ``N_`` prefix is
  skipped, as kohya skips it (rename it ``1_name`` to use it), and so are images beside the subfolders;
- regularization (prior-preservation) images, ``--reg_data_dir`` in the same layout: each epoch draws as many of
  them as it draws training images (their repeats cut short, or raised in turn, as kohya's DreamBooth dataset
  does), and their loss is weighted by ``--prior_loss_weight``;
- the dataset-config TOML (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``): a subset's value wins over
  its dataset's, which wins over ``[general]``, which wins over the command line's flags (kohya's order);
- captions: prefix/suffix, ``keep_tokens`` (or ``keep_tokens_separator``), ``shuffle_caption`` and
  ``caption_tag_dropout_rate``, with ``caption_separator`` between tags and ", " joining them again.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .layer import LoHaError

FOLDER = re.compile(r"(\d+)_(.*)")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Subset:
    """A folder of images with how they are used (kohya's DreamBooth subset)."""
    image_dir: str | None = None  # None: the --train_data_dir / --dataset_name samples as they are listed
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    alpha_mask: bool = False

    @property
    def varies(self) -> bool:
        """Whether its captions change from draw to draw (beyond whole-caption dropout)."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0

    @property
    def name(self) -> str:
        return Path(self.image_dir).name if self.image_dir else "(train_data_dir)"


@dataclass(frozen=True)
class Dataset:
    """Subsets trained at one resolution and batch size (kohya's [[datasets]])."""
    subsets: tuple = ()
    resolution: int = 1024
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int = 64


SUBSET_KEYS = {f.name for f in fields(Subset)}
DATASET_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"}
# kohya keys this kit does not have, so a TOML using one is refused instead of trained differently
UNSUPPORTED = {"color_aug", "face_crop_aug_range", "random_crop", "secondary_separator", "enable_wildcard",
               "token_warmup_min", "token_warmup_step", "custom_attributes", "resize_interpolation", "cache_info",
               "caption_dropout_every_n_epochs", "metadata_file", "conditioning_data_dir", "network_multiplier",
               "bucket_no_upscale", "validation_seed", "validation_split", "debug_dataset"}
TYPES = {"num_repeats": int, "keep_tokens": int, "batch_size": int, "bucket_reso_steps": int, "min_bucket_reso": int,
         "max_bucket_reso": int, "resolution": int, "caption_dropout_rate": float, "caption_tag_dropout_rate": float,
         "is_reg": bool, "shuffle_caption": bool, "flip_aug": bool, "alpha_mask": bool, "enable_bucket": bool}


def folder_subsets(root, *, is_reg: bool, defaults: Subset, what: str) -> list[Subset] | None:
    """kohya's layout under ``root``: one Subset per ``N_name`` subfolder, or None when it has none (a plain
    image folder). A ``0_name`` folder is refused; a folder without the prefix is skipped, with a note."""
    root = Path(root)
    if not root.is_dir():
        raise LoHaError(f"{what} {root} does not exist or is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    matched = [(p, FOLDER.fullmatch(p.name)) for p in folders]
    if not any(m for _, m in matched):
        return None
    subsets = []
    for path, m in matched:
        if m is None:
            print(f"note: {what}: skipped {path.name}/ (no N_ repeat prefix; kohya skips such folders too, rename it "
                  f"1_{path.name} to train on it once per epoch)", file=sys.stderr)
            continue
        repeats = int(m[1])
        if repeats < 1:
            raise LoHaError(f"{what}: folder {path.name} has 0 repeats, so its images would never be used; give it a "
                            "number of repeats of 1 or more (e.g. 1_" + m[2] + ")")
        subsets.append(replace(defaults, image_dir=str(path), num_repeats=repeats, is_reg=is_reg,
                               class_tokens=m[2] or defaults.class_tokens))
    return subsets


def images_in(folder) -> list[Path]:
    """The images directly in a subset's folder, sorted (kohya does not look into its subfolders)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# ------------------------------------------------------------------------------------------- the TOML
DATASET_LEVEL = {"datasets", "subsets"}


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli  # Python 3.10: requirements.txt installs it

    return tomli


def read_config(file, cli: dict) -> tuple[list[Dataset], dict]:
    """The datasets of a kohya dataset-config TOML, and {key: (TOML's value, flag's value)} where the file
    overrides a flag. ``cli``: the flags' values for kohya's keys (train_batch_size as batch_size), the defaults
    of what the file leaves unset. Folders are read as given (relative to the working folder, as kohya does)."""
    path = Path(file)
    toml = _toml()
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise LoHaError(f"cannot read --dataset_config {path}: {getattr(e, 'strerror', None) or e}") from None
    except toml.TOMLDecodeError as e:
        raise LoHaError(f"--dataset_config {path} is not valid TOML: {e}") from None
    where = f"--dataset_config {path}"
    _check_keys(data, {"general", "datasets"}, where, "the top level")
    general = data.get("general", {})
    _check_keys(general, (SUBSET_KEYS - {"image_dir", "is_reg", "alpha_mask"}) | DATASET_KEYS, where, "[general]")
    tables = data.get("datasets", [])
    if not isinstance(tables, list) or not tables:
        raise LoHaError(f"{where} has no [[datasets]] table; add one with at least one [[datasets.subsets]]")
    datasets, overridden = [], {}
    for i, table in enumerate(tables, 1):
        _check_keys(table, (SUBSET_KEYS - {"image_dir", "is_reg", "alpha_mask"}) | DATASET_KEYS | {"subsets"},
                    where, f"[[datasets]] #{i}")
        subsets = []
        for j, sub in enumerate(table.get("subsets", []), 1):
            label = f"[[datasets.subsets]] #{j} of [[datasets]] #{i}"
            _check_keys(sub, SUBSET_KEYS, where, label)
            if "image_dir" not in sub:
                raise LoHaError(f"{where}: {label} has no image_dir")
            values = {}
            for key in SUBSET_KEYS:
                value = _first(key, sub, table, general, cli, Subset.__dataclass_fields__[key].default)
                values[key] = _typed(key, value, where, label)
            if values["num_repeats"] < 1:
                raise LoHaError(f"{where}: {label} ({values['image_dir']}) has num_repeats {values['num_repeats']}, so "
                                "its images would never be used; give it 1 or more")
            subsets.append(Subset(**values))
        if not subsets:
            raise LoHaError(f"{where}: [[datasets]] #{i} has no [[datasets.subsets]]")
        values = {}
        for key in DATASET_KEYS:
            value = _first(key, table, general, cli, Dataset.__dataclass_fields__[key].default)
            if key == "resolution" and isinstance(value, list):
                if len(value) != 2 or value[0] != value[1]:
                    raise LoHaError(f"{where}: [[datasets]] #{i} has resolution {value}; this kit trains at a square "
                                    "resolution with aspect-ratio buckets (give one number and enable_bucket)")
                value = value[0]
            values[key] = _typed(key, value, where, f"[[datasets]] #{i}")
            toml_value = _first(key, table, general, {}, None)
            if toml_value is not None and cli.get(key) is not None and toml_value != cli[key]:
                overridden[key] = (toml_value, cli[key])
        datasets.append(Dataset(subsets=tuple(subsets), **values))
    return datasets, overridden


def _check_keys(table, allowed, where, label):
    if not isinstance(table, dict):
        raise LoHaError(f"{where}: {label} is not a table")
    for key in table:
        if key in UNSUPPORTED:
            raise LoHaError(f"{where}: {label} sets {key}, a kohya option this kit does not support; remove it")
        if key not in allowed:
            hint = " (it belongs in [[datasets.subsets]])" if key in ("image_dir", "is_reg", "alpha_mask") else ""
            raise LoHaError(f"{where}: {label} has an unknown key {key}{hint}")


def _first(key, *tables_and_default):
    *tables, default = tables_and_default
    for table in tables:
        if table.get(key) is not None:
            return table[key]
    return default


def _typed(key, value, where, label):
    kind = TYPES.get(key)
    if value is None or kind is None:
        if key not in TYPES and value is not None and not isinstance(value, str):
            raise LoHaError(f"{where}: {label} has {key} = {value!r}; expected text")
        return value
    ok = isinstance(value, bool) if kind is bool else isinstance(value, (int, float) if kind is float else int) \
        and not isinstance(value, bool)
    if not ok:
        expected = "true or false" if kind is bool else kind.__name__
        raise LoHaError(f"{where}: {label} has {key} = {value!r}; expected {expected}")
    return kind(value)


# ------------------------------------------------------------------------------------------- an epoch
def regularization_repeats(train_draws: int, reg: list[int]) -> list[int]:
    """How often each regularization image (in order, with its folder's repeats) is drawn per epoch, so the
    epoch draws as many of them as it draws training images (``train_draws``): kohya's rule. In turn each takes
    its own repeats until the count is reached (the rest get 0: more regularization images than training
    draws), then, while it is not, each in turn one more."""
    out = [0] * len(reg)
    total, first = 0, True
    while reg and total < train_draws:
        for i, repeats in enumerate(reg):
            out[i] += repeats if first else 1
            total += repeats if first else 1
            if total >= train_draws:
                break
        first = False
    return out


def process_caption(text: str, subset: Subset, rng) -> str:
    """One draw's caption: prefix and suffix, then (when it shuffles or drops tags) the fixed first tags (or the
    parts around keep_tokens_separator) kept, the others shuffled and each dropped with the tag dropout rate."""
    if subset.caption_prefix:
        text = f"{subset.caption_prefix} {text}"
    if subset.caption_suffix:
        text = f"{text} {subset.caption_suffix}"
    text = text.split("\n")[0]
    if not subset.varies:
        return text
    sep = subset.caption_separator
    suffix = []
    if subset.keep_tokens_separator and subset.keep_tokens_separator in text:
        fixed_part, flex_part = text.split(subset.keep_tokens_separator, 1)
        if subset.keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(subset.keep_tokens_separator, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        tokens = [t.strip() for t in text.strip().split(sep)]
        fixed, flex = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
    if subset.shuffle_caption:
        rng.shuffle(flex)
    if subset.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def tag_frequency(captions: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per folder name, how many of its images' captions hold each tag (lower case)."""
    out = {}
    for folder, texts in captions.items():
        counts = out.setdefault(folder, {})
        for text in texts:
            for tag in text.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return out


def check_no_overlap(train_folders, reg_folders):
    """A regularization folder must not be, or lie inside, a training folder (its images would be both)."""
    for reg in reg_folders:
        r = Path(reg).resolve()
        for train in train_folders:
            t = Path(train).resolve()
            if r == t or t in r.parents:
                raise LoHaError(f"the regularization folder {reg} {'is' if r == t else 'is inside'} the training "
                                f"folder {train}; keep regularization images in a folder of their own")
