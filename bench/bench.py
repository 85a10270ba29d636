"""Training-step speed, peak memory, inference time and exact op counts of LoHa implementations, side by side.

One process, one device, one loop for every variant:

    floor         the frozen UNet, no adapter, backward taken to the input latents
    loha-grouped  this project's default: forward_mode="grouped" on stacked factors (same-shape layers
                  built and differentiated together, saving only their inputs)
    loha-merged   this project, forward_mode="merged", per-layer factors (one Function per layer)
    loha-bypass   this project, forward_mode="bypass", per-layer factors (base(x) + x·ΔWᵀ)
    peft-loha     PEFT LoHa (inject_adapter_in_model + LoHaConfig, the same targets)
    lycoris-loha  LyCORIS LoHa (LycorisNetwork with the same preset)
    peft-lora     PEFT LoRA at rank 2r: the same parameter count, for reference
    python-floor  (on request) the floor with a do-nothing Python autograd.Function on each target linear
                  that computes the exact weight gradient and discards it: what any Python-level adapter
                  with exact gradients pays before doing any LoHa math
    grad-floor    (on request) the floor with the targets' base weights trainable (linears and convs), no
                  optimizer: autograd's exact weight gradients and nothing else, the part of an adapter's
                  overhead that no exact method avoids

    python bench/bench.py --model tiny --device cpu --threads 1 --rounds 20 --steps 5 --json bench-cpu.json
    python bench/bench.py --model sdxl --device cuda --dtype bf16 --resolution 1024 --batch_size 1 \
        --steps 8 --warmup 3 --json sdxl-bs1.json
    python bench/bench.py --count --model sdxl --dtype bf16 --resolution 1024   # exact ops, bytes and peak

A training step is forward + backward + AdamW (fused, the same settings for every variant). Adapter
factors are fp32 for every variant (diffusers' ``cast_training_params`` convention); with ``--dtype
bf16`` the base is bf16 and the forward runs under bf16 autocast, as accelerate's mixed precision does.
Every variant gets a fresh UNet with the same seeded weights. ``--preset full`` adapts LyCORIS's full
preset (attention, MLPs, resnet convs, samplers, embeddings) in every variant.

``--count`` (bench/count.py) runs one steady-state step per variant and counts, by a GPU's rules (CUDA's
autocast policy, flash attention): every aten op dispatched, per phase, launched or not, the bytes the
launched ones move, the bytes saved for backward, and the step's peak memory with its split. With
``--model sdxl`` it runs on fake tensors: the full SDXL UNet at any resolution costs no memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import loha  # noqa: E402
from loha import internals  # noqa: E402
from loha.tiny_sdxl import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, tiny_unet  # noqa: E402

VARIANTS = ("floor", "loha-grouped", "loha-merged", "loha-bypass", "peft-loha", "lycoris-loha", "peft-lora")
ON_REQUEST = ("python-floor", "grad-floor")  # not in the default set: a reference point, not an implementation
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = list(loha.DEFAULT_TARGETS)  # the attention linears (bench/quality.py uses them too)


class BenchError(Exception):
    """A bad command line or an environment that cannot run the requested benchmark."""


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def unet_config(model: str) -> dict:
    return {"tiny": TINY_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}[model]


@torch.no_grad()
def _cheap_init(unet: nn.Module, seed: int):
    """Seeded weights for an SDXL UNet built on the meta device, without diffusers' slow init.

    Linear/conv weights ~ N(0, 1/fan_in) keep activations O(1) through the 70 transformer blocks
    (uninitialised memory could hold NaN or denormals, which would distort CPU timings); norms are
    identity. The numbers are meaningless, the shapes and the work are SDXL's.
    """
    gen = torch.Generator(device=next(unet.parameters()).device).manual_seed(seed)
    for module in unet.modules():
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = weight[0].numel()
            weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        elif isinstance(weight, nn.Parameter):
            weight.fill_(1.0)
        if isinstance(bias, nn.Parameter):
            bias.zero_()
    for buffer in unet.buffers():
        buffer.zero_()


def build_unet(model: str, device: torch.device, dtype: torch.dtype, seed: int, fake=None) -> nn.Module:
    """A fresh UNet with identical seeded weights every call, on ``device`` in ``dtype``; with ``fake`` (a
    FakeTensorMode) its storage is fake: the full SDXL UNet costs no memory."""
    # nn.Module.to: diffusers' own .to() warns about fp32-kept modules on every cast, and these UNets have none
    if model == "tiny":
        with fake or contextlib.nullcontext():
            return nn.Module.to(tiny_unet(seed), device=device, dtype=dtype)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = nn.Module.to(UNet2DConditionModel(**SDXL_UNET_CONFIG), dtype)
    with fake or contextlib.nullcontext():
        unet = unet.to_empty(device=device)
        _cheap_init(unet, seed)
    return unet


def make_inputs(model: str, batch_size: int, resolution: int, device, dtype, seed: int) -> dict:
    """Random UNet inputs with SDXL's conditioning shapes: latents, text states, pooled text, time ids."""
    cfg = unet_config(model)
    if resolution % 8:
        raise BenchError(f"--resolution must be a multiple of 8 (the VAE factor), got {resolution}")
    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    return {
        "sample": rand(batch_size, cfg["in_channels"], side, side),
        "timestep": torch.randint(0, 1000, (batch_size,), generator=gen).to(device),
        "encoder_hidden_states": rand(batch_size, 77, cfg["cross_attention_dim"]),
        "added_cond_kwargs": {
            "text_embeds": rand(batch_size, pooled),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch_size,
                                     device=device, dtype=dtype),
        },
        "target": rand(batch_size, cfg["out_channels"], side, side),
    }


