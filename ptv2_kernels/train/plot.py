"""The per-epoch curve of a run: training loss and the dev metric."""

from __future__ import annotations


def plot_history(history: list, metric: str, path, title: str = "") -> bool:
    """Draw train loss (left axis) and dev ``metric`` (right axis) per epoch into ``path`` (PNG).
    Returns False (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [h["epoch"] for h in history]
    loss = [h.get("train_loss") for h in history]
    dev = [h.get("dev", {}).get(metric) for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(epochs, loss, "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, dev, "s-", color="tab:orange", label=f"dev {metric}")
    ax2.set_ylabel(f"dev {metric}", color="tab:orange")
    best = max(range(len(dev)), key=lambda i: dev[i] if dev[i] is not None else float("-inf")) if dev else None
    if best is not None and dev[best] is not None:
        ax2.axvline(epochs[best], color="gray", ls=":", lw=1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
