"""The model bundle: one self-describing directory that a replica needs and nothing else.

    <bundle>/
      manifest.json        id, creation time, versions, training config, data fingerprint,
                           relevance threshold, headline metrics, sha256 of every other file
      model.pt             state dict (torch.save; loaded with weights_only=True)
      model_config.json    RerankerConfig
      feature_spec.json    FeatureSpec
      normalizer.json      per-feature input normalisation fitted on the training split
      calibrator.json      isotonic thresholds (plain data, no pickle)
      metrics.json         held-out evaluation report
      reliability.png      reliability diagram of the test split

Loading verifies every checksum and the spec fingerprint and fails closed with `BundleError`;
there is no fallback to an untrained model anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import cotrr_ray
from cotrr_ray.core.calibration import IsotonicCalibrator
from cotrr_ray.core.features import CandidateList, FeatureNormalizer, PaddedLists, pad_lists
from cotrr_ray.core.spec import FeatureSpec

if TYPE_CHECKING:  # torch is imported where weights are read or written, not by light readers
    import torch

    from cotrr_ray.core.model import Reranker, RerankerConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = (
    "model.pt",
    "model_config.json",
    "feature_spec.json",
    "normalizer.json",
    "calibrator.json",
    "metrics.json",
)


class BundleError(RuntimeError):
    """A bundle is missing, corrupt or incompatible; the message says which file and why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    out = {
        "cotrr_ray": cotrr_ray.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }
    try:  # Ray is not needed to build a bundle (e.g. under torchrun on a GPU box), and is not imported here.
        out["ray"] = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable JSON ({e})") from None


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    spec: FeatureSpec
    model_config: RerankerConfig
    model: Reranker
    normalizer: FeatureNormalizer
    calibrator: IsotonicCalibrator
    device: torch.device
    uri: str | None = None  # where other processes load it from (registry URI); None = `path`

    @property
    def source(self) -> str:
        return self.uri or str(self.path)

    @property
    def bundle_id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def top_m(self) -> int:
        return self.model_config.max_list_len

    @property
    def relevance_threshold(self) -> float:
        return float(self.manifest["relevance_threshold"])

    # ------------------------------------------------------------------ inference

    def featurize(self, lists: list[CandidateList], m: int | None = None) -> PaddedLists:
        """Normalise and pad the Top-M windows of `lists` (M = longest window, or `m`)."""
        m = m or max(cl.window for cl in lists)
        if m > self.top_m:
            raise ValueError(f"window {m} exceeds the bundle's top_m {self.top_m}")
        return pad_lists([self.normalizer.transform(cl) for cl in lists], self.spec, m)

    def score(self, lists: list[CandidateList], *, amp: str = "none") -> list[np.ndarray]:
        """Raw logits of each list's window, as a list of (window,) float32 arrays."""
        from cotrr_ray.core.scoring import predict_logits

        padded = self.featurize(lists)
        logits = predict_logits(self.model, padded, device=self.device, batch_size=len(lists), amp=amp)
        return [logits[i, : cl.window] for i, cl in enumerate(lists)]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return self.calibrator.predict(logits)

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def save(
        path: str | Path,
        *,
        model: Reranker,
        spec: FeatureSpec,
        normalizer: FeatureNormalizer,
        calibrator: IsotonicCalibrator,
        relevance_threshold: float,
        metrics: dict[str, Any],
        train_config: dict[str, Any],
        data_fingerprint: str,
        extra_files: dict[str, Path] | None = None,
    ) -> Path:
        """Write a new bundle directory atomically: into a temp dir beside `path`, then renamed to it.

        An existing `path` is refused: a bundle is never rewritten (publish new ones into a registry)."""
        import torch

        path = Path(path)
        if path.exists():
            raise BundleError(f"{path} exists; a bundle is written once (publish new ones into a registry)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp is owner-only; a bundle is meant to be read by serving processes
        try:
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
            _write_json(tmp / "model_config.json", model.config.to_dict())
            _write_json(tmp / "feature_spec.json", spec.model_dump(mode="json"))
            _write_json(tmp / "normalizer.json", normalizer.to_dict())
            _write_json(tmp / "calibrator.json", calibrator.to_dict())
            _write_json(tmp / "metrics.json", metrics)
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / name)
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            manifest = {
                "format_version": FORMAT_VERSION,
                "bundle_id": f"{spec.version}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}",
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "versions": _versions(),
                "feature_spec_fingerprint": spec.fingerprint(),
                "relevance_threshold": relevance_threshold,
                "num_parameters": model.num_parameters(),
                "data_fingerprint": data_fingerprint,
                "train_config": train_config,
                "headline_metrics": metrics.get("headline", {}),
                "files": {name: sha256_file(tmp / name) for name in files},
            }
            _write_json(tmp / MANIFEST, manifest)
            os.rename(tmp, path)  # fails if `path` appeared meanwhile: never over another bundle
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
        import torch

        from cotrr_ray.core.model import Reranker, RerankerConfig

        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"no bundle directory at {path}")
        manifest = _read_json(path / MANIFEST) if (path / MANIFEST).exists() else None
        if manifest is None:
            raise BundleError(f"{path}: missing {MANIFEST}")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{path}: unsupported bundle format_version {manifest.get('format_version')!r}")
        listed = manifest.get("files", {})
        for name in REQUIRED_FILES:
            if name not in listed:
                raise BundleError(f"{path}: manifest does not list required file {name}")
        for name, digest in listed.items():
            f = path / name
            if not f.is_file():
                raise BundleError(f"{path}: missing file {name}")
            if sha256_file(f) != digest:
                raise BundleError(f"{path}: checksum mismatch for {name} (file corrupt or modified)")
        try:
            spec = FeatureSpec.model_validate(_read_json(path / "feature_spec.json"))
            if spec.fingerprint() != manifest.get("feature_spec_fingerprint"):
                raise BundleError(f"{path}: feature_spec.json does not match the manifest's fingerprint")
            model_config = RerankerConfig.from_dict(_read_json(path / "model_config.json"))
            expected = RerankerConfig.from_spec(spec, context_dim=model_config.context_dim)
            if (model_config.candidate_groups, model_config.query_groups) != (
                expected.candidate_groups,
                expected.query_groups,
            ):
                raise BundleError(f"{path}: model_config groups do not match feature_spec.json")
            normalizer = FeatureNormalizer.from_dict(_read_json(path / "normalizer.json"), spec)
            calibrator = IsotonicCalibrator.from_dict(_read_json(path / "calibrator.json"))
            device = torch.device(device)
            model = Reranker(model_config)
            state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            model.to(device).eval()
        except BundleError:
            raise
        except Exception as e:  # any parse/shape error is a bad bundle, reported as such
            raise BundleError(f"{path}: invalid bundle ({type(e).__name__}: {e})") from e
        return cls(path, manifest, spec, model_config, model, normalizer, calibrator, device)


