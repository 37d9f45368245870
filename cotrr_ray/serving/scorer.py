"""The scorer and calibrator logic as plain objects (no Ray): `cotrr_ray.serving.deployments` wraps them.

- `ScorerCore`: a loaded bundle that scores batches of Top-M windows, with a checked hot swap.
- `CalibratorCore`: isotonic calibrators keyed by bundle id, so a probability always comes from the
  calibrator of the bundle that produced the logit.
- `ScoreResult` / `CalibrationInput`: the messages that travel between deployments (numpy, no JSON).

torch is imported lazily (through `Bundle`), so the router can import the message types cheaply.
"""

from __future__ import annotations

import collections
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotrr_ray.bundles.bundle import load_calibrator
from cotrr_ray.bundles.registry import BundleSource
from cotrr_ray.core.features import CandidateList
from cotrr_ray.core.spec import FeatureSpec

logger = logging.getLogger(__name__)


def synthetic_list(spec: FeatureSpec, n: int = 4, window: int = 4, seed: int = 0) -> CandidateList:
    """An in-spec list of `n` random candidates (health checks and warm-up)."""
    rng = np.random.default_rng(seed)
    window = min(window, n)

    def vec(d: int, rows: int | None = None) -> np.ndarray:
        x = rng.standard_normal((rows, d) if rows else d).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return CandidateList(
        query_id="synthetic",
        ids=[f"synthetic-{i}" for i in range(n)],
        upstream=np.linspace(1.0, 0.5, n, dtype=np.float32),
        window=window,
        features={g: vec(d, window) for g, d in spec.candidate.items()},
        query_features={g: vec(d) for g, d in spec.query.items()},
        labels=None,
    )


@dataclass
class ScoreResult:
    """What a scorer returns per list: the window's raw logits and the bundle that made them."""

    logits: np.ndarray  # (window,) float32
    model_version: str
    bundle_uri: str  # where the calibrator (any node) loads this bundle from: a registry URI or shared path
    probabilities: np.ndarray | None = None  # (window,) float64, set only in fused mode (calibrated by the scorer)
    # Wall time (ms) of the `ScorerCore.score` call that produced it: the forward pass of the whole
    # batch plus the per-result work. Every window of a batch carries the batch's time, so this is
    # what this window waited on for compute, not its share of the CPU (the router's Server-Timing
    # `model` stage).
    compute_ms: float | None = None


@dataclass
class CalibrationInput:
    bundle_id: str
    bundle_uri: str
    logits: np.ndarray  # (window,)


