from __future__ import annotations

import json

import pytest
import torch

from cotrr_ray.core.model import Reranker, RerankerConfig
from cotrr_ray.core.spec import IMAGE_SEARCH_SPEC, FeatureSpec

LETOR_SPEC = FeatureSpec(version="letor-test", candidate={"letor": 136})


def make_model(spec: FeatureSpec = IMAGE_SEARCH_SPEC, seed: int = 0, **overrides) -> Reranker:
    torch.manual_seed(seed)
    overrides.setdefault("d_model", 64)
    overrides.setdefault("n_heads", 4)
    model = Reranker(RerankerConfig.from_spec(spec, context_dim=3, **overrides)).eval()
    # At init (std 0.02) attention is nearly uniform and interactions are ~1e-5; perturb the weights
    # so that dependence and invariance checks have a wide margin.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def with_candidate_replaced(candidate: dict, index: int) -> dict:
    """A copy of the candidate features with one candidate's every group replaced by noise."""
    changed = {n: x.clone() for n, x in candidate.items()}
    for x in changed.values():
        x[:, index] = torch.randn_like(x[:, index]) * 3
    return changed


def make_inputs(config: RerankerConfig, B: int = 2, M: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    candidate = {n: torch.randn(B, M, d, generator=g) for n, d in config.candidate_groups}
    query = {n: torch.randn(B, d, generator=g) for n, d in config.query_groups}
    context = torch.randn(B, M, config.context_dim, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    return candidate, query, context, mask


def test_parameter_count_default_spec_in_range():
    torch.manual_seed(0)
    model = Reranker(RerankerConfig.from_spec(IMAGE_SEARCH_SPEC, context_dim=3))
    assert 1_000_000 <= model.num_parameters() <= 3_000_000


def test_output_shape_and_dtype():
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config, B=3, M=7)
    logits = model(candidate, query, context, mask)
    assert logits.shape == (3, 7)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_padding_invariance():
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config, B=2, M=5)
    ref = model(candidate, query, context, mask)

    g = torch.Generator().manual_seed(7)
    pad = 4
    cand_p = {
        n: torch.cat([x, 100 * torch.randn(2, pad, x.shape[-1], generator=g)], dim=1) for n, x in candidate.items()
    }
    cand_p["visual"][:, -1] = float("nan")  # garbage may be anything, even NaN
    ctx_p = torch.cat([context, 50 * torch.randn(2, pad, context.shape[-1], generator=g)], dim=1)
    mask_p = torch.cat([mask, torch.zeros(2, pad, dtype=torch.bool)], dim=1)
    padded = model(cand_p, query, ctx_p, mask_p)
    assert padded.shape == (2, 9)
    torch.testing.assert_close(padded[:, :5], ref, atol=1e-5, rtol=0)


def test_list_context_dependence():
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config, B=1, M=5)
    ref = model(candidate, query, context, mask)
    changed = with_candidate_replaced(candidate, 2)
    out = model(changed, query, context, mask)
    assert (out[0, 0] - ref[0, 0]).abs() > 1e-6
    # A candidate masked out must not influence others, unlike a real one.
    mask_out = mask.clone()
    mask_out[0, 2] = False
    a = model(candidate, query, context, mask_out)
    b = model(changed, query, context, mask_out)
    torch.testing.assert_close(a[:, [0, 1, 3, 4]], b[:, [0, 1, 3, 4]], atol=1e-5, rtol=0)


def test_query_dependence():
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config)
    ref = model(candidate, query, context, mask)
    other = {n: torch.randn_like(x) for n, x in query.items()}
    out = model(candidate, other, context, mask)
    assert (out - ref).abs().max() > 1e-6


def test_spec_without_query_groups():
    model = make_model(LETOR_SPEC)
    assert model.query_encoder is None
    candidate, query, context, mask = make_inputs(model.config, B=2, M=6)
    assert query == {}
    mask[1, 4:] = False
    logits = model(candidate, query, context, mask)
    assert logits.shape == (2, 6)
    assert torch.isfinite(logits[mask]).all()


def test_all_padded_list_gives_no_nan():
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config)
    mask[1] = False
    logits = model(candidate, query, context, mask)
    assert torch.isfinite(logits).all()