class _PythonFloorFunction(torch.autograd.Function):
    """y = x·Wᵀ + b; backward: the input gradient and the exact weight gradient gᵀx, folded into a scalar
    that reaches one trainable token (so the optimizer has a tensor and nothing is optimised away)."""

    @staticmethod
    def forward(ctx, x, weight, bias, token):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        grad_w = torch.mm(g.reshape(-1, g.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return torch.matmul(g, weight), None, None, grad_w.sum().reshape(1)


def _python_floor(unet: nn.Module, targets: list[str]):
    token = nn.Parameter(torch.zeros(1, device=next(unet.parameters()).device))
    modules = dict(unet.named_modules())
    for path in targets:
        m = modules[path]
        if type(m) is not nn.Linear:
            raise BenchError(f"python-floor wraps Linear layers only, and {path} is a {type(m).__name__}; "
                             "use --preset attn-only or attn-mlp")
        m.forward = lambda x, m=m: _PythonFloorFunction.apply(x, m.weight, m.bias, token)
    return [token], targets


def add_adapter(name: str, unet: nn.Module, rank: int, preset: str = "attn-only", *, conv_rank=None,
                lora_rank=None, peft_init=True):
    """Put adapter ``name`` on the modules ``preset`` selects (every variant the same set; convs larger than
    1×1 at ``conv_rank``, default ``rank``; PEFT LoRA at ``lora_rank``, default 2·rank, the same parameter
    count, and twice the conv rank). Returns (trainable params, extras)."""
    extras = {}
    unet.requires_grad_(False)
    if name == "floor":
        return [], extras
    targets = loha.preset_targets(unet, preset)
    conv_rank = conv_rank or rank
    modules = dict(unet.named_modules())
    wide = [p for p in targets if isinstance(modules[p], nn.Conv2d) and modules[p].kernel_size != (1, 1)]
    if name == "python-floor":
        params, extras["adapted"] = _python_floor(unet, targets)
    elif name == "grad-floor":
        modules = dict(unet.named_modules())
        params = [modules[path].weight.requires_grad_(True) for path in targets]
        extras["adapted"], extras["no_optimizer"] = targets, True
        return params, extras  # the base weights as they are: no fp32 copy, no optimizer
    elif name.startswith("loha-"):
        mode = name.split("-")[1]
        loha.inject(unet, rank=rank, alpha=rank, preset=preset, conv_rank=conv_rank, conv_alpha=conv_rank,
                    forward_mode=mode, stack=mode == "grouped")
        params = loha.trainable_parameters(unet)
        extras["adapted"] = sorted(loha.adapter_modules(unet))
    elif name in ("peft-loha", "peft-lora"):
        from peft import LoHaConfig, LoraConfig, inject_adapter_in_model

        exact = lambda r: {f"^{p}$": r for p in wide}  # noqa: E731 - convs larger than 1×1 by full path
        if name == "peft-loha":
            config = LoHaConfig(r=rank, alpha=rank, target_modules=targets, rank_pattern=exact(conv_rank),
                                alpha_pattern=exact(conv_rank), init_weights=peft_init)
        else:
            lora = lora_rank or 2 * rank
            lora_conv = lora * conv_rank // rank
            config = LoraConfig(r=lora, lora_alpha=lora, target_modules=targets, rank_pattern=exact(lora_conv),
                                alpha_pattern=exact(lora_conv))
        inject_adapter_in_model(config, unet)  # called directly: PeftModel.forward wants transformers' args
        params = [p for p in unet.parameters() if p.requires_grad]
        extras["adapted"] = sorted({n.split(".hada_")[0].split(".lora_")[0]
                                    for n, p in unet.named_parameters() if p.requires_grad})
    elif name == "lycoris-loha":
        import logging

        from lycoris import LycorisNetwork
        from lycoris.config import PRESET

        logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs a dozen INFO lines per network
        # Presets are class-level globals: set the one we want right before building the network.
        if preset == "attn-only":  # LyCORIS's own attn-only names no diffusers class; the Attention class
            rules = {"target_module": ["Attention"], "target_name": [], "enable_conv": False}
        else:
            rules = {"target_module": PRESET[preset]["unet_target_module"],
                     "target_name": PRESET[preset]["unet_target_name"], "enable_conv": PRESET[preset]["enable_conv"]}
        LycorisNetwork.apply_preset(rules)
        # its conv modules call .item() on a shape, which a fake tensor cannot: built real then (and then
        # not countable under FakeTensorMode, SDXL size); without convs it is built fake like the others
        with internals.unset_fake_temporarily() if rules["enable_conv"] else contextlib.nullcontext():
            network = LycorisNetwork(unet, multiplier=1.0, lora_dim=rank, alpha=rank, conv_lora_dim=conv_rank,
                                     conv_alpha=conv_rank, network_module="loha")
        network.apply_to()
        device = next(unet.parameters()).device
        network.to(device)  # factors stay fp32, as for the other variants
        params = list(network.parameters())
        extras["network"] = network
        extras["adapted"] = sorted(m.lora_name.removeprefix("lycoris_") for m in network.loras)
    else:
        raise BenchError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS + ON_REQUEST)}")
    for p in params:
        p.data = p.data.float()
    return params, extras


