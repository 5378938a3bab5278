#!/usr/bin/env python3
"""Draw loss_curve.png from a training_log.csv written by train_glm4_moe_tiny.py.

    python3 training/plot_loss.py models/glm4-moe-tiny/training_log.csv models/glm4-moe-tiny/loss_curve.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = list(csv.DictReader(open(src)))
    tok = [int(r["tokens"]) / 1e6 for r in rows]
    train = [float(r["train_loss"]) for r in rows]
    vio = [float(r["max_vio"]) for r in rows]
    val = [(int(r["tokens"]) / 1e6, float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(tok, train, label="train (mean over 50 steps)")
    ax.plot(*zip(*val), "o-", label="validation (81 held-out files, 374k tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(1.0, 5.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("glm4-moe-tiny on the CPython 3.13 standard library")
    ax2.plot(tok, vio, color="tab:green")
    ax2.set_ylabel("MaxVio")
    ax2.set_xlabel("training tokens (millions)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