def test_zero_layers_scores_each_candidate_alone_and_trains_every_parameter():
    model = make_model(n_layers=0)
    assert model.query_encoder is None and len(model.blocks) == 0
    candidate, query, context, mask = make_inputs(model.config, B=1, M=5)
    ref = model(candidate, query, context, mask)
    changed = with_candidate_replaced(candidate, 2)
    out = model(changed, query, context, mask)
    torch.testing.assert_close(out[:, [0, 1, 3, 4]], ref[:, [0, 1, 3, 4]], atol=1e-6, rtol=0)
    assert (
        model(candidate, {n: torch.randn_like(x) for n, x in query.items()}, context, mask) - ref
    ).abs().max() > 1e-6
    model.train()
    model(candidate, query, context, mask).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs no unused parameters


@pytest.mark.parametrize("n_layers", [0, 1])
def test_dropout_is_active_in_training_even_without_attention(n_layers):
    # With n_layers 0 the encoder and head are the whole network; config.dropout must reach them.
    model = make_model(n_layers=n_layers, dropout=0.3)
    inputs = make_inputs(model.config)
    torch.testing.assert_close(model(*inputs), model(*inputs))  # eval: deterministic
    model.train()
    assert (model(*inputs) - model(*inputs)).abs().max() > 1e-4
    no_dropout = make_model(n_layers=n_layers, dropout=0.0).train()
    torch.testing.assert_close(no_dropout(*inputs), no_dropout(*inputs))


def test_group_norm_decides_whether_a_groups_magnitude_reaches_the_score():
    # The LayerNorm on a group's projection makes its token blind to the group's overall scale (the
    # embedding case); without it a larger feature vector can mean a more relevant candidate.
    for group_norm, scale_invariant in ((True, True), (False, False)):
        model = make_model(n_layers=0, group_norm=group_norm, dropout=0.0)
        assert (
            any(isinstance(m, torch.nn.LayerNorm) for m in model.candidate_encoder.group_proj.modules()) == group_norm
        )
        with torch.no_grad():
            for proj in model.candidate_encoder.group_proj:
                proj[0].bias.zero_()
        candidate, query, context, mask = make_inputs(model.config, B=1, M=4)
        ref = model(candidate, query, context, mask)
        scaled = dict(candidate, visual=candidate["visual"] * 3.0)
        same = torch.allclose(model(scaled, query, context, mask), ref, atol=1e-4)
        assert same == scale_invariant, group_norm


def test_config_round_trip_and_validation():
    config = RerankerConfig.from_spec(IMAGE_SEARCH_SPEC, context_dim=3, n_layers=3, dropout=0.2, group_norm=False)
    d = json.loads(json.dumps(config.to_dict()))
    back = RerankerConfig.from_dict(d)
    assert back == config
    # Bundles written before group_norm existed had the LayerNorm: a missing key means True.
    assert RerankerConfig.from_dict({k: v for k, v in d.items() if k != "group_norm"}).group_norm is True
    assert back.to_dict() == config.to_dict()
    with pytest.raises(ValueError, match="unknown"):
        RerankerConfig.from_dict({**d, "temperature": 1.0})
    with pytest.raises(ValueError, match="n_heads"):
        RerankerConfig.from_spec(IMAGE_SEARCH_SPEC, context_dim=3, d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="n_layers"):
        RerankerConfig.from_spec(IMAGE_SEARCH_SPEC, context_dim=3, n_layers=-1)


def test_rejects_mismatched_inputs():
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config)
    bad = dict(candidate, visual=torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="visual"):
        model(bad, query, context, mask)
    with pytest.raises(ValueError, match="max_list_len"):
        model(*make_inputs(model.config, M=model.config.max_list_len + 1))


def test_bf16_autocast_forward_backward():
    model = make_model(dropout=0.1).train()
    candidate, query, context, mask = make_inputs(model.config, B=2, M=6)
    mask[0, 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(candidate, query, context, mask)
    assert logits.dtype == torch.float32
    logits[mask].square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_head_and_logits_stay_fp32_under_bf16_autocast():
    # Served logits must not be rounded to bf16 (~0.016 apart near |z| = 3): ties and orders would
    # differ from the fp32 logits the calibrator was fitted on.
    model = make_model()
    candidate, query, context, mask = make_inputs(model.config, B=4, M=8)
    seen = []
    hook = model.head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(candidate, query, context, mask)
    hook.remove()
    assert logits.dtype == torch.float32
    # The head's output is the fp32 head of the same (bf16-autocast) hidden states, bit for bit.
    with torch.inference_mode():
        expected = model.head(seen[0].float()).squeeze(-1)
    assert torch.equal(logits, expected)
    # And the logits carry more than bf16's 8 bits of mantissa.
    assert not torch.equal(logits, logits.bfloat16().float())
    assert logits.unique().numel() == logits.numel()
