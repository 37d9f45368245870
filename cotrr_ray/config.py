"""Entry-point settings as pydantic models: one field, one description, defaults here.

`TrainConfig` is what `train_job.py` reads from `configs/*.yaml` plus ``key=value`` overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC, FeatureSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Fault injection (ScorerConfig.fault, scaling.fail_after_epoch) validates only where this is "1":
# a production `serve deploy` or training job must not be able to switch it on by a config edit.
# Tests and benches set it before they start Ray, so their Serve replicas and Train workers (which
# validate the config again) inherit it.
FAULT_INJECTION_ENV = "COTRR_ENABLE_FAULT_INJECTION"


def _require_fault_injection(setting: str) -> None:
    if os.environ.get(FAULT_INJECTION_ENV) != "1":
        raise ValueError(
            f"{setting} is fault injection for tests; it is refused unless {FAULT_INJECTION_ENV}=1 is set in "
            "the environment of every process that validates this config (the driver, Serve replicas, Ray "
            "Train workers)"
        )


class GenerateConfig(_Strict):
    queries: int = Field(2000, ge=10, description="Number of synthetic queries to generate.")
    seed: int = Field(0, description="Generator seed (the data is a pure function of it).")
    min_candidates: int = Field(20, ge=1, description="Shortest candidate list.")
    max_candidates: int = Field(32, ge=1, description="Longest candidate list.")


class DataConfig(_Strict):
    path: str | None = Field(
        None, description="Training data file. None = generate synthetic data into the output directory."
    )
    format: Literal["jsonl", "letor", "parquet"] = Field(
        "jsonl",
        description="Format of `path`: a JSONL or LETOR file (converted once to Parquet under `cache_dir`), or "
        "`parquet`, a dataset directory written by `python -m cotrr_ray.data convert` (local or s3://).",
    )
    cache_dir: str = Field(
        "artifacts/data", description="Where generated synthetic data and converted Parquet datasets are kept."
    )
    cache_max_mb: float = Field(
        512,
        ge=0,
        description="A split (train, validation) of at most this many MB on storage (its share of the source) is "
        "read once into Ray's object store for all epochs; a larger one is streamed from storage every epoch "
        "(memory bounded by blocks in flight). 0 = always stream.",
    )
    shuffle_buffer_queries: int = Field(
        1000,
        ge=0,
        description="Queries in each Train worker's local shuffle buffer (Ray Data), reshuffled per epoch from "
        "(seed, rank, epoch); 0 = shard order. A worker's private memory grows with it: up to about twice "
        'this many queries\' model inputs at a compaction of the buffer (README "Training at scale").',
    )
    block_queries: int = Field(
        128,
        ge=0,
        description="Queries per Ray Data block streamed into the Train workers (a streaming repartition after "
        "normalising), so a worker's memory is set by this and the shuffle buffer, not by the source's row "
        "groups; 0 = blocks as read (one row group each).",
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Synthetic data settings.")
    feature_spec: FeatureSpec = Field(
        default=IMAGE_SEARCH_SPEC, description="Feature groups of a JSONL dataset (LETOR files use `letor`)."
    )
    letor_num_features: int = Field(136, ge=1, description="LETOR: number of features per row.")
    letor_upstream_feature: int | Literal["file_order"] = Field(
        110,
        description="LETOR: the upstream order. A 1-based feature number (its value descending is the upstream "
        "order and the upstream score; MSLR: 110 = BM25), or `file_order`: each query's rows are already in "
        "upstream order in the file (upstream score = minus the row's position in its query).",
    )
    splits: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.7, "validation": 0.1, "calibration": 0.1, "test": 0.1},
        description="Query-level split fractions (by a hash of the query id); must include train/validation/test, "
        "or be `{train: 1.0}` with `evaluation.method: cross_fit`.",
    )
    split_salt: str = Field("cotrr-split", description="Salt of the split hash; change it to draw new splits.")
    relevance_threshold: float = Field(
        1.0, description="A candidate is 'relevant' (the calibrated probability's event) iff label >= this."
    )

    @model_validator(mode="after")
    def _check_splits(self) -> DataConfig:
        if (
            self.format == "letor"
            and isinstance(self.letor_upstream_feature, int)
            and not 1 <= self.letor_upstream_feature <= self.letor_num_features
        ):
            raise ValueError(
                f"data.letor_upstream_feature must be in 1..{self.letor_num_features} (data.letor_num_features) or "
                f"'file_order', got {self.letor_upstream_feature}"
            )
        # {train: 1.0} is only valid with cross-fitted evaluation, which TrainConfig checks.
        missing = {"train", "validation", "test"} - set(self.splits)
        if missing and self.splits != {"train": 1.0}:
            raise ValueError(
                f"data.splits must include {sorted(missing)} (or be {{train: 1.0}} with evaluation.method: cross_fit)"
            )
        if abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise ValueError(f"data.splits must sum to 1, got {sum(self.splits.values())}")
        return self


class ModelArgs(_Strict):
    top_m: int = Field(20, ge=1, description="Top-M window the model scores; the tail keeps upstream order.")
    d_model: int = Field(256, ge=8, description="Token width.")
    n_heads: int = Field(8, ge=1, description="Attention heads (must divide d_model).")
    n_layers: int = Field(
        2,
        ge=0,
        description="Blocks of cross-attention + list self-attention + FFN (0: no attention, each candidate "
        "scored from its own features and context alone).",
    )
    ffn_mult: int = Field(4, ge=1, description="FFN hidden width as a multiple of d_model.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout in attention, FFN, candidate encoder and head.")
    group_norm: bool = Field(
        True,
        description="LayerNorm on each candidate feature group's projection. True suits embeddings, whose norm "
        "carries no meaning; false keeps the magnitude, which is the signal in dense relevance features (MSLR "
        "sample, no attention: inner-CV nDCG@10 0.490 without it vs 0.473 with it, bench/results/mslr_inner_cv_tuning.json).",
    )


class OptimConfig(_Strict):
    loss: Literal["lambda", "listnet"] = Field("lambda", description="Listwise loss (see cotrr_ray.core.losses).")
    ranknet_weight: float = Field(0.0, ge=0, description="Weight of an extra pairwise RankNet term.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(32, ge=1, description="Queries per micro-batch per worker.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_epochs: int = Field(20, ge=1, description="Upper bound on epochs (the cosine schedule spans these).")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="Fraction of optimizer steps of linear warm-up.")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="Cosine floor as a fraction of the peak lr.")
    patience: int = Field(4, ge=1, description="Early stopping: epochs without validation window nDCG@10 gain.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    amp: Literal["bf16", "fp16", "none"] = Field(
        "bf16", description="Autocast dtype; fp16 (CUDA only) uses a GradScaler."
    )
    input_noise_std: float = Field(0.0, ge=0, description="Gaussian noise on normalised inputs (regulariser).")
    select: Literal["best_val", "last"] = Field(
        "best_val",
        description="Which epoch becomes the model: the best validation nDCG@10 over the Top-M "
        "window (`val_window_ndcg@10`; early stopping with "
        "`patience`), or the last of `max_epochs` (epochs chosen by cross-validation, for data too small "
        "for a validation split to select on; no early stopping).",
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    seed: int = Field(0, description="Seed for init, shuffling and dropout.")


class ScalingArgs(_Strict):
    num_workers: int = Field(2, ge=0, description="Ray Train workers (0 = run the loop in the driver).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); otherwise CPU + gloo.")
    cpus_per_worker: float = Field(
        1,
        gt=0,
        description="CPUs reserved per worker. Ray Data's reads need at least one CPU beside the workers' "
        "reservations (the job refuses to start otherwise).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the Train workers' bundles: PACK (fewest nodes) or SPREAD (one per node "
        "where possible, e.g. to read shards on every node).",
    )
    score_actors: int = Field(
        1, ge=1, description="Ray Data actors (models) scoring the calibration and test splits after training."
    )
    torch_threads: int = Field(
        1, ge=1, description="Intra-op threads per worker; more threads than reserved CPUs thrash."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    storage_path: str | None = Field(
        None,
        description="Ray Train storage: a local path (shared FS for multi-node) or s3://. None = "
        "<registry>/_runs, beside the bundles of `output` (so an s3:// registry keeps its checkpoints on S3 too).",
    )
    run_name: str | None = Field(
        None,
        description="Ray Train run name. None = a fresh timestamped run; a fixed name makes a rerun "
        "of a crashed job resume from its last checkpoint in storage_path.",
    )
    fail_after_epoch: int | None = Field(
        None,
        description=f"Testing only: rank 0 raises once after reporting this epoch, to exercise resume. Refused "
        f"unless {FAULT_INJECTION_ENV}=1 in the environment (of the driver and the Ray Train workers).",
    )

    @model_validator(mode="after")
    def _gate_fault_injection(self) -> ScalingArgs:
        if self.fail_after_epoch is not None:
            _require_fault_injection(f"scaling.fail_after_epoch={self.fail_after_epoch}")
        return self


class CalibrationArgs(_Strict):
    method: Literal["holdout", "cross_fit"] = Field(
        "holdout",
        description="holdout = fit on the calibration split; cross_fit = out-of-fold scores (small data).",
    )
    folds: int = Field(5, ge=2, description="cross_fit: number of query folds.")
    min_samples: int = Field(1000, ge=1, description="Warn when fewer calibration rows than this.")


class EvaluationArgs(_Strict):
    method: Literal["test_split", "cross_fit"] = Field(
        "test_split",
        description="test_split = report on the held-out test split of `data.splits`. cross_fit = for small data: "
        "no query is held out (`data.splits: {train: 1.0}`); the K cross-fit fold models (`calibration.folds`) "
        "score the queries they did not see, and those out-of-fold scores give both the calibrator's rows and "
        "the report (per-query metrics with bootstrap intervals over every query; calibration of each fold's "
        "rows by a calibrator fitted on the other folds' rows). The final model trains on every query for "
        "exactly `optim.max_epochs` epochs. Needs calibration.method cross_fit and optim.select last.",
    )


class TrainConfig(_Strict):
    output: str = Field(
        "artifacts/registry/demo",
        description="Registry model to publish into, `<registry>/<name>` (a local path or s3://bucket/prefix/name): "
        "the bundle lands in `<registry>/<name>/<bundle_id>/`, a new immutable id per run, never over another.",
    )
    alias: str | None = Field(
        None,
        description="Move this alias of the model (e.g. `candidate`) to the new bundle after publishing, with a "
        "compare-and-swap; None = publish only (promote later with `python -m cotrr_ray.registry`).",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Where the lists come from.")
    model: ModelArgs = Field(default_factory=ModelArgs, description="Reranker shape.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisation.")
    scaling: ScalingArgs = Field(default_factory=ScalingArgs, description="Ray Train scaling and fault tolerance.")
    calibration: CalibrationArgs = Field(default_factory=CalibrationArgs, description="Calibrator fitting.")
    evaluation: EvaluationArgs = Field(
        default_factory=EvaluationArgs, description="How the bundle's quality report is estimated."
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for the metric intervals.")

    @model_validator(mode="after")
    def _check_evaluation(self) -> TrainConfig:
        if self.evaluation.method == "cross_fit":
            wrong = []
            if self.data.splits != {"train": 1.0}:
                wrong.append(
                    f"data.splits must be {{train: 1.0}} (every query trains the final model), got {self.data.splits}"
                )
            if self.calibration.method != "cross_fit":
                wrong.append("calibration.method must be cross_fit (the out-of-fold scores are the calibration rows)")
            if self.optim.select != "last":
                wrong.append("optim.select must be last (no validation split to select an epoch on)")
            if wrong:
                raise ValueError("evaluation.method cross_fit: " + "; ".join(wrong))
        elif self.data.splits == {"train": 1.0}:
            raise ValueError("data.splits {train: 1.0} holds nothing out: use it with evaluation.method cross_fit")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
        raw: dict[str, Any] = {} if path is None else load_yaml_with_base(Path(path))
        for item in overrides or []:
            apply_override(raw, item)
        return cls.model_validate(raw)


BASE_KEY = "base"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml_with_base(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A training YAML as a dict; ``base: other.yaml`` (relative to this file) is loaded first and this
    file's keys are merged over it, section by section, so a config states only what differs."""
    path = path.resolve()
    if path in _seen:
        raise ValueError(f"{path}: circular `{BASE_KEY}` chain {[str(p) for p in _seen]}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a training config must be a mapping")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ValueError(f"{path}: `{BASE_KEY}` must be a file name, got {base!r}")
    return _merge(load_yaml_with_base(path.parent / base, (*_seen, path)), raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict, in place."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.path=value")
    key, value = item.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


