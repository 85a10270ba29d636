"""Exact, noise-free figures of one steady-state training step per variant (``bench.py --count``): launched ops,
bytes those ops move, bytes saved for backward, and the peak memory with its split, all by a GPU's rules.

The step is the trainer's (``--setup trainer``): bf16 base under autocast, output cast to fp32, per-sample
MSE, clip_grad_norm_(1.0), fused AdamW, zero_grad(set_to_none); or the harness of the H200 anchor runs
(``--setup anchor``: F.mse_loss, foreach AdamW, the previous output alive through the next step, PEFT LoHa
with its own init, LoRA at rank r), which the peak is validated against. With ``--model sdxl`` it runs on
fake tensors (``loha.memory``): the full SDXL UNet at any resolution costs no memory. Every count is taken
under CUDA's autocast policy, and on fake tensors with CUDA's flash attention (``loha.memory.cuda_rules``),
so the numbers are a GPU step's, not a CPU one's.

"launched" means dispatched aten ops minus views, allocations without a fill and shape queries: on a GPU
each is a kernel launch. The optimizer's state is made first by an update from zero gradients; what the
first real step would leave behind beyond it (nothing, for every variant here) would not be counted.
"""

from __future__ import annotations

import contextlib
import random
import sys

import torch
import torch.nn.functional as F

import loha
from loha import internals
from loha import memory as lmem

# Ops that launch no kernel: views (they only make a new tensor header), allocations without a fill,
# and shape/device queries. Everything else that reaches the dispatcher is a kernel launch on a GPU.
NON_LAUNCHING = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
                 "aten.new_empty.default", "aten.new_empty_strided.default", "aten.detach.default",
                 "aten.lift_fresh.default", "aten._unsafe_view.default", "aten.alias.default",
                 "aten.set_.source_Storage_storage_offset", "aten.resize_.default", "prim.device.default",
                 "aten.sym_size.int", "aten.sym_stride.int", "aten.sym_numel.default",
                 "aten.sym_storage_offset.default",
                 "aten.is_same_size.default", "aten._has_compatible_shallow_copy_type.default"}
PHASES = ("forward", "backward", "optimizer")
KIND_OF_PHASE = {"forward": "activations", "backward": "temporaries", "optimizer": "optimizer"}
PHASE_OF_KIND = {kind: phase for phase, kind in KIND_OF_PHASE.items()}
TOP_OPS = 12  # the most frequent (phase, op) pairs kept per variant in the JSON
# torch.cuda.max_memory_allocated (GiB) of the anchor harness on one H200 (torch 2.11+cu130, 2026-11-26;
# BENCHMARKS.md §4): bs1 1024² bf16 rank 8, the attention linears
H200_ANCHOR_GIB = {("floor", False): 11.21698808670044, ("peft-loha", False): 13.601448059082031,
                   ("lycoris-loha", False): 13.276458740234375, ("peft-lora", False): 12.386186599731445,
                   ("floor", True): 5.7595672607421875, ("peft-loha", True): 6.092556953430176,
                   ("lycoris-loha", True): 5.94102144241333, ("peft-lora", True): 5.809834003448486}


def launches(func) -> bool:
    """Whether an op launches a kernel: an aten op that is not a view, an allocation without a fill or a shape
    query (the profiler's record_function markers and other namespaces launch nothing)."""
    name = str(func)
    return func.namespace == "aten" and not (getattr(func, "is_view", False) or name in NON_LAUNCHING)


def distinct_bytes(t: torch.Tensor) -> int:
    """The bytes of t's distinct elements: an expanded (stride-0) dimension is read once, not per index."""
    n = t.element_size()
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else min(size, 1)
    return n


def moved_bytes(args, out) -> int:
    """What a launched op reads and writes if nothing stays in cache between ops: the distinct bytes of its
    tensor arguments (lists included) and of its outputs. An in-place op's output is its input, so that
    tensor counts twice, once read and once written. A floor for the op's own memory traffic."""
    tensors = [t for t in internals.tree_leaves((args, out)) if isinstance(t, torch.Tensor)]
    return sum(distinct_bytes(t) for t in tensors)


def op_counter():
    """A dispatch mode counting every aten op under it, by phase, launched or not (and by op, for reading),
    and the bytes the launched ones move (``moved_bytes``)."""

    class Counter(internals.DispatchMode()):
        def __init__(self):
            super().__init__()
            self.phase = "forward"
            self.counts = {ph: {"launched": 0, "other": 0, "moved_bytes": 0} for ph in PHASES}
            self.by_op = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "prim":  # device/shape queries FakeTensorMode routes through the dispatcher
                return func(*args, **(kwargs or {}))
            kind = "launched" if launches(func) else "other"
            self.counts[self.phase][kind] += 1
            out = func(*args, **(kwargs or {}))
            if kind == "launched":
                key = (self.phase, str(func))
                self.by_op[key] = self.by_op.get(key, 0) + 1
                self.counts[self.phase]["moved_bytes"] += moved_bytes((args, kwargs), out)
            return out

    return Counter()