# ----------------------------------------------------------------------------- light readers
# For processes that route or calibrate but never run the model: no weights, no torch.


@dataclass(frozen=True)
class BundleMeta:
    """What the router needs from a bundle: no weights, no torch."""

    path: str
    bundle_id: str
    spec: FeatureSpec
    top_m: int
    relevance_threshold: float


def read_meta(path: str | Path) -> BundleMeta:
    """Read manifest, feature spec and Top-M of a bundle (checksums are verified by the scorer)."""
    p = Path(path)
    if not p.is_dir():
        raise BundleError(
            f"no bundle directory at {p} (cwd {os.getcwd()}): train one with "
            "`python train_job.py --config configs/demo.yaml`, or point AppArgs.bundle_uri at a bundle or alias"
        )
    manifest = _read_json(p / "manifest.json")
    try:
        spec = FeatureSpec.model_validate(_read_json(p / "feature_spec.json"))
        top_m = int(_read_json(p / "model_config.json")["max_list_len"])
        meta = BundleMeta(str(p), str(manifest["bundle_id"]), spec, top_m, float(manifest["relevance_threshold"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{p}: not a valid bundle ({type(e).__name__}: {e})") from None
    if spec.fingerprint() != manifest.get("feature_spec_fingerprint"):
        raise BundleError(f"{p}: feature_spec.json does not match the manifest's fingerprint")
    return meta


def load_calibrator(path: str | Path) -> tuple[str, Any]:
    """(bundle id, IsotonicCalibrator) from a bundle's calibrator.json, checksum-verified."""
    p = Path(path)
    manifest = _read_json(p / "manifest.json")
    digest = manifest.get("files", {}).get("calibrator.json")
    if digest is None or sha256_file(p / "calibrator.json") != digest:
        raise BundleError(f"{p}: calibrator.json is missing or does not match the manifest checksum")
    try:
        return str(manifest["bundle_id"]), IsotonicCalibrator.from_dict(_read_json(p / "calibrator.json"))
    except (KeyError, ValueError) as e:
        raise BundleError(f"{p}: invalid calibrator ({e})") from None