# =============================================================================== serving
# Settings of the Serve application (`cotrr_ray.serving.app:build_app`, issue 3). `AppArgs` is the
# builder's `args` (a change rebuilds the app and restarts replicas); `RoutingConfig` and
# `ScorerConfig` are deployments' `user_config`, applied live by `reconfigure` (no restart) when
# `serve deploy serve_config.yaml` changes them.


class RoutingConfig(_Strict):
    """The Router's `user_config`: traffic split, shadow mode, timeouts, default Top-M."""

    rollout_percentage: float = Field(
        0.0,
        ge=0,
        le=100,
        description=(
            "Share of units (0-100, in steps of 0.01) assigned to the treatment arm: treatment iff "
            "bucket(experiment_salt, unit) <= round(rollout_percentage * 100), buckets 1..10000 "
            "(basis points; see cotrr_ray.experiments.assignment)."
        ),
    )
    shadow_mode: bool = Field(
        False,
        description=(
            "Answer every request with the control arm and score the treatment in the background, "
            "recording Kendall tau / overlap@10 between the two orders."
        ),
    )
    mode: Literal["ab", "interleave"] = Field(
        "ab",
        description=(
            "'ab': a unit in the treatment bucket sees the treatment's ranking. 'interleave': it sees "
            "the team-draft merge of the treatment's and the control's rankings of the window (the "
            "control scorer's, or upstream order without one), each item's team and the competitive "
            "flag logged, clicks credited per team (cotrr_ray.experiments.interleaving). The other units "
            "see the control in both modes. Ignored in shadow mode."
        ),
    )
    experiment_salt: str = Field(
        "rerank-v1", max_length=256, description="Hash salt of the A/B split; a new salt reshuffles every unit."
    )
    timeout_ms: float = Field(
        1000.0, gt=0, le=60_000, description="Budget for scorer + calibrator per request; past it -> upstream order."
    )
    top_m: int | None = Field(
        None, ge=1, description="Top-M window when a request omits top_m. None = the bundle's top_m (the maximum)."
    )
    shadow_timeout_ms: float = Field(2000.0, gt=0, le=60_000, description="Budget of one background shadow scoring.")
    max_shadow_in_flight: int = Field(
        16, ge=1, description="Concurrent shadow scorings per router replica; more are dropped and counted."
    )
    coalesce_max_lists: int = Field(
        16,
        ge=1,
        le=256,
        description=(
            "Router -> Scorer/Calibrator hops carry the Top-M windows of concurrent requests together: at "
            "most this many per call (one hop's fixed cost per batch instead of per request)."
        ),
    )
    coalesce_max_in_flight: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "Calls per downstream deployment a router replica keeps outstanding; further requests wait "
            "(no timer) and leave together when one returns. >= the number of Scorer replicas."
        ),
    )
    server_timing: bool = Field(
        True,
        description="Send the Server-Timing response header (stage times of each rerank); off for "
        "deployments that must not reveal internal timings to clients.",
    )

    @model_validator(mode="after")
    def _check_rollout_resolution(self) -> RoutingConfig:
        # Buckets are basis points: a finer percentage would be logged as the rollout (exposure log,
        # gauge) while a different share was assigned. Same rule as cotrr_ray.experiments.assignment._threshold.
        basis_points = self.rollout_percentage * 100
        if abs(basis_points - round(basis_points)) > 1e-6:
            raise ValueError(
                f"rollout_percentage must be a multiple of 0.01 (buckets are basis points), "
                f"got {self.rollout_percentage!r}"
            )
        return self


