from __future__ import annotations

import numpy as np

from cotrr_ray.core.metrics import calibration_report, sigmoid
from cotrr_ray.training.plots import reliability_diagram


def test_reliability_diagram_writes_png(tmp_path) -> None:
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=2000)
    labels = (rng.uniform(size=logits.size) < sigmoid(logits / 3.0)).astype(float)
    raw = sigmoid(logits)
    calibrated = sigmoid(logits / 3.0)
    curves = {"raw sigmoid": (raw, labels), "calibrated": (calibrated, labels)}
    metrics = {name: calibration_report(p, y) for name, (p, y) in curves.items()}
    open_before = len(plt.get_fignums())

    out = reliability_diagram(curves, tmp_path / "sub" / "rel.png", title="test", metrics=metrics)

    assert out == tmp_path / "sub" / "rel.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert len(plt.get_fignums()) == open_before  # figure closed
