"""Per-example norms of `nn.MultiheadAttention` from the step's own forward and backward.

The in-projection's weight is used inside `F.multi_head_attention_forward`, out of reach of a
module hook, and between it and the module's output sit the softmax and the attention dropout.
A replay of the attention would draw new dropout masks, so its per-example gradients would not
be the step's. While a `Capture` records a probe step, `nn.MultiheadAttention` modules therefore
run `CapturedMultiheadAttention.forward`: the same computation as torch's (the same linear maps,
mask handling, `scaled_dot_product_attention` or softmax-dropout-bmm, in the same order, so the
same random numbers are drawn), written out so that the outputs of the in-projection and the
input of `out_proj` are tensors of its own. Their signals come from the step's backward, through
the step's dropout masks, and the in-projection and `out_proj` then follow the Linear rule
(`ghost_norms.py`).

The class of each captured module is swapped for the watch (as `torch.nn.utils.parametrize`
does) and restored after. Off probe steps, in eval mode or without grad, the forward is torch's
own. A copy or a pickle of the module is a plain `nn.MultiheadAttention`.

Handled: packed projections (`_qkv_same_embed_dim`), no `bias_k`/`bias_v`, no `add_zero_attn`,
batched inputs; other modules keep torch's forward and go to the torch.func fallback.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradwatch.stats.ghost_norms import Call

# id(module) -> the captures recording it, with its name in each capture's model.
_CAPTURES: dict[int, list[tuple[Any, str]]] = {}


def capturable(module: nn.Module) -> bool:
    """Whether `module` is an `nn.MultiheadAttention` whose forward this file writes out."""
    return (
        type(module) in (nn.MultiheadAttention, CapturedMultiheadAttention)
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and not module.add_zero_attn
    )


def swap_in(module: nn.Module, capture: Any, name: str) -> None:
    """Record `module`'s attention for `capture` (under `name`) while the capture is active."""
    _CAPTURES.setdefault(id(module), []).append((capture, name))
    module.__class__ = CapturedMultiheadAttention


def swap_out(module: nn.Module, capture: Any) -> None:
    """Stop recording for `capture`; the module is torch's again when no capture is left."""
    left = [(c, n) for c, n in _CAPTURES.get(id(module), []) if c is not capture]
    if left:
        _CAPTURES[id(module)] = left
        return
    _CAPTURES.pop(id(module), None)
    module.__class__ = nn.MultiheadAttention


class CapturedMultiheadAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention` whose forward, while a capture records, exposes the in-projection
    outputs and the input of `out_proj` (see the module docstring)."""

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        arguments = (
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal,
        )  # fmt: skip
        captures = [(c, n) for c, n in _CAPTURES.get(id(self), []) if c.active and c.passes]
        if not captures or not torch.is_grad_enabled() or query.dim() != 3:
            return nn.MultiheadAttention.forward(self, *arguments)
        try:
            return _attention(self, functools.partial(_record, captures), *arguments)
        except Exception as exc:
            # torch's own forward decides whose fault it is: it raises on the user's arguments
            # (and its error is the one to see); if it runs, the fault is gradwatch's, reported
            # through each capture (a watcher stops watching; the training goes on).
            out = nn.MultiheadAttention.forward(self, *arguments)
            for capture, _ in captures:
                capture.fail(exc)
            return out

    def __reduce_ex__(self, protocol: Any) -> Any:
        # copies and pickles are torch's own class: the swap belongs to this process's watch
        reduced = super().__reduce_ex__(protocol)
        return (object.__new__, (nn.MultiheadAttention,), *reduced[2:])


def _record(
    captures: list[tuple[Any, str]],
    part: str,
    x: Tensor,
    y: Tensor,
    rows: tuple[int, int] | None,
) -> None:
    """Record a linear map's call for every capture, under the module's name (`part` "") or
    its `out_proj`'s: its input `x` and where the step's backward puts the signal at its output
    `y`, both [L, B, ...] (sequence first)."""
    for capture, name in captures:
        signal = capture.keep_signal(y)
        if signal is None:
            continue
        call = Call((x.detach().transpose(0, 1),), {}, signal, rows=rows, batch_first=True)
        owner = ".".join(n for n in (name, part) if n)  # the module's name ("" for the root)
        capture.passes[-1].setdefault(owner, []).append(call)


def _projected(
    module: nn.MultiheadAttention, record: Any, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v from the packed in-projection, computed as `F._in_projection_packed` does."""
    width = module.embed_dim
    weight, bias = module.in_proj_weight, module.in_proj_bias

    def project(x: Tensor, start: int, stop: int) -> Tensor:
        out = F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])
        record("", x, out, (start, stop))
        return out

    def split(proj: Tensor, parts: int) -> tuple[Tensor, ...]:
        proj = (
            proj.reshape(*proj.shape[:-1], parts, width).unsqueeze(0).transpose(0, -2).squeeze(-2)
        )
        return tuple(proj.contiguous())

    if key is value and query is key:
        return split(project(query, 0, 3 * width), 3)  # type: ignore[return-value]
    if key is value:
        return (project(query, 0, width), *split(project(key, width, 3 * width), 2))  # type: ignore[return-value]
    return (
        project(query, 0, width),
        project(key, width, 2 * width),
        project(value, 2 * width, 3 * width),
    )


def _sequence_first(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-first inputs as [L, B, E], each distinct tensor transposed once, as torch does (so
    that `_projected` sees which of them are the same tensor)."""
    if key is value and query is key:
        query = query.transpose(1, 0)
        return query, query, query
    if key is value:
        key = key.transpose(1, 0)
        return query.transpose(1, 0), key, key
    return query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)


def _masks(
    query: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    need_weights: bool,
    is_causal: bool,
) -> tuple[Tensor | None, Tensor | None, bool]:
    """The masks and the causal flag as `F.multi_head_attention_forward` makes them."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype,
    )  # fmt: skip
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        return key_padding_mask, None, is_causal
    attn_mask = F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
        target_type=query.dtype, check_other=False,
    )  # fmt: skip
    return key_padding_mask, attn_mask, is_causal and key_padding_mask is None


def _weighted(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout: float,
    shape: tuple[int, int, int],
) -> tuple[Tensor, Tensor]:
    """need_weights: softmax, dropout and bmm, as torch does; the merged heads [L·B, E] and the
    weights [B, H, L, S]. The softmax runs over [B, H, L, S] (the same values), so that the
    attention probes see the heads."""
    batch, heads, length = shape
    keys = k.shape[1]
    scores = torch.bmm(q * math.sqrt(1.0 / float(q.shape[-1])), k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = F.softmax(scores.view(batch, heads, length, keys), dim=-1)
    weights = weights.view(batch * heads, length, keys)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    merged = torch.bmm(weights, v).transpose(0, 1).reshape(length * batch, heads * q.shape[-1])
    return merged, weights.view(batch, heads, length, keys)


def _attention(
    module: nn.MultiheadAttention,
    record: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    average_attn_weights: bool,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """torch's `nn.MultiheadAttention.forward` for batched inputs in training, written out."""
    if module.batch_first:
        query, key, value = _sequence_first(query, key, value)
    length, batch, width = query.shape
    heads = module.num_heads
    key_padding_mask, attn_mask, is_causal = _masks(
        query, key_padding_mask, attn_mask, need_weights, is_causal
    )
    q, k, v = _projected(module, record, query, key, value)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    head_dim = width // heads
    q = q.view(length, batch * heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], batch * heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], batch * heads, head_dim).transpose(0, 1)
    keys = k.shape[1]
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(batch, 1, 1, keys)
            .expand(-1, heads, -1, -1)
            .reshape(batch * heads, 1, keys)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        merged, weights = _weighted(q, k, v, attn_mask, dropout, (batch, heads, length))
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(batch, heads, -1, keys)
        q = q.view(batch, heads, length, head_dim)
        k = k.view(batch, heads, keys, head_dim)
        v = v.view(batch, heads, keys, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal)
        merged = out.permute(2, 0, 1, 3).reshape(batch * length, width)
    projected = F.linear(merged, module.out_proj.weight, module.out_proj.bias)
    out = projected.view(length, batch, projected.size(1))
    record("out_proj", merged.view(length, batch, width), out, None)
    return (out.transpose(1, 0) if module.batch_first else out), weights
