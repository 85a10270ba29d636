"""SDXL training data: finding samples, checking images, aspect buckets, crops with micro-conditioning,
a deterministic batch plan, and an on-disk feature cache.

Every random choice about data (crop, flip, caption pick, caption dropout, batch order) is a pure
function of (seed, epoch, sample index). Nothing here touches the global RNGs, so a run resumed
mid-epoch, a run with cached features, and a run split over several processes all see the same
samples with the same augmentations.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from PIL import Image, ImageOps

from .formats import atomic_write_bytes
from .kohya_data import Subset, images_in, process_caption, regularization_repeats
from .layer import LoHaError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_IMAGE_BYTES = 256 * 1024 * 1024  # a larger "image" is not a training photo; refuse to read it whole
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb threshold (~89 Mpx), made an error


# ------------------------------------------------------------------------------------- randomness
def rng_for(*keys) -> random.Random:
    """A Python RNG seeded by ``keys`` (stable across runs, processes and Python versions)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def torch_generator_for(*keys) -> torch.Generator:
    return torch.Generator().manual_seed(rng_for(*keys).getrandbits(63))


# ---------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One training example before its image is checked: where its bytes come from, its caption, and the kohya
    subset (folder, repeats, caption rules) and dataset (resolution, batch size) it belongs to."""
    index: int
    name: str
    caption: object  # a str, or a list of str (one is picked per epoch)
    path: Path | None = None  # a file, or...
    row: dict | None = None  # ...a datasets Image(decode=False) value with embedded "bytes"
    subset: Subset = field(default_factory=Subset)
    dataset: int = 0

    def read_bytes(self) -> bytes:
        if self.path is not None:
            if self.path.stat().st_size > MAX_IMAGE_BYTES:
                raise OSError(f"file is larger than {MAX_IMAGE_BYTES >> 20} MiB")
            return self.path.read_bytes()
        return self.row["bytes"]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def samples_from_folder(data_dir, caption_column: str = "text", caption_extension: str = ".txt",
                        what: str = "--train_data_dir") -> list[Sample]:
    """An imagefolder with ``metadata.jsonl`` (``file_name`` + caption column), or kohya's layout of
    ``photo.png`` beside ``photo.txt`` (searched recursively).

    Every image must resolve, symlinks followed, to a file inside ``data_dir``: an entry that escapes it
    (``../``, an absolute path, a symlink pointing out) stops the run. Reading files a dataset merely
    names would let a downloaded dataset read anything on the machine into a model.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise LoHaError(f"{what} {root} does not exist or is not a folder")
    root = root.resolve()
    metadata = root / "metadata.jsonl"
    entries = _read_metadata(metadata, caption_column) if metadata.is_file() else _read_kohya_folder(
        root, caption_extension)
    if not entries:
        raise LoHaError(f"{what} {root} holds no images (expected metadata.jsonl, or images with "
                        f"{caption_extension} captions beside them)")
    samples = []
    for i, (name, caption) in enumerate(entries):
        path = (root / name).resolve()
        if Path(name).is_absolute() or not _inside(path, root):
            raise LoHaError(f"{metadata.name if metadata.is_file() else 'data folder'}: entry {name!r} points "
                            f"outside {root}; refused (copy the image into the folder)")
        samples.append(Sample(i, str(name), caption, path=path))
    return samples


def samples_from_subset(subset: Subset, dataset: int, start: int = 0) -> list[Sample]:
    """The images directly in a kohya subset's folder, in file-name order; each image's caption from its caption
    file, else the subset's class tokens. A folder with no image, or an image with neither, is refused."""
    root = Path(subset.image_dir)
    if not root.is_dir():
        raise LoHaError(f"image folder {root} does not exist or is not a folder")
    images = images_in(root)
    if not images:
        raise LoHaError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    resolved, samples = root.resolve(), []
    for image in images:
        if not _inside(image.resolve(), resolved):
            raise LoHaError(f"{image} points outside {root}; refused (copy the image into the folder)")
        caption_file = image.with_suffix(subset.caption_extension)
        caption = None
        if caption_file.is_file() and _inside(caption_file.resolve(), resolved):
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() or None
        caption = caption if caption is not None else subset.class_tokens
        if caption is None:
            raise LoHaError(f"{image} has no caption file ({caption_file.name}) and its folder no class tokens; add "
                            "the caption file, name the folder N_<class tokens>, or set class_tokens")
        samples.append(Sample(start + len(samples), f"{root.name}/{image.name}", caption, path=image, subset=subset,
                              dataset=dataset))
    return samples


