"""Point-PEFT's Point-prior Prompt: retrieve similar training shapes, turn them into prompt tokens.

Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.

Parameter-free attention. A memory bank holds one feature per training shape, F (S, C), taken
from the frozen pretrained encoder (`course_lib.point_peft.memory_bank`). For a query shape with
feature f (from the same frozen encoder):

    s_i = <f / |f|, F_i / |F_i|>               cosine similarity to every stored shape   (S,)
    I   = top-K indices of s                    the K most similar shapes (K = 8)
    a   = softmax(s_I)                          no temperature, no parameters             (K,)
    r   = sum_{i in I} a_i F_i                  the weighted sum of the retrieved features (C,)
    prompt set = [f, r, F_I1, ..., F_IK]        K + 2 tokens                              (K+2, C)

In training the query shape itself is in the bank and would retrieve itself with similarity ~1;
`exclude_indices` (the batch's dataset indices) removes it. The official code does not exclude
it (its query is augmented, so it retrieves a near-copy of itself); the course does, so that the
prior carries information about *other* shapes, and says so.

Similarity is cosine (both sides normalised), as in the paper; the retrieved features and the
query feature enter the prompt unnormalised, on the encoder's own scale.

Prompt tokens. Each block that gets prompts has its own P = K + 2 learnable tokens (dropout
0.1). The retrieved set passes a tiny residual bottleneck (C -> 8 -> C) and is added:

    prompts_l = Dropout(E_l) + (R + Adapter_l(R))          E_l (P, C) learned, R (B, P, C) retrieved

They are inserted right after CLS at the block input and removed after the block
(`insert_prompts`, `remove_prompts`); without a memory bank (ablation) prompts_l = Dropout(E_l).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from course_lib.point_peft.adapter import PointBottleneckAdapter
from course_lib.points.sampling import check_finite

if TYPE_CHECKING:
    from course_lib.point_peft.memory_bank import MemoryBank

__all__ = [
    "PointPriorPrompt",
    "Retrieval",
    "insert_prompts",
    "parameter_free_attention",
    "remove_prompts",
    "retrieval_precision",
]


class Retrieval(NamedTuple):
    """What `parameter_free_attention` returns."""

    prompts: Tensor  # (B, K+2, C): [query, weighted sum, K retrieved]
    weights: Tensor  # (B, K) softmax over the top-K similarities
    indices: Tensor  # (B, K) bank rows retrieved, most similar first
    similarities: Tensor  # (B, K) their cosine similarities


def parameter_free_attention(
    query: Tensor, bank: Tensor, top_k: int = 8, exclude_indices: Tensor | None = None
) -> Retrieval:
    """Cosine top-K retrieval from a bank, softmax weights, weighted sum (see the module doc).

    Args:
        query: (B, C) features of the query shapes (frozen pretrained encoder).
        bank: (S, C) stored features, one row per training shape.
        top_k: K, shapes retrieved per query (K < S when excluding, K <= S otherwise).
        exclude_indices: None, or (B,) bank rows never to retrieve (the query's own row; use -1
            for a query that is not in the bank, e.g. a test shape).

    Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.
    """
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query must be (B, C) and bank (S, C) with the same C, got {tuple(query.shape)} and {tuple(bank.shape)}"
        )
    check_finite(query, "query")  # cosine similarity with a NaN query is NaN for every shape
    check_finite(bank, "bank")
    S = bank.shape[0]
    limit = S - 1 if exclude_indices is not None else S
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limit:
        raise ValueError(f"top_k must be an int in [1, {limit}] for a bank of {S} shapes, got {top_k!r}")
    similarities = F.normalize(query, dim=-1) @ F.normalize(bank, dim=-1).T  # cos(f, F_i)     (B, S)
    if exclude_indices is not None:
        exclude_indices = torch.as_tensor(exclude_indices, device=query.device).long()
        if exclude_indices.shape != (query.shape[0],):
            raise ValueError(
                f"exclude_indices must have shape (B,) = ({query.shape[0]},), got {tuple(exclude_indices.shape)}"
            )
        if bool((exclude_indices >= S).any()) or bool((exclude_indices < -1).any()):
            raise ValueError(
                f"exclude_indices must be bank rows in [0, {S}) or -1 (not in the bank), got {exclude_indices.tolist()}"
            )
        own = torch.zeros_like(similarities, dtype=torch.bool)  # (B, S)
        rows = exclude_indices >= 0
        own[rows.nonzero().squeeze(1), exclude_indices[rows]] = True
        similarities = similarities.masked_fill(own, float("-inf"))  # never retrieve yourself
    top_similarities, indices = similarities.topk(top_k, dim=-1)  # (B, K), most similar first
    weights = top_similarities.softmax(dim=-1)  # a = softmax(s_I), no temperature     (B, K)
    retrieved = bank[indices]  # F_I                                                    (B, K, C)
    weighted_sum = (weights.unsqueeze(-1) * retrieved).sum(dim=1)  # r = sum a_i F_i     (B, C)
    prompts = torch.cat([query.unsqueeze(1), weighted_sum.unsqueeze(1), retrieved], dim=1)  # (B, K+2, C)
    return Retrieval(prompts, weights, indices, top_similarities)


def retrieval_precision(
    bank: MemoryBank,
    query_features: Tensor | None = None,
    query_labels: Tensor | None = None,
    top_k: int = 8,
) -> float:
    """How often the bank retrieves a shape of the query's own class: label precision@K, in [0, 1].

    The fraction of the K retrieved rows (`parameter_free_attention`, cosine top-K) whose bank
    label equals the query's label, over all queries. Without `query_features` the queries are
    the bank's own rows, each kept from retrieving itself (leave-one-out, what a training shape
    sees); with `query_features` (B, C) and `query_labels` (B,), e.g. the frozen encoder's
    features of the test shapes, nothing is excluded. Chance level is about 1 / number of
    classes for a balanced bank. A prior that retrieves the wrong classes mostly feeds noise
    into the prompts.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    features, labels = bank.features, bank.labels
    if (query_features is None) != (query_labels is None):
        raise ValueError("pass both query_features (B, C) and query_labels (B,), or neither (leave-one-out on the bank)")
    if query_features is None:
        retrieval = parameter_free_attention(features, features, top_k, exclude_indices=torch.arange(len(labels)))
        query_labels = labels
    else:
        query_labels = torch.as_tensor(query_labels).long()
        if query_features.dim() != 2 or query_labels.shape != (query_features.shape[0],):
            raise ValueError(
                f"query_features must be (B, C) and query_labels (B,), got {tuple(query_features.shape)} and "
                f"{tuple(query_labels.shape)}"
            )
        retrieval = parameter_free_attention(query_features.float(), features, top_k)
    same_class = labels[retrieval.indices] == query_labels.to(labels.device)[:, None]  # (B, K)
    return same_class.float().mean().item()


