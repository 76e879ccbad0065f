"""Accuracy curves of RL runs as a PNG (matplotlib, optional)."""
from __future__ import annotations


def plot_accuracy(curves: dict, path: str, title: str, log=print) -> bool:
    """curves: label -> (steps, values[, lower, upper]). Writes a PNG; False (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib not installed: no {path} (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        line, = ax.plot(curve[0], curve[1], label=label)
        if len(curve) == 4:
            ax.fill_between(curve[0], curve[2], curve[3], alpha=0.15, color=line.get_color())
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (sampled, T=1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
