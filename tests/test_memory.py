"""loha.memory: the live-bytes tracker against real CPU memory, CUDA's autocast policy against torch's own
list of CUDA autocast ops, and the fake-tensor step against the same step on real tensors."""

import gc

import pytest
import torch
import torch.nn.functional as F

import loha
from loha import internals
from loha import memory as lmem
from loha.tiny_sdxl import tiny_unet
from tests.helpers import randomize_adapters, unet_inputs

MiB = 2**20


def test_every_private_torch_api_loha_uses_exists():
    """loha.internals names each private torch API the project touches; a torch without one fails here by name."""
    for path in internals.NAMES:
        internals.resolve(path)
    with pytest.raises(AttributeError, match=r"torch\._C\._no_such_thing, which loha uses for"):
        internals.NAMES["torch._C._no_such_thing"] = "a test"
        try:
            internals.resolve("torch._C._no_such_thing")
        finally:
            del internals.NAMES["torch._C._no_such_thing"]


def test_the_policy_table_covers_every_cuda_autocast_op_of_this_torch():
    """Every op this torch registers an AutocastCUDA kernel for has its policy in the table (an op added to
    CUDA's lists in a later torch would be missed otherwise)."""
    assert internals.registered_ops("AutocastCUDA") <= set(lmem.CUDA_AUTOCAST)


def test_cuda_rules_run_norms_in_fp32_and_matmuls_in_bf16():
    """Under CPU autocast torch keeps layer_norm, group_norm, softmax and sum in bf16; under CUDA's policy they
    run in fp32 (and sums return fp32), matmuls in bf16, and an fp32 leaf that needs grad is cast once per
    autocast region (CUDA's cast cache)."""
    x = torch.randn(2, 8, 16)
    w = torch.randn(16, 16, requires_grad=True)
    img = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            n = F.layer_norm(x.bfloat16(), (16,))
            return (n.dtype, F.group_norm(img, 2).dtype, torch.softmax(x.bfloat16(), -1).dtype,
                    x.bfloat16().sum().dtype, (x @ w).dtype)

    class Casts(internals.DispatchMode()):
        shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    assert run()[:4] == (torch.bfloat16,) * 4  # CPU's own policy
    with lmem.cuda_rules(flash=False):
        got = run()
        with Casts(), torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(x, w), F.linear(x, w)
    assert got[:5] == (torch.float32, torch.float32, torch.float32, torch.float32, torch.bfloat16)
    assert Casts.shapes.count((16, 16)) == 1 and Casts.shapes.count((2, 8, 16)) == 2  # w cast once, x twice
    assert run()[:4] == (torch.bfloat16,) * 4  # restored


def test_live_bytes_counts_what_is_alive_rounded_like_cuda():
    """Independent arithmetic: allocations of known sizes, freed in a known order; the peak is the largest sum
    of 512-byte-rounded sizes alive at once, and the split files them by phase."""
    tracker = lmem.LiveBytes()
    keep = torch.zeros(100)  # 400 bytes → 512
    tracker.track([keep], "parameters")
    with tracker:
        tracker.reset_peak()
        a = torch.ones(1000)  # 4000 → 4096
        b = torch.ones(300)  # 1200 → 1536
        del a
        tracker.phase = "temporaries"
        c = torch.ones(2000)  # 8000 → 8192
        assert tracker.live == 512 + 1536 + 8192
        del b, c
    assert tracker.peak.total == 512 + 1536 + 8192
    assert tracker.peak.split["parameters"] == 512 and tracker.peak.split["temporaries"] == 8192
    assert tracker.peak.split["activations"] == 1536
    assert tracker.live == 512


def unet_step(unet, params, optimizer, inputs, dtype=torch.float32):
    def step(tracker):
        tracker.phase = "activations"
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = unet(**inputs).sample
        loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        tracker.phase = "temporaries"
        loss.backward()
        tracker.phase = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def tiny_peak(fake: bool, preset="attn-only", checkpointing=False, profile=False):
    torch.manual_seed(0)
    unet = tiny_unet(0)
    mode = internals.fake_mode() if fake else None
    with mode or torch.no_grad():
        if fake:
            unet = unet.to_empty(device="cpu")
    with mode if fake else torch.enable_grad(), lmem.fake_moves() if fake else torch.enable_grad():
        if checkpointing:
            unet.enable_gradient_checkpointing()
        loha.inject(unet, rank=4, preset=preset)
        if not fake:
            randomize_adapters(unet, seed=1, std=0.1)
        params = loha.trainable_parameters(unet)
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        inputs = unet_inputs()
        if profile:
            return unet, params, optimizer, inputs
        return lmem.step_peak(unet, params, optimizer, unet_step(unet, params, optimizer, inputs), inputs)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_fake_step_peaks_where_the_real_one_does(checkpointing):
    """The tiny UNet with LoHa: the same step on fake and on real tensors gives the same peak, at the same op,
    up to a few 512-byte blocks (small constants the fake mode makes without a kernel; measured 0-3)."""
    real, fake = tiny_peak(False, checkpointing=checkpointing), tiny_peak(True, checkpointing=checkpointing)
    assert real.total > 16 * MiB and abs(real.total - fake.total) <= 4 * 512 and real.at == fake.at
    assert all(abs(real.split[k] - fake.split[k]) <= 4 * 512 for k in lmem.KINDS)


def test_the_tracker_agrees_with_the_cpu_allocator():
    """The tracker on real tensors (without CUDA's 512-byte rounding) against the CPU allocator's own record
    (torch.profiler's memory events, every allocation including kernels' scratch): the allocator's peak over
    the step's start is the tracker's, up to the scratch of the op running at the peak (under 1 MiB here)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    unet, params, optimizer, inputs = tiny_peak(False, profile=True)
    step = unet_step(unet, params, optimizer, inputs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for p in params:  # the optimizer state first, as step_peak makes it; recorded, so its frees are too
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        tracker = lmem.LiveBytes(granule=1)  # what existed before the step is known, as step_peak has it
        tracker.track([*unet.parameters(), *unet.buffers(), *lmem.optimizer_state(optimizer)], "parameters")
        with record_function("measured"), tracker:
            start = tracker.live
            tracker.reset_peak()
            step(tracker)
    events = list(prof.profiler.kineto_results.events())
    span = next((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == "measured")
    running, base, top = 0, None, 0
    for when, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if when >= span[0] and base is None:
            base = top = running
        running += nbytes
        if span[0] <= when <= span[1]:
            top = max(top, running)
    tracked, allocator = tracker.peak.total - start, top - base
    assert tracked > 4 * MiB
    assert tracked <= allocator <= tracked + MiB
