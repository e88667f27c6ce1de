"""The per-epoch curve of a run: training loss and the dev metric."""

from __future__ import annotations

from typing import Optional


def draw_history(history: list, metric: str, title: str = "", baseline: Optional[float] = None):
    """A figure of train loss (left axis) and dev ``metric`` (right axis) per evaluation, with whole
    epochs on the x axis (evaluations between epochs sit between ticks), the best evaluation marked and
    ``baseline`` (the most frequent training label's score) drawn across. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    loss = [h.get("train_loss") for h in history]
    dev = [h.get("dev", {}).get(metric) for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(epochs, loss, "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a 2-epoch run reads 1, 2, not 1.0, 1.2, ... 2.0
    ax.set_ylabel("train loss (mean per step)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epochs, dev, "s-", color="tab:orange", label=f"dev {metric}")
    ax2.set_ylabel(f"dev {metric}", color="tab:orange")
    if baseline is not None:
        ax2.axhline(baseline, color="tab:orange", ls="--", lw=1, label=f"baseline {baseline:.4f} (most frequent label)")
    best = max(range(len(dev)), key=lambda i: dev[i] if dev[i] is not None else float("-inf")) if dev else None
    if best is not None and dev[best] is not None:
        ax2.axvline(epochs[best], color="gray", ls=":", lw=1, label=f"best: epoch {epochs[best]:g}")
    ax.set_title(f"{title}: train loss and dev {metric}" if title else f"train loss and dev {metric}")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax2.legend(handles=handles, loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def plot_history(history: list, metric: str, path, title: str = "", baseline: Optional[float] = None) -> bool:
    """Draw :func:`draw_history` into ``path`` (PNG). Returns False (and draws nothing) when
    matplotlib is missing."""
    fig = draw_history(history, metric, title, baseline)
    if fig is None:
        return False
    import matplotlib.pyplot as plt
    fig.savefig(path)
    plt.close(fig)
    return True