class ScorerConfig(_Strict):
    """A Scorer deployment's `user_config`: bundle hot swap and dynamic batching."""

    bundle_uri: str | None = Field(
        None,
        description=(
            "Hot swap: load this bundle (a directory, a registry id or an alias) and switch to it atomically "
            "(in-flight batches finish on the old one). It must have the same feature spec and a top_m >= the "
            "builder's bundle. None = the bundle_uri from the builder args."
        ),
    )
    alias_poll_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description=(
            "When the served bundle_uri is an alias (`<registry>/<name>@production`): how often each replica "
            "reads the alias and swaps to the bundle it names now. 0 = never (the id read at start stays)."
        ),
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="@serve.batch size; keep max_ongoing_requests >= this.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "How long a batch waits to fill before it runs anyway. 0: take what is queued (the router "
            "already coalesces concurrent requests, and calls that arrive while a batch runs form the next)."
        ),
    )
    fault: Literal["none", "raise", "slow"] = Field(
        "none",
        description=(
            "TESTING ONLY (fault injection, like scaling.fail_after_epoch): 'raise' fails every "
            "scoring call, 'slow' delays it by fault_delay_s. Anything but 'none' is refused unless "
            f"{FAULT_INJECTION_ENV}=1 is set in the environment of the Scorer replicas (they validate "
            "user_config in reconfigure) and of the process that builds the app."
        ),
    )
    fault_delay_s: float = Field(5.0, ge=0, le=600, description="TESTING ONLY: delay of fault='slow'.")

    @model_validator(mode="after")
    def _gate_fault_injection(self) -> ScorerConfig:
        if self.fault != "none":
            _require_fault_injection(f"ScorerConfig.fault={self.fault!r}")
        return self


