"""The LoHa toolbox behind ``python -m loha``: bake adapters into a checkpoint, extract a LoHa from a
fine-tune, resize one, convert between layouts and dtypes, and inspect a file.

Every verb reads adapters through the strict loader and names modules through meta-device skeletons of
the SDXL pipeline (from a base folder's configs, ``--config``, or SDXL base 1.0's), and writes atomically.
"""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from . import checkpoints as ck
from . import formats, names, sources
from . import math as lm
from .formats import Lazy, LoHaFileError, ModuleWeights
from .inject import preset_targets
from .layer import LoHaError

ADAPTED = ("unet", "text_encoder", "text_encoder_2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check_out(out, **inputs):
    """--out must not be one of the inputs: the result replaces ``out`` while the input is still being read."""
    for flag, path in inputs.items():
        if path is not None and Path(out).resolve() == Path(path).resolve():
            raise LoHaError(f"--out is the same path as --{flag} ({path}); write the result to a new path")


def _bar(items, description, total=None, enabled=True):
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, total=total, leave=False, disable=not enabled)


# ------------------------------------------------------------------------------- an adapter's entries
BASE_KEYS = ("loha.base_model", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "loha.vae",
             "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash", "ss_base_model_version")


def carried(adapter: formats.Adapter) -> dict:
    """The base-model metadata of an adapter, for a file made from it (resize, convert)."""
    return {k: adapter.metadata[k] for k in BASE_KEYS if isinstance(adapter.metadata.get(k), str)}


def _adapter_and_skeleton(adapter_path, config) -> tuple[formats.Adapter, dict]:
    """The parsed adapter and the skeletons to name its modules: ``config``'s, else those of the base model
    the file records when it is a local diffusers folder (the tiny demo's), else SDXL base 1.0's; in that last
    case, a file that does not fit is said to need its own base, named, not to be for a different base."""
    adapter = formats.read_adapter(adapter_path)
    recorded = adapter.base_model
    if config is None and recorded and (Path(recorded) / "model_index.json").is_file():
        try:
            return adapter, ck.skeletons(recorded)
        except LoHaFileError:  # not an SDXL folder after all: SDXL's structure, as without a record
            pass
    skeleton = ck.skeletons(config)
    if config is None and recorded and not sources.found(recorded):
        skeleton["assumed"] = recorded
    return adapter, skeleton


def resolved(adapter: formats.Adapter, skeleton: dict) -> dict[str, dict[str, ModuleWeights]]:
    """{component: {module path: weights}} of an adapter, strictly checked against the skeleton."""
    out = {}
    for component in adapter.components:
        try:
            entries = formats._resolve(adapter, component, skeleton[component])
            formats._check_fits(entries, skeleton[component], adapter.source, component)
        except LoHaFileError as e:
            if "assumed" not in skeleton or "different base model" not in str(e):
                raise
            raise LoHaError(sources.unreachable_base_note(skeleton["assumed"], adapter.metadata).replace(
                "--pretrained_model_name_or_path", "--config") + " (its modules do not fit SDXL base 1.0's)") from None
        out[component] = entries
    return out


def delta_of(mw: ModuleWeights, shape) -> torch.Tensor:
    """alpha/rank·ΔW in fp32 (fp64 stays), in the weight's shape."""
    return lm.delta([lm.wide(f) for f in mw.factors], mw.alpha / mw.rank).reshape(shape)


def apply_to(w32: torch.Tensor, mw: ModuleWeights, scale: float, part: str) -> torch.Tensor:
    """The base tensor (fp32) with one adapter at ``scale`` folded in: what its layer computes in forward."""
    if part == "bias":
        return w32 + scale * mw.diff_b.to(w32)
    if mw.factors is None:
        return w32 + scale * mw.diff.to(w32)
    delta = delta_of(mw, w32.shape).to(w32)
    if mw.dora_scale is not None:
        return lm.dora(w32 + delta, mw.dora_scale.to(w32), w32, scale)
    return w32 + scale * delta