def saved_counter(model):
    """A saved-tensors pack hook that records each saved storage's bytes once (keyed by the storage itself,
    which fake tensors have too), the model's parameters excluded; and the {storage: bytes} it fills."""
    resident = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in resident:
            saved[storage._cdata] = storage.nbytes()
        return t

    pack.loha_unpack_twice = True  # a plain counter: loha's input recipes stay on, as in a run without hooks
    return pack, saved


@contextlib.contextmanager
def python_scalar_draws(tally: list):
    """PEFT decides module dropout with ``torch.rand(1) > p`` and a Python ``if``: a FakeTensor has no value
    for that. Inside this context a one-element draw returns a Python float, and ``tally`` counts the draws:
    on real tensors each is three launched ops (rand, gt, and the item() sync), added back to the forward."""
    original = torch.rand

    def rand(*size, **kwargs):
        if size in ((1,), ((1,),)):
            tally.append(1)
            return random.random()
        return original(*size, **kwargs)

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


def make_optimizer(params, setup):
    if not params:
        return None
    if setup == "anchor":  # the anchor harness: torch.optim.AdamW(params, lr=1e-4), CUDA's default foreach
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=True)


def count_variant(name: str, args, fake) -> dict:
    """One steady-state training step of ``name``, counted (``fake``: a FakeTensorMode, for SDXL)."""
    import bench

    dtype, device = bench.DTYPES[args.dtype], torch.device("cpu")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    unet = bench.build_unet(args.model, device, dtype, args.seed, fake)
    draws = []
    with contextlib.ExitStack() as stack:
        if fake is not None:
            stack.enter_context(fake)
            stack.enter_context(lmem.fake_moves())
            if name.startswith("peft"):
                stack.enter_context(python_scalar_draws(draws))
        stack.enter_context(lmem.cuda_rules(flash=fake is not None))
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if args.base_precision == "fp8":
            from loha.fp8 import store_fp8

            store_fp8(unet.requires_grad_(False))
        lora_rank = args.rank if args.setup == "anchor" else 2 * args.rank
        params, extras = bench.add_adapter(name, unet, args.rank, args.preset, conv_rank=args.conv_rank,
                                           lora_rank=lora_rank, peft_init=args.setup == "anchor")
        unet.train()
        optimizer = None if extras.get("no_optimizer") else make_optimizer(params, args.setup)
        inputs = bench.make_inputs(args.model, args.batch_size, args.resolution, device, dtype, args.seed)
        sample = inputs["sample"].detach().requires_grad_(name == "floor")  # the floor's backward reaches every layer
        counter = op_counter()
        pack, saved = saved_counter(unet)
        previous = []

        def step(tracker):
            def phase(p):
                counter.phase, tracker.phase = p, KIND_OF_PHASE[p]

            phase("forward")
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = unet(sample, inputs["timestep"], inputs["encoder_hidden_states"],
                           added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0]
            if args.setup == "anchor":
                loss = F.mse_loss(out.float(), inputs["target"].float())
            else:  # accelerate's fp32 output, then the trainer's per-sample loss
                loss = F.mse_loss(out.float(), inputs["target"].float(), reduction="none").mean(dim=(1, 2, 3)).mean()
            counter.counts["forward"]["launched"] += 3 * len(draws)  # see python_scalar_draws
            phase("backward")
            loss.backward()
            phase("optimizer")
            if optimizer is not None:
                if args.setup == "trainer":  # foreach, as torch picks for CUDA tensors (here: CPU fakes)
                    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            elif extras.get("no_optimizer"):
                for p in params:
                    p.grad = None
            sample.grad = None
            if args.setup == "anchor":
                previous[:] = [out]  # the anchor loop keeps `out` until the next forward returns

        if args.setup == "anchor":  # the previous step's output is alive during the measured one
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), torch.no_grad():
                previous.append(unet(sample.detach(), inputs["timestep"], inputs["encoder_hidden_states"],
                                     added_cond_kwargs=inputs["added_cond_kwargs"], return_dict=False)[0])
        draws.clear()

        @contextlib.contextmanager
        def counting():  # around the measured step only, not the update that makes the optimizer's state
            with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield

        peak = lmem.step_peak(unet, params, optimizer, step, (inputs, sample, previous), counting())
    return {"adapted": len(extras.get("adapted", [])), "optimizer_tensors": 0 if optimizer is None else len(params),
            "params": sum(p.numel() for p in params), "ops": counter.counts,
            "saved_for_backward_bytes": sum(saved.values()), "peak": peak.as_dict(),
            "top_ops": sorted(([ph, op, n] for (ph, op), n in counter.by_op.items()), key=lambda r: -r[2])[:TOP_OPS]}