class EventLogConfig(_Strict):
    """Where decision records and feedback events go, and what `POST /v1/feedback` accepts
    (`cotrr_ray.experiments.eventlog`, `.events`)."""

    uri: str | None = Field(
        None,
        description=(
            "Root of the event log: a local directory or s3://bucket/prefix. Segments land under "
            "kind=<decision|feedback>/date=YYYY-MM-DD/. None = no event log: POST /v1/feedback answers 404 "
            "and decisions go only to exposure_log_path (or the Serve log)."
        ),
    )
    staging_dir: str = Field(
        "/tmp/cotrr-events",
        description=(
            "Object-store URI only: the node-local directory where open segments are written and fsync'ed "
            "before their upload on close; leftovers of killed replicas are uploaded at the next start."
        ),
    )
    max_segment_bytes: int = Field(
        64 * 1024 * 1024, ge=4096, description="Close (and upload) a segment once it would grow past this size."
    )
    max_segment_age_s: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="Close a segment this long after it was opened (bounds what an s3:// log holds only on local disk).",
    )
    commit_interval_s: float = Field(
        0.2,
        ge=0.01,
        le=10.0,
        description=(
            "Decision records (one per rerank answer, not waited for) are written and fsync'ed together at "
            "least this often: the most a killed replica can lose of them. Feedback is always fsync'ed "
            "before its 2xx."
        ),
    )
    max_events_per_batch: int = Field(1000, ge=1, le=100_000, description="More events in one body -> HTTP 413.")
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Larger feedback bodies -> HTTP 413 (checked before parsing)."
    )
    max_string_length: int = Field(
        256, ge=1, le=4096, description="Longest event_id, request_id, item_id or type; longer -> HTTP 422."
    )
    event_types: list[str] = Field(
        ["impression", "click", "conversion"],
        min_length=1,
        description="Accepted feedback event types; others -> HTTP 422. Extend for new interactions (e.g. add_to_cart).",
    )
    max_event_age_s: float = Field(
        7 * 86_400.0, gt=0, description="Event timestamps older than now minus this -> HTTP 422."
    )
    max_clock_skew_s: float = Field(
        300.0, ge=0, description="Event timestamps later than now plus this (client clock ahead) -> HTTP 422."
    )
    recent_ids: int = Field(
        100_000,
        ge=0,
        description=(
            "Event ids each Router replica remembers after acknowledging them, so a retried batch is not "
            "written again (0 = off; analysis dedupes by event_id either way)."
        ),
    )