def check_same_targets(adapted: dict[str, list[str]]):
    """Every adapter variant must wrap exactly the same linears, or the comparison means nothing."""
    reference = None
    for name, paths in adapted.items():
        if name == "floor":
            continue
        keys = sorted(p.replace(".", "_") for p in paths)
        if reference is None:
            reference = (name, keys)
        elif keys != reference[1]:
            extra = sorted(set(keys) ^ set(reference[1]))[:4]
            raise BenchError(f"{name} adapts different layers than {reference[0]} "
                             f"({len(keys)} vs {len(reference[1])}; e.g. {extra})")


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory over a block: max_memory_allocated on CUDA; on Linux CPU, the peak RSS (VmHWM,
    reset through /proc/self/clear_refs) minus the RSS at the start. The CPU number is approximate:
    the allocator keeps freed pages, so it can under-count; it is None where it cannot be measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._start = _status_kib("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._start is not None:
            peak = _status_kib("VmHWM")
            self.peak_bytes = None if peak is None else max(peak - self._start, 0) * 1024


@dataclass
class Variant:
    name: str
    unet: nn.Module
    params: list
    optimizer: torch.optim.Optimizer | None
    extras: dict
    step_times: list = field(default_factory=list)
    step_cpu_times: list = field(default_factory=list)
    peak_bytes: int | None = None
    gradients_checked: bool = False


def make_optimizer(params, kind: str, extras=None):
    if not params or (extras or {}).get("no_optimizer"):
        return None
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, **{kind: True})


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_step(v: Variant, inputs: dict, device, dtype):
    sample = inputs["sample"]
    if v.name == "floor":
        sample = sample.detach().requires_grad_(True)  # the backward reaches every layer, as with an adapter
    with autocast(device, dtype):
        out = v.unet(sample, inputs["timestep"], inputs["encoder_hidden_states"],
                     added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out.float(), inputs["target"].float())
    loss.backward()
    if not v.gradients_checked:  # once: a variant whose adapters get no gradient would time nothing useful
        missing = sum(p.grad is None for p in v.params)
        if missing:
            raise BenchError(f"{v.name}: {missing} of {len(v.params)} trainable tensors got no gradient")
        v.gradients_checked = True
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    elif v.extras.get("no_optimizer"):
        for p in v.params:  # grad-floor: each step computes its gradients afresh, no accumulation
            p.grad = None
    return loss


