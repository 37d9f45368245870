"""Listwise attention reranker: scores the top-M candidates of one query jointly.

Each candidate becomes one vector (its feature groups and scalar context fused), the query becomes a
few key/value tokens, and a small pre-LN transformer lets every candidate look at the query
(cross-attention) and at the other candidates of its list (self-attention), so a score depends on
what else was retrieved. The config is a frozen dataclass that round-trips through JSON, so a
checkpoint carries its own architecture and loads without pickled objects.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from cotrr_ray.core.spec import FeatureSpec


@dataclass(frozen=True)
class RerankerConfig:
    candidate_groups: tuple[tuple[str, int], ...]  # (name, dim) per candidate group, in input order
    query_groups: tuple[tuple[str, int], ...]  # (name, dim) per query group; may be empty
    context_dim: int  # per-candidate scalar features computed upstream (score, z-score, 1/position, ...)
    d_model: int = 256
    n_heads: int = 8
    n_layers: int = 2  # 0 = no attention: each candidate scored alone (an ablation, and for tiny data)
    ffn_mult: int = 4
    dropout: float = 0.1
    group_norm: bool = True  # LayerNorm on each candidate group's projection (False: keep its magnitude)
    max_list_len: int = 20  # the Top-M window trained for; longer lists are refused, not silently scored

    def __post_init__(self) -> None:
        # JSON and YAML hand us lists; normalise so equality and hashing behave.
        object.__setattr__(self, "candidate_groups", tuple((str(n), int(d)) for n, d in self.candidate_groups))
        object.__setattr__(self, "query_groups", tuple((str(n), int(d)) for n, d in self.query_groups))
        problems = []
        if not self.candidate_groups:
            problems.append("candidate_groups must not be empty")
        for scope, groups in (("candidate", self.candidate_groups), ("query", self.query_groups)):
            names = [n for n, _ in groups]
            if len(set(names)) != len(names):
                problems.append(f"duplicate {scope} group names: {names}")
            problems += [f"{scope} group {n!r} has dim {d} < 1" for n, d in groups if d < 1 or not n]
        if self.context_dim < 0:
            problems.append(f"context_dim must be >= 0, got {self.context_dim}")
        if self.d_model < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            problems.append(f"d_model ({self.d_model}) must be a positive multiple of n_heads ({self.n_heads})")
        if self.n_layers < 0:
            problems.append(f"n_layers must be >= 0, got {self.n_layers}")
        if self.ffn_mult < 1 or self.max_list_len < 1:
            problems.append("ffn_mult and max_list_len must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if problems:
            raise ValueError("invalid RerankerConfig: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, spec: FeatureSpec, *, context_dim: int, **overrides: Any) -> RerankerConfig:
        return cls(
            candidate_groups=tuple(spec.candidate.items()),
            query_groups=tuple(spec.query.items()),
            context_dim=context_dim,
            **overrides,
        )

    @property
    def similarity_pairs(self) -> tuple[tuple[int, int], ...]:
        """(candidate group index, query group index) pairs with equal dims, whose raw cosine is a feature."""
        return tuple(
            (i, j)
            for i, (_, dc) in enumerate(self.candidate_groups)
            for j, (_, dq) in enumerate(self.query_groups)
            if dc == dq
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidate_groups"] = [[n, dim] for n, dim in self.candidate_groups]
        d["query_groups"] = [[n, dim] for n, dim in self.query_groups]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RerankerConfig keys {unknown}; known keys are {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is MISSING)
        if missing:
            raise ValueError(f"RerankerConfig dict is missing required keys {missing}")
        return cls(**d)


class Attention(nn.Module):
    """Multi-head attention from x to a separate memory; self-attention is memory = x."""

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.q = nn.Linear(config.d_model, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor, memory: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, M, d = x.shape
        L = memory.shape[1]
        nh, hs = self.n_heads, d // self.n_heads
        q = self.q(x).view(B, M, nh, hs).transpose(1, 2)  # (B, nh, M, hs)
        k, v = self.kv(memory).split(d, dim=-1)
        k = k.view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, M, hs)
        return self.proj(y.transpose(1, 2).reshape(B, M, d))


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.proj = nn.Linear(d_hidden, d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN: cross-attention to the query, self-attention over the list, FFN."""

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.has_query = bool(config.query_groups)
        if self.has_query:
            self.ln_cross = nn.LayerNorm(d)
            self.ln_memory = nn.LayerNorm(d)
            self.cross_attn = Attention(config)
        self.ln_self = nn.LayerNorm(d)
        self.self_attn = Attention(config)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = MLP(d, config.ffn_mult * d, d, config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, memory: Tensor | None, list_mask: Tensor) -> Tensor:
        if memory is not None:
            x = x + self.drop(self.cross_attn(self.ln_cross(x), self.ln_memory(memory)))  # (B, M, d)
        h = self.ln_self(x)
        x = x + self.drop(self.self_attn(h, h, list_mask))  # (B, M, d)
        return x + self.ffn(self.ln_ffn(x))  # (B, M, d)


