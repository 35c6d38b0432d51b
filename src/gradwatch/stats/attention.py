"""Attention and output-logit probes: the early signs of transformer training instabilities.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities",
arXiv 2309.14322) reproduce in small models two instabilities of large ones, both visible in these
numbers long before the loss shows them: attention logits that grow without bound while the
attention entropy collapses (Dehghani et al. 2023, ViT-22B), and output logits whose log Z drifts
away from 0.

Per attention module, on probe steps (stored as the probe-step array "attention", read with
`run.series("attn_max_logit")` → [steps, len(run.attention_modules)]):

- `attn_max_logit`  max |s| over the attention scores s = q·k/√d_h (with the scale the model
                    uses) that the softmax gives a non-zero weight: masked entries (−inf, or the
                    −1e4 / finfo.min that code writes) are left out.
- `attn_entropy`    per head, the entropy −Σ_k p log p of each query's attention, averaged over
                    the queries of the batch; then the min over heads (nats). Queries whose keys
                    are all masked are left out. (A min over queries would say nothing: under a
                    causal mask the first query's entropy is always 0.)

Which calls are attention, found while a probe step runs (a `TorchFunctionMode` entered by a
forward pre-hook on the model and left when the step's gradients are read, so it also sees the
loss the user computes after the forward):
- `softmax` over the last axis of a tensor of 4 or more dimensions ([batch, heads, queries, keys];
  the dimensions between batch and queries count as heads) or of 3 dimensions with as many
  queries as keys ([batch, T, T], one head): an explicit q·kᵀ softmax, torch's `nn.Softmax`,
  Hugging Face's eager attention;
- `F.scaled_dot_product_attention` (the scores are never materialised there: they are computed
  here from q and k, with its mask, causal flag, scale and grouped-query heads);
- `nn.MultiheadAttention` (`F.multi_head_attention_forward`, or with `per_example` its forward
  written out, seen as SDPA or softmax: q and k from its input projection,
  its masks, `bias_k` and `add_zero_attn`).
The call belongs to the innermost module of the model with a method on the Python stack (its
`forward`, or a helper it calls; torch's own `nn.Softmax` passes it to its parent), named as in
`named_modules()`; calls outside the model (a softmax in the user's loss code) are left out.

For the output logits z, the input of `F.cross_entropy` (also through `nn.CrossEntropyLoss`,
and inside Hugging Face models that compute their loss), per probe step, as scalars:
- `logit_lse`      the mean over positions of log Z = logsumexp_c z_c (positions whose target is
                   `ignore_index` left out).
- `logit_lse_max`  the largest |log Z| over those positions.
- `logit_prob_frac` the share of the loss input that already is a probability: rows of
                   `F.cross_entropy`'s input with every entry in [0, 1] and a sum within 1e-3 of
                   1 (a softmax applied before the loss), and entries of
                   `F.binary_cross_entropy_with_logits`' input strictly inside (0, 1) when a
                   sigmoid made it (its autograd node, seen through reshapes: logits near 0 also
                   fall inside). Logits are neither: a healthy run reads 0.
NaN when no cross-entropy ran (a regression loss, or a loss written from log_softmax and
nll_loss, whose input no longer holds log Z).

Cost: probe steps only. The mode sees every torch call of the forward (a Python call each, a few
µs); each attention call costs about one more softmax over its scores (for SDPA and
MultiheadAttention also the q·kᵀ product, in chunks of at most `CHUNK` scores); the logits cost
one logsumexp. No host sync. Under torch.compile the probes do not run (the values are NaN).
The mode is left when the step's gradients are read (the watcher's step pre-hook, before its own
statistics), or at the next forward off a probe step. A backward called inside it runs outside
it (a mode is off the stack while it handles a call), so only the forward and the loss pay.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradwatch.distributed import LOCAL, Reduction
from gradwatch.stats.attention_calls import (
    AttentionCall,
    attention_statistics,
    made_by,
    mha_call,
    sdpa_arguments,
    sdpa_call,
    softmax_call,
)
from gradwatch.stats.hooks import Shield, eager_unless_traced, unshielded

ATTENTION_STATS: tuple[str, ...] = ("attn_max_logit", "attn_entropy")
LOGIT_SCALARS: tuple[str, ...] = ("logit_lse", "logit_lse_max", "logit_prob_frac")
ATTENTION = "attention"  # the name of the probe-step array


class AttentionProbes:
    """Finds the attention calls and the output logits of probe steps and sums their statistics.

    `probe` is set by the watcher (through `ProbeRecords`) while the forward pass in progress
    belongs to a probe step. `write()` returns (names, [attention modules, 2]) and the logit
    scalars of the step, combined over `ranks`, then starts afresh.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        ranks: Reduction = LOCAL,
        *,
        shield: Shield = unshielded,
    ) -> None:
        self._model = model
        self.shield = shield
        self._names = {id(m): name for name, m in model.named_modules()}
        self.device = device
        self.ranks = ranks
        self.probe = False
        self.names: list[str] = []  # attention modules, in the order they were first seen
        self._max: list[Tensor] = []
        self._entropy: list[Tensor] = []  # per module [2, heads]: Σ entropy, rows
        # Σ log Z, positions, Σ probability rows or entries, rows or entries checked, max |log Z|
        self._logits = torch.zeros(5, device=device)
        # The mode passes every torch call on; what it observes is gradwatch's own work.
        self._mode = _AttentionMode(shield(self._observe))
        self._entered = False
        self.handles: list[Any] = []

    def attach(self) -> None:
        self.handles.append(self._model.register_forward_pre_hook(self.shield(self._enter)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.leave()

    @property
    def _active(self) -> bool:
        return self.probe and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._active and not self._entered:
            self._mode.__enter__()
            self._entered = True
        elif not self.probe:
            self.leave()  # a probe step whose update never came (a skipped step)

    def leave(self) -> None:
        """Stop watching torch calls (the step's gradients are being read: the forward pass and
        the loss are over)."""
        if self._entered:
            self._entered = False
            self._mode.__exit__(None, None, None)

    def _observe(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """One attention or loss call of the forward pass (its arguments and output)."""
        if name == "softmax" and args and isinstance(args[0], Tensor):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(dim, int) and isinstance(output, Tensor):
                call = softmax_call(args[0], dim, output)
                if call is not None:
                    self._record(call)
        elif name == "scaled_dot_product_attention":
            self._record(sdpa_call(*sdpa_arguments(args, kwargs)))
        elif name == "multi_head_attention_forward":
            self._record(mha_call(args, kwargs))
        elif name == "cross_entropy" and args and isinstance(args[0], Tensor):
            target = kwargs.get("target", args[1] if len(args) > 1 else None)
            self._record_logits(args[0], target, kwargs.get("ignore_index", -100))
        elif name == "binary_cross_entropy_with_logits" and args and isinstance(args[0], Tensor):
            self._record_logits(args[0], None, None)

    def _record(self, call: AttentionCall) -> None:
        """Add one attention call to its module's sums."""
        name = self._owner()
        if name is None:
            return
        if name not in self.names:
            self.names.append(name)
            self._max.append(torch.zeros((), device=self.device))
            self._entropy.append(torch.zeros(2, call.heads, device=self.device))
        index = self.names.index(name)
        if self._entropy[index].shape[1] != call.heads:
            return  # the same module with another head count: keep the first
        largest, entropy = attention_statistics(call)
        torch.maximum(self._max[index], largest.to(self.device), out=self._max[index])
        self._entropy[index] += entropy.to(self.device)

    def _owner(self) -> str | None:
        """The innermost module of the model whose forward (or a method of it) is running, None
        outside the model (a softmax in the user's loss code is not attention)."""
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in self._names and not isinstance(owner, nn.Softmax):
                return self._names[id(owner)]
            frame = frame.f_back
        return None

    def _record_logits(self, logits: Tensor, target: Any, ignore_index: int | None) -> None:
        """Add one loss input to the step's sums: the log Z of a cross-entropy input ([N, C, ...],
        [C]; `ignore_index` given) and, for both losses, how much of it is probabilities."""
        if not torch.is_grad_enabled() or not logits.is_floating_point() or not logits.numel():
            return
        with torch.no_grad():
            z = logits.detach().float()
            if ignore_index is None:  # binary cross-entropy with logits: element-wise
                # Logits near 0 can all fall inside (0, 1) (a GAN critic at equilibrium): only
                # a sigmoid's output counts, as its autograd node tells.
                made = made_by(logits, "SigmoidBackward0")
                inside = ((z > 0) & (z < 1)).sum().float() * made
                summary = torch.stack([inside, torch.full_like(inside, z.numel())])
                self._logits[2:4] += summary.to(self.device)
                return
            dim = 1 if z.dim() > 1 else 0
            lse = torch.logsumexp(z, dim=dim)
            kept = torch.ones_like(lse, dtype=torch.bool)
            indices = isinstance(target, Tensor) and not target.is_floating_point()
            if indices and target.shape == lse.shape:  # class indices, not probabilities
                kept = target != ignore_index
            in_range = ((z >= 0) & (z <= 1)).all(dim=dim)
            distribution = in_range & ((z.sum(dim=dim) - 1).abs() <= 1e-3)
            summary = torch.stack(
                [
                    torch.where(kept, lse, 0.0).sum(),
                    kept.sum().float(),
                    (distribution & kept).sum().float(),
                    kept.sum().float(),
                    torch.where(kept, lse.abs(), 0.0).max(),
                ]
            )
        self._logits[:4] += summary[:4].to(self.device)
        torch.maximum(self._logits[4], summary[4].to(self.device), out=self._logits[4])

    def write(self) -> tuple[list[str], Tensor | None, dict[str, Tensor]]:
        """This probe step's attention statistics ([modules, 2], None without attention) and
        logit scalars, combined over the ranks (a few all-reduces); then leave the mode and
        start afresh."""
        self.leave()
        array = None
        if self.names:
            largest = self.ranks.max(torch.stack(self._max))
            sums = self.ranks.sum(torch.cat([e.flatten() for e in self._entropy]))
            entropies, called, start = [], [], 0
            for e in self._entropy:
                total, rows = sums[start : start + e.numel()].view_as(e)
                start += e.numel()
                entropies.append((total / rows.clamp_min(1)).min())
                called.append(rows.sum() > 0)
            array = torch.where(
                torch.stack(called)[:, None],
                torch.stack([largest, torch.stack(entropies)], dim=1),
                torch.nan,
            )
            for m, e in zip(self._max, self._entropy, strict=True):
                m.zero_()
                e.zero_()
        total, positions, probabilities, checked = self.ranks.sum(self._logits[:4].clone())
        largest_lse = self.ranks.max(self._logits[4:].clone())[0]
        seen = positions > 0
        mean_name, max_name, prob_name = LOGIT_SCALARS
        scalars = {
            mean_name: torch.where(seen, total / positions.clamp_min(1), torch.nan),
            max_name: torch.where(seen, largest_lse, torch.nan),
            prob_name: torch.where(checked > 0, probabilities / checked.clamp_min(1), torch.nan),
        }
        self._logits.zero_()
        return list(self.names), array, scalars


# Autograd nodes that change a tensor's shape only (names without "Backward<n>"): looked
# through to find what made it.
class _AttentionMode(TorchFunctionMode):
    """Passes every torch call on, and hands the attention and loss calls (`_SEEN`), with their
    arguments and output, to `observe`."""

    def __init__(self, observe: Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]):
        super().__init__()
        self._observe = observe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        output = func(*args, **kwargs)
        if name not in _SEEN:  # nearly every call: pass it on at once
            return output
        # Evaluation inside a probe step; or a compiled submodule that dynamo traces through
        # this mode: it passes through (the attention inside a compiled region is not seen).
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return output
        self._observe(name, args, kwargs, output)
        return output


_SEEN = frozenset(
    (
        "softmax",
        "scaled_dot_product_attention",
        "multi_head_attention_forward",
        "cross_entropy",
        "binary_cross_entropy_with_logits",
    )
)


eager_unless_traced(AttentionProbes._enter)