# ------------------------------------------------------------------------------------------- merge
def merge(base, adapters: list[tuple[str, float]], out, *, config=None, progress=True) -> dict:
    """Fold ``adapters`` [(path, scale), ...] into the checkpoint ``base`` (a diffusers folder or a single
    file) and write ``out``: a diffusers folder, or with a .safetensors name the single-file layout. Adapted
    tensors are computed in fp32 from the base tensor and every adapter in turn, and cast once; every other
    tensor is copied bit for bit; one tensor at a time is in memory. With no adapter a diffusers folder is
    written as a single file, unchanged (for A1111, ComfyUI and Forge, and for training on single files)."""
    base, out = Path(base), Path(out)
    if not adapters and not (base.is_dir() and out.suffix == ".safetensors"):
        raise LoHaError("give at least one --adapter (without one, merge only converts a diffusers folder into a "
                        "single .safetensors file)")
    _check_out(out, base=base)
    for path, _ in adapters:
        _check_out(out, adapter=path)
    skeleton = ck.skeletons(base if base.is_dir() else config)
    checkpoint = ck.open_checkpoint(base, skeleton)
    edits: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    counts = {}
    for path, scale in adapters:
        if not math.isfinite(scale):
            raise LoHaError(f"--scale for {path} must be a finite number, got {scale}")
        adapter = formats.read_adapter(path)
        for component, entries in resolved(adapter, skeleton).items():
            for module, mw in entries.items():
                parts = ([("weight", "weight")] if mw.factors is not None or mw.diff is not None else []) + \
                        ([("bias", "bias")] if mw.diff_b is not None else [])
                for part, suffix in parts:
                    key = _tensor_key(checkpoint, component, f"{module}.{suffix}", adapter.source)
                    edits[component][key].append((mw, scale, part))
            counts[f"{Path(path).name} → {component}"] = len(entries)
    single = out.suffix == ".safetensors"
    if single:
        _merge_to_single_file(checkpoint, skeleton, edits, out, adapters, progress)
    else:
        if checkpoint.kind != "diffusers":
            raise LoHaError(f"{base.name} is a single-file checkpoint: merge it into a single file "
                            f"(--out {out.name}.safetensors), or convert it to a diffusers folder first "
                            "(diffusers' StableDiffusionXLPipeline.from_single_file(...).save_pretrained(...))")
        _merge_to_folder(checkpoint, edits, out, progress)
    return {"out": str(out), "layout": "single file" if single else "diffusers folder",
            "adapted_tensors": sum(len(v) for v in edits.values()), "modules": counts}


def _tensor_key(checkpoint: ck.Checkpoint, component: str, key: str, source: str) -> str:
    found = _find(checkpoint, component, key)
    if found not in checkpoint.tensors[component]:
        raise LoHaFileError(f"{source}: the base model has no {component} tensor {key}; the adapter was trained "
                            "for another model")
    return found


def _edited(loader, edits: list, dtype) -> torch.Tensor:
    w32 = lm.wide(loader())
    for mw, scale, part in edits:
        w32 = apply_to(w32, mw, scale, part)
    if not torch.isfinite(w32).all():
        raise LoHaError("merging would put NaN/Inf into the checkpoint; an adapter or a --scale is broken")
    return w32.to(dtype)


def _merge_to_folder(checkpoint: ck.Checkpoint, edits, out: Path, progress):
    files = defaultdict(dict)  # weights file -> {key: edits}
    for component, by_key in edits.items():
        for key, changes in by_key.items():
            t = checkpoint.tensors[component][key]
            files[t.file][t.key] = changes
    with formats.atomic_directory(out) as tmp:
        for item in _bar(sorted(checkpoint.path.rglob("*")), "writing", enabled=progress):
            target = tmp / item.relative_to(checkpoint.path)
            if item.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif item not in files:
                shutil.copy2(item, target)  # untouched files, the weights of the VAE among them: bit for bit
            else:
                header, metadata, _ = formats.read_header(item, max_header=ck.CHECKPOINT_HEADER_BYTES,
                                                          max_tensors=ck.CHECKPOINT_TENSORS)
                tensors = {}
                for key, t in ck.indexed(item, header).items():
                    changes = files[item].get(key)
                    make = (lambda t=t, c=changes: _edited(t.load, c, t.stored_dtype)) if changes else t.load
                    tensors[key] = Lazy(t.stored_dtype, t.stored_shape, make)
                formats.write_safetensors(target, tensors, metadata or None)