def _read_metadata(file: Path, caption_column: str) -> list[tuple[str, object]]:
    entries = []
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LoHaError(f"{file}:{line_no} is not valid JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise LoHaError(f"{file}:{line_no} needs a \"file_name\" string")
        if caption_column not in row:
            raise LoHaError(f"--caption_column {caption_column!r} is not in {file.name} (line {line_no} has "
                            f"{sorted(k for k in row if k != 'file_name')})")
        entries.append((row["file_name"], row[caption_column]))
    return entries


def _read_kohya_folder(root: Path, caption_extension: str) -> list[tuple[str, object]]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    entries = []
    for image in images:
        caption_file = image.with_suffix(caption_extension)
        caption = None
        if caption_file.is_file() and _inside(caption_file.resolve(), root):
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
        entries.append((str(image.relative_to(root)), caption))
    return entries


def samples_from_dataset(dataset, image_column: str, caption_column: str, root=None) -> list[Sample]:
    """Samples from a ``datasets.Dataset`` (the train split of ``--dataset_name``).

    With ``root`` (a local image folder), an image that is read from a file rather than embedded must
    resolve, symlinks followed, inside it: the same rule as ``samples_from_folder``.
    """
    from datasets import Image as ImageFeature

    if len(dataset) == 0:
        raise LoHaError("the dataset is empty")
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise LoHaError(f"{flag} {column!r} is not a column of the dataset; it has {dataset.column_names}")
    if isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    samples = []
    for i, row in enumerate(dataset):
        image = row[image_column]
        if not isinstance(image, dict):  # e.g. a column of file names
            image = {"bytes": None, "path": str(image)}
        name = image.get("path") or f"row {i}"
        if image.get("bytes") is not None:
            samples.append(Sample(i, name, row[caption_column], row=image))
            continue
        # read from a file: check and then read the same resolved path, through the size-checked reader
        path = Path(root, image.get("path") or "").resolve() if root is not None else Path(image.get("path") or "")
        if root is not None and not _inside(path, Path(root).resolve()):
            raise LoHaError(f"--dataset_name {root}: image {image.get('path')!r} points outside the folder; "
                            "refused (copy the image into the folder)")
        samples.append(Sample(i, name, row[caption_column], path=path))
    return samples


def select_samples(samples: list[Sample], max_train_samples: int | None, seed: int) -> list[Sample]:
    """The first ``max_train_samples`` of a seeded shuffle (as diffusers' scripts do), in index order."""
    if max_train_samples is None or max_train_samples >= len(samples):
        return samples
    chosen = sorted(rng_for(seed, "max_train_samples").sample(range(len(samples)), max_train_samples))
    return [samples[i] for i in chosen]