class CandidateEncoder(nn.Module):
    """Feature groups + scalar context of one candidate -> one d_model vector."""

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        d = config.d_model
        # ModuleList, not ModuleDict: spec group names may contain '.', which ModuleDict rejects.
        # The LayerNorm makes a token blind to its group's overall magnitude: right for an embedding,
        # wrong for dense relevance features (BM25, click rates...) where a larger value means more
        # relevant, so it is a per-model choice.
        self.group_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, d), nn.LayerNorm(d) if config.group_norm else nn.Identity())
            for _, dim in config.candidate_groups
        )
        self.n_context_in = config.context_dim + len(config.similarity_pairs)
        if self.n_context_in:
            # Two layers so a few scalars (score, rank, cosine) can enter non-linearly.
            self.context_proj = nn.Sequential(
                nn.Linear(self.n_context_in, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d)
            )
        n_tokens = len(config.candidate_groups) + (1 if self.n_context_in else 0)
        self.type_emb = nn.Parameter(0.02 * torch.randn(n_tokens, d))
        # A plain sum would turn the type embeddings into one constant bias; a per-token gate lets
        # them matter and lets the model down-weight an uninformative group per candidate.
        self.gate = nn.Linear(d, 1)
        self.ln_fuse = nn.LayerNorm(d)
        # Dropout here and in the head, not only in the blocks: with n_layers 0 they are the whole
        # network, and config.dropout must still regularise it.
        self.fuse = MLP(d, d, d, config.dropout)

    def forward(self, groups: list[Tensor], context: Tensor | None) -> Tensor:
        tokens = [proj(x) for proj, x in zip(self.group_proj, groups)]  # each (B, M, d)
        if context is not None:
            tokens.append(self.context_proj(context))
        t = torch.stack(tokens, dim=-2) + self.type_emb  # (B, M, T, d)
        x = (torch.sigmoid(self.gate(t)) * t).sum(dim=-2)  # (B, M, d)
        return x + self.fuse(self.ln_fuse(x))  # (B, M, d)


class QueryEncoder(nn.Module):
    """Query groups -> key/value tokens, behind one learned null token."""

    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.group_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, d), nn.LayerNorm(d)) for _, dim in config.query_groups
        )
        self.type_emb = nn.Parameter(0.02 * torch.randn(len(config.query_groups), d))
        # With a single key, softmax gives it weight 1 whatever the scores; the null token makes the
        # weight on the query depend on the candidate-query match (attend to "nothing" if irrelevant).
        self.null = nn.Parameter(0.02 * torch.randn(1, 1, d))

    def forward(self, groups: list[Tensor]) -> Tensor:
        q = torch.stack([proj(x) for proj, x in zip(self.group_proj, groups)], dim=1)  # (B, Q, d)
        q = q + self.type_emb
        null = self.null.expand(q.shape[0], 1, -1).to(q.dtype)  # (B, 1, d)
        return torch.cat([null, q], dim=1)  # (B, 1 + Q, d)