def _merge_to_single_file(checkpoint: ck.Checkpoint, skeleton, edits, out: Path, adapters, progress):
    """Every tensor of the base under its single-file name; fused in_proj tensors assembled from (or kept with)
    their q/k/v thirds; VAE attention weights as the 1×1 convs the LDM layout has."""
    tensors, metadata = {}, dict(checkpoint.metadata)
    if checkpoint.kind == "single":
        by_ldm = defaultdict(list)  # single-file key -> [(Tensor, edits)]
        for component, by_key in edits.items():
            for key, changes in by_key.items():
                t = checkpoint.tensors[component][key]
                if t.transpose:
                    raise LoHaError(f"{component} {key} is stored transposed in a single file; no LoHa adapts it")
                by_ldm[t.key].append((t, changes))
        for key, t in checkpoint.raw.items():
            make = (lambda t=t, e=by_ldm[key]: _fold(t, e)) if key in by_ldm else t.load
            tensors[key] = Lazy(t.stored_dtype, t.stored_shape, make)
    else:
        up = ck.vae_up_blocks(checkpoint.path)
        table = {c: by_key for c, (by_key, _) in ck.single_file_names(skeleton).items()}
        fused = defaultdict(dict)
        for component in ck.COMPONENTS:
            for key, t in checkpoint.tensors[component].items():
                if key.endswith("position_ids"):
                    continue
                if component == "vae":
                    mapped = ck.vae_key(key, up)
                    name, third, transpose = None if mapped is None else ck.PREFIX["vae"] + mapped, None, False
                else:
                    name, third, transpose, _ = table[component].get(key, (None, None, False, False))
                if name is None:
                    raise LoHaError(f"{component} tensor {key} has no single-file name; this is not a standard "
                                    "SDXL checkpoint")
                changes = edits.get(component, {}).get(key)
                make = (lambda t=t, c=changes: _edited(t.load, c, t.stored_dtype)) if changes else t.load
                shape = t.stored_shape
                if third is not None:
                    fused[name][third] = (t, make)
                elif transpose:
                    tensors[name] = Lazy(t.stored_dtype, shape[::-1], lambda m=make: m().T.contiguous())
                elif component == "vae" and len(shape) == 2 and ".mid.attn_1." in name:
                    tensors[name] = Lazy(t.stored_dtype, (*shape, 1, 1), lambda m=make: m()[:, :, None, None])
                else:
                    tensors[name] = Lazy(t.stored_dtype, shape, make)
        for name, thirds in fused.items():
            if sorted(thirds) != [0, 1, 2]:
                raise LoHaError(f"the base model's text_encoder_2 lacks a q, k or v projection for {name}")
            first = thirds[0][0]
            tensors[name] = Lazy(first.stored_dtype, (3 * first.stored_shape[0], *first.stored_shape[1:]),
                                 lambda th=thirds: torch.cat([th[i][1]() for i in range(3)]))
    if adapters:
        metadata["loha.merged"] = ", ".join(f"{Path(p).name} x{s:g}" for p, s in adapters)
        metadata["loha.merged_into"] = str(checkpoint.path.resolve())
    with _progress_writes(tensors, progress):
        formats.write_safetensors(out, tensors, metadata)


def _fold(raw: ck.Tensor, targets) -> torch.Tensor:
    """A single-file tensor with its edits: whole, or per third of a fused in_proj."""
    t = ck.Tensor(raw.file, raw.key, raw.stored_dtype, raw.stored_shape).load()
    for tensor, changes in targets:
        if tensor.third is None:
            t = _edited(lambda t=t: t, changes, raw.stored_dtype)
        else:
            thirds = list(t.chunk(3))
            thirds[tensor.third] = _edited(lambda th=thirds[tensor.third]: th, changes, raw.stored_dtype)
            t = torch.cat(thirds)
    return t


class _progress_writes:
    """A progress bar over the tensors as they are written."""

    def __init__(self, tensors: dict, enabled: bool):
        self.tensors, self.enabled = tensors, enabled

    def __enter__(self):
        self.bar = _bar(None, "writing", total=len(self.tensors), enabled=self.enabled)
        for lazy in self.tensors.values():
            make = lazy.make

            def counted(make=make):
                t = make()
                self.bar.update(1)
                return t

            lazy.make = counted
        return self

    def __exit__(self, *exc):
        self.bar.close()


