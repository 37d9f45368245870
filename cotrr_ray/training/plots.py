"""Reliability diagrams for calibration reports (PNG via the headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cotrr_ray.core.metrics import reliability_curve


def _legend_label(name: str, metrics: dict[str, dict] | None) -> str:
    if not metrics or name not in metrics:
        return name
    m = metrics[name]
    parts = []
    ece_value = m.get("ece_equal_width", m.get("ece"))
    if ece_value is not None:
        parts.append(f"ECE={float(ece_value):.3f}")
    if m.get("brier") is not None:
        parts.append(f"Brier={float(m['brier']):.3f}")
    return f"{name} ({', '.join(parts)})" if parts else name


def reliability_diagram(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    title: str,
    n_bins: int = 15,
    metrics: dict[str, dict] | None = None,
) -> Path:
    """Draw a reliability diagram with a histogram of predictions and save it as PNG.

    Parameters
    ----------
    curves : dict
        Label (e.g. ``"raw sigmoid"``, ``"calibrated"``) -> ``(probs, labels01)``.
    path : str or Path
        Output PNG path; parent directories are created.
    title : str
        Figure title.
    n_bins : int
        Number of equal-width bins on [0, 1].
    metrics : dict, optional
        Label -> `calibration_report`-style dict; its ``ece_equal_width`` (or ``ece``) and
        ``brier`` are shown in the legend.

    Returns
    -------
    Path
        The written file.
    """
    if not curves:
        raise ValueError("curves is empty; nothing to plot")
    # Deferred so importing this module stays cheap; force=False keeps a backend a caller chose.
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(6.0, 7.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    try:
        ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1, label="perfect")
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        for name, (probs, labels01) in curves.items():
            mean_pred, frac_pos, _ = reliability_curve(probs, labels01, n_bins, "uniform")
            label = _legend_label(name, metrics)
            (line,) = ax.plot(mean_pred, frac_pos, marker="o", markersize=4, label=label)
            probs_arr = np.asarray(probs, dtype=np.float64)
            ax_hist.hist(probs_arr, bins=edges, histtype="step", color=line.get_color())
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("fraction of positives")
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
        ax_hist.set_xlabel("predicted probability")
        ax_hist.set_ylabel("count")
        ax_hist.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, dpi=120, format="png")
    finally:
        # Figures are global pyplot state; leaking them grows memory in long evaluation jobs.
        plt.close(fig)
    return out
