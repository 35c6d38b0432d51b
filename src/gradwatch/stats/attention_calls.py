"""The attention calls the attention probes see (`attention.py`), as `AttentionCall`s: an
explicit softmax over q·kᵀ scores, `F.scaled_dot_product_attention` and
`F.multi_head_attention_forward`, with their masks; and their statistics (the largest score and
the entropy per head), computed in chunks of at most `CHUNK` scores. No host sync.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# At most about this many scores (and weights) exist at once while a call's statistics are made.
CHUNK = 1 << 24

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


_SHAPE_NODES = frozenset(
    ("View", "UnsafeView", "Reshape", "ReshapeAlias", "Squeeze", "Unsqueeze", "Select", "Slice",
     "Permute", "T", "Transpose", "Alias", "Clone", "Expand")
)  # fmt: skip


def made_by(t: Tensor, node: str, hops: int = 4) -> float:
    """1.0 if autograd node `node` ("SigmoidBackward0") made `t`, through at most `hops`
    shape-only nodes; else 0.0. Reads the graph on the host: no data, no sync."""
    fn = t.grad_fn
    for _ in range(hops + 1):
        if fn is None:
            return 0.0
        name = type(fn).__name__
        if name == node:
            return 1.0
        if re.sub(r"Backward\d*$", "", name) not in _SHAPE_NODES or not fn.next_functions:
            return 0.0
        fn = fn.next_functions[0][0]
    return 0.0


@dataclass(frozen=True)
class AttentionCall:
    """One attention call's scores, made batch chunk by batch chunk: either the scores the
    model's softmax saw with its weights ([batch, heads, queries, keys]), or q and k
    ([batch, heads, L, d]) with the scale and an additive mask broadcastable to the scores (its
    batch axis 1 or `batch`), for SDPA and nn.MultiheadAttention, which never make them."""

    batch: int
    heads: int
    scores: Tensor | None = None
    weights: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    scale: float = 1.0
    mask: Tensor | None = None

    def chunk(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """(scores, weights) of examples start..stop, float32, masked entries −inf."""
        if self.scores is not None and self.weights is not None:
            return self.scores[start:stop].float(), self.weights[start:stop].float()
        assert self.q is not None and self.k is not None
        scores = self.q[start:stop].float() @ self.k[start:stop].float().transpose(-2, -1)
        scores = scores * self.scale
        if self.mask is not None:
            mask = self.mask if self.mask.shape[0] == 1 else self.mask[start:stop]
            scores = scores + mask
        return scores, scores.softmax(dim=-1)


def attention_statistics(call: AttentionCall) -> tuple[Tensor, Tensor]:
    """max |s| over the entries with non-zero weight, and per head [Σ entropy, rows], of one
    attention call. In chunks of the batch, so that at most about `CHUNK` scores exist at once
    (the q·kᵀ product of SDPA and MultiheadAttention included). No host sync."""
    _, queries, keys = call.heads, *_lengths(call)
    step = max(1, CHUNK // max(1, call.heads * queries * keys))
    largest = torch.zeros((), device=_device(call))
    entropy = torch.zeros(2, call.heads, device=_device(call))
    with torch.no_grad():
        for start in range(0, call.batch, step):
            s, p = call.chunk(start, start + step)
            low, high = s.masked_fill(p == 0, 0.0).aminmax()
            largest = torch.maximum(largest, torch.maximum(high, -low))
            h = -torch.special.xlogy(p, p).sum(dim=-1)  # [batch, heads, queries]; NaN: no key
            valid = torch.isfinite(h)
            entropy[0] += torch.where(valid, h, 0.0).sum(dim=(0, 2))
            entropy[1] += valid.sum(dim=(0, 2))
    return largest, entropy


def _lengths(call: AttentionCall) -> tuple[int, int]:
    if call.scores is not None:
        return call.scores.shape[-2], call.scores.shape[-1]
    assert call.q is not None and call.k is not None
    return call.q.shape[-2], call.k.shape[-2]


def _device(call: AttentionCall) -> torch.device:
    source = call.scores if call.scores is not None else call.q
    assert source is not None
    return source.device


def softmax_call(x: Tensor, dim: int, weights: Tensor) -> AttentionCall | None:
    """A softmax over `dim` of x, when it looks like attention (see the module docs)."""
    if dim not in (-1, x.dim() - 1) or not x.is_floating_point():
        return None
    if x.dim() >= 4:
        scores = x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
    elif x.dim() == 3 and x.shape[1] == x.shape[2]:
        scores = x[:, None]
    else:
        return None
    return AttentionCall(
        scores.shape[0], scores.shape[1], scores.detach(), weights.detach().reshape(scores.shape)
    )


def sdpa_call(
    query: Tensor,
    key: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> AttentionCall:
    """The scores `F.scaled_dot_product_attention` computes inside, from its arguments."""
    q, k = _as_heads(query.detach()), _as_heads(key.detach())
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves a group
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    queries, keys = q.shape[-2], k.shape[-2]
    mask = None
    if is_causal:
        future = torch.ones(queries, keys, dtype=torch.bool, device=q.device).triu(1)
        mask = _additive(future[None, None], blocked_when_true=True)
    if attn_mask is not None:
        extra = _additive(_as_heads(attn_mask.detach()), blocked_when_true=False)
        mask = extra if mask is None else mask + extra
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return AttentionCall(q.shape[0], q.shape[1], q=q, k=k, scale=scale, mask=mask)


def mha_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> AttentionCall:
    """The scores of one `F.multi_head_attention_forward` call, from its arguments."""
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, heads = a["query"].detach(), a["key"].detach(), a["num_heads"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key = query[:, None], key[:, None]
    embed = query.shape[-1]
    with torch.no_grad():
        if a["use_separate_proj_weight"]:
            w_q, w_k = a["q_proj_weight"], a["k_proj_weight"]
        else:
            w_q, w_k = a["in_proj_weight"][:embed], a["in_proj_weight"][embed : 2 * embed]
        bias = a["in_proj_bias"]
        b_q, b_k = (None, None) if bias is None else (bias[:embed], bias[embed : 2 * embed])
        length, batch = query.shape[:2]
        q = F.linear(query, w_q, b_q).reshape(length, batch * heads, -1).transpose(0, 1)
        if a["static_k"] is not None:
            k = a["static_k"].detach()
        else:
            k = F.linear(key, w_k, b_k)
            if a["bias_k"] is not None:
                k = torch.cat([k, a["bias_k"].detach().expand(1, batch, -1)])
            k = k.reshape(k.shape[0], batch * heads, -1).transpose(0, 1)
        if a["add_zero_attn"]:
            k = torch.cat([k, k.new_zeros(k.shape[0], 1, k.shape[2])], dim=1)
    q, k = q.reshape(batch, heads, length, -1), k.reshape(batch, heads, k.shape[1], -1)
    extra = k.shape[2] - key.shape[0]  # bias_k / zero-attention keys are never masked
    mask = None
    if a["attn_mask"] is not None:
        attn_mask = a["attn_mask"].detach()
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.reshape(-1, heads, *attn_mask.shape[-2:])
        mask = _additive(F.pad(attn_mask, (0, extra)), blocked_when_true=True)
    if a["key_padding_mask"] is not None:
        padding = a["key_padding_mask"].detach()
        padding = F.pad(padding[None] if unbatched else padding, (0, extra))[:, None, None, :]
        padding = _additive(padding, blocked_when_true=True)
        mask = padding if mask is None else mask + padding
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    return AttentionCall(batch, heads, q=q, k=k, scale=1 / math.sqrt(q.shape[-1]), mask=mask)


def _as_heads(t: Tensor) -> Tensor:
    """[..., L, E] as [batch, heads, L, E]: the axes between the first and the last two are
    heads; 2-d (unbatched, one head) and 3-d (one head) inputs get the missing axes."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[:, None]
    return t.reshape(t.shape[0], -1, *t.shape[-2:])


def _additive(mask: Tensor, blocked_when_true: bool) -> Tensor:
    """A boolean mask (True = blocked, or True = attends) or an additive float mask, as an
    additive float32 mask: −inf where blocked."""
    if mask.dtype != torch.bool:
        return mask.float()
    blocked = mask if blocked_when_true else ~mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(blocked, -torch.inf)


def sdpa_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = dict(zip(names, args, strict=False)) | kwargs
    return (
        given["query"],
        given["key"],
        given.get("attn_mask"),
        bool(given.get("is_causal", False)),
        given.get("scale"),
        bool(given.get("enable_gqa", False)),
    )
