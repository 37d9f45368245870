"""The training loop without Ray: `cotrr_ray.training.loop.fit` under a single-process `TorchContext`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import tiny_train_config

from cotrr_ray.core.model import Reranker
from cotrr_ray.core.scoring import inference_amp, predict_logits
from cotrr_ray.data.readers import file_fingerprint
from cotrr_ray.data.synthetic import generate
from cotrr_ray.training import loop, prepare
from cotrr_ray.training.checkpoints import ResumeMismatchError, config_fingerprint, load_state
from cotrr_ray.training.loop import (
    VAL_METRIC,
    InMemoryBatches,
    epoch_seed,
    fit,
    warmup_cosine,
    window_ndcg,
    window_ndcg_sums,
)
from cotrr_ray.training.prepare import PreparedData, pad_split, prepare_data, window_logits
from cotrr_ray.training.torchrun import TorchContext

SPLITS = "data.splits={train: 0.7, validation: 0.3, test: 0.0}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PreparedData:
    """~120 generated queries, lists of 10-14, Top-8 windows; split 70/30 train/validation."""
    tmp = tmp_path_factory.mktemp("train-data")
    path = generate(tmp / "d.jsonl", queries=120, seed=0, min_candidates=10, max_candidates=14, top_m=8, progress=False)
    return prepare_data(tiny_train_config(tmp, [SPLITS]), path)


def _cfg(tmp_path: Path, *overrides: str):
    return tiny_train_config(tmp_path, [SPLITS, *overrides])


def _fit(cfg, data: PreparedData, ckpt_dir: Path, model_config=None, data_fingerprint=None) -> TorchContext:
    ctx = TorchContext(ckpt_dir)
    train, val = data.padded["train"], data.padded["validation"]
    fit(cfg, model_config or data.model_config, train, val, ctx, data_fingerprint=data_fingerprint)
    return ctx


def test_prepared_data_is_split_by_query_and_normalised_on_train(data: PreparedData) -> None:
    train_ids = {cl.query_id for cl in data.lists["train"]}
    val_ids = {cl.query_id for cl in data.lists["validation"]}
    assert train_ids and val_ids and not train_ids & val_ids
    assert len(train_ids) + len(val_ids) == 120
    assert len(data.padded["train"]) == len(train_ids) and data.padded["train"].mask.shape[1] == 8
    z = data.padded["train"].candidate["visual"][data.padded["train"].mask]
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)  # standardised on train...
    zv = data.padded["validation"].candidate["visual"][data.padded["validation"].mask]
    assert np.abs(zv.mean(0)).max() > 1e-3  # ...not on validation


def test_loss_decreases_and_validation_beats_untrained(data: PreparedData, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optim.max_epochs=6")
    torch.manual_seed(cfg.optim.seed)  # fit() initialises the model from the same seed
    untrained = Reranker(data.model_config)
    val = data.padded["validation"]
    before = window_ndcg(predict_logits(untrained, val), val)
    ctx = _fit(cfg, data, tmp_path / "ckpt")
    hist = ctx.history
    assert [h["epoch"] for h in hist] == list(range(6))
    losses = [h["train_loss"] for h in hist]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.6 * losses[0], losses
    # Measured: untrained ~0.61, trained ~0.85 (upstream order ~0.84) on these 30 validation queries.
    assert hist[-1][VAL_METRIC] > before + 0.1, (before, hist[-1][VAL_METRIC])
    assert hist[-1]["best_val_window_ndcg@10"] == max(h[VAL_METRIC] for h in hist)
    # Every epoch left a complete, resumable checkpoint.
    state = load_state(tmp_path / "ckpt" / "epoch_005")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best", "bad_epochs", "model_config"} <= set(state)
    assert state["epoch"] == 5
    # The schedule ran to its floor: lr * min_lr_ratio after the last optimizer step.
    assert hist[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio, rel=1e-6)


def test_bf16_autocast_runs_on_cpu(data: PreparedData, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optim.amp=bf16", "optim.max_epochs=3")
    hist = _fit(cfg, data, tmp_path / "ckpt").history
    assert len(hist) == 3
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h[VAL_METRIC]) for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_fp16_on_cpu_raises_a_clear_error(data: PreparedData, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optim.amp=fp16", "optim.max_epochs=1")
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        _fit(cfg, data, tmp_path / "ckpt")


def test_warmup_cosine_shape() -> None:
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.05)
    warm = [f(s) for s in range(10)]
    assert warm[0] == pytest.approx(0.1)  # starts small
    assert all(a < b for a, b in zip(warm, warm[1:]))  # linear ramp up
    assert warm[-1] == pytest.approx(1.0) and f(10) == pytest.approx(1.0)  # peak 1 after warm-up
    decay = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(55) == pytest.approx(0.05 + 0.95 * 0.5)  # half way through the cosine
    assert f(100) == pytest.approx(0.05) and f(250) == pytest.approx(0.05)  # ends at min_ratio, stays
    assert warmup_cosine(10, 0, 0.0)(0) == 1.0 and warmup_cosine(10, 0, 0.0)(10) == pytest.approx(0.0)


def test_gradient_accumulation_steps_the_optimizer_less_often(data: PreparedData, tmp_path: Path) -> None:
    n_batches = math.ceil(len(data.padded["train"]) / 16)  # batch_size 16
    for accum in (1, 2):
        cfg = _cfg(tmp_path, f"optim.grad_accum_steps={accum}", "optim.max_epochs=2")
        ckpt = tmp_path / f"ckpt{accum}"
        hist = _fit(cfg, data, ckpt).history
        assert all(math.isfinite(h["train_loss"]) for h in hist)
        sched = load_state(ckpt / "epoch_001")["scheduler"]
        assert sched["last_epoch"] == 2 * math.ceil(n_batches / accum)


def test_early_stopping_when_the_metric_plateaus(data: PreparedData, tmp_path: Path) -> None:
    # lr so small that the ranking never changes: validation nDCG is flat from epoch 0.
    cfg = _cfg(tmp_path, "optim.lr=1e-9", "optim.patience=2", "optim.max_epochs=10")
    hist = _fit(cfg, data, tmp_path / "ckpt").history
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # best at 0, then 2 epochs without gain
    assert len({round(h[VAL_METRIC], 9) for h in hist}) == 1
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_000", "epoch_001", "epoch_002"]


def test_resume_after_injected_failure_matches_uninterrupted_run(
    data: PreparedData, tmp_path: Path, fault_injection
) -> None:
    # Dropout on, so the per-epoch reseeding of shuffling and dropout is part of what is checked.
    model_config = dataclasses.replace(data.model_config, dropout=0.1)
    epochs = "optim.max_epochs=4"
    a = _fit(_cfg(tmp_path, epochs), data, tmp_path / "a", model_config).history

    cfg_b = _cfg(tmp_path, epochs, "scaling.fail_after_epoch=1")
    ctx_b = TorchContext(tmp_path / "b")
    with pytest.raises(RuntimeError, match="injected failure after epoch 1"):
        fit(cfg_b, model_config, data.padded["train"], data.padded["validation"], ctx_b)
    assert [h["epoch"] for h in ctx_b.history] == [0, 1]  # epoch 1 was reported (checkpointed) first
    resumed = _fit(cfg_b, data, tmp_path / "b", model_config).history  # a fresh call, same checkpoint dir
    assert [h["epoch"] for h in resumed] == [2, 3]

    assert resumed[-1]["epoch"] == a[-1]["epoch"] == 3
    assert resumed[-1][VAL_METRIC] == pytest.approx(a[-1][VAL_METRIC], abs=1e-6)
    assert resumed[-1]["train_loss"] == pytest.approx(a[-1]["train_loss"], rel=1e-6)
    assert resumed[-1]["best_val_window_ndcg@10"] == pytest.approx(a[-1]["best_val_window_ndcg@10"], abs=1e-6)
    # On CPU the replay is exact, down to the weights.
    wa, wb = load_state(tmp_path / "a" / "epoch_003")["model"], load_state(tmp_path / "b" / "epoch_003")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_a_finished_run_does_nothing(data: PreparedData, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "optim.max_epochs=2")
    _fit(cfg, data, tmp_path / "ckpt")
    assert _fit(cfg, data, tmp_path / "ckpt").history == []


def test_resume_after_failure_at_the_early_stopping_epoch_stops_too(
    data: PreparedData, tmp_path: Path, fault_injection
) -> None:
    plateau = ("optim.lr=1e-9", "optim.patience=2", "optim.max_epochs=10")
    a = _fit(_cfg(tmp_path, *plateau), data, tmp_path / "a").history
    assert a[-1]["epoch"] == 2  # early stop after epoch 2
    cfg_b = _cfg(tmp_path, *plateau, "scaling.fail_after_epoch=2")
    with pytest.raises(RuntimeError, match="injected failure after epoch 2"):
        _fit(cfg_b, data, tmp_path / "b")
    resumed = _fit(cfg_b, data, tmp_path / "b").history
    # The uninterrupted run stopped at epoch 2; the resumed one must not go further.
    assert resumed == []


def test_early_stopping_state_survives_resume(data: PreparedData, tmp_path: Path, fault_injection) -> None:
    # Plateau from epoch 0 with patience 3: uninterrupted, the run stops after epoch 3. A failure
    # after epoch 1 must not reset `best`/`bad_epochs`, or the resumed run would train longer.
    plateau = ("optim.lr=1e-9", "optim.patience=3", "optim.max_epochs=10")
    a = _fit(_cfg(tmp_path, *plateau), data, tmp_path / "a").history
    assert a[-1]["epoch"] == 3
    cfg_b = _cfg(tmp_path, *plateau, "scaling.fail_after_epoch=1")
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(cfg_b, data, tmp_path / "b")
    resumed = _fit(cfg_b, data, tmp_path / "b").history
    assert [h["epoch"] for h in resumed] == [2, 3]
    assert load_state(tmp_path / "b" / "epoch_003")["bad_epochs"] == 3


# ------------------------------------------------------------------------- per-rank seeds


def test_epoch_seed_is_a_pure_function_of_seed_rank_and_epoch() -> None:
    assert epoch_seed(0, 0, 0) == epoch_seed(0, 0, 0) and epoch_seed(7, 1, 3) == epoch_seed(7, 1, 3)
    seeds = {epoch_seed(s, r, e) for s in (0, 1, 100_003) for r in range(4) for e in range(20)}
    assert len(seeds) == 3 * 4 * 20  # no two (seed, rank, epoch) share a stream
    assert epoch_seed(-1, 0, 0) != epoch_seed(1, 0, 0)


def test_ranks_draw_different_dropout_and_each_rank_replays_its_own(
    data: PreparedData, tmp_path: Path, monkeypatch
) -> None:
    # Two single-process "ranks" on the same data and weights: only the rank differs, so with one
    # seed for all ranks their dropout (and losses) would be identical.
    model_config = dataclasses.replace(data.model_config, dropout=0.3)
    cfg = _cfg(tmp_path, "optim.max_epochs=1", "optim.input_noise_std=0.1")
    losses = {}
    for name, rank in (("r0", "0"), ("r0-again", "0"), ("r1", "1")):
        monkeypatch.setenv("RANK", rank)
        losses[name] = _fit(cfg, data, tmp_path / name, model_config).history[0]["train_loss"]
    assert losses["r0"] == losses["r0-again"]
    assert losses["r0"] != losses["r1"]


def test_ddp_shuffle_comes_from_the_sampler_and_agrees_across_ranks(data: PreparedData) -> None:
    # The per-rank torch seed must not leak into DDP shuffling: every rank's DistributedSampler
    # permutes with its own seed and the epoch, so the shards stay disjoint and cover the data.
    padded = data.padded["train"]
    n = len(padded)
    key = padded.query["text_embedding"][:, 0]  # a per-list value that tells lists apart
    assert len(set(key.tolist())) == n
    for epoch in (0, 3):
        shards = []
        for rank in (0, 1):
            batches = InMemoryBatches(padded, 16, rank=rank, world_size=2)
            torch.manual_seed(epoch_seed(0, rank, epoch))  # what _train_epoch does before iterating
            shards.append([v for b in batches.epoch(epoch) for v in b.query["text_embedding"][:, 0].tolist()])
            assert batches.num_lists == len(shards[-1])
        assert not set(shards[0]) & set(shards[1])
        assert set(shards[0]) | set(shards[1]) == set(key.tolist())


def test_in_memory_validation_shards_add_up_to_the_whole_split(data: PreparedData) -> None:
    # Validation is sharded across ranks (no padding, no overlap): the ranks' metric sums add up
    # to the single-process metric.
    padded = data.padded["validation"]
    logits = np.random.default_rng(0).normal(size=padded.mask.shape).astype(np.float32)
    whole = window_ndcg_sums(logits, padded)
    parts = np.zeros(2)
    for rank in range(3):
        shard = InMemoryBatches(padded, 7, shuffle=False, rank=rank, world_size=3)
        idx = np.arange(len(padded))[rank::3]
        for start, b in zip(range(0, len(idx), 7), shard.epoch(0)):
            parts += window_ndcg_sums(logits[idx[start : start + 7]], b)
    np.testing.assert_allclose(parts, whole)
    assert whole[0] / whole[1] == pytest.approx(window_ndcg(logits, padded))


# ------------------------------------------------------------------------- scoring precision


def test_validation_scores_at_serving_precision_not_trainings(data: PreparedData, tmp_path: Path, monkeypatch) -> None:
    # Checkpoint selection must rank the scores that will be served: on CPU that is fp32 even when
    # training runs under bf16 autocast.
    amps = []
    real = loop.predict_logits
    monkeypatch.setattr(loop, "predict_logits", lambda *a, **kw: amps.append(kw.get("amp")) or real(*a, **kw))
    _fit(_cfg(tmp_path, "optim.amp=bf16", "optim.max_epochs=2"), data, tmp_path / "ckpt")
    assert amps == [inference_amp("cpu")] * 2 == ["none", "none"]


def test_window_logits_score_at_the_inference_amp_of_the_models_device(data: PreparedData, monkeypatch) -> None:
    # Calibration (and test) scores come from window_logits: the rule must be serving's for the
    # model's device. Pretend that device serves bf16 and check the logits are bf16-autocast ones.
    torch.manual_seed(0)
    model = Reranker(data.model_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    devices = []
    monkeypatch.setattr(prepare, "inference_amp", lambda d: devices.append(torch.device(d)) or "bf16")
    lists = data.lists["validation"][:8]
    got = window_logits(model, lists, data)
    assert devices == [torch.device("cpu")]
    padded = pad_split(lists, data.normalizer, data.model_config.max_list_len)
    bf16, fp32 = predict_logits(model, padded, amp="bf16"), predict_logits(model, padded, amp="none")
    for i, (z, cl) in enumerate(zip(got, lists)):
        np.testing.assert_array_equal(z, bf16[i, : cl.window])
    assert any(not np.array_equal(z, fp32[i, : cl.window]) for i, (z, cl) in enumerate(zip(got, lists)))


# ------------------------------------------------------------------------- resume fingerprint

INTERRUPTED = ("optim.max_epochs=3", "scaling.fail_after_epoch=0")


def _interrupted_run(data: PreparedData, tmp_path: Path, ckpt: Path, fingerprint: str) -> None:
    with pytest.raises(RuntimeError, match="injected failure after epoch 0"):
        _fit(_cfg(tmp_path, *INTERRUPTED), data, ckpt, data_fingerprint=fingerprint)


def test_resume_refuses_a_checkpoint_of_another_config(data: PreparedData, tmp_path: Path, fault_injection) -> None:
    ckpt = tmp_path / "ckpt"
    _interrupted_run(data, tmp_path, ckpt, "sha256:data-a")
    other = _cfg(tmp_path, *INTERRUPTED, "optim.lr=0.001")
    with pytest.raises(ResumeMismatchError) as err:
        _fit(other, data, ckpt, data_fingerprint="sha256:data-a")
    msg = str(err.value)
    mine = config_fingerprint(other, data.model_config)
    theirs = config_fingerprint(_cfg(tmp_path, *INTERRUPTED), data.model_config)
    assert mine != theirs and mine in msg and theirs in msg
    assert "the config fingerprint differs" in msg and msg.count("sha256:data-a") == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_000"]  # nothing trained on the old weights


def test_resume_refuses_a_checkpoint_of_other_data(data: PreparedData, tmp_path: Path, fault_injection) -> None:
    ckpt = tmp_path / "ckpt"
    _interrupted_run(data, tmp_path, ckpt, "sha256:data-a")
    with pytest.raises(ResumeMismatchError, match="the data fingerprint differs") as err:
        _fit(_cfg(tmp_path, *INTERRUPTED), data, ckpt, data_fingerprint="sha256:data-b")
    assert "sha256:data-a" in str(err.value) and "sha256:data-b" in str(err.value)


def test_resume_refuses_a_checkpoint_without_a_fingerprint(data: PreparedData, tmp_path: Path, fault_injection) -> None:
    ckpt = tmp_path / "ckpt"
    _interrupted_run(data, tmp_path, ckpt, "sha256:data-a")
    state = load_state(ckpt / "epoch_000")
    del state["fingerprint"]  # written before checkpoints carried one: whose it is cannot be told
    torch.save(state, ckpt / "epoch_000" / "state.pt")
    with pytest.raises(ResumeMismatchError, match="config and data fingerprints differ"):
        _fit(_cfg(tmp_path, *INTERRUPTED), data, ckpt, data_fingerprint="sha256:data-a")


def test_resume_accepts_the_same_config_and_data_whatever_the_run_knobs(
    data: PreparedData, tmp_path: Path, fault_injection
) -> None:
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("the bytes of a data file\n")
    fp = file_fingerprint(data_file)
    ckpt = tmp_path / "ckpt"
    _interrupted_run(data, tmp_path, ckpt, fp)
    knobs = (
        f"output={tmp_path / 'elsewhere'}",
        f"data.cache_dir={tmp_path / 'other-cache'}",
        "bootstrap_samples=500",
        "calibration.method=cross_fit",
        "scaling.num_workers=0",
        "scaling.cpus_per_worker=2",
        "scaling.max_failures=0",
        "scaling.run_name=renamed",
        "scaling.fail_after_epoch=null",
    )
    resumed = _fit(_cfg(tmp_path, "optim.max_epochs=3", *knobs), data, ckpt, data_fingerprint=fp).history
    assert [h["epoch"] for h in resumed] == [1, 2]
    assert load_state(ckpt / "epoch_002")["fingerprint"] == load_state(ckpt / "epoch_000")["fingerprint"]
