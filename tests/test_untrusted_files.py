"""Untrusted adapter files: every file either loads correctly or ends in one ``loha.LoHaError`` with a
non-empty one-line message. Never another exception, a hang, a large allocation, code execution, or a
half-changed model.

Property tests (hypothesis, bounded and derandomized so CI is repeatable; set LOHA_FUZZ_EXAMPLES=2000
LOHA_FUZZ_RANDOM=1 for a longer random hunt) feed random bytes, mutated valid files, crafted headers and
crafted configs. Named cases cover each bad input listed in issue 6. Each load runs under a time limit
(SIGALRM) and an address-space limit (RLIMIT_AS), so a hang or a huge allocation fails the test instead
of passing unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import Tally, record
from torch import nn

import loha
from loha.formats import FACTOR_NAMES

REPO = Path(__file__).resolve().parents[1]
AREA = "untrusted adapter file"
LOAD_SECONDS = 10  # far above any honest load of these tiny files (milliseconds)
EXTRA_ADDRESS_SPACE = 1 << 30  # a file under 100 KB has no business allocating a GiB


def fuzz_settings(examples: int):
    return settings(max_examples=int(os.environ.get("LOHA_FUZZ_EXAMPLES", examples)), deadline=None,
                    database=None, derandomize=not os.environ.get("LOHA_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------- a small model
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_k = nn.Linear(6, 8)
        self.to_v = nn.Linear(6, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8)])


class SmallModel(nn.Module):
    """Two attention blocks with the SDXL target names (to_out.0) and one cross-attention width."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Attention(), Attention()])


def trained_small_model(rank=2, alpha=3.0):
    """A model whose adapters have non-zero factors (a freshly injected one has ΔW = 0)."""
    model = SmallModel()
    loha.inject(model, rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loha.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


LINEAR_SHAPES = {p: (m.out_features, m.in_features) for p, m in SmallModel().named_modules()
                 if isinstance(m, nn.Linear)}
KOHYA_NAMES = {"lora_unet_" + p.replace(".", "_"): p for p in LINEAR_SHAPES}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid kohya file and PEFT folder of the same adapter, and their bytes."""
    d = tmp_path_factory.mktemp("valid")
    model = trained_small_model()
    kohya = loha.export_kohya(model, d / "small.safetensors")
    peft = loha.save(model, d / "peft")
    return SimpleNamespace(kohya=kohya, peft=peft, kohya_bytes=kohya.read_bytes(),
                           peft_bytes=(peft / "adapter_model.safetensors").read_bytes(),
                           peft_config=json.loads((peft / "adapter_config.json").read_text()),
                           tensors=safetensors.torch.load_file(kohya), model=model)


# ----------------------------------------------------------------------------------- guards
class Hang(BaseException):
    """BaseException on purpose: an ``except Exception`` in the code under test must not swallow it."""


def _vm_size() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: only the time limit applies
        return None


@contextlib.contextmanager
def bounded(seconds=LOAD_SECONDS, extra_bytes=EXTRA_ADDRESS_SPACE):
    """Fail (Hang / MemoryError) instead of hanging or allocating without bound."""
    def on_alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm_size = _vm_size()
    if vm_size is not None:
        limit = vm_size + extra_bytes if hard == resource.RLIM_INFINITY else min(vm_size + extra_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(_vm_size() is None, reason="the address-space guard needs Linux's /proc")
def test_guards_catch_hangs_and_huge_allocations():
    """The guards above are what make "never hangs, never allocates without bound" testable: prove they bite."""
    limits = resource.getrlimit(resource.RLIMIT_AS)
    with pytest.raises(Hang), bounded(seconds=0.2):
        time.sleep(2)
    with pytest.raises(MemoryError), bounded():
        bytearray(2 * EXTRA_ADDRESS_SPACE)
    with pytest.raises(RuntimeError, match="memory"), bounded():
        torch.empty(2 * EXTRA_ADDRESS_SPACE, dtype=torch.uint8)
    assert resource.getrlimit(resource.RLIMIT_AS) == limits and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def try_load(path, model=None, **kwargs) -> tuple[str, str, float]:
    """("loaded" | "refused", message, seconds). Anything but LoHaError propagates and fails the test."""
    model = SmallModel() if model is None else model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    had_adapters = bool(loha.adapter_modules(model))
    start = time.perf_counter()
    try:
        with bounded():
            loha.load(model, path, **kwargs)
    except loha.LoHaError as e:
        message = str(e)
        assert message.strip(), "empty error message"
        assert "\n" not in message, f"error message is not one line: {message!r}"
        assert bool(loha.adapter_modules(model)) == had_adapters, "a refused file injected adapters"
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), \
            "a refused file changed the model"
        return "refused", message, time.perf_counter() - start
    return "loaded", "", time.perf_counter() - start


def check_loaded_matches(model, file_tensors: dict, allow_nonfinite=False):
    """After a successful kohya load: every adapter holds exactly the file's values, in shapes that fit."""
    layers = loha.adapter_modules(model)
    assert layers, "load reported success but injected nothing"
    for path, layer in layers.items():
        out_f, in_f = LINEAR_SHAPES[path]
        name = next(k for k, p in KOHYA_NAMES.items() if p == path)
        assert layer.hada_w1_a.shape[0] == out_f and layer.hada_w1_b.shape[1] == in_f
        for factor in FACTOR_NAMES:
            expected = file_tensors[f"{name}.{factor}"].to(getattr(layer, factor).dtype)
            actual = getattr(layer, factor).detach()
            assert torch.equal(actual.isnan(), expected.isnan()), (path, factor)
            assert torch.equal(actual.nan_to_num(0.0), expected.nan_to_num(0.0)), (path, factor)
            if not allow_nonfinite:
                assert torch.isfinite(getattr(layer, factor)).all()
        assert layer.alpha > 0 and math.isfinite(layer.alpha)


def raw_safetensors(header, data: bytes = b"", claimed_length: int | None = None) -> bytes:
    """A safetensors-shaped byte string with any header (dict or bytes) and any length field."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if claimed_length is None else claimed_length
    return struct.pack("<Q", n % (1 << 64)) + head + data


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------- property tests
def test_valid_files_load_exactly(valid):
    """The control for everything below: the unmodified files load, with the file's exact values."""
    for path in (valid.kohya, valid.peft):
        model = SmallModel()
        outcome, message, _ = try_load(path, model)
        assert outcome == "loaded", message
        check_loaded_matches(model, valid.tensors)
        record(AREA, f"valid {'folder' if path.is_dir() else 'file'} (control)", "loaded, values exact")


def test_random_bytes_never_crash(tmp_path):
    tally = Tally(AREA, "random bytes (any length, valid-looking length prefix or not)")

    @fuzz_settings(100)
    @given(data=st.one_of(st.binary(max_size=2048),
                          st.builds(lambda n, rest: struct.pack("<Q", n) + rest,
                                    st.integers(0, 300), st.binary(max_size=400))),
           suffix=st.sampled_from([".safetensors", "", ".lora"]))
    def check(data, suffix):
        outcome, message, seconds = try_load(write(tmp_path / f"random{suffix}", data))
        tally.add(outcome, message, seconds)

    check()
    tally.save()


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
)


def mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, where, what in mutations:
        i = where % (len(b) + 1)
        if kind == "flip" and i < len(b):
            b[i] ^= what
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = what
        elif kind == "delete":
            del b[i:i + what]
    return bytes(b)


def test_mutated_kohya_files(tmp_path, valid):
    tally = Tally(AREA, "valid kohya file with random byte flips, truncations, insertions, deletions")

    @fuzz_settings(100)
    @given(mutations=st.lists(MUTATION, min_size=1, max_size=4), near_header=st.booleans())
    def check(mutations, near_header):
        if near_header:  # most structure lives in the first few hundred bytes
            mutations = [(k, w % 600, x) for k, w, x in mutations]
        data = mutate(valid.kohya_bytes, mutations)
        path = write(tmp_path / "mutated.safetensors", data)
        model = SmallModel()
        outcome, message, seconds = try_load(path, model)
        if outcome == "loaded":
            check_loaded_matches(model, safetensors.torch.load_file(path))
        tally.add(outcome, message, seconds)

    check()
    tally.save()


def test_mutated_peft_folders(tmp_path, valid):
    tally = Tally(AREA, "valid PEFT folder with a mutated adapter_model.safetensors")

    @fuzz_settings(60)
    @given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
    def check(mutations):
        folder = tmp_path / "peft"
        write(folder / "adapter_model.safetensors", mutate(valid.peft_bytes, mutations))
        (folder / "adapter_config.json").write_text(json.dumps(valid.peft_config))
        outcome, message, seconds = try_load(folder)
        tally.add(outcome, message, seconds)

    check()
    tally.save()


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=6))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
DTYPES = st.one_of(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "F8_E4M3",
                                    "F8_E5M2", "C64", "U64", "Q4_0", ""]), st.text(max_size=5))
DIMS = st.one_of(st.integers(0, 16), st.integers(-3, 2**70), st.just(2**63 - 1), JSON_SCALARS)
OFFSETS = st.one_of(st.integers(0, 700), st.integers(-2**64, 2**70), JSON_SCALARS)
ENTRY = st.one_of(
    st.fixed_dictionaries({"dtype": DTYPES, "shape": st.one_of(st.lists(DIMS, max_size=9), DIMS),
                           "data_offsets": st.one_of(st.lists(OFFSETS, max_size=3), OFFSETS)}),
    JSON_VALUES)
TENSOR_NAMES = st.one_of(st.sampled_from([f"{n}.{f}" for n in KOHYA_NAMES for f in (*FACTOR_NAMES, "alpha")]),
                         st.text(max_size=30))


def test_crafted_headers(tmp_path):
    """Headers that lie: length far past the file, bad JSON, bad offsets, unknown dtypes, huge shapes."""
    tally = Tally(AREA, "crafted headers: lying length field, non-JSON, wrong types, offsets past the end or "
                        "overlapping, unknown dtypes, huge shapes, odd __metadata__")

    @fuzz_settings(100)
    @given(header=st.dictionaries(TENSOR_NAMES, ENTRY, max_size=5),
           metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=8), st.text(max_size=8)), JSON_VALUES),
           data=st.binary(max_size=700),
           length=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1, 10**8])),
           damage=st.one_of(st.none(), st.tuples(st.integers(0, 10**4), st.integers(1, 255))))
    def check(header, metadata, data, length, damage):
        if metadata is not None:
            header = {**header, "__metadata__": metadata}
        raw = bytearray(json.dumps(header).encode())
        if damage and raw:
            raw[damage[0] % len(raw)] ^= damage[1]
        outcome, message, seconds = try_load(write(tmp_path / "crafted.safetensors",
                                                   raw_safetensors(bytes(raw), data, length)))
        tally.add(outcome, message, seconds)

    check()
    tally.save()


