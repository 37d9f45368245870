"""The Serve application; the only place deployments are bound.

    serve run serve_config.yaml                 # import_path: cotrr_ray.serving.app:build_app

    from cotrr_ray.serving.app import build_app         # or from Python / tests
    serve.run(build_app(AppArgs(bundle_uri="artifacts/registry/demo@production")), route_prefix="/")

Relative paths in `AppArgs` resolve against the working directory of the process that runs this
builder: with `serve run` that is the directory it was started from; with `serve deploy` it is
the directory of the cluster's `ray start` (use absolute paths there). The resolved absolute paths
are what the replicas receive, so their own working directory never matters.
"""

# No `from __future__ import annotations`: Serve reads build_app's parameter annotation to validate
# the YAML `args` into AppArgs, and a string annotation would hand the builder a plain dict.
import os

from ray.serve import Application

from cotrr_ray.bundles.bundle import BundleError, read_meta
from cotrr_ray.bundles.registry import BundleSource, resolve_uri
from cotrr_ray.config import AppArgs
from cotrr_ray.serving.deployments import Calibrator, Router, Scorer
from cotrr_ray.storage import locate


def build_app(args: AppArgs) -> Application:
    """Router -> Scorer [+ ScorerControl] -> Calibrator, after checking the bundles exist and agree.

    With `args.fused_calibration` the Scorer(s) calibrate and there is no Calibrator deployment.
    """
    args = AppArgs.model_validate(args)  # a no-op for AppArgs; validates a dict from other callers
    base_dir = os.getcwd()
    bundle_uri = resolve_uri(args.bundle_uri, base_dir)
    meta = read_meta(BundleSource.parse(bundle_uri).resolve()[1])  # a missing bundle or alias fails the deploy here
    max_top_m = meta.top_m
    control_uri = None
    if args.control_bundle_uri is not None:
        control_uri = resolve_uri(args.control_bundle_uri, base_dir)
        control_meta = read_meta(BundleSource.parse(control_uri).resolve()[1])
        if control_meta.spec.fingerprint() != meta.spec.fingerprint():
            raise BundleError(
                f"control bundle {control_uri} has feature spec {control_meta.spec.describe()!r}, "
                f"treatment {bundle_uri} has {meta.spec.describe()!r}: both arms must share one spec"
            )
        max_top_m = min(max_top_m, control_meta.top_m)
    if args.routing.top_m is not None and args.routing.top_m > max_top_m:
        raise ValueError(f"routing.top_m {args.routing.top_m} exceeds the bundles' top_m {max_top_m}")
    exposure = args.exposure_log_path
    log = args.event_log
    event_log = log.model_copy(
        update={
            "uri": locate(log.uri, base_dir).uri if log.uri else None,
            "staging_dir": locate(log.staging_dir, base_dir).uri,
        }
    )
    args = args.model_copy(
        update={
            "bundle_uri": bundle_uri,
            "control_bundle_uri": control_uri,
            "exposure_log_path": resolve_uri(exposure, base_dir) if exposure else None,
            "event_log": event_log,
        }
    )

    fused = args.fused_calibration
    scorer = Scorer.options(user_config=args.scorer.model_dump()).bind(bundle_uri, base_dir, fused)
    control = None
    if control_uri is not None:
        control = Scorer.options(name="ScorerControl", user_config=args.control_scorer.model_dump()).bind(
            control_uri, base_dir, fused
        )
    calibrator = None if fused else Calibrator.bind([u for u in (bundle_uri, control_uri) if u is not None])
    return Router.options(user_config=args.routing.model_dump()).bind(scorer, calibrator, control, args)
