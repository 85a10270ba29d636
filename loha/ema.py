"""An exponential moving average of the LoHa factors, by diffusers' ``EMAModel`` (its decay warms up as
(1 + n)/(10 + n), capped at ``decay``, after a first update that copies), saved and restored without
pickles: the averages as a safetensors file, the counters as JSON."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .formats import read_safetensors, write_safetensors
from .layer import LoHaError

WEIGHTS, STATE = "ema.safetensors", "ema.json"


class FactorEMA:
    """The EMA of ``params`` (the tensors the optimizer updates: stacked or per layer, elementwise either way)."""

    def __init__(self, params, decay: float):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.ema = EMAModel(self.params, decay=decay, foreach=True)

    def step(self):
        self.ema.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged factors in the model for the body (exports, sample images); the trained ones after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save(self, folder: Path):
        state = self.ema.state_dict()
        tensors = {f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(state.pop("shadow_params"))}
        write_safetensors(Path(folder) / WEIGHTS, tensors)
        (Path(folder) / STATE).write_text(json.dumps(state))

    def load(self, folder: Path):
        folder = Path(folder)
        try:
            state = json.loads((folder / STATE).read_text())
            tensors, _ = read_safetensors(folder / WEIGHTS)
        except (OSError, ValueError) as e:
            raise LoHaError(f"cannot resume from {folder}: its EMA state is missing or damaged "
                            f"({getattr(e, 'strerror', None) or e}); it was saved without --use_ema?") from None
        shadow = [tensors.get(f"shadow.{i}") for i in range(len(self.params))]
        if len(tensors) != len(self.params) or any(
                s is None or s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise LoHaError(f"cannot resume from {folder}: its EMA state does not fit this run's adapters")
        with torch.no_grad():
            for s, p in zip(self.ema.shadow_params, shadow):
                s.copy_(p)
        for key in ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                    "power"):
            setattr(self.ema, key, state[key])