class PointPriorPrompt(nn.Module):
    """One block's prompt tokens: Dropout(E) (+ the retrieved set through a residual bottleneck).

    forward(batch_size, retrieved=None) -> (B, P, C). `retrieved` (B, P, C) comes from
    `parameter_free_attention(...).prompts`; None (no memory bank) gives the learned tokens alone.

    Derived in notebooks/part2_point_peft/14_point_prior_prompt.ipynb.
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int = 10,
        *,
        dropout: float = 0.1,
        retrieval_bottleneck: int | None = 8,
        adapter_dropout: float = 0.1,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        self.num_tokens = num_tokens
        self.embeddings = nn.Parameter(torch.empty(num_tokens, dim))  # E_l          (P, C)
        nn.init.trunc_normal_(self.embeddings, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.retrieval_adapter = (
            PointBottleneckAdapter(dim, retrieval_bottleneck, dropout=adapter_dropout, residual=True, zero_init=zero_init)
            if retrieval_bottleneck is not None
            else None
        )  # R + Adapter(R), C -> 8 -> C; None when the model has no memory bank

    def forward(self, batch_size: int, retrieved: Tensor | None = None) -> Tensor:
        prompts = self.dropout(self.embeddings.expand(batch_size, -1, -1))  # own dropout mask per shape  (B, P, C)
        if retrieved is None:
            return prompts
        if self.retrieval_adapter is None:
            raise ValueError("this PointPriorPrompt was built without a retrieval adapter (no memory bank)")
        if retrieved.shape != prompts.shape:
            raise ValueError(
                f"retrieved set {tuple(retrieved.shape)} must match the prompts {tuple(prompts.shape)} (B, P, C)"
            )
        return prompts + self.retrieval_adapter(retrieved)  # (B, P, C)


def insert_prompts(x: Tensor, prompts: Tensor) -> Tensor:
    """[CLS, tokens...] (B, 1+G, C) and prompts (B, P, C) -> [CLS, prompts, tokens...] (B, 1+P+G, C)."""
    if x.dim() != 3 or prompts.dim() != 3 or x.shape[0] != prompts.shape[0] or x.shape[2] != prompts.shape[2]:
        raise ValueError(
            f"x (B, 1+G, C) and prompts (B, P, C) must agree on B and C, got {tuple(x.shape)}, {tuple(prompts.shape)}"
        )
    return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)


def remove_prompts(x: Tensor, num_prompts: int) -> Tensor:
    """[CLS, P prompts, tokens...] (B, 1+P+G, C) -> [CLS, tokens...] (B, 1+G, C)."""
    return torch.cat([x[:, :1], x[:, 1 + num_prompts :]], dim=1)
