"""Training metrics as files people look at: ``metrics.jsonl`` and a loss-curve PNG."""

from __future__ import annotations

import io
import json


def history_jsonl(history: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in history)


def loss_curve_png(history: list[dict], title: str = "loss") -> bytes:
    """Train (and validation, where measured) loss against step, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train")
    val = [r for r in history if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