RARELY = st.sampled_from([False] * 9 + [True])  # hypothesis favours the first entries: mostly False


@st.composite
def loha_like_tensors(draw):
    """Well-formed safetensors whose *content* is adversarial: ranks, shapes, dtypes, alphas, values.
    Each fault is drawn rarely, so that a good share of examples load and get checked value by value."""
    names = draw(st.lists(st.one_of(
        st.sampled_from([*KOHYA_NAMES, "lora_unet_blocks_9_to_q", "lycoris_blocks_0_to_k",
                         "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_blocks_0",
                         "lora_unet_blocks_0_to_q_x"]),
        st.text(max_size=12).map(lambda t: "lora_unet_" + t)), min_size=1, max_size=4, unique=True))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tensors = {}
    for name in names:
        out_f, in_f = LINEAR_SHAPES.get(KOHYA_NAMES.get(name), (8, 8))
        rank = draw(st.integers(0, 10)) if draw(RARELY) else draw(st.integers(1, 6))
        natural = {"hada_w1_a": [out_f, rank], "hada_w1_b": [rank, in_f],
                   "hada_w2_a": [out_f, rank], "hada_w2_b": [rank, in_f]}
        for factor, shape in natural.items():
            if draw(RARELY) and draw(RARELY):
                continue  # a missing factor
            if draw(RARELY):
                shape = draw(st.lists(st.integers(0, 10), max_size=3))
            dtype = torch.int32 if draw(RARELY) and draw(RARELY) else draw(
                st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
            t = torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point else \
                torch.randint(-3, 3, shape, generator=gen, dtype=dtype)
            if t.numel() and dtype.is_floating_point and draw(RARELY):
                t.view(-1)[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tensors[f"{name}.{factor}"] = t
        if draw(RARELY):
            alpha = draw(st.one_of(st.none(), st.floats(width=32), st.lists(st.floats(-4, 8), max_size=3)))
        else:
            alpha = draw(st.floats(0.25, 16))
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if draw(RARELY):
        tensors[draw(st.sampled_from(["lora_unet_blocks_0_to_q.lora_down.weight", "stray", "x.hada_t1"]))] = \
            torch.zeros(2)
    return tensors


def test_crafted_tensor_contents(tmp_path):
    """Valid layout, bad meaning: every load either matches the file exactly or is refused."""
    tally = Tally(AREA, "well-formed files with adversarial content: ranks 0-10, shapes that disagree, "
                        "non-float factors, NaN/Inf, alphas of every kind, missing factors, unknown modules")

    @fuzz_settings(100)
    @given(tensors=loha_like_tensors(), allow_nonfinite=st.booleans())
    def check(tensors, allow_nonfinite):
        path = tmp_path / "content.safetensors"
        path.write_bytes(safetensors.torch.save(tensors))
        model = SmallModel()
        outcome, message, seconds = try_load(path, model, allow_nonfinite=allow_nonfinite)
        if outcome == "loaded":
            check_loaded_matches(model, tensors, allow_nonfinite)
        tally.add(outcome, message, seconds)

    check()
    tally.save()


def test_crafted_peft_configs(tmp_path, valid):
    """adapter_config.json comes from strangers too: any JSON in r, alpha and the patterns."""
    tally = Tally(AREA, "crafted adapter_config.json: any JSON for r, alpha, rank_pattern, alpha_pattern, "
                        "peft_type, or not an object at all")
    keys = st.sampled_from(["r", "alpha", "rank_pattern", "alpha_pattern", "peft_type"])
    patterns = st.dictionaries(st.sampled_from(["to_q", "blocks.0.to_k", "(a+)+$", "[", ".*", "to_out.0"]),
                               JSON_SCALARS, max_size=3)

    @fuzz_settings(100)
    @given(changes=st.dictionaries(keys, st.one_of(JSON_VALUES, patterns), max_size=3),
           whole=st.one_of(st.none(), JSON_VALUES))
    def check(changes, whole):
        folder = tmp_path / "peft"
        write(folder / "adapter_model.safetensors", valid.peft_bytes)
        config = {**valid.peft_config, **changes} if whole is None else whole
        (folder / "adapter_config.json").write_text(json.dumps(config))
        outcome, message, seconds = try_load(folder)
        tally.add(outcome, message, seconds)

    check()
    tally.save()


# ----------------------------------------------------------------------------------- named cases
def kohya_with(valid, changes: dict | None = None, drop=()) -> bytes:
    tensors = {k: v.clone() for k, v in valid.tensors.items() if k not in drop}
    tensors.update(changes or {})
    return safetensors.torch.save(tensors)


Q = "lora_unet_blocks_0_to_q"


def _valid_header_and_data(valid):
    n = struct.unpack("<Q", valid.kohya_bytes[:8])[0]
    return json.loads(valid.kohya_bytes[8:8 + n]), valid.kohya_bytes[8 + n:]


def _shift_offsets(valid, how):
    header, data = _valid_header_and_data(valid)
    how(header)
    return raw_safetensors(header, data)


def _overlap(header):  # two tensors of the same size share their bytes
    header[Q + ".hada_w2_a"]["data_offsets"] = list(header[Q + ".hada_w1_a"]["data_offsets"])


def _past_end(header):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"] = [header[last]["data_offsets"][0] + 4, header[last]["data_offsets"][1] + 4]


def _set(key, field, value):
    def change(header):
        header[key][field] = value
    return change


NAMED_FILES = {
    # case: (file bytes from `valid`, words the message must contain)
    "empty file": (lambda v: b"", "only 0 bytes"),
    "7 bytes": (lambda v: b"\x01" * 7, "only 7 bytes"),
    "random bytes (1 KiB)": (lambda v: bytes(torch.randint(0, 256, (1024,), generator=torch.Generator()
                                                          .manual_seed(3), dtype=torch.uint8).tolist()),
                             "not safetensors"),
    "truncated inside the length field": (lambda v: v.kohya_bytes[:5], "not a safetensors"),
    "truncated inside the header": (lambda v: v.kohya_bytes[:100], "truncated"),
    "truncated inside the tensor data": (lambda v: v.kohya_bytes[:len(v.kohya_bytes) - 100], "truncated"),
    "truncated by one byte": (lambda v: v.kohya_bytes[:-1], "truncated"),
    "header length 2**63 in a small file": (lambda v: raw_safetensors(b"{}", b"", 2**63), "header claims"),
    "header length 2**64-1": (lambda v: raw_safetensors(b"{}", b"", 2**64 - 1), "header claims"),
    "header length 100 MB + 1 (over the cap) in a small file": (lambda v: raw_safetensors(b"{}", b"", 10**8 + 1),
                                                                 "header claims"),
    "header is not JSON": (lambda v: raw_safetensors(b"{not json"), "not JSON"),
    "header is not UTF-8": (lambda v: raw_safetensors(b'{"\xff\xfe": 1}'), "not JSON"),
    "header is a JSON array": (lambda v: raw_safetensors(b"[1, 2]"), "not a JSON object"),
    "header nested 100,000 deep": (lambda v: raw_safetensors(b"[" * 100_000), "not JSON"),
    "__metadata__ not string to string": (lambda v: raw_safetensors({"__metadata__": {"a": 1}}), "__metadata__"),
    "tensor entry with missing fields": (lambda v: raw_safetensors({Q + ".alpha": {"dtype": "F32"}}), "malformed"),
    "tensor offsets overlap": (lambda v: _shift_offsets(v, _overlap), "overlap"),
    "tensor offsets past the end": (lambda v: _shift_offsets(v, _past_end), "past the end"),
    "negative tensor offsets": (lambda v: _shift_offsets(v, _set(Q + ".alpha", "data_offsets", [-4, 0])),
                                "past the end"),
    "offsets that disagree with the shape": (lambda v: _shift_offsets(v, _set(Q + ".hada_w1_a", "shape", [8, 3])),
                                             "holds"),
    "unknown dtype F8_E4M3": (lambda v: _shift_offsets(v, _set(Q + ".alpha", "dtype", "F8_E4M3")), "dtype"),
    "unknown dtype Q4_0": (lambda v: _shift_offsets(v, _set(Q + ".alpha", "dtype", "Q4_0")), "dtype"),
    "huge shape 2**62 x 2**62 with no data": (
        lambda v: raw_safetensors({Q + ".hada_w1_a": {"dtype": "F32", "shape": [2**62, 2**62],
                                                      "data_offsets": [0, 0]}}), "holds"),
    "very large claimed rank (10**6) with no data": (
        lambda v: raw_safetensors({Q + ".hada_w1_b": {"dtype": "F32", "shape": [10**6, 8],
                                                      "data_offsets": [0, 4 * 8 * 10**6]}}), "past the end"),
    "rank larger than the layer (9 for 6->8)": (
        lambda v: kohya_with(v, {f"lora_unet_blocks_0_to_k.{f}": torch.ones(s) for f, s in
                                 zip(FACTOR_NAMES, [(8, 9), (9, 6), (8, 9), (9, 6)])}), "implausible"),
    "factor ranks disagree (w1_a r=2, w1_b r=3)": (lambda v: kohya_with(v, {Q + ".hada_w1_b": torch.ones(3, 8)}),
                                                   "disagree"),
    "factor of 3 dimensions": (lambda v: kohya_with(v, {Q + ".hada_w2_a": torch.ones(8, 2, 1)}), "disagree"),
    "factor shapes disagree with the base model (16 out, layer has 8)": (
        lambda v: kohya_with(v, {Q + ".hada_w1_a": torch.ones(16, 2), Q + ".hada_w2_a": torch.ones(16, 2)}),
        "different base model"),
    "integer factors": (lambda v: kohya_with(v, {Q + ".hada_w1_a": torch.ones(8, 2, dtype=torch.int32)}),
                        "non-float"),
    "alpha zero": (lambda v: kohya_with(v, {Q + ".alpha": torch.tensor(0.0)}), "alpha must be"),
    "alpha negative": (lambda v: kohya_with(v, {Q + ".alpha": torch.tensor(-4.0)}), "alpha must be"),
    "alpha NaN": (lambda v: kohya_with(v, {Q + ".alpha": torch.tensor(math.nan)}), "alpha must be"),
    "alpha Inf": (lambda v: kohya_with(v, {Q + ".alpha": torch.tensor(math.inf)}), "alpha must be"),
    "alpha non-scalar (shape [2])": (lambda v: kohya_with(v, {Q + ".alpha": torch.tensor([1.0, 2.0])}),
                                     "non-scalar"),
    "alpha missing": (lambda v: kohya_with(v, drop=[Q + ".alpha"]), "no alpha"),
    "NaN factor value": (lambda v: kohya_with(v, {Q + ".hada_w1_a": torch.full((8, 2), math.nan)}), "NaN/Inf"),
    "Inf factor value": (lambda v: kohya_with(v, {Q + ".hada_w2_b": torch.full((2, 8), -math.inf)}), "NaN/Inf"),
    "missing key (hada_w2_b of one module)": (lambda v: kohya_with(v, drop=[Q + ".hada_w2_b"]), "missing"),
    "extra key with an unknown suffix": (lambda v: kohya_with(v, {Q + ".scale": torch.ones(1)}), "unexpected keys"),
    "extra LoRA key (lora_down)": (lambda v: kohya_with(v, {Q + ".lora_down.weight": torch.ones(2, 8)}), "LoRA"),
    "extra module without a known prefix": (
        lambda v: kohya_with(v, {f"model_x.{f}": t for f, t in
                                 ((f, v.tensors[f"{Q}.{f}"]) for f in (*FACTOR_NAMES, "alpha"))}),
        "known prefixes"),
    "module the model does not have (blocks_7)": (
        lambda v: kohya_with(v, {f"lora_unet_blocks_7_to_q.{f}": v.tensors[f"{Q}.{f}"]
                                 for f in (*FACTOR_NAMES, "alpha")}), "do not exist"),
    "module that is not a Linear (blocks_0)": (
        lambda v: kohya_with(v, {f"lora_unet_blocks_0.{f}": v.tensors[f"{Q}.{f}"] for f in (*FACTOR_NAMES, "alpha")}),
        "not Linear"),
    "tensor name with a newline and a terminal escape": (
        lambda v: kohya_with(v, {f"lora_unet_x\ny\x1b[2J.{f}": v.tensors[f"{Q}.{f}"]
                                 for f in (*FACTOR_NAMES, "alpha")}),
        "control characters"),
    "text-encoder weights loaded into one model": (
        lambda v: kohya_with(v, {f"lora_te1_blocks_0_to_q.{f}": v.tensors[f"{Q}.{f}"]
                                 for f in (*FACTOR_NAMES, "alpha")}), "pass the pipeline"),
}


@pytest.mark.parametrize("case", NAMED_FILES)
def test_named_bad_file(case, tmp_path, valid):
    make, expected_words = NAMED_FILES[case]
    path = write(tmp_path / "adapter.safetensors", make(valid))
    outcome, message, _ = try_load(path)
    record(AREA, case, f"{outcome}: {message}" if message else outcome)
    assert outcome == "refused"
    assert expected_words.lower() in message.lower(), message


def test_nonfinite_factors_allowed_only_with_the_flag(tmp_path, valid):
    nan_w1a = torch.full((8, 2), math.nan)
    path = write(tmp_path / "nan.safetensors", kohya_with(valid, {Q + ".hada_w1_a": nan_w1a}))
    outcome, message, _ = try_load(path)
    assert outcome == "refused" and "NaN" in message
    model = SmallModel()
    outcome, message, _ = try_load(path, model, allow_nonfinite=True)
    assert outcome == "loaded", message
    layer = loha.adapter_modules(model)["blocks.0.to_q"]
    assert torch.isnan(layer.hada_w1_a).all()
    assert torch.equal(loha.adapter_modules(model)["blocks.1.to_q"].hada_w1_a,
                       valid.tensors["lora_unet_blocks_1_to_q.hada_w1_a"])
    record(AREA, "NaN factors with allow_nonfinite=True", "loaded as asked, the NaN values kept as they are")


PEFT_CONFIG_CASES = {
    "config alpha zero": ({"alpha": 0}, "alpha"),
    "config alpha negative": ({"alpha": -1.5}, "alpha"),
    "config alpha a string": ({"alpha": "8"}, "alpha"),
    "config alpha a list (non-scalar)": ({"alpha": [8]}, "alpha"),
    "config alpha 1e400 (inf)": ({"alpha": 1e400}, "alpha"),
    "config alpha 10**400": ({"alpha": 10**400}, "alpha"),
    "config r larger than the factors (10**9)": ({"r": 10**9}, "config says r"),
    "config r a float": ({"r": 2.5}, "r="),
    "config alpha_pattern a list": ({"alpha_pattern": [1]}, "alpha_pattern"),
    "config rank_pattern with a bad regex": ({"rank_pattern": {"(": 2}}, "rank_pattern"),
    "config peft_type LORA": ({"peft_type": "LORA"}, "not LOHA"),
}


@pytest.mark.parametrize("case", PEFT_CONFIG_CASES)
def test_named_bad_peft_config(case, tmp_path, valid):
    changes, expected_words = PEFT_CONFIG_CASES[case]
    folder = tmp_path / "peft"
    write(folder / "adapter_model.safetensors", valid.peft_bytes)
    (folder / "adapter_config.json").write_text(json.dumps({**valid.peft_config, **changes}))
    outcome, message, _ = try_load(folder)
    record(AREA, case, f"{outcome}: {message}" if message else outcome)
    assert outcome == "refused"
    assert expected_words in message, message


def test_regex_backtracking_pattern_is_refused_quickly(tmp_path, valid):
    """A rank_pattern like (a+)+$ against a module named aaaa…! backtracks for hours if evaluated."""
    folder = tmp_path / "peft"
    tensors = safetensors.torch.load_file(valid.peft / "adapter_model.safetensors")
    evil = "base_model.model." + "a" * 40 + "!"
    tensors.update({f"{evil}.{f}": tensors[f"base_model.model.blocks.0.to_q.{f}"].clone() for f in FACTOR_NAMES})
    write(folder / "adapter_model.safetensors", safetensors.torch.save(tensors))
    (folder / "adapter_config.json").write_text(json.dumps({**valid.peft_config, "rank_pattern": {"(a+)+$": 2}}))
    outcome, message, seconds = try_load(folder)
    record(AREA, "rank_pattern (a+)+$ with a module named a*40 + '!' (ReDoS)",
           f"{outcome} in {seconds:.3f} s: {message}")
    assert outcome == "refused" and "rank_pattern" in message and seconds < 1


@pytest.mark.parametrize("low_bytes", [b"\x80", b"PK"], ids=["0x80", "PK"])
def test_valid_file_whose_length_field_looks_like_pickle_magic_loads(low_bytes, tmp_path, valid):
    """The header length is little-endian, so 1 valid file in 256 starts with pickle's 0x80 byte."""
    def export(pad):
        return loha.export_kohya(valid.model, tmp_path / "k.safetensors", metadata={"pad": "x" * pad}).read_bytes()

    modulus = 1 << (8 * len(low_bytes))  # each pad character adds one header byte (before 8-byte alignment)
    guess = (int.from_bytes(low_bytes, "little") - struct.unpack("<Q", export(0)[:8])[0]) % modulus
    assert any(export(pad).startswith(low_bytes) for pad in range(max(0, guess - 8), guess + 9))
    model = SmallModel()
    outcome, message, _ = try_load(tmp_path / "k.safetensors", model)
    record(AREA, f"valid file whose length field starts with {low_bytes!r} (pickle/zip magic)",
           f"{outcome}{': ' + message if message else ''}")
    assert outcome == "loaded", message
    check_loaded_matches(model, valid.tensors)


def test_peft_folder_config_edge_cases(tmp_path, valid):
    cases = {
        "directory missing adapter_config.json": ({"adapter_model.safetensors": valid.peft_bytes}, "has no"),
        "directory with only adapter_config.json": ({"adapter_config.json": b"{}"}, "has no"),
        "adapter_config.json not JSON": ({"adapter_model.safetensors": valid.peft_bytes,
                                          "adapter_config.json": b"{"}, "not valid JSON"),
        "adapter_config.json nested 100,000 deep": ({"adapter_model.safetensors": valid.peft_bytes,
                                                     "adapter_config.json": b"[" * 100_000}, "not valid JSON"),
        "empty directory": ({}, "holds no adapter"),
        "checkpoint dir whose unet/ lacks its config": ({"unet/adapter_model.safetensors": valid.peft_bytes},
                                                        "has no"),
        "PEFT folder with only adapter_model.bin (a pickle)": ({"adapter_config.json": json.dumps(
            valid.peft_config).encode(), "adapter_model.bin": pickle.dumps({"x": 1})}, "pickle"),
        "bare adapter_model.safetensors with no config beside it": (None, "alpha is unknown"),
    }
    for case, (files, expected_words) in cases.items():
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        if files is None:
            target = write(folder / "adapter_model.safetensors", safetensors.torch.save(
                safetensors.torch.load_file(valid.peft / "adapter_model.safetensors")))  # no loha.config metadata
        else:
            for name, data in files.items():
                write(folder / name, data)
            target = folder
        outcome, message, _ = try_load(target)
        record(AREA, case, f"{outcome}: {message}")
        assert outcome == "refused" and expected_words in message, (case, message)


def test_special_paths(tmp_path, valid):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    loop_inside = tmp_path / "dir_with_loop"
    loop_inside.mkdir()
    (loop_inside / "adapter_config.json").write_text(json.dumps(valid.peft_config))
    (loop_inside / "adapter_model.safetensors").symlink_to(loop_inside / "adapter_model.safetensors")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening a FIFO for reading blocks forever: it must not be opened
    device = tmp_path / "zero.safetensors"
    device.symlink_to("/dev/zero")
    cases = {"symlink loop (to itself)": (loop, "cannot open"), "symlink loop (a -> b -> a)": (a, "cannot open"),
             "folder whose weights file is a symlink loop": (loop_inside, "has no adapter_model.safetensors"),
             "a named pipe (FIFO)": (fifo, "not a regular file"),
             "a symlink to /dev/zero": (device, "not a regular file"),
             "a path that does not exist": (tmp_path / "missing.safetensors", "cannot open")}
    for case, (path, expected_words) in cases.items():
        outcome, message, seconds = try_load(path)
        record(AREA, case, f"{outcome}: {message}")
        assert outcome == "refused" and expected_words in message, (case, message)
        assert seconds < LOAD_SECONDS


# ----------------------------------------------------------------------------------- pickles
class MakesMarker:
    """Unpickling this creates ``marker``: proof that a loader ran pickle on the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def pickle_payloads(tmp_path):
    """{format: bytes} of live payloads; the test checks first that each really creates the marker."""
    marker = tmp_path / "PWNED"
    payloads = {"pickle protocol 0": pickle.dumps(MakesMarker(marker), protocol=0),
                "pickle protocol 4": pickle.dumps(MakesMarker(marker), protocol=4)}
    torch.save({"state_dict": MakesMarker(marker)}, tmp_path / "payload.pt")
    payloads["torch.save zip"] = (tmp_path / "payload.pt").read_bytes()
    return marker, payloads


def _payload_is_live(marker, data: bytes, tmp_path) -> bool:
    if data.startswith(b"PK"):
        write(tmp_path / "probe.pt", data)
        torch.load(tmp_path / "probe.pt", weights_only=False)
    else:
        pickle.loads(data)
    live = marker.exists()
    marker.unlink(missing_ok=True)
    return live


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth", ".safetensors", ""])
def test_pickles_are_refused_without_unpickling(suffix, tmp_path, pickle_payloads, monkeypatch):
    marker, payloads = pickle_payloads

    def opened(*args, **kwargs):
        raise Hang("pickle was opened")  # BaseException: cannot be mistaken for a refusal

    for fmt, data in payloads.items():
        assert _payload_is_live(marker, data, tmp_path), f"the {fmt} payload is not live; the test proves nothing"
        with monkeypatch.context() as m:
            for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
                m.setattr(module, name, opened)
            outcome, message, _ = try_load(write(tmp_path / f"model{suffix}", data))
        record(AREA, f"{fmt} payload named *{suffix or ' (no suffix)'}",
               f"{outcome}: {message}; marker file created: {marker.exists()}")
        assert outcome == "refused" and not marker.exists()


# ----------------------------------------------------------------------------------- the real UNet
def test_tiny_sdxl_unet_fit_checks(tmp_path):
    """On the tiny SDXL UNet (SGM names): a right file loads, wrong shapes and a foreign model's file don't."""
    from loha.tiny_sdxl import tiny_unet

    source = tiny_unet()
    loha.inject(source, rank=2)
    file = loha.export_kohya(source, tmp_path / "unet.safetensors")
    tensors = safetensors.torch.load_file(file)
    unet = tiny_unet()
    assert try_load(file, unet)[0] == "loaded"

    name = next(k[:-len(".hada_w1_b")] for k in tensors if k.endswith("attn2_to_k.hada_w1_b"))
    wrong_in = {**tensors, f"{name}.hada_w1_b": torch.ones(2, 7), f"{name}.hada_w2_b": torch.ones(2, 7)}
    small_file = loha.export_kohya(trained_small_model(), tmp_path / "small.safetensors")
    cases = {"SDXL kohya file whose attn2.to_k expects another text width": (
                 write(tmp_path / "wrong.safetensors", safetensors.torch.save(wrong_in)), "different base model"),
             "a LoHa for another model loaded into the SDXL UNet": (small_file, "do not exist")}
    for case, (path, expected_words) in cases.items():
        outcome, message, _ = try_load(path, tiny_unet())
        record(AREA, case, f"{outcome}: {message}")
        assert outcome == "refused" and expected_words in message, message


# ----------------------------------------------------------------------------------- infer.py
INFER = REPO / "infer.py"


@pytest.mark.skipif(not INFER.exists(), reason="infer.py is not written yet")
@pytest.mark.parametrize("case", ["truncated by one byte", "pickle", *(
    pytest.param(c, marks=pytest.mark.slow) for c in ("alpha NaN", "module the model does not have (blocks_7)",
                                                      "symlink loop"))])
def test_infer_cli_refuses_bad_files(case, tmp_path, valid, tiny_pipeline_dir, pickle_payloads):
    marker, payloads = pickle_payloads
    if case == "pickle":
        path, expected_words = write(tmp_path / "adapter.ckpt", payloads["torch.save zip"]), "pickle"
    elif case == "symlink loop":
        path, expected_words = tmp_path / "loop.safetensors", "symlink that leads nowhere"
        path.symlink_to(path)
    else:
        make, expected_words = NAMED_FILES[case]
        path = write(tmp_path / "adapter.safetensors", make(valid))
    out = tmp_path / "out"
    cmd = [sys.executable, str(INFER), "--checkpoint", str(path), "--pretrained_model_name_or_path",
           str(tiny_pipeline_dir), "--prompt", "a cat", "--num_inference_steps", "1", "--device", "cpu",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    label = "a LoHa made for another model" if case.startswith("module the model") else case
    record("infer.py", f"infer.py --checkpoint given: {label}", f"exit {proc.returncode}: {last}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("error: ") and expected_words.lower() in last.lower(), proc.stderr
    assert not marker.exists()
    assert not list(out.glob("*.png"))


# ------------------------------------------------------------------- size bombs, absurd scales, ambiguity
def _many_tiny_tensors(count: int) -> bytes:
    header = {f"lora_unet_blocks_0_to_q_{i}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(count)}
    return raw_safetensors(header, bytes(4 * count))


BOMBS = {  # case: (file bytes, words of the refusal)
    "200,000 tiny tensors (a valid file)": (lambda v: _many_tiny_tensors(200_000), "refused as a size bomb"),
    "an 85 MiB header": (lambda v: raw_safetensors(b"{" + b" " * (85 << 20) + b"}"), "refused as a size bomb"),
}


@pytest.mark.parametrize("case", BOMBS)
def test_size_bombs_are_refused_from_the_header_in_well_under_a_second(case, tmp_path, valid):
    """Bounds: 16 MiB of header and 50,000 tensors, 7-16x the largest real adapter (ComfyUI's full trainer
    output on SDXL: about 7,000 tensors, a 1 MiB header)."""
    make, words = BOMBS[case]
    path = write(tmp_path / "bomb.safetensors", make(valid))
    outcome, message, seconds = try_load(path)
    assert outcome == "refused" and words in message and seconds < 0.5, (message, seconds)
    record(AREA, case, f"refused in {seconds * 1e3:.0f} ms: {message}")


def _scaled_alpha(valid, alpha, dtype=torch.float32):
    return kohya_with(valid, {f"{name}.alpha": torch.tensor(alpha, dtype=dtype) for name in KOHYA_NAMES})


ABSURD = {
    "alpha 1e30 (every module)": (lambda v: _scaled_alpha(v, 1e30), "which drowns the model or overflows"),
    "alpha 1e300 stored as F64": (lambda v: _scaled_alpha(v, 1e300, torch.float64), "drowns the model or overflows"),
    "one module named twice (kohya and LyCORIS names)": (
        lambda v: kohya_with(v, {f"lycoris_blocks_0_to_q.{f}": v.tensors[f"{Q}.{f}"].clone()
                                 for f in (*FACTOR_NAMES, "alpha")}),
        "names the module blocks.0.to_q twice"),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_scales_and_duplicate_names_are_refused(case, tmp_path, valid):
    make, words = ABSURD[case]
    outcome, message, _ = try_load(write(tmp_path / "a.safetensors", make(valid)))
    assert outcome == "refused" and words in message, message
    record(AREA, case, f"refused: {message}")


def test_a_strong_but_sane_scale_still_loads(tmp_path, valid):
    """The magnitude bound refuses only the absurd: alpha 100 at rank 2 (scale 50) loads."""
    outcome, message, _ = try_load(write(tmp_path / "s.safetensors", _scaled_alpha(valid, 100.0)))
    assert outcome == "loaded", message


@pytest.mark.skipif(not INFER.exists(), reason="infer.py is not written yet")
def test_infer_writes_no_image_from_non_finite_latents(tmp_path, tiny_pipeline_dir, monkeypatch):
    """Latents that turn NaN mid-sampling (an adapter that passes every check but blows up in this dtype)
    stop infer.py with one line before anything is decoded or written."""
    import infer

    model = loha.tiny_sdxl.tiny_unet()
    loha.inject(model, rank=2)
    adapter = loha.export_kohya(model, tmp_path / "a.safetensors")
    original = infer.load_pipeline

    def blowing_up(*args, **kwargs):
        pipe = original(*args, **kwargs)
        calls = []

        def nan_on_second_call(module, inputs, output):
            calls.append(1)
            return (output[0] * float("nan"),) if len(calls) == 2 else output

        pipe.unet.register_forward_hook(nan_on_second_call)
        return pipe

    monkeypatch.setattr(infer, "load_pipeline", blowing_up)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(adapter), "--pretrained_model_name_or_path", str(tiny_pipeline_dir),
                    "--prompt", "a cat", "--num_inference_steps", "3", "--output_dir", str(out)])
    assert e.value.code.startswith("error: the latents became NaN/Inf at sampling step 2 of 3") \
        and "no image was written" in e.value.code
    assert not list(out.glob("*.png"))
    record("infer.py", "latents turn NaN at sampling step 2 of 3", f"exit 1: {e.value.code}; no PNG written")


@pytest.mark.skipif(not INFER.exists(), reason="infer.py is not written yet")
def test_infer_checks_its_output_folder_before_loading_any_model(tmp_path, valid, monkeypatch):
    import infer

    monkeypatch.setattr(infer, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model first"))
    (tmp_path / "file").write_text("a regular file")
    with pytest.raises(SystemExit) as e:
        infer.main(["--checkpoint", str(valid.kohya), "--prompt", "x", "--output_dir", str(tmp_path / "file" / "o"),
                    "--pretrained_model_name_or_path", str(tmp_path)])
    assert e.value.code.startswith(f"error: cannot write into --output_dir {tmp_path / 'file' / 'o'}")
    record("infer.py", "--output_dir that cannot be written", f"exit 1 before any model loads: {e.value.code}")