class ScorerCore:
    """A loaded bundle that scores batches; `swap` replaces it atomically (one reference)."""

    def __init__(self, bundle: Any, *, amp: str):
        self.bundle = bundle
        self.amp = amp
        self.reference_fingerprint = bundle.spec.fingerprint()
        self.reference_top_m = bundle.top_m
        self.replica = {"id": uuid.uuid4().hex, "pid": os.getpid(), "started_at": time.time()}
        self.swaps: collections.Counter = collections.Counter()
        self.last_swap_error: str | None = None
        self._failed_id: str | None = None
        self.batches = 0  # model calls
        self.lists = 0  # Top-M windows they scored

    @staticmethod
    def device_and_amp() -> tuple[str, str]:
        """cuda when a GPU is visible, else cpu; the autocast is `inference_amp`'s for that device."""
        import torch

        from cotrr_ray.core.scoring import inference_amp

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return device, inference_amp(device)

    @staticmethod
    def load_bundle(uri: str, device: Any) -> Any:
        """The `Bundle` a URI names now (a directory, a registry id or an alias; remote ones through the
        local cache), tagged with the URI of its fixed version so other processes can load it too."""
        from cotrr_ray.bundles.bundle import Bundle

        fixed_uri, local = BundleSource.parse(uri).resolve()
        bundle = Bundle.load(local, device=device)
        bundle.uri = fixed_uri
        return bundle

    @classmethod
    def load(cls, uri: str) -> ScorerCore:
        """Load and warm up a bundle; raises `BundleError` (fail closed, never a random model)."""
        device, amp = cls.device_and_amp()
        t0 = time.perf_counter()
        bundle = cls.load_bundle(uri, device)
        core = cls(bundle, amp=amp)
        warm_ms = core.warm_up(bundle)
        logger.info(
            "loaded bundle %s on %s (%s) in %.0f ms, warm-up %.1f ms",
            bundle.bundle_id,
            device,
            bundle.spec.describe(),
            (time.perf_counter() - t0) * 1000,
            warm_ms,
        )
        return core

    def warm_up(self, bundle: Any) -> float:
        t0 = time.perf_counter()
        logits = bundle.score([synthetic_list(bundle.spec, n=4, window=min(4, bundle.top_m))], amp=self.amp)[0]
        if not np.isfinite(logits).all():
            raise RuntimeError(f"bundle {bundle.bundle_id} produced non-finite logits on the warm-up list")
        return (time.perf_counter() - t0) * 1000

    def health_check(self) -> float:
        """A real forward pass of the served bundle on a synthetic list; raises if it fails or gives
        non-finite logits (a lost GPU, corrupted weights in memory). Returns its wall time in ms."""
        return self.warm_up(self.bundle)

    def load_replacement(self, path: str) -> Any:
        """Load a bundle for a hot swap and check it can serve this app's requests (blocking)."""
        bundle = self.load_bundle(path, self.bundle.device)
        if bundle.spec.fingerprint() != self.reference_fingerprint:
            raise ValueError(
                f"bundle {path} has feature spec {bundle.spec.describe()!r}, not the served one; "
                "a new spec needs a redeploy with new AppArgs"
            )
        if bundle.top_m < self.reference_top_m:
            raise ValueError(f"bundle {path} has top_m {bundle.top_m} < the served top_m {self.reference_top_m}")
        self.warm_up(bundle)
        return bundle

    def swap(self, bundle: Any) -> None:
        old, self.bundle = self.bundle, bundle
        self.swaps["ok"] += 1
        self.last_swap_error = None
        logger.info("hot-swapped bundle %s -> %s", old.bundle_id, bundle.bundle_id)

    def follow(self, source: BundleSource) -> bool:
        """Swap to the bundle `source` names now if that is not the served one (an alias moved).

        Blocking (a registry read, and a download and load when it moved); returns whether it swapped.
        A bundle that failed to load is not retried until the alias moves again, so one bad publish
        costs one error, not one per poll.
        """
        bundle_id = source.current_id()
        if bundle_id in (self.bundle.bundle_id, self._failed_id):
            return False
        try:
            bundle = self.load_replacement(source.uri)
        except Exception as e:
            self._failed_id = bundle_id
            self.swap_failed(f"{source.uri} ({bundle_id})", e)
            return False
        self._failed_id = None
        self.swap(bundle)
        return True

    def swap_failed(self, path: str, error: BaseException) -> None:
        self.swaps["error"] += 1
        self.last_swap_error = f"{path}: {type(error).__name__}: {error}"[:1000]
        logger.error("bundle hot swap to %s failed; still serving %s: %s", path, self.bundle.bundle_id, error)

    def score(self, lists: list[CandidateList], *, calibrate: bool = False) -> list[ScoreResult]:
        """Raw logits per list, one model call for the whole batch (blocking).

        `calibrate=True` (fused mode) also sets each result's probabilities from the same bundle's
        isotonic calibrator, exactly what `CalibratorCore.transform` computes for that bundle id.
        """
        t0 = time.perf_counter()
        bundle = self.bundle  # one read: a concurrent swap never mixes bundles within a batch
        logits = bundle.score(lists, amp=self.amp)
        self.batches += 1
        self.lists += len(lists)
        uri = bundle.source
        out = []
        for x in logits:
            x = np.array(x, dtype=np.float32)
            probs = bundle.calibrator.predict(x.astype(np.float64)) if calibrate else None
            out.append(ScoreResult(x, bundle.bundle_id, uri, probs))
        compute_ms = (time.perf_counter() - t0) * 1000
        for r in out:  # the whole batch's time on each of its windows (see ScoreResult.compute_ms)
            r.compute_ms = compute_ms
        return out

    def score_calls(self, calls: list[list[CandidateList]], *, calibrate: bool = False) -> list[list[ScoreResult]]:
        """`score` over the lists of several calls in one model batch; the results regrouped per call."""
        results = self.score([cl for call in calls for cl in call], calibrate=calibrate)
        out, i = [], 0
        for call in calls:
            out.append(results[i : i + len(call)])
            i += len(call)
        return out

    def info(self) -> dict[str, Any]:
        b = self.bundle
        return {
            "bundle_id": b.bundle_id,
            "bundle_uri": b.source,
            "bundle_path": str(b.path),
            "device": str(b.device),
            "amp": self.amp,
            "top_m": b.top_m,
            "relevance_threshold": b.relevance_threshold,
            "num_parameters": b.manifest.get("num_parameters"),
            "headline_metrics": b.manifest.get("headline_metrics", {}),
            "replica": self.replica,
            "swaps": dict(self.swaps),
            "last_swap_error": self.last_swap_error,
            "batches": self.batches,
            "lists": self.lists,
            "mean_batch_lists": round(self.lists / self.batches, 3) if self.batches else None,
        }