# --------------------------------------------------------------------------------------------- fitting
def _rows(target, b, h, ridge):
    """argmin over a of Σ_i ‖target_i − (a_i·b) ⊙ h_i‖² (+ a ridge), exactly: each row's r×r normal
    equations, batched. target, h (L, o, n); b (L, r, n) → a (L, o, r). The Gram matrices come from
    h² @ (b ⊗ b) (L, o, r²), never an (o, r, n) design tensor."""
    L, r, n = b.shape
    bb = (b[:, :, None, :] * b[:, None, :, :]).reshape(L, r * r, n)
    gram = ((h * h) @ bb.transpose(1, 2)).reshape(L, -1, r, r)
    damp = ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] + 1e-20
    rhs = (target * h) @ b.transpose(1, 2)
    eye = torch.eye(r, dtype=b.dtype, device=b.device)
    return torch.linalg.solve(gram + damp * eye, rhs[..., None])[..., 0]


def fit_loha(deltas: torch.Tensor, rank: int, *, sweeps: int = 50, ridge: float = 1e-6):
    """LoHa factors (scale 1: alpha = rank) for L same-shape differences (L, out, in), fitted together by
    alternating least squares on ‖(W1a·W1b) ⊙ (W2a·W2b) − ΔW‖: with three factors fixed the fourth is a
    linear least-squares problem, solved exactly row by row (or column by column), so no step makes the
    error grow. The problem has no closed form and local minima; the start is the best rank-r fit of
    sign(ΔW)·√|ΔW| and of √|ΔW| (their product is ΔW), which ends best in our measurements, and a layer
    whose fit ends worse than the best rank-r LoRA (a LoHa too, with W2 = 1) gets that instead. Returns
    ((w1a, w1b, w2a, w2b) stacked, the relative error of each layer)."""
    L, out_f, in_f = deltas.shape
    r = min(rank, out_f, in_f)
    rms = (deltas.flatten(1).norm(dim=1) / math.sqrt(out_f * in_f)).clamp_min(1e-30)
    target = deltas / rms[:, None, None]  # unit RMS: the ridge means the same for every layer
    flipped = target.transpose(1, 2)

    def lowrank(m):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :, :r] * s[:, None, :r].sqrt(), s[:, :r, None].sqrt() * vh[:, :r, :]

    a1, b1 = lowrank(target.abs().sqrt() * target.sign())
    a2, b2 = lowrank(target.abs().sqrt())
    for _ in range(sweeps):
        h2 = a2 @ b2
        a1 = _rows(target, b1, h2, ridge)
        b1 = _rows(flipped, a1.transpose(1, 2), h2.transpose(1, 2), ridge).transpose(1, 2)
        h1 = a1 @ b1
        a2 = _rows(target, b2, h1, ridge)
        b2 = _rows(flipped, a2.transpose(1, 2), h1.transpose(1, 2), ridge).transpose(1, 2)
    norms = target.flatten(1).norm(dim=1).clamp_min(1e-30)
    errors = ((a1 @ b1) * (a2 @ b2) - target).flatten(1).norm(dim=1) / norms
    la, lb = lowrank(target)
    lora = ((la @ lb) - target).flatten(1).norm(dim=1) / norms
    worse = ~(errors <= lora)  # NaN counts as worse
    if worse.any():
        a1[worse], b1[worse] = la[worse], lb[worse]
        a2[worse], b2[worse] = 0.0, 0.0
        a2[worse, :, 0], b2[worse, 0, :] = 1.0, 1.0  # W2a·W2b = 1: the LoRA itself
        errors = torch.where(worse, lora, errors)
    return (a1 * rms[:, None, None], b1, a2, b2), errors


def lora_error(deltas: torch.Tensor, rank: int) -> torch.Tensor:
    """The relative error of the best rank-``rank`` approximation (an SVD-optimal LoRA), per layer."""
    s = torch.linalg.svdvals(deltas)
    return s[:, rank:].square().sum(1).sqrt() / s.square().sum(1).sqrt().clamp_min(1e-30)