def count_all(args) -> dict:
    """Exact figures for every variant. ``--model sdxl`` runs under FakeTensorMode (no memory)."""
    import bench

    results = {}
    for name in args.variants:
        fake = internals.fake_mode() if args.model == "sdxl" else None
        if fake is not None and name == "lycoris-loha" and loha.PRESETS[args.preset].conv:
            # its conv modules call .item() on a shape, which a fake tensor cannot answer
            print("skipped lycoris-loha: its conv modules cannot be built under FakeTensorMode; count it with "
                  "--model tiny", file=sys.stderr, flush=True)
            continue
        results[name] = count_variant(name, args, fake)
        print(f"counted {name}: {sum(c['launched'] + c['other'] for c in results[name]['ops'].values())} ops, "
              f"peak {results[name]['peak']['bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    for r in results.values():
        r["launched"] = sum(r["ops"][ph]["launched"] for ph in PHASES)
        r["all"] = r["launched"] + sum(r["ops"][ph]["other"] for ph in PHASES)
        r["moved_bytes"] = sum(r["ops"][ph]["moved_bytes"] for ph in PHASES)
    floor = results.get("floor")
    for name, r in results.items():
        if floor is not None and r["adapted"]:
            r["extra_launched_per_layer"] = (r["launched"] - floor["launched"]) / r["adapted"]
            r["extra_all_per_layer"] = (r["all"] - floor["all"]) / r["adapted"]
            r["saved_over_floor_bytes"] = r["saved_for_backward_bytes"] - floor["saved_for_backward_bytes"]
            r["moved_over_floor_bytes"] = r["moved_bytes"] - floor["moved_bytes"]
            r["peak_over_floor_bytes"] = r["peak"]["bytes"] - floor["peak"]["bytes"]
        anchor = H200_ANCHOR_GIB.get((name, args.gradient_checkpointing))
        if (args.setup == "anchor" and anchor and args.model == "sdxl" and args.resolution == 1024
                and args.batch_size == 1 and args.rank == 8 and args.preset == "attn-only"):
            r["h200_anchor_gib"] = anchor
            r["peak_vs_h200"] = r["peak"]["bytes"] / 2**30 / anchor
    return {"config": bench.run_config(args), "environment": bench.environment(torch.device("cpu")),
            "counts": results, "chunk_bytes": loha.grouped.CHUNK_BYTES}


def _gib(b):
    return f"{b / 2**30:.2f}"


def count_table(report: dict) -> str:
    cfg, counts = report["config"], report["counts"]
    lines = [f"{cfg['model']} UNet, {cfg['dtype']}, batch {cfg['batch_size']}, {cfg['resolution']}², rank "
             f"{cfg['rank']} (convs {cfg['conv_rank'] or cfg['rank']}), preset {cfg['preset']}, gradient checkpointing "
             f"{'on' if cfg['gradient_checkpointing'] else 'off'}, base weights "
             f"{cfg.get('base_precision', 'auto')}, {cfg['setup']} step, one steady-state step"
             + (" under FakeTensorMode" if cfg["model"] == "sdxl" else "")
             + f", CUDA's autocast policy; grouped chunks of {report['chunk_bytes'] / 2**20:g} MiB of built weights; "
             f"{report['environment']['date_utc']}; torch {report['environment']['torch']}", "",
             "| variant | adapted | forward ops: launched · other | backward | optimizer "
             "| extra ops per adapted layer: all · launched | saved for backward MiB | vs floor MiB "
             "| optimizer tensors | moved GB (launched ops) | vs floor GB | peak GiB | vs floor GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in counts.items():
        ph = [f"{r['ops'][p]['launched']} · {r['ops'][p]['other']}" for p in PHASES]
        extra = (f"{r['extra_all_per_layer']:.1f} · {r['extra_launched_per_layer']:.2f}"
                 if "extra_launched_per_layer" in r else "")
        over = f"{r['saved_over_floor_bytes'] / 2**20:+.1f}" if "saved_over_floor_bytes" in r else ""
        moved = f"{r['moved_over_floor_bytes'] / 1e9:+.3g}" if "moved_over_floor_bytes" in r else ""
        peak_over = f"{r['peak_over_floor_bytes'] / 2**30:+.2f}" if "peak_over_floor_bytes" in r else ""
        lines.append(f"| {name} | {r['adapted']} | {' | '.join(ph)} | {extra} | "
                     f"{r['saved_for_backward_bytes'] / 2**20:.1f} | {over} | {r['optimizer_tensors']} | "
                     f"{r['moved_bytes'] / 1e9:.3g} | {moved} | {_gib(r['peak']['bytes'])} | {peak_over} |")
    lines += ["", "The peak's split (GiB) and where it happens:", "",
              "| variant | peak | parameters | gradients | optimizer state | activations | temporaries | inputs "
              "| in | H200 anchor | fake / H200 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in counts.items():
        s = r["peak"]["split"]
        anchor = (f"{r['h200_anchor_gib']:.2f} | {r['peak_vs_h200']:.3f}" if "h200_anchor_gib" in r else " | ")
        lines.append(f"| {name} | {_gib(r['peak']['bytes'])} | {_gib(s['parameters'])} | {_gib(s['gradients'])} | "
                     f"{_gib(s['optimizer'])} | {_gib(s['activations'])} | {_gib(s['temporaries'])} | "
                     f"{_gib(s['inputs'])} | {PHASE_OF_KIND.get(r['peak']['at'][0], '')} | {anchor} |")
    return "\n".join(lines) + "\n"