def primary(times: tuple[float, float], device: torch.device) -> float:
    """The number the ratios use: wall time on GPU, CPU time on CPU (see timed)."""
    return times[0] if device.type == "cuda" else times[1]


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). On a shared CPU the second one is what the step
    itself cost, whatever the neighbours did; on GPU only the wall time means anything."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


@torch.inference_mode()
def inference_times(v: Variant, inputs: dict, device, dtype, steps: int, warmup: int) -> dict:
    """Median forward time in eval mode, with the adapter applied on the fly and, where the library can,
    folded into the weights (fused)."""
    v.unet.eval()
    forward = lambda: v.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                             added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)

    def median_time():
        with autocast(device, dtype):
            for _ in range(warmup):
                forward()
            return statistics.median(primary(timed(forward, device), device) for _ in range(steps))

    result = {"unfused_s": median_time()}
    if v.name.startswith("loha-"):
        loha.merge(v.unet)
        result["fused_s"] = median_time()
        loha.unmerge(v.unet)
    elif v.name.startswith("peft-"):
        layers = [m for m in v.unet.modules() if hasattr(m, "merge") and hasattr(m, "unmerge")
                  and hasattr(m, "active_adapters")]
        for m in layers:
            m.merge()
        result["fused_s"] = median_time()
        for m in layers:
            m.unmerge()
    elif v.name == "lycoris-loha":  # last use of this network: it cannot be unmerged afterwards
        network = v.extras["network"]
        network.restore()
        network.merge_to(1.0)
        result["fused_s"] = median_time()
    v.unet.train()
    return result


def saved_for_backward_bytes(v: Variant, inputs: dict, device, dtype) -> int:
    """Bytes of the tensors autograd keeps for backward in one training step, beyond the model's own
    parameters (counted once per storage). Exact and noise-free, on every device: this is where an
    adapter that saves an out×in ΔW per layer shows."""
    from count import saved_counter

    pack, saved = saved_counter(v.unet)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(v, inputs, device, dtype)
    return sum(saved.values())


