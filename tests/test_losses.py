from __future__ import annotations

import math

import pytest
import torch

from cotrr_ray.core.losses import lambda_loss, listnet_loss, ranking_loss, ranknet_loss
from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.spec import FeatureSpec

LOSSES = {
    "lambda": lambda_loss,
    "lambda@2": lambda s, y, m: lambda_loss(s, y, m, k=2),
    "listnet": listnet_loss,
    "ranknet": ranknet_loss,
}


def random_batch(B: int = 4, M: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, M, generator=g)
    labels = torch.randint(0, 5, (B, M), generator=g).float()
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1 % B, 4:] = False
    mask[3 % B, 3:] = False
    labels[:, 0], labels[:, 1] = 0.0, 3.0  # every real list has label variation
    return logits, labels, mask


def test_lambda_hand_computed():
    # Two candidates, labels (1, 0), scores (0, 0): ranks by stable order are (1, 2).
    # |dNDCG| = |2^1 - 2^0| * |1/log2(2) - 1/log2(3)| / (1/log2(2)) and the logistic term is log 2.
    logits = torch.zeros(1, 2)
    labels = torch.tensor([[1.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = (1.0 - 1.0 / math.log2(3.0)) * math.log(2.0)
    assert lambda_loss(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)
    assert ranknet_loss(logits, labels, mask).item() == pytest.approx(math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("k", [None, 3])
def test_lambda_matches_loop_reference(k):
    logits, labels, mask = random_batch(B=3, M=6, seed=3)
    per_query = []
    for b in range(3):
        s, y = logits[b][mask[b]].tolist(), labels[b][mask[b]].tolist()
        n = len(s)
        order = sorted(range(n), key=lambda i: -s[i])
        rank = {i: r + 1 for r, i in enumerate(order)}
        cut = n if k is None else k
        disc = lambda r, cut=cut: 1.0 / math.log2(1 + r) if r <= cut else 0.0  # noqa: E731
        idcg = sum((2**g - 1) * disc(r + 1) for r, g in enumerate(sorted(y, reverse=True)))
        total = 0.0
        for i in range(n):
            for j in range(n):
                if y[i] > y[j]:
                    w = abs(2 ** y[i] - 2 ** y[j]) * abs(disc(rank[i]) - disc(rank[j])) / idcg
                    total += w * math.log1p(math.exp(-(s[i] - s[j])))
        per_query.append(total)
    expected = sum(per_query) / 3
    assert lambda_loss(logits, labels, mask, k=k).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["lambda", "lambda@2", "listnet", "ranknet"])
def test_perfect_order_beats_reversed(name):
    labels = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    good = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert LOSSES[name](good, labels, mask) < LOSSES[name](good.flip(1), labels, mask)


@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_does_not_affect_loss(name):
    logits, labels, mask = random_batch()
    ref = LOSSES[name](logits, labels, mask)
    g = torch.Generator().manual_seed(1)
    garbage_logits = torch.where(mask, logits, 1e3 * torch.randn(logits.shape, generator=g))
    garbage_labels = torch.where(mask, labels, torch.randint(0, 50, labels.shape, generator=g).float())
    garbage_logits[3, -1] = float("nan")
    out = LOSSES[name](garbage_logits, garbage_labels, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
def test_per_query_grouping(name):
    logits, labels, mask = random_batch(B=2)
    batch = LOSSES[name](logits, labels, mask)
    singles = [LOSSES[name](logits[i : i + 1], labels[i : i + 1], mask[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(batch, (singles[0] + singles[1]) / 2)
    # ...and it is not the loss of the whole batch as one list.
    flat = LOSSES[name](logits.reshape(1, -1), labels.reshape(1, -1), mask.reshape(1, -1))
    assert not torch.allclose(batch, flat)


@pytest.mark.parametrize("name", list(LOSSES))
def test_queries_without_label_variation_are_ignored(name):
    logits, labels, mask = random_batch(B=3)
    labels[1] = 2.0  # constant list
    labels[2, 1:] = 4.0  # variation only in a padded position does not count
    labels[2, 0] = 4.0
    mask[2, 3:] = False
    labels[2, 5] = 0.0
    ref = LOSSES[name](logits[:1], labels[:1], mask[:1])
    torch.testing.assert_close(LOSSES[name](logits, labels, mask), ref)


@pytest.mark.parametrize("name", list(LOSSES))
def test_no_qualifying_query_gives_zero_with_grad(name):
    logits = torch.randn(2, 4, requires_grad=True)
    labels = torch.ones(2, 4)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    loss = LOSSES[name](logits, labels, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_finite_and_masked(name):
    logits, labels, mask = random_batch()
    logits = torch.where(mask, logits, float("nan")).requires_grad_()
    loss = LOSSES[name](logits, labels, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()
    assert logits.grad[mask].abs().sum() > 0


def test_ranking_loss_dispatch():
    logits, labels, mask = random_batch()
    torch.testing.assert_close(
        ranking_loss("lambda", logits, labels, mask, k=3), lambda_loss(logits, labels, mask, k=3)
    )
    torch.testing.assert_close(
        ranking_loss("listnet", logits, labels, mask, ranknet_weight=0.5),
        listnet_loss(logits, labels, mask) + 0.5 * ranknet_loss(logits, labels, mask),
    )
    with pytest.raises(ValueError, match="listmle"):
        ranking_loss("listmle", logits, labels, mask)


def ndcg_at(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean NDCG@k over lists (gain 2^l - 1, log2 discount); all candidates real."""
    disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float32))
    gains = torch.exp2(labels) - 1
    dcg = (gains.gather(1, scores.argsort(1, descending=True)[:, :k]) * disc).sum(1)
    idcg = (gains.sort(1, descending=True).values[:, :k] * disc).sum(1)
    return (dcg / idcg.clamp_min(1e-12)).mean().item()


def test_tiny_training_run_learns():
    torch.manual_seed(0)
    spec = FeatureSpec(version="tiny", candidate={"emb": 16, "extra": 4}, query={"q": 16})
    config = RerankerConfig.from_spec(spec, context_dim=2, d_model=64, n_heads=4, dropout=0.0)
    model = Reranker(config)

    n, M = 64, 10
    candidate = {"emb": torch.randn(n, M, 16), "extra": torch.randn(n, M, 4)}
    query = {"q": torch.randn(n, 16)}
    context = torch.randn(n, M, 2)
    mask = torch.ones(n, M, dtype=torch.bool)
    w = torch.randn(16)
    proj = candidate["emb"] @ w  # (n, M)
    labels = torch.bucketize(proj, torch.tensor([-1.0, 0.0, 0.75, 1.5])).float()  # graded 0..4

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    with torch.no_grad():
        model.eval()
        ndcg_before = ndcg_at(model(candidate, query, context, mask), labels, 5)
    model.train()
    losses = []
    for _ in range(60):
        loss = lambda_loss(model(candidate, query, context, mask), labels, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        ndcg_after = ndcg_at(model(candidate, query, context, mask), labels, 5)
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
    assert ndcg_after > ndcg_before + 0.05, (ndcg_before, ndcg_after)