class AppArgs(_Strict):
    """`args` of `cotrr_ray.serving.app:build_app` (serve_config.yaml)."""

    bundle_uri: str = Field(
        "artifacts/registry/demo@production",
        description=(
            "Treatment bundle: a registry alias `<registry>/<name>@<alias>` (followed live, see "
            "ScorerConfig.alias_poll_s), a fixed version `<registry>/<name>/<bundle_id>`, or a bundle "
            "directory; the registry may be local or s3://. The default is what `python train_job.py "
            "--config configs/demo.yaml` publishes and aliases. A relative path resolves against the working "
            "directory of the process that builds the app; a missing bundle or alias fails the deploy."
        ),
    )
    control_bundle_uri: str | None = Field(
        None,
        description="Optional control bundle, same forms as bundle_uri (deployment 'ScorerControl'); None = control "
        "is the upstream order.",
    )
    max_candidates: int = Field(1000, ge=1, description="More candidates in one request -> HTTP 413.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Larger request bodies -> HTTP 413 (checked before parsing)."
    )
    exposure_log_path: str | None = Field(
        None,
        description=(
            "Append exposure records (JSON lines) to this file. None = log them through the "
            "'ray.serve' logger (the replica's log file)."
        ),
    )
    event_log: EventLogConfig = Field(
        default_factory=EventLogConfig,
        description="Durable event log of decisions and feedback (online experiments); off unless uri is set.",
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig,
        description=(
            "Initial Router user_config for apps built from Python. In serve_config.yaml set the "
            "Router deployment's user_config instead: that is what `serve deploy` changes live."
        ),
    )
    scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="Initial Scorer user_config.")
    fused_calibration: bool = Field(
        False,
        description=(
            "Fused mode: the Scorer applies the bundle's isotonic calibrator itself and there is no "
            "Calibrator deployment (one hop fewer per request). Default false: the three-deployment "
            "graph Router -> Scorer -> Calibrator. With serve_config.yaml also delete the Calibrator entry."
        ),
    )
    control_scorer: ScorerConfig = Field(default_factory=ScorerConfig, description="Initial ScorerControl user_config.")