def fit_group(deltas, rank, target_error, max_rank, sweeps):
    """Fit one shape's layers at ``rank``, or at the smallest rank of 1, 2, 4, ... (up to ``max_rank``) that
    reaches ``target_error`` for each layer. Returns [(factors, rank, error)] per layer."""
    if target_error is None:
        factors, errors = fit_loha(deltas, rank, sweeps=sweeps)
        return [(tuple(f[i] for f in factors), min(rank, *deltas.shape[1:]), float(errors[i]))
                for i in range(len(deltas))]
    results, todo, r = [None] * len(deltas), list(range(len(deltas))), 1
    while todo:
        factors, errors = fit_loha(deltas[todo], r, sweeps=sweeps)
        last = r >= max_rank or r >= min(deltas.shape[1:])
        keep = []
        for j, i in enumerate(todo):
            if errors[j] <= target_error or last:
                results[i] = (tuple(f[j] for f in factors), min(r, *deltas.shape[1:]), float(errors[j]))
            else:
                keep.append(i)
        todo, r = keep, r * 2
    return results


FIT_BATCH_ELEMENTS = 1 << 25  # differences fitted together: 128 MiB of fp32 per batch, the fit keeps a few copies


def _fit_all(shapes: dict, load, rank, target_error, max_rank, sweeps, progress, device="cpu"):
    """Fit every difference: ``shapes`` {key: (out, in·k)}, ``load(key)`` the fp32 difference (out, in·k).
    Layers of one shape fit together, in batches of at most FIT_BATCH_ELEMENTS, loaded as each batch
    starts: memory holds one batch and the fitted factors, never every difference. Returns
    {key: (ModuleWeights, LoHa error, SVD LoRA error, ‖ΔW‖²)}."""
    groups = defaultdict(list)
    for key, shape in shapes.items():
        groups[tuple(shape)].append(key)
    batches = []
    for shape, keys in groups.items():
        size = max(1, FIT_BATCH_ELEMENTS // math.prod(shape))
        batches += [keys[i:i + size] for i in range(0, len(keys), size)]
    out = {}
    bar = _bar(None, "fitting", total=len(shapes), enabled=progress)
    for keys in batches:
        stacked = torch.stack([load(k).to(device) for k in keys])
        fits = fit_group(stacked, rank, target_error, max_rank, sweeps)
        for key, (factors, r, err), d in zip(keys, fits, stacked):
            lora = float(lora_error(d[None], min(2 * r, *d.shape))[0])
            out[key] = (ModuleWeights(tuple(f.cpu().contiguous() for f in factors), float(r)), err, lora,
                        float(d.double().square().sum()))
        bar.update(len(keys))
    bar.close()
    return out


def _report(fits: dict) -> dict:
    rows = [{"component": c, "module": p, "rank": int(mw.rank), "loha_error": e, "lora_error": le}
            for (c, p), (mw, e, le, _) in fits.items()]
    energy = [f[3] for f in fits.values()]
    total = sum(energy)
    total_error = lambda i: math.sqrt(sum(f[i] ** 2 * n for f, n in zip(fits.values(), energy)) / total) \
        if total else 0.0
    return {"layers": rows, "total_loha_error": total_error(1), "total_lora_error": total_error(2),
            "parameters": sum(sum(f.numel() for f in mw.factors) for mw, *_ in fits.values())}


def _write_fitted(out, fits: dict, skeleton, naming: str, metadata: dict):
    parts = []
    for component in ADAPTED:
        entries = {p: fit[0] for (c, p), fit in fits.items() if c == component}
        if entries:
            parts.append((component, skeleton[component], entries))
    return formats.write_kohya(out, parts, naming=naming, metadata=metadata)


# -------------------------------------------------------------------------------------------- extract
def extract(base, tuned, out, *, rank: int | None = None, target_error: float | None = None,
            preset: str = "attn-only", text_encoders: bool = False, config=None, sweeps: int = 50,
            max_rank: int = 64, device: str = "cpu", naming: str = "sgm", progress=True) -> dict:
    """A LoHa whose ΔW approximates ``tuned`` − ``base`` on the modules ``preset`` selects (and the text
    encoders' with ``text_encoders``), fitted per layer at ``rank`` or to ``target_error``."""
    _check_fit_args(rank, target_error, sweeps, max_rank)
    base, tuned = Path(base), Path(tuned)
    _check_out(out, base=base, tuned=tuned)
    skeleton = ck.skeletons(base if base.is_dir() else (tuned if tuned.is_dir() else config))
    b, t = ck.open_checkpoint(base, skeleton), ck.open_checkpoint(tuned, skeleton)
    components = ADAPTED if text_encoders else ("unet",)
    pairs, unchanged = {}, []
    for component in components:
        for path in preset_targets(skeleton[component], preset):
            key = f"{path}.weight"
            wb = b.tensors[component].get(_find(b, component, key))
            wt = t.tensors[component].get(_find(t, component, key))
            if wb is None or wt is None:
                raise LoHaFileError(f"{component} {key} is missing from {'the base' if wb is None else 'the tuned'} "
                                    "model: the two are not the same architecture")
            if wb.shape != wt.shape:
                raise LoHaFileError(f"{component} {key} is {list(wb.shape)} in the base but {list(wt.shape)} in "
                                    "the tuned model: not a fine-tune of this base")
            pairs[(component, path)] = (wb, wt)

    def difference(key):
        wb, wt = pairs[key]
        d = wt.load().float() - wb.load().float()
        if not torch.isfinite(d).all():
            raise LoHaFileError(f"{key[0]} {key[1]}.weight: the difference has NaN/Inf values")
        return d.reshape(d.shape[0], -1)

    changed = {}
    for key in _bar(list(pairs), "comparing", enabled=progress):  # one pair of tensors in memory at a time
        if difference(key).any():
            changed[key] = (pairs[key][0].shape[0], math.prod(pairs[key][0].shape[1:]))
        else:
            unchanged.append(key)
    if not changed:
        raise LoHaError(f"the tuned model equals the base on every {preset} module: nothing to extract")
    fits = _fit_all(changed, difference, rank, target_error, max_rank, sweeps, progress, device)
    report = _report(fits)
    report["unchanged_layers"] = len(unchanged)
    report["out"] = str(out)
    _write_fitted(out, fits, skeleton, naming, {"loha.extracted_from": f"{tuned.name} - {base.name}",
                                                "loha.preset": preset, **sources.provenance(str(base))})
    return report


def _find(checkpoint, component, key):
    """The checkpoint's name for a module tensor key (text encoder keys with or without ``text_model.``),
    or the key itself when it has none."""
    index = checkpoint.tensors[component]
    return next((k for k in (key, names.text_path(key), key.removeprefix("text_model.")) if k in index), key)


def _check_fit_args(rank, target_error, sweeps, max_rank):
    if (rank is None) == (target_error is None):
        raise LoHaError("give exactly one of --rank and --target_error")
    if rank is not None and rank < 1:
        raise LoHaError(f"--rank must be >= 1, got {rank}")
    if target_error is not None and not 0 < target_error < 1:
        raise LoHaError(f"--target_error is a relative error in (0, 1), got {target_error}")
    if sweeps < 1 or max_rank < 1:
        raise LoHaError("--sweeps and --max_rank must be >= 1")


# --------------------------------------------------------------------------------------------- resize
def resize(adapter_path, out, *, rank: int | None = None, target_error: float | None = None, config=None,
           sweeps: int = 50, max_rank: int = 64, naming: str = "sgm", progress=True) -> dict:
    """Refit an existing LoHa's every ΔW (scale included) at a lower rank, or to a target error."""
    _check_fit_args(rank, target_error, sweeps, max_rank)
    _check_out(out, adapter=adapter_path)
    adapter, skeleton = _adapter_and_skeleton(adapter_path, config)
    kept, shapes = {}, {}
    for component, entries in resolved(adapter, skeleton).items():
        for path, mw in entries.items():
            if mw.factors is None or mw.dora_scale is not None or mw.diff_b is not None:
                raise LoHaError(f"{path} carries DoRA or full differences, whose effect is not one ΔW to refit; "
                                "resize takes plain LoHa adapters")
            weight = skeleton[component].get_submodule(path).weight
            kept[(component, path)] = mw
            shapes[(component, path)] = (weight.shape[0], math.prod(weight.shape[1:]))
    fits = _fit_all(shapes, lambda key: delta_of(kept[key], shapes[key]).float(), rank, target_error, max_rank,
                    sweeps, progress)
    report = _report(fits)
    report["from_ranks"] = sorted({int(mw.rank) for mw in kept.values()})
    report["out"] = str(out)
    _write_fitted(out, fits, skeleton, naming, {"loha.resized_from": Path(adapter_path).name, **carried(adapter)})
    return report


# -------------------------------------------------------------------------------------------- convert
def convert(adapter_path, out, *, to: str, dtype: str | None = None, config=None) -> dict:
    """Rewrite an adapter as a PEFT folder ("peft": out/unet/, out/text_encoder/, ...), a kohya file with
    SGM names ("kohya") or LyCORIS's diffusers names ("lycoris"), optionally in another dtype."""
    if to not in ("peft", "kohya", "lycoris"):
        raise LoHaError(f"--to must be peft, kohya or lycoris, got {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise LoHaError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    _check_out(out, adapter=adapter_path)
    adapter, skeleton = _adapter_and_skeleton(adapter_path, config)
    parts = [(c, skeleton[c], e) for c, e in resolved(adapter, skeleton).items()]
    cast = DTYPES.get(dtype)
    base_model = adapter.base_model
    if to == "peft":
        problem = next(filter(None, (formats._peft_incompatible(m, e) for _, m, e in parts)), None)
        if problem:
            raise LoHaError(problem)
        with formats.atomic_directory(out) as tmp:
            for component, model, entries in parts:
                formats.write_peft(tmp / component, model, entries, base_model=base_model, dtype=cast)
    else:
        kept = {k: v for k, v in adapter.metadata.items() if isinstance(v, str) and k != "base_model"}
        formats.write_kohya(out, parts, base_model=base_model, dtype=cast,
                            naming="sgm" if to == "kohya" else "diffusers", metadata=kept)
    return {"out": str(out), "to": to, "modules": {c: len(e) for c, _, e in parts},
            "dtype": dtype or "as stored"}


# -------------------------------------------------------------------------------------------- inspect
def inspect(adapter_path, *, config=None, progress=False) -> dict:
    """What a LoHa file is: layout, base model, modules per block, ranks, alphas, dtypes, kinds, the ΔW norm
    of every module, and the metadata."""
    adapter, skeleton = _adapter_and_skeleton(adapter_path, config)
    by_component = resolved(adapter, skeleton)
    modules, blocks = [], defaultdict(int)
    for component, entries in by_component.items():
        for path, mw in _bar(list(entries.items()), f"measuring {component}", enabled=progress):
            weight = skeleton[component].get_submodule(path).weight
            kind = ("diff" if mw.factors is None else "conv Tucker" if mw.tucker else
                    "conv" if weight.dim() == 4 else "linear") + (" + DoRA" if mw.dora_scale is not None else "") + (
                " + bias diff" if mw.diff_b is not None else "")
            norm = float(delta_of(mw, (weight.shape[0], -1)).norm()) if mw.factors is not None else float(
                mw.diff.float().norm() if mw.diff is not None else mw.diff_b.float().norm())
            tensors = [*(mw.factors or ()), *(t for t in (mw.diff, mw.diff_b, mw.dora_scale) if t is not None)]
            modules.append({"component": component, "module": path, "kind": kind,
                            "rank": None if mw.factors is None else mw.rank,
                            "alpha": None if mw.factors is None else mw.alpha,
                            "dtype": str(tensors[0].dtype).removeprefix("torch."), "delta_norm": norm})
            blocks[f"{component}: {_block_of(component, path)}"] += 1
    return {"file": str(adapter_path), "layout": _layout_name(adapter), "base_model": adapter.base_model,
            "modules": len(modules), "blocks": dict(blocks),
            "ranks": sorted({m["rank"] for m in modules if m["rank"] is not None}),
            "alphas": sorted({m["alpha"] for m in modules if m["alpha"] is not None}),
            "dtypes": sorted({m["dtype"] for m in modules}), "kinds": sorted({m["kind"] for m in modules}),
            "per_module": modules,
            "metadata": {k: v for k, v in adapter.metadata.items() if k != "base_model" and v is not None}}


def _block_of(component: str, path: str) -> str:
    parts = path.split(".")
    if component != "unet":
        layer = next((parts[i + 1] for i, p in enumerate(parts) if p == "layers"), None)
        return f"layer {layer}" if layer is not None else parts[0]
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _layout_name(adapter: formats.Adapter) -> str:
    if adapter.style == "peft":
        return "PEFT LoHa folder"
    every = [n for modules in adapter.components.values() for n in modules]
    if any(n.startswith("diffusion_model.") for n in every):
        return "ComfyUI trainer file (diffusion_model.<SGM path>)"
    if any(n.startswith("lycoris_") for n in every):
        return "LyCORIS file (diffusers names)"
    if any(n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                         "lora_unet_time_embed", "lora_unet_label_emb", "lora_unet_out_"))
           for n in every):
        return "kohya file (SGM names)"
    return "kohya file (diffusers names)"
