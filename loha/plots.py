"""loss.png: the training loss (raw, faint, and smoothed) and the validation loss against the step, a picture a
person reads at a glance."""

from __future__ import annotations

import io
from pathlib import Path

from .formats import atomic_write_bytes


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    out, average = [], 0.0
    for n, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** n))
    return out


def loss_plot(file, train: list[tuple[int, float]], validation: list[tuple[int, float]], title: str = "") -> Path:
    """Write the plot to ``file`` (atomically) from (step, loss) pairs; non-finite losses are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none is touched
    from matplotlib.figure import Figure

    finite = lambda pairs: [(s, v) for s, v in pairs if v == v and abs(v) != float("inf")]
    train, validation = finite(train), finite(validation)
    figure = Figure(figsize=(8, 4.5), dpi=100)
    axes = figure.add_subplot()
    if train:
        steps, values = zip(*train)
        axes.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss")
        axes.plot(steps, smoothed(list(values)), color="tab:blue", linewidth=1.8, label="training loss (smoothed)")
    if validation:
        steps, values = zip(*validation)
        axes.plot(steps, values, color="tab:orange", marker="o", linewidth=1.8, label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if train or validation:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    atomic_write_bytes(file, buffer.getvalue())
    return Path(file)