def build_variant(name, args, device, dtype) -> Variant:
    torch.manual_seed(args.seed)
    unet = build_unet(args.model, device, dtype, args.seed)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.base_precision == "fp8":
        from loha.fp8 import store_fp8

        store_fp8(unet.requires_grad_(False))
    params, extras = add_adapter(name, unet, args.rank, args.preset, conv_rank=args.conv_rank)
    unet.train()
    if args.compile:
        unet = torch.compile(unet)
    return Variant(name, unet, params, make_optimizer(params, args.optimizer, extras), extras)


def run_steps(v: Variant, inputs, device, dtype, steps: int):
    with PeakMemory(device) as memory:
        for _ in range(steps):
            wall, cpu = timed(lambda: train_step(v, inputs, device, dtype), device)
            v.step_times.append(wall)
            v.step_cpu_times.append(cpu)
    if memory.peak_bytes is not None:
        v.peak_bytes = max(v.peak_bytes or 0, memory.peak_bytes)


def measure(args, on_variant=None) -> dict:
    """Runs every variant; returns the report. ``on_variant(report so far)`` is called after each variant
    when they run one at a time, so a run cut short (a device lease's time limit) keeps what it measured."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but torch sees no CUDA device")
    inputs = make_inputs(args.model, args.batch_size, args.resolution, device, dtype, args.seed)
    if args.compile and device.type == "cpu":
        print("warning: with torch 2.13, compiled CPU graphs of the UNet compute wrong weight gradients "
              "(BENCHMARKS.md section 1); these timings are not of a correct training step", file=sys.stderr)
    results, adapted = {}, {}
    env = environment(device)

    def report() -> dict:
        with_ratios = copy.deepcopy(results)
        add_ratios(with_ratios)
        return {"config": run_config(args), "environment": env, "results": with_ratios}

    def finish(v: Variant):
        times = v.step_times if device.type == "cuda" else v.step_cpu_times  # the same rule as primary()
        results[v.name] = {
            "params": sum(p.numel() for p in v.params),
            "step_median_s": statistics.median(times),
            "step_min_s": min(times),
            "step_wall_median_s": statistics.median(v.step_times),
            "step_cpu_median_s": statistics.median(v.step_cpu_times),
            "steps_timed": len(times),
            "peak_memory_bytes": v.peak_bytes,
            "saved_for_backward_bytes": None if args.compile else saved_for_backward_bytes(v, inputs, device, dtype),
            **(inference_times(v, inputs, device, dtype, args.infer_steps, args.warmup)
               if args.infer_steps else {}),
        }

    if args.rounds == 1:
        # One variant at a time, freed before the next: the only way a full SDXL fits several times over.
        for name in args.variants:
            v = build_variant(name, args, device, dtype)
            adapted[name] = v.extras.get("adapted", [])
            check_same_targets(adapted)
            for _ in range(args.warmup):
                train_step(v, inputs, device, dtype)
            run_steps(v, inputs, device, dtype, args.steps)
            finish(v)
            if on_variant is not None:
                on_variant(report())
            del v
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        # Interleaved rounds: a shared or noisy machine slows all variants alike instead of one.
        built = [build_variant(name, args, device, dtype) for name in args.variants]
        for v in built:
            adapted[v.name] = v.extras.get("adapted", [])
        check_same_targets(adapted)
        for v in built:
            for _ in range(args.warmup):
                train_step(v, inputs, device, dtype)
        for _ in range(args.rounds):
            for v in built:
                run_steps(v, inputs, device, dtype, args.steps)
        for v in built:
            finish(v)
    return report()


def add_ratios(results: dict):
    for r in results.values():
        for ref in ("floor", "peft-loha", "lycoris-loha"):
            if ref in results:
                r[f"step_vs_{ref}"] = r["step_median_s"] / results[ref]["step_median_s"]
        if "floor" in results:
            floor = results["floor"]
            peft = results.get("peft-loha")
            if peft is not None and r is not floor:  # issue 12's measure: overhead over the floor
                for key in ("step_median_s", "step_min_s"):
                    r[f"overhead_{key[5:-2]}_vs_peft-loha"] = (r[key] - floor[key]) / (peft[key] - floor[key]) \
                        if peft[key] > floor[key] else None
            for key in ("unfused_s", "fused_s"):
                if key in r and "unfused_s" in floor:
                    r[f"{key[:-2]}_vs_floor"] = r[key] / floor["unfused_s"]
            if r["peak_memory_bytes"] is not None and floor["peak_memory_bytes"] is not None:
                r["peak_memory_over_floor_bytes"] = r["peak_memory_bytes"] - floor["peak_memory_bytes"]


def run_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("json", "markdown")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import diffusers
    import peft

    try:
        from importlib.metadata import version

        lycoris_version = version("lycoris-lora")
    except Exception:  # noqa: BLE001 - an optional comparison library
        lycoris_version = None
    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "lycoris": lycoris_version,
        "loha": loha.__version__,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(x):
    return "" if x is None else f"{x:.2f}×"


def _mem(nbytes, on_gpu: bool):
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 2**30:.2f} GiB" if on_gpu else f"{nbytes / 2**20:.0f} MiB"


def markdown_table(report: dict) -> str:
    cfg, env, results = report["config"], report["environment"], report["results"]
    on_gpu = torch.device(cfg["device"]).type == "cuda"
    machine = env.get("gpu") or f"{env['cpu']} CPU, {env['cpu_threads']} torch thread(s)"
    clock = "wall time, synchronised" if on_gpu else "process CPU time (wall time in the JSON)"
    lines = [
        f"{cfg['model']} UNet, {cfg['dtype']}, batch {cfg['batch_size']}, {cfg['resolution']}², rank {cfg['rank']}, "
        f"grad ckpt {'on' if cfg['gradient_checkpointing'] else 'off'}, compile {'on' if cfg['compile'] else 'off'}, "
        f"AdamW {cfg['optimizer']}; {machine}; {env['date_utc']}; torch {env['torch']}, diffusers "
        f"{env['diffusers']}, peft {env['peft']}, lycoris {env['lycoris']}; {cfg['rounds']}×{cfg['steps']} timed "
        f"steps after {cfg['warmup']} warm-up; times are {clock}"
        + (f"; **partial: {report['partial']}** (the run stopped early)" if report.get("partial") else ""),
        "",
        "| variant | params | step median ms | step min ms | vs floor | vs PEFT LoHa | vs LyCORIS "
        "| overhead vs PEFT LoHa's: median · min "
        f"| {'peak GiB (max allocated)' if on_gpu else 'peak memory'} | saved for backward MiB "
        "| infer unfused ms | infer fused ms | unfused vs floor | fused vs floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        saved = r.get("saved_for_backward_bytes")
        overhead = [r.get(f"overhead_{stat}_vs_peft-loha") for stat in ("median", "min")]
        overhead = "" if None in overhead else f"{overhead[0]:.2f} · {overhead[1]:.2f}"
        lines.append(
            f"| {name} | {r['params']:,} | {_ms(r['step_median_s'])} | {_ms(r['step_min_s'])} "
            f"| {_ratio(r.get('step_vs_floor'))} | {_ratio(r.get('step_vs_peft-loha'))} "
            f"| {_ratio(r.get('step_vs_lycoris-loha'))} | {overhead} "
            f"| {_mem(r['peak_memory_bytes'] if on_gpu else None, on_gpu)} "
            f"| {'n/a' if saved is None else f'{saved / 2**20:.1f}'} "
            f"| {_ms(r.get('unfused_s'))} | {_ms(r.get('fused_s'))} "
            f"| {_ratio(r.get('unfused_vs_floor'))} | {_ratio(r.get('fused_vs_floor'))} |")
    return "\n".join(lines) + "\n"


def precision_table(size: int = 640, seed: int = 0) -> str:
    """The merged forward's precision cost, measured: with a bf16 base, W + ΔW is rounded to W's precision
    step, so the ΔW the forward really applies differs from the trained one; bypass rounds ΔW alone; grouped
    (the default) rounds W + ΔW as merged does, from products rounded to bf16. Reported: ‖ΔW_effective −
    ΔW‖/‖ΔW‖ at mean |ΔW| of 1e-5, 1e-4, 1e-3 on an SDXL-sized attention weight (std 0.02), and the same for
    the layer's output change x·ΔWᵀ, which is what the next layer sees. Merged's and grouped's effective
    ΔW are read out of the layer (an identity input makes its output the built weight, exactly); bypass's
    is bf16(ΔW) by construction (its output rounding hides it)."""
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(size, size, generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(64, size, generator=gen).to(torch.bfloat16)
    eye = torch.eye(size, dtype=torch.bfloat16)
    base = nn.Linear(size, size, bias=False).to(torch.bfloat16).requires_grad_(False)
    base.weight.copy_(weight)
    layer = loha.LoHaLinear(base, 8)
    loha.stack(nn.ModuleList([layer]))
    modes = ("merged", "grouped", "bypass")
    lines = ["| mean abs ΔW | " + " | ".join(f"ΔW rel. error {m}" for m in modes) + " | "
             + " | ".join(f"output-change rel. error {m}" for m in modes) + " |", "|---" * 7 + "|"]
    for magnitude in (1e-5, 1e-4, 1e-3):
        with torch.no_grad():
            for p in layer.factors():
                p.normal_(generator=gen)
            layer.factors()[0].mul_(magnitude / layer.delta_weight().abs().mean())
        dw = layer.delta_weight().detach().double()
        w = weight.double()
        applied = {"bypass": dw.to(torch.bfloat16).double()}
        true_change = x.double() @ dw.T
        changes = {}
        for mode in modes:
            layer.forward_mode = mode
            if mode != "bypass":  # in grad mode: a training build (without grad, grouped's pair is fp32)
                applied[mode] = layer(eye).T.detach().double() - w
            changes[mode] = layer(x).detach().double() - (x.double() @ w.T)
        row = [f"{magnitude:g}"]
        row += [f"{((applied[m] - dw).norm() / dw.norm()).item():.3g}" for m in modes]
        row += [f"{((changes[m] - true_change).norm() / true_change.norm()).item():.3g}" for m in modes]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def train_throughput(train_argv: list[str]) -> dict:
    """Run train_loha_sdxl.py's main() in this process. Reports the script's own images/s (images seen over
    its loop time, data loading included) and how much of that loop was spent waiting on the DataLoader
    (iterator ``__next__``: reading, decoding and collating a batch, or loading cached features; with
    workers, the wait for them)."""
    from torch.utils.data import dataloader

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import train_loha_sdxl

    waits, runs = [], []
    original_next, original_train = dataloader._BaseDataLoaderIter.__next__, train_loha_sdxl.train

    def timed_next(self):
        start = time.perf_counter()
        try:
            return original_next(self)
        finally:
            waits.append(time.perf_counter() - start)

    def kept_train(run, args):
        runs.append(run)
        waits.clear()  # only the training loop's batches: caching passes before it also use DataLoaders
        return original_train(run, args)

    dataloader._BaseDataLoaderIter.__next__ = timed_next
    train_loha_sdxl.train = kept_train  # main() looks it up at call time
    try:
        code = train_loha_sdxl.main(train_argv)
    finally:
        dataloader._BaseDataLoaderIter.__next__, train_loha_sdxl.train = original_next, original_train
    if code or not runs or not runs[0].train_seconds:
        raise BenchError(f"train_loha_sdxl.py exited with {code} before timing any training step")
    run = runs[0]
    return {"steps": run.global_step, "images": run.images_seen, "loop_s": run.train_seconds,
            "images_per_s": run.images_seen / run.train_seconds, "loader_wait_s": sum(waits),
            "loader_share": sum(waits) / run.train_seconds, "loader_wait_max_s": max(waits, default=0.0),
            "batches_loaded": len(waits)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "sdxl"), default="tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="the base model's dtype")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's own)")
    p.add_argument("--rank", type=int, default=8, help="LoHa rank r (PEFT LoRA gets 2r)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="> 1 keeps every variant in memory and interleaves them, round after round (for noisy CPUs)")
    p.add_argument("--infer_steps", type=int, default=5, help="timed inference forwards (0 skips inference)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--preset", default="attn-only", choices=list(loha.PRESETS),
                   help="which modules every variant adapts (LyCORIS's preset names; convs at --rank)")
    p.add_argument("--count", action="store_true",
                   help="exact op counts, bytes moved and saved, and peak memory per variant instead of timings "
                        "(--model sdxl: on fake tensors, no memory)")
    p.add_argument("--setup", choices=("trainer", "anchor"), default="trainer",
                   help="--count's step: the trainer's, or the H200 anchor harness's (to validate the peak)")
    p.add_argument("--conv_rank", type=int, default=None, help="rank of convs larger than 1x1 (default: --rank)")
    p.add_argument("--base_precision", choices=("auto", "fp8"), default="auto",
                   help="the UNet's frozen Linear/Conv2d weights in --dtype (auto) or fp8, every variant")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet of every variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + ON_REQUEST, metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)} (default: all of them), or {', '.join(ON_REQUEST)}")
    p.add_argument("--optimizer", choices=("fused", "foreach"), default=None,
                   help="AdamW implementation for every variant (default: fused, what the trainer uses)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", action="store_true",
                   help="only print the merged-vs-bypass bf16 precision table, then exit")
    p.add_argument("--train_throughput", nargs=argparse.REMAINDER, default=None, metavar="TRAIN_ARGS",
                   help="run train_loha_sdxl.py with these arguments (e.g. --demo --max_train_steps 30) and "
                        "report images/s and the share of the loop spent waiting on the data loader; last flag")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 8 * unet_config(args.model)["sample_size"]
    for name in ("batch_size", "rank", "steps", "rounds", "resolution"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0 or args.infer_steps < 0:
        p.error("--warmup and --infer_steps must be >= 0")
    args.variants = list(dict.fromkeys(args.variants))
    if args.optimizer is None:
        args.optimizer = "fused"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    # Both settings are process-wide: put them back, so that a caller (e.g. pytest) is left as it was.
    threads, verbosity = torch.get_num_threads(), diffusers_logging.get_verbosity()
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # the "kept in float32" notice on every .to(dtype)
    try:
        return run(args)
    except BenchError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        diffusers_logging.set_verbosity(verbosity)


def run(args) -> int:
    if args.precision:
        print(precision_table())
        return 0
    if args.count:
        from count import count_all, count_table

        report = count_all(args)
        print(count_table(report))
        if args.json:
            loha.atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
        if args.markdown:
            loha.atomic_write_bytes(args.markdown, count_table(report).encode())
        return 0
    if args.train_throughput is not None:
        result = train_throughput(args.train_throughput)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"train_args": args.train_throughput, **result}, indent=2) + "\n")
        return 0
    def write(report: dict):
        """JSON and markdown, replaced atomically: after every variant (marked partial), then complete."""
        for path, text in ((args.json, json.dumps(report, indent=2) + "\n"), (args.markdown, markdown_table(report))):
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                loha.atomic_write_bytes(path, text.encode())

    def progress(report: dict):
        done = list(report["results"])
        r = report["results"][done[-1]]
        print(f"[{len(done)}/{len(args.variants)}] {done[-1]}: step median {_ms(r['step_median_s'])} ms",
              file=sys.stderr, flush=True)
        write({**report, "partial": f"{len(done)} of {len(args.variants)} variants"})

    report = measure(args, on_variant=progress)
    print(markdown_table(report))
    write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
