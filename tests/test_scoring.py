"""The inference precision rule (cotrr_ray.core.scoring.inference_amp) and the Scorer's use of it."""

from __future__ import annotations

import pytest
import torch

from cotrr_ray.core.scoring import inference_amp
from cotrr_ray.serving.scorer import ScorerCore


@pytest.mark.parametrize(
    ("cuda", "bf16", "expected"),
    [(False, False, ("cpu", "none")), (True, True, ("cuda", "bf16")), (True, False, ("cuda", "fp16"))],
)
def test_the_scorer_serves_at_the_inference_amp_of_its_device(monkeypatch, cuda: bool, bf16: bool, expected) -> None:
    # One rule for the Scorer, validation (checkpoint selection) and calibration scoring: if the
    # Scorer chose its precision on its own, the calibrator could be fitted on other logits.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert ScorerCore.device_and_amp() == expected
    assert inference_amp(expected[0]) == inference_amp(torch.device(expected[0])) == expected[1]


def test_cpu_inference_is_fp32_whatever_cuda_supports(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert inference_amp("cpu") == "none"
