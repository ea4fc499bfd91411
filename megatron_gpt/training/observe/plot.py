"""The loss curve a user looks at first: loss, validation loss and lr against step."""

from __future__ import annotations

import json
import os
from pathlib import Path


def plot_metrics(metrics_path: Path, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "val_loss" in r]
    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss", color="tab:blue")
    if valid:
        loss_axis.plot([r["step"] for r in valid], [r["val_loss"] for r in valid], "o-", label="validation loss",
                       color="tab:orange")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss (nats/token)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], label="lr", color="tab:gray", alpha=0.6)
    lr_axis.set_ylabel("learning rate")
    handles = loss_axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    loss_axis.legend(handles, [h.get_label() for h in handles], loc="upper right")
    loss_axis.set_title(metrics_path.parent.name)
    figure.tight_layout()
    temporary = output.with_suffix(f".tmp{os.getpid()}.png")
    figure.savefig(temporary)
    plt.close(figure)
    os.replace(temporary, output)
    return output
