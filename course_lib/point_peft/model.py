"""Point-PEFT on a pretrained Point-MAE: freeze it, add prompts and adapters, train 1 in 10 weights or fewer.

Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb (the pieces in 14 and 15).

    model, report = point_peft(load_pretrained_point_mae(num_classes=15), PointPEFTConfig(), bank)
    logits = model(points, indices=dataset_indices)      # training: indices keep a shape from itself
    logits = model(points)                                # evaluation on test shapes

One forward pass, for block l of the frozen backbone (x = [CLS, G patch tokens], pos their
position embeddings, P = K + 2 prompt tokens in the first L blocks):

    h = x + pos                                          (B, 1+G, C)
    h = [h_CLS, prompts_l, h_patches]                    (B, 1+P+G, C)   if l < L   (prompt.py)
    h = h + Attn(LN(h))                                  frozen
    m = MLP(LN(h));  h = h + m + 0.7 * Adapter_l(m)      frozen MLP, parallel adapter (adapter.py)
    h = GeometryAwareAdapter_l(h)                        local groups, propagation, final bottleneck
    x = h without the prompt tokens                      (B, 1+G, C)

then the frozen final LayerNorm (trained, as in the official code) and the head.

The query feature for retrieval comes from a frozen *copy* of the pretrained encoder
(`query_encoder`, in eval mode), as the official code keeps a second pretrained model for it:
the wrapped encoder's CLS, final norm and biases change while training, the bank's features must
not. The copy is not counted in the report's totals (the paper does not count it either);
`course_lib.meters.count_parameters(model)` does count it, as frozen, so use `model.report()`.

Trained (the official set): the prompts and their coordinates, the adapters and the shared local
attention, the CLS token and position, the final norm, the head, and the biases of the frozen
blocks that Point-MAE has (attention output, MLP fc1/fc2, both LayerNorms). The course's blocks
also have query/key/value biases, which Point-MAE's do not; they stay frozen.

Official code vs paper: see the docs of prompt.py and adapter.py. Here: prompts go into blocks
0-5 (`prompt_blocks=None`, the official code; the paper's "first L blocks" is `prompt_blocks=L`),
and a training shape never retrieves itself (`exclude_self=True`; the official code lets it).
The frozen tokenizer's BatchNorm layers follow the model's train/eval mode, as in the official code.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from course_lib.point_peft.adapter import (
    GeometryAwareAdapter,
    LocalGroupAttention,
    TokenGrouping,
    group_tokens,
)
from course_lib.point_peft.backbone import PointBackbone, check_point_backbone
from course_lib.point_peft.memory_bank import MemoryBank, encoder_sha256
from course_lib.point_peft.prompt import (
    PointPriorPrompt,
    insert_prompts,
    parameter_free_attention,
    remove_prompts,
)
from course_lib.report import PEFTReport

__all__ = ["ABLATIONS", "PointPEFTConfig", "PointPEFTModel", "PointPEFTReport", "point_peft"]

#: Named switches for the ablations of notebook 16.
ABLATIONS: dict[str, dict[str, bool]] = {
    "full": {},
    "prompt_only": {"use_adapter": False},
    "adapter_only": {"use_prompt": False},
    "no_bank": {"use_memory_bank": False},
}

#: Biases of the frozen blocks that the official code trains (BitFit-like).
TRAINED_BLOCK_BIASES = ("attention.output.bias", "mlp.fc1.bias", "mlp.fc2.bias", "attention_norm.bias", "mlp_norm.bias")


@dataclass(frozen=True)
class PointPEFTConfig:
    """Sizes and switches of Point-PEFT; defaults are the official Point-MAE code's values.

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.

    Attributes:
        use_prompt / use_adapter / use_memory_bank: the three parts (see `ABLATIONS`).
        top_k: K shapes retrieved from the bank; the prompt set has K + 2 tokens.
        num_prompt_tokens: P; None means K + 2 (must be K + 2 with a memory bank).
        prompt_blocks: L, prompts in blocks 0..L-1; None = min(6, depth) (official: blocks 0-5).
        prompt_dropout: dropout on the learned prompt tokens.
        retrieval_bottleneck: width of the residual bottleneck on the retrieved set (C -> 8 -> C).
        adapter_bottleneck: width of the MLP-branch and final bottlenecks (C -> 16 -> C).
        adapter_dropout: dropout inside every bottleneck (official 0.1).
        mlp_adapter_scale: x <- x + m + 0.7 * Adapter(m).
        local_heads, local_head_dim: the shared local attention, 6 x 3 (see adapter.py).
        local_attention_scale: None = 1/sqrt(heads * head_dim) (official); head_dim ** -0.5 is usual.
        num_anchors: FPS anchors over token centres; None = G // 2.
        anchor_neighbours: k tokens per anchor, by centre xyz (16).
        anchor_scale: g_a += 0.3 * x_a.   propagation_scale: x_t += 0.3 * interpolation.
        propagation_neighbours: None = all anchors (official), 3 = PointNet++ / paper.
        exclude_self: training shapes never retrieve their own bank row (needs `indices`).
        zero_init: start every bottleneck at zero and the pooled BatchNorm's scale at zero
            (official: no; Xavier init). With `anchor_scale=0` as well, the adapters then start as
            the identity: without prompts the patch tokens start exactly as the pretrained
            encoder's (prompts still act through the frozen attention). Note that `anchor_scale`
            is a fixed scale, not an initial value: 0 drops the anchor term for all of training.
        train_biases: train the frozen blocks' biases (official: yes).
        bank_query_in_training: in training, take a shape's retrieval query from its own bank
            row (its feature without augmentation) instead of running the frozen query encoder
            on the augmented cloud (official: run it). Saves one frozen forward per step.
        group_prompts: the prompt tokens join the adapter's geometric groups through their
            learnable coordinates (official: yes). False groups the patch tokens alone, so the
            retrieved features reach the patch tokens only through the frozen attention.
    """

    use_prompt: bool = True
    use_adapter: bool = True
    use_memory_bank: bool = True
    top_k: int = 8
    num_prompt_tokens: int | None = None
    prompt_blocks: int | None = None
    prompt_dropout: float = 0.1
    retrieval_bottleneck: int = 8
    adapter_bottleneck: int = 16
    adapter_dropout: float = 0.1
    mlp_adapter_scale: float = 0.7
    local_heads: int = 6
    local_head_dim: int = 3
    local_attention_scale: float | None = None
    num_anchors: int | None = None
    anchor_neighbours: int = 16
    anchor_scale: float = 0.3
    propagation_scale: float = 0.3
    propagation_neighbours: int | None = None
    exclude_self: bool = True
    zero_init: bool = False
    train_biases: bool = True
    bank_query_in_training: bool = False
    group_prompts: bool = True

    def __post_init__(self) -> None:
        if not (self.use_prompt or self.use_adapter):
            raise ValueError("PointPEFTConfig: use_prompt and use_adapter are both False, nothing would be added")
        positive = ("top_k", "retrieval_bottleneck", "adapter_bottleneck", "local_heads", "local_head_dim", "anchor_neighbours")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PointPEFTConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_prompt_tokens", "prompt_blocks", "num_anchors", "propagation_neighbours"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"PointPEFTConfig.{name} must be None or a positive int, got {value!r}")
        for name in ("prompt_dropout", "adapter_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"PointPEFTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.uses_bank and self.num_prompt_tokens not in (None, self.top_k + 2):
            raise ValueError(
                f"with a memory bank the prompt set has top_k + 2 = {self.top_k + 2} tokens, got "
                f"num_prompt_tokens={self.num_prompt_tokens}; leave it None or set use_memory_bank=False"
            )

    @property
    def uses_bank(self) -> bool:
        return self.use_prompt and self.use_memory_bank

    @property
    def prompt_tokens(self) -> int:
        """P, the number of prompt tokens per block."""
        return self.num_prompt_tokens if self.num_prompt_tokens is not None else self.top_k + 2

    @classmethod
    def ablation(cls, name: str, **overrides: Any) -> PointPEFTConfig:
        """The config of one ablation of `ABLATIONS` ("full", "prompt_only", "adapter_only", "no_bank")."""
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}")
        return cls(**(ABLATIONS[name] | overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PointPEFTReport(PEFTReport):
    """A `course_lib.report.PEFTReport` of a Point-PEFT model (the frozen query-encoder copy
    aside), with the head's share and the copy's size. `per_part` is the earlier name of `parts`.

    `point_peft` wraps the encoder it is given (in place: the encoder's own parameters are
    frozen there and it lives on inside the returned wrapper, which is the model to train)."""

    head: int = 0
    query_encoder: int = 0

    @property
    def per_part(self) -> dict[str, int]:
        return self.parts

    @property
    def trainable_pct_without_head(self) -> float:
        """Trainable share leaving the classification head out of both counts."""
        return 100.0 * (self.trainable - self.head) / (self.total - self.head)

    def __str__(self) -> str:
        lines = [
            f"trainable {self.trainable:,} of {self.total:,} parameters ({self.trainable_pct:.2f}%; "
            f"{self.trainable_pct_without_head:.2f}% without the {self.head:,}-parameter head)"
        ]
        lines += [f"  {name:<22} {count:>10,}" for name, count in self.parts.items()]
        if self.query_encoder:
            lines.append(f"  (+ {self.query_encoder:,} frozen in the query-encoder copy, not counted)")
        return "\n".join(lines)


class PointPEFTModel(nn.Module):
    """A frozen `PointMAEEncoder` with Point-prior Prompts and Geometry-aware Adapters (module doc).

    Parts: `encoder` (the wrapped model, frozen in place), `prompts` (one `PointPriorPrompt` per
    prompted block), `prompt_coordinates` (P, 3; None unless prompts join the adapters' groups),
    `adapters` (one `GeometryAwareAdapter` per block), `local_attention` (shared),
    `query_encoder` (frozen copy, with a bank) and the bank as buffers `bank_features` (S, C),
    `bank_labels` (S,).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """

    def __init__(
        self, encoder: PointBackbone, config: PointPEFTConfig = PointPEFTConfig(), memory_bank: MemoryBank | None = None
    ) -> None:
        super().__init__()
        check_point_backbone(encoder)  # PointMAEEncoder, or any point transformer with the same pieces
        if not isinstance(config, PointPEFTConfig):
            raise TypeError(f"config must be a PointPEFTConfig, got {type(config).__name__}")
        mc, C = encoder.config, encoder.config.dim
        self.config = config
        self.num_prompt_blocks = min(6, mc.depth) if config.prompt_blocks is None else config.prompt_blocks
        self.num_prompts = config.prompt_tokens if config.use_prompt else 0
        self.num_anchors = mc.num_groups // 2 if config.num_anchors is None else config.num_anchors
        if config.use_prompt and self.num_prompt_blocks > mc.depth:
            raise ValueError(f"prompt_blocks = {self.num_prompt_blocks} exceeds the backbone's depth {mc.depth}")
        if config.use_adapter and not 1 <= self.num_anchors <= mc.num_groups:
            raise ValueError(f"num_anchors must be in [1, G = {mc.num_groups}], got {self.num_anchors}")
        if config.use_adapter and config.anchor_neighbours > mc.num_groups:
            raise ValueError(f"anchor_neighbours = {config.anchor_neighbours} exceeds the G = {mc.num_groups} patch tokens")
        if config.uses_bank and memory_bank is None:
            raise ValueError(
                "this config retrieves from a memory bank: pass one (build_memory_bank / load_memory_bank), "
                "or use PointPEFTConfig.ablation('no_bank')"
            )

        self.encoder = encoder
        self.query_encoder: PointBackbone | None = None
        if config.uses_bank:
            self.query_encoder = copy.deepcopy(encoder).eval()
            self.query_encoder.head = nn.Identity()  # only pooled features are needed
            memory_bank.check_encoder(encoder_sha256(self.query_encoder), source="the memory bank")
            if memory_bank.dim != C:
                raise ValueError(f"the memory bank has C = {memory_bank.dim} features, the encoder C = {C}")
            if config.top_k >= memory_bank.num_shapes:
                raise ValueError(
                    f"top_k = {config.top_k} needs a bank of more than {config.top_k} shapes, got {memory_bank.num_shapes}"
                )
            self.register_buffer("bank_features", memory_bank.features.clone(), persistent=False)
            self.register_buffer("bank_labels", memory_bank.labels.clone(), persistent=False)

        P = self.num_prompts
        self.prompts = nn.ModuleList(
            PointPriorPrompt(
                C, P, dropout=config.prompt_dropout, adapter_dropout=config.adapter_dropout, zero_init=config.zero_init,
                retrieval_bottleneck=config.retrieval_bottleneck if config.uses_bank else None,
            )
            for _ in range(self.num_prompt_blocks if config.use_prompt else 0)
        )  # fmt: skip
        # learnable xyz of the prompt tokens, so they join the adapters' geometric groups   (P, 3)
        grouped = config.use_prompt and config.use_adapter and config.group_prompts
        self.prompt_coordinates = nn.Parameter(torch.empty(P, 3)) if grouped else None
        if self.prompt_coordinates is not None:
            nn.init.trunc_normal_(self.prompt_coordinates, std=0.02)
        self.adapters = nn.ModuleList(
            GeometryAwareAdapter(
                C, config.adapter_bottleneck, dropout=config.adapter_dropout, mlp_scale=config.mlp_adapter_scale,
                anchor_scale=config.anchor_scale, propagation_scale=config.propagation_scale, zero_init=config.zero_init,
            )
            for _ in range(mc.depth if config.use_adapter else 0)
        )  # fmt: skip
        self.local_attention = (
            LocalGroupAttention(C, config.local_heads, config.local_head_dim, config.local_attention_scale)
            if config.use_adapter
            else None
        )
        self.mark_trainable()

    # -- which parameters train ----------------------------------------------------------------

    def is_trained(self, name: str) -> bool:
        """Whether the parameter `name` (as in `named_parameters()`) belongs to the official trained set."""
        if name.startswith("query_encoder."):
            return False
        if not name.startswith("encoder."):
            return True  # prompts, prompt coordinates, adapters, local attention
        inner = name.removeprefix("encoder.")
        if inner in ("cls_token", "cls_position") or inner.startswith(("norm.", "head.")):
            return True
        biases = tuple(getattr(self.encoder, "trained_block_biases", TRAINED_BLOCK_BIASES))
        return self.config.train_biases and inner.startswith("blocks.") and inner.endswith(biases)

    def mark_trainable(self) -> None:
        """Freeze everything, then unfreeze exactly the official trained set."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(self.is_trained(name))

    def report(self) -> PointPEFTReport:
        """Trainable / total parameters (query-encoder copy aside) and the trained count per part."""
        per_part: dict[str, int] = {}
        trainable = total = query = 0
        for name, parameter in self.named_parameters():
            n = parameter.numel()
            if name.startswith("query_encoder."):
                query += n
                continue
            total += n
            if parameter.requires_grad:
                trainable += n
                inner = name.removeprefix("encoder.")
                part = "block biases" if inner.startswith("blocks.") else inner.split(".")[0]
                per_part[part] = per_part.get(part, 0) + n
        head = sum(p.numel() for p in self.encoder.head.parameters() if p.requires_grad)
        changed = sorted({name.split(".")[0] for name, _ in self.named_children() if name not in ("encoder", "query_encoder")})
        return PointPEFTReport(method="point_peft", trainable=trainable, total=total, changed=changed, parts=per_part,
                               in_place=True, config=self.config, head=head, query_encoder=query)  # fmt: skip

    def train(self, mode: bool = True) -> PointPEFTModel:
        super().train(mode)
        if self.query_encoder is not None:
            self.query_encoder.eval()  # the bank's features were taken in eval mode
        return self

    # -- forward --------------------------------------------------------------------------------

    def retrieve(self, points: Tensor, indices: Tensor | None = None, query_features: Tensor | None = None) -> Tensor:
        """The retrieved prompt set (B, K+2, C) for a batch (see `parameter_free_attention`)."""
        if self.query_encoder is None:
            raise ValueError("this model has no memory bank (use_prompt and use_memory_bank must both be on)")
        if query_features is None and self.training and indices is not None and self.config.bank_query_in_training:
            query_features = self.bank_features[indices]  # (B, C): the shapes' own rows, un-augmented
        if query_features is None:
            with torch.no_grad():
                query_features = self.query_encoder.pooled_features(points)  # (B, C), frozen
        exclude = None
        if self.config.exclude_self:
            if indices is None and self.training:
                raise ValueError(
                    "in training, pass the batch's dataset indices, model(points, indices=...), so that no "
                    "training shape retrieves itself from the memory bank (or set exclude_self=False)"
                )
            exclude = indices
        return parameter_free_attention(query_features, self.bank_features, self.config.top_k, exclude).prompts

    def forward_features(
        self, points: Tensor, indices: Tensor | None = None, query_features: Tensor | None = None
    ) -> Tensor:
        """points (B, N, 3) -> final tokens (B, 1+G, C), after the final LayerNorm."""
        x, pos, centres = self.encoder.embed(points)  # (B, 1+G, C), (B, 1+G, C), (B, G, 3)
        B, P = x.shape[0], self.num_prompts
        retrieved = self.retrieve(points, indices, query_features) if self.query_encoder is not None else None
        grouping_plain = grouping_prompted = None
        if self.local_attention is not None:
            k, n = self.config.anchor_neighbours, self.config.propagation_neighbours
            group = lambda xyz, lead: group_tokens(xyz, self.num_anchors, k, lead, n)
            if len(self.prompts) < len(self.encoder.blocks) or self.prompt_coordinates is None:
                grouping_plain = group(centres, 0)  # patch tokens only
            if len(self.prompts) > 0 and self.prompt_coordinates is not None:
                prompt_xyz = self.prompt_coordinates.expand(B, -1, -1).to(centres.dtype)  # (B, P, 3)
                grouping_prompted = group(torch.cat([prompt_xyz, centres], dim=1), P)  # (B, P+G, 3) token centres
        for index, block in enumerate(self.encoder.blocks):
            h = x + pos  # (B, 1+G, C)
            prompted = index < len(self.prompts)
            if prompted:
                h = insert_prompts(h, self.prompts[index](B, retrieved))  # (B, 1+P+G, C)
            h = h + block.attention_branch(h)  # frozen attention
            m = block.mlp_branch(h)  # frozen MLP
            h = h + m
            if self.local_attention is not None:
                adapter: GeometryAwareAdapter = self.adapters[index]
                h = h + adapter.mlp_delta(m)  # + 0.7 * Adapter(m)
                grouped = prompted and self.prompt_coordinates is not None
                grouping: TokenGrouping = grouping_prompted if grouped else grouping_plain
                h = adapter(h, grouping, self.local_attention, P if prompted else 0, prompts_grouped=grouped)
            x = remove_prompts(h, P) if prompted else h  # (B, 1+G, C)
        return self.encoder.norm(x)

    def forward(self, points: Tensor, indices: Tensor | None = None, query_features: Tensor | None = None) -> Tensor:
        """points (B, N, 3) -> logits (B, num_classes). `indices`: the batch's bank rows (training)."""
        return self.encoder.classify(self.forward_features(points, indices, query_features))


def point_peft(
    model: PointBackbone, config: PointPEFTConfig = PointPEFTConfig(), memory_bank: MemoryBank | None = None
) -> tuple[PointPEFTModel, PointPEFTReport]:
    """Wrap a pretrained Point-MAE (or any `PointBackbone`) with Point-PEFT: freeze it, add the
    modules, report the counts.

    `model` is frozen in place (except the official trained set) and held by the wrapper;
    `memory_bank` must come from the same encoder (`build_memory_bank` / `load_memory_bank`),
    else it is refused as stale. Returns (the wrapper, its `PointPEFTReport`).

    Derived in notebooks/part2_point_peft/16_point_peft_results.ipynb.
    """
    wrapped = PointPEFTModel(model, config, memory_bank)
    return wrapped, wrapped.report()