# ------------------------------------------------------------------------------------------ images
def decode_image(data: bytes) -> Image.Image:
    """Decode untrusted bytes into an RGB image with its EXIF orientation applied.

    Raises on anything that is not a complete, sane image: truncated, corrupt, empty, not an image, or a
    decompression bomb (more than MAX_IMAGE_PIXELS pixels).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels is too many")
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))  # transparent areas become white, not black
    return image.convert("RGB")


@dataclass
class CheckedSample:
    """A sample whose image decoded: its original size (after EXIF rotation) and content hash; how often an
    epoch draws it (its folder's repeats, or for a regularization image kohya's balance); its mask, if any."""
    sample: Sample
    width: int
    height: int
    sha256: str
    bucket: tuple[int, int] = (0, 0)  # (width, height) it is cropped to
    draws: int = 1
    mask: Path | None = None

    @property
    def index(self) -> int:
        return self.sample.index


@dataclass
class ScanReport:
    good: list[CheckedSample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def check_samples(samples: list[Sample], progress=None) -> ScanReport:
    """Decode every image once; skip the broken ones and samples whose caption is not text."""
    report = ScanReport()
    for sample in progress(samples) if progress else samples:
        caption = sample.caption
        if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                             and all(isinstance(c, str) for c in caption))):
            report.skipped.append((sample.name, f"caption is {type(caption).__name__}, not text"))
            continue
        try:
            data = sample.read_bytes()
            image = decode_image(data)
        except Exception as e:  # untrusted files make PIL raise many types; each means "skip this one"
            report.skipped.append((sample.name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        report.good.append(CheckedSample(sample, image.width, image.height, hashlib.sha256(data).hexdigest()))
    return report


# ------------------------------------------------------------------------------------------- masks
def find_masks(checked: list[CheckedSample], mask_dir) -> None:
    """For masked loss from ``mask_dir``: each training image's mask, the file with its name (any image
    suffix) in ``mask_dir/<its folder>/`` or ``mask_dir/``, of the image's size. Regularization images without
    one learn everywhere. A missing mask or one of another size is refused in one line."""
    root = Path(mask_dir)
    if not root.is_dir():
        raise LoHaError(f"--mask_data_dir {root} does not exist or is not a folder")
    for c in checked:
        stem = Path(c.sample.name).stem
        folders = [root / Path(c.sample.name).parent, root]
        found = next((f for folder in folders for f in sorted(folder.glob(f"{stem}.*"))
                      if f.suffix.lower() in IMAGE_SUFFIXES), None)
        if found is None:
            if c.sample.subset.is_reg:
                continue
            raise LoHaError(f"--mask_data_dir {root} has no mask for {c.sample.name} (expected {stem}.png or another "
                            "image with that name)")
        with Image.open(found) as mask:
            size = ImageOps.exif_transpose(mask).size
        if size != (c.width, c.height):
            raise LoHaError(f"the mask {found} is {size[0]}x{size[1]} but its image {c.sample.name} is "
                            f"{c.width}x{c.height}; a mask must have its image's size")
        c.mask = found


def mask_tensor(sample: CheckedSample, aug, latent_factor: int = 8, from_alpha: bool = False) -> torch.Tensor:
    """The sample's mask (1, h/8, w/8) in [0, 1] (white: learn), resized, cropped and flipped exactly as its image
    and averaged over each latent pixel's 8×8 block (the latent-space loss it weights). From its mask file, or
    its image's alpha channel; ones where it has neither."""
    image = None
    if sample.mask is not None:
        image = ImageOps.exif_transpose(Image.open(sample.mask)).convert("L")
    elif from_alpha:
        with Image.open(io.BytesIO(sample.sample.read_bytes())) as source:
            source = ImageOps.exif_transpose(source)
            if source.mode in ("RGBA", "LA", "PA") or (source.mode == "P" and "transparency" in source.info):
                image = source.convert("RGBA").getchannel("A")
    w, h = sample.bucket
    if image is None:
        return torch.ones(1, h // latent_factor, w // latent_factor)
    size, box, _ = crop_geometry(sample.width, sample.height, sample.bucket, aug)
    image = image.resize(size, Image.Resampling.BILINEAR).crop(box)
    if aug.flip:
        image = ImageOps.mirror(image)
    mask = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.interpolate(mask, size=(h // latent_factor, w // latent_factor), mode="area")[0]


# ----------------------------------------------------------------------------------------- buckets
def bucket_resolutions(resolution: int, step: int = 64, low: int | None = None,
                       high: int | None = None) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiple of ``step`` and area <= resolution², each side from ``low`` to
    ``high`` (default: a quarter of the resolution to twice it; kohya's min/max_bucket_reso): SDXL's and kohya's
    aspect-ratio buckets."""
    area = resolution * resolution
    low = low or max(step, resolution // 4 // step * step)
    high = high or resolution * 2
    buckets = {(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            buckets |= {(width, height), (height, width)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio; among equals, the largest."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def assign_buckets(checked: list[CheckedSample], resolution: int, enable_bucket: bool, datasets=None) -> None:
    """Each sample's bucket: its dataset's (``datasets``, kohya_data.Dataset by index) or these settings."""
    cache = {}
    for c in checked:
        if datasets is not None:
            d = datasets[c.sample.dataset]
            key = (d.resolution, d.enable_bucket, d.bucket_reso_steps, d.min_bucket_reso, d.max_bucket_reso)
        else:
            key = (resolution, enable_bucket, 64, None, None)
        if key not in cache:
            res, on, step, low, high = key
            cache[key] = bucket_resolutions(res, step, low, high) if on else [(res, res)]
        c.bucket = nearest_bucket(c.width, c.height, cache[key])


def assign_draws(checked: list[CheckedSample]) -> None:
    """Each sample's draws per epoch: a training image its folder's repeats; the regularization images of a
    dataset kohya's balance, as many draws in all as the dataset's training images get."""
    for d in sorted({c.sample.dataset for c in checked}):
        mine = [c for c in checked if c.sample.dataset == d]
        train = sum(c.sample.subset.num_repeats for c in mine if not c.sample.subset.is_reg)
        reg = [c for c in mine if c.sample.subset.is_reg]
        for c, n in zip(reg, regularization_repeats(train, [c.sample.subset.num_repeats for c in reg])):
            c.draws = n
        for c in mine:
            if not c.sample.subset.is_reg:
                c.draws = c.sample.subset.num_repeats


# ------------------------------------------------------------------------------ crops and time_ids
@dataclass(frozen=True)
class Augmentation:
    crop_y: float  # where the crop window sits in the free space, 0 = top/left, 1 = bottom/right
    crop_x: float
    flip: bool


def choose_augmentation(seed: int, epoch: int, index: int, center_crop: bool, random_flip: bool,
                        draw: int = 0) -> Augmentation:
    rng = rng_for(seed, epoch, index, draw, "augment")
    y, x, flip = rng.random(), rng.random(), rng.random() < 0.5
    return Augmentation(0.5 if center_crop else y, 0.5 if center_crop else x, random_flip and flip)


def crop_geometry(width: int, height: int, bucket: tuple[int, int], aug: Augmentation):
    """(resized (w, h), crop box (left, top, right, bottom) in the resized image, time_ids).

    The image is scaled to cover the bucket and cropped to it. time_ids follow SDXL: original
    (height, width) before the resize, crop (top, left) as the model sees it (after a flip the left
    offset is measured from the other side), target (height, width).
    """
    target_w, target_h = bucket
    scale = max(target_w / width, target_h / height)
    resized_w, resized_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    top = int(round(aug.crop_y * (resized_h - target_h)))
    left = int(round(aug.crop_x * (resized_w - target_w)))
    seen_left = resized_w - left - target_w if aug.flip else left
    time_ids = (height, width, top, seen_left, target_h, target_w)
    return (resized_w, resized_h), (left, top, left + target_w, top + target_h), time_ids


def pixels_and_time_ids(data: bytes, bucket, aug: Augmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded, resized, cropped, maybe flipped image as a (3, h, w) tensor in [-1, 1], and its time_ids."""
    image = decode_image(data)
    size, box, time_ids = crop_geometry(image.width, image.height, bucket, aug)
    image = image.resize(size, Image.Resampling.LANCZOS).crop(box)
    if aug.flip:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float().div(127.5).sub(1.0), torch.tensor(time_ids, dtype=torch.float32)


def choose_caption(caption, seed: int, epoch: int, index: int, dropout: float, draw: int = 0,
                   subset: Subset | None = None, variants: int | None = None) -> str:
    """One draw's caption: a random pick from a list of captions; the empty prompt with probability ``dropout``;
    then the subset's caption rules (prefix/suffix, keep_tokens, shuffle, tag dropout). With ``variants`` N the
    rules' randomness is one of N fixed draws per caption (what a cache of text embeddings can hold)."""
    rng = rng_for(seed, epoch, index, draw, "caption")
    picked = caption if isinstance(caption, str) else caption[rng.randrange(len(caption))]
    if rng.random() < dropout:
        return ""
    if subset is None:
        return picked
    if variants and subset.varies:
        return caption_variant(picked, subset, seed, rng.randrange(variants))
    return process_caption(picked, subset, rng)


def caption_variant(text: str, subset: Subset, seed: int, variant: int) -> str:
    """Variant ``variant`` of a caption under its subset's rules, the same for every sample with that caption."""
    return process_caption(text, subset, rng_for(seed, "caption variant", text, variant))


# -------------------------------------------------------------------------------------- validation
VALIDATION_EPOCH = -1  # the "epoch" validation items are keyed by: never a training epoch
VALIDATION_TIMESTEPS = 4  # per validation image, as kohya's validation loss takes them


def split_validation(checked: list[CheckedSample], fraction: float, seed: int
                     ) -> tuple[list[CheckedSample], list[CheckedSample]]:
    """(training, validation): a seeded choice of round(n·fraction) of the n training images (at least one,
    never all; regularization images always train), as kohya's --validation_split holds them out."""
    candidates = [c for c in checked if not c.sample.subset.is_reg]
    held = max(1, round(len(candidates) * fraction))
    if held >= len(candidates):
        raise LoHaError(f"--validation_split {fraction} would hold out {held} of the {len(candidates)} training "
                        "images, leaving none to train on; lower it or add images")
    order = [c.index for c in candidates]
    rng_for(seed, "validation split").shuffle(order)
    chosen = set(order[:held])
    return [c for c in checked if c.index not in chosen], [c for c in checked if c.index in chosen]


def validation_timesteps(low: int, high: int, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """kohya's fixed validation timesteps: ``count`` evenly spaced inside (low, high), ends excluded."""
    return [int(t) for t in np.linspace(low, high, count + 2, dtype=int)[1:-1]]


# -------------------------------------------------------------------------------------- batch plan
def epoch_batches(checked: list[CheckedSample], global_batch, seed: int, epoch: int) -> list[list[tuple[int, int]]]:
    """This epoch's global batches, as lists of (position in ``checked``, draw): each sample appears once per draw
    (its repeats). A batch never mixes buckets or datasets. ``global_batch``: one size, or {dataset: size}.

    Shuffled within each (dataset, bucket), cut into batches of that dataset's global batch (the last may be
    short), then the batch order is shuffled. Depends only on (seed, epoch), never on the process count.
    """
    rng = rng_for(seed, epoch, "batches")
    by_bucket: dict[tuple, list[tuple[int, int]]] = {}
    for pos, c in enumerate(checked):
        by_bucket.setdefault((c.sample.dataset, c.bucket), []).extend((pos, d) for d in range(c.draws))
    batches = []
    for key in sorted(by_bucket):
        entries = by_bucket[key]
        size = global_batch if isinstance(global_batch, int) else global_batch[key[0]]
        rng.shuffle(entries)
        batches += [entries[i:i + size] for i in range(0, len(entries), size)]
    rng.shuffle(batches)
    return batches


def share_of_batch(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a global batch; a batch short of ``world`` is padded by repeating itself
    so every process gets work (DDP needs every rank in every step)."""
    padded = [batch[i % len(batch)] for i in range(math.ceil(len(batch) / world) * world)]
    return padded[rank::world]


# ------------------------------------------------------------------------------------ feature cache
def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """safetensors files under ``root/<kind>/<key[:2]>/<key>.safetensors``, written atomically.

    A key is a hash of everything the stored value depends on, so a changed image, caption,
    resolution, crop or model simply misses and is recomputed; nothing is ever invalidated by hand.
    """

    def __init__(self, root):
        self.root = Path(root)

    def _file(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        file = self._file(kind, key)
        try:
            return safetensors.torch.load_file(str(file))
        except Exception:  # missing, or a damaged entry: a miss, recomputed and replaced
            return None

    def has(self, kind: str, key: str, names: tuple[str, ...]) -> bool:
        """Whether a usable entry holding ``names`` exists, reading only its header: safetensors checks
        that the header is valid and that its offsets cover the file exactly, so a truncated or garbled
        entry is a miss here, as it is for ``get``, without reading the tensors (start-up cost with a
        large cache). A damaged payload is not detected by ``get`` either: safetensors has no checksum."""
        try:
            with safetensors.safe_open(str(self._file(kind, key)), "pt") as f:
                return set(names) <= set(f.keys())
        except Exception:
            return False

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        file = self._file(kind, key)
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(file, safetensors.torch.save({k: v.contiguous().cpu() for k, v in tensors.items()}))