class Reranker(nn.Module):
    def __init__(self, config: RerankerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.candidate_encoder = CandidateEncoder(config)
        # Only attention reads the query tokens; without blocks the query enters through the cosines
        # alone, and an encoder nobody reads would leave parameters without gradients (DDP refuses).
        self.query_encoder = QueryEncoder(config) if config.query_groups and config.n_layers else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.head = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, 1)
        )
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by depth, so the stream's
        # variance does not grow with n_layers at init.
        for name, p in self.named_parameters():
            if name.startswith("blocks.") and name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, candidate: dict[str, Tensor], query: dict[str, Tensor], context: Tensor, mask: Tensor) -> Tensor:
        """Logits (B, M) float32; entries where mask is False are unspecified."""
        cfg = self.config
        self._check_inputs(candidate, query, context, mask)
        keep = mask.unsqueeze(-1)  # (B, M, 1)
        # Zero padded rows first: callers may leave garbage (even NaN) there, and 0 * NaN in the
        # attention matmul would leak into real rows despite the mask.
        cand = [candidate[name].masked_fill(~keep, 0.0) for name, _ in cfg.candidate_groups]  # (B, M, d_g)
        qry = [query[name] for name, _ in cfg.query_groups]  # (B, d_h)

        ctx_parts = [context.masked_fill(~keep, 0.0).float()] if cfg.context_dim else []
        for i, j in cfg.similarity_pairs:
            # Cosine of the raw vectors (e.g. CLIP image vs query text) is the strongest relevance
            # signal we have; hand it over directly instead of hoping attention rediscovers it.
            sim = F.cosine_similarity(cand[i].float(), qry[j].float().unsqueeze(1), dim=-1, eps=1e-6)  # (B, M)
            ctx_parts.append(sim.unsqueeze(-1))
        ctx = torch.cat(ctx_parts, dim=-1) if ctx_parts else None  # (B, M, C + S)

        x = self.candidate_encoder(cand, ctx)  # (B, M, d)
        memory = self.query_encoder(qry) if self.query_encoder is not None else None  # (B, 1 + Q, d)

        # Padded keys are hidden from every row. A list with no real candidate would leave a row
        # with no key at all (softmax of all -inf = NaN), so such lists attend everywhere instead.
        key_ok = mask | ~mask.any(dim=-1, keepdim=True)  # (B, M)
        list_mask = key_ok[:, None, None, :]  # (B, 1, 1, M), broadcast over heads and query rows
        for block in self.blocks:
            x = block(x, memory, list_mask)
        # The head runs in fp32 even under autocast: bf16 logits have ~0.016 resolution near |z| = 3,
        # enough for ties and orders that differ from the fp32 logits the calibrator was fitted on.
        # It is a few small matmuls per candidate, so the cost is negligible.
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float()).squeeze(-1)  # (B, M) float32

    def _check_inputs(
        self, candidate: dict[str, Tensor], query: dict[str, Tensor], context: Tensor, mask: Tensor
    ) -> None:
        cfg = self.config
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a (B, M) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        B, M = mask.shape
        if M > cfg.max_list_len:
            raise ValueError(f"list length {M} exceeds max_list_len {cfg.max_list_len} this model was built for")
        expected_c = [n for n, _ in cfg.candidate_groups]
        expected_q = [n for n, _ in cfg.query_groups]
        if sorted(candidate) != sorted(expected_c) or sorted(query) != sorted(expected_q):
            raise ValueError(
                f"feature groups do not match the model: got candidate {sorted(candidate)}, query {sorted(query)};"
                f" expected candidate {expected_c}, query {expected_q}"
            )
        for name, dim in cfg.candidate_groups:
            if tuple(candidate[name].shape) != (B, M, dim):
                got = tuple(candidate[name].shape)
                raise ValueError(f"candidate[{name!r}] has shape {got}, expected {(B, M, dim)}")
        for name, dim in cfg.query_groups:
            if tuple(query[name].shape) != (B, dim):
                raise ValueError(f"query[{name!r}] has shape {tuple(query[name].shape)}, expected {(B, dim)}")
        if tuple(context.shape) != (B, M, cfg.context_dim):
            raise ValueError(f"context has shape {tuple(context.shape)}, expected {(B, M, cfg.context_dim)}")