class CalibratorCore:
    """Calibrators by bundle id (LRU). An unknown id is loaded from the URI the scorer reported (through
    the local cache for a remote registry), so after an alias moves the calibrator of the new id is
    there as soon as the first window scored by it arrives, and the old one stays for in-flight ones."""

    def __init__(self, max_bundles: int = 8):
        self.max_bundles = max_bundles
        self._by_id: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def add(self, uri: str) -> str:
        bundle_id, calibrator = load_calibrator(BundleSource.parse(uri).resolve()[1])
        self._by_id[bundle_id] = calibrator
        self._by_id.move_to_end(bundle_id)
        while len(self._by_id) > self.max_bundles:
            self._by_id.popitem(last=False)
        return bundle_id

    def missing(self, items: list[CalibrationInput]) -> dict[str, str]:
        """{bundle_id: uri} of the items whose calibrator is not loaded yet."""
        return {it.bundle_id: it.bundle_uri for it in items if it.bundle_id not in self._by_id}

    def load_missing(self, missing: dict[str, str]) -> dict[str, str]:
        """Load calibrators (blocking); returns {bundle_id: error} for those that failed."""
        errors = {}
        for bundle_id, path in missing.items():
            try:
                loaded = self.add(path)
                if loaded != bundle_id:
                    errors[bundle_id] = f"{path} now holds bundle {loaded}, not {bundle_id}"
            except Exception as e:
                errors[bundle_id] = f"{type(e).__name__}: {e}"
        return errors

    def transform(self, item: CalibrationInput) -> np.ndarray:
        calibrator = self._by_id.get(item.bundle_id)
        if calibrator is None:
            raise KeyError(f"no calibrator loaded for bundle {item.bundle_id}")
        return calibrator.predict(np.asarray(item.logits, dtype=np.float64))

    def transform_each(self, items: list[CalibrationInput], errors: dict[str, str]) -> list[Any]:
        """One entry per item: its probabilities, or a RuntimeError that fails only that item.

        `errors` ({bundle_id: message}, from `load_missing`) fails the items of calibrators that did not load.
        """
        out: list[Any] = []
        for item in items:  # one item's failure (unknown bundle) never fails the others
            if item.bundle_id in errors:
                out.append(RuntimeError(errors[item.bundle_id]))
                continue
            try:
                out.append(self.transform(item))
            except Exception as e:
                out.append(RuntimeError(f"{type(e).__name__}: {e}"))
        return out

    def health_check(self) -> None:
        """Every loaded calibrator maps a grid of logits to finite probabilities in [0, 1]."""
        if not self._by_id:
            raise RuntimeError("no calibrator loaded")
        grid = np.linspace(-10.0, 10.0, 21)
        for bundle_id, calibrator in self._by_id.items():
            p = np.asarray(calibrator.predict(grid))
            if p.shape != grid.shape or not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
                raise RuntimeError(f"calibrator of bundle {bundle_id} returned invalid probabilities")

    @property
    def bundle_ids(self) -> list[str]:
        return list(self._by_id)
