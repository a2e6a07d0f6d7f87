"""Training curves as a PNG: loss and accuracy per epoch, train and validation, kept epoch marked.

Drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no
global figure state, no display needed, safe in threads and on servers.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any


def render_curves(history: Sequence[Mapping[str, Any]], kept_epoch: int | None = None) -> bytes:
    """PNG bytes of the curves in ``history`` (one mapping per epoch with ``epoch``,
    ``train_loss``, ``val_loss``, ``train_accuracy``, ``val_accuracy``).

    Training figures are running means over the epoch's (augmented) batches, with the label
    smoothing of the run; validation figures are of the model at the epoch's end, unsmoothed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, metric, label in (
        (loss_axes, "loss", "cross-entropy (train: with label smoothing)"),
        (accuracy_axes, "accuracy", "accuracy"),
    ):
        axes.plot(epochs, [row[f"train_{metric}"] for row in history], label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], label="validation")
        if kept_epoch is not None:
            axes.axvline(
                kept_epoch, color="grey", linestyle=":", label=f"kept (epoch {kept_epoch})"
            )
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
