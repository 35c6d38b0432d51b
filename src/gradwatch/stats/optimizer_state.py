"""Statistics of the optimizer's state: where Adam's ε takes over the update.

Adam (and AdamW, NAdam, RAdam) divides the first moment by √v̂ + ε, v̂ = v / (1 − β₂^t) the
bias-corrected second moment, the gradient's mean square over the last ~1/(1 − β₂) steps. When √v̂
falls to the order of ε, ε dominates the denominator and the update shrinks far below the learning
rate: the layer stops learning although its gradient is not zero (Wortsman et al. 2023,
"Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322, §3.4:
the gradient RMS of large models falls to ε; remedy: a smaller ε).

- `adam_eps_frac`  per tensor, the share of entries whose √v̂ < `EPS_FACTOR`·ε (with AMSGrad, of
                   the running maximum of v̂ that it divides by), among all its entries, counting
                   only entries that ever had a gradient (v > 0): an entry whose gradient has
                   always been exactly 0 (a unit a ReLU keeps dead, a pixel blank in every image,
                   a word not seen yet) takes no update whatever ε is, so ε does not dominate
                   it. Probe steps, read in the step post-hook from the optimizer's state
                   (this step's v): one comparison and one sum over v per tensor. NaN for
                   tensors without Adam-family state.

Under FSDP2 each rank counts its shard and divides by the whole tensor's size; the flush sums the
shards. No host sync: a step counter on the device stays there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradwatch.distributed import local_tensor
from gradwatch.inventory import Inventory
from gradwatch.stats.device import constant

EPS_FACTOR = 10.0


class AdamEpsilon:
    """`adam_eps_frac` of the watched tensors that an Adam-family optimizer updates."""

    def __init__(self, optimizer: torch.optim.Optimizer, inventory: Inventory) -> None:
        self.optimizer = optimizer
        self._index = {id(p): i for i, p in enumerate(inventory.params)}

    def shares(self, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """(inventory indices, shares) of the tensors with Adam state, on `device`; None when
        there are none (another optimizer, or before its first step)."""
        index, shares = [], []
        for group in self.optimizer.param_groups:
            eps, betas = group.get("eps"), group.get("betas")
            if not isinstance(eps, float) or not isinstance(betas, (tuple, list)):
                continue
            for param in group["params"]:
                state = self.optimizer.state.get(param, {})
                if id(param) not in self._index or "exp_avg_sq" not in state:
                    continue
                second = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
                second = state["exp_avg_sq"] if second is None else second
                index.append(self._index[id(param)])
                shares.append(_share_below(second, state["step"], eps, float(betas[1]), param))
        if not index:
            return None
        key = tuple(index)
        return constant(key, device, torch.long), torch.stack([s.to(device) for s in shares])


def _share_below(
    second: Tensor, step: Tensor | float, eps: float, beta2: float, param: Tensor
) -> Tensor:
    """Share of entries with 0 < √(v / (1 − β₂^t)) < EPS_FACTOR·ε, i.e. with
    0 < v < (EPS_FACTOR·ε)²·(1 − β₂^t). A step counter on the host (the default) makes the threshold
    a Python number, passed to the comparison as it is (no copy to the device)."""
    v = local_tensor(second.detach())
    if isinstance(step, Tensor) and step.device.type != "cpu":  # capturable / fused: stay there
        correction: Tensor | float = 1 - beta2 ** step.to(v.device, torch.float64)
    else:
        correction = 1 - beta2 ** float(step)  # host data: the step counter is on the CPU
    below = (v < (EPS_FACTOR * eps) ** 2 * correction) & (v > 0)
    return below.sum().float() / param.numel()
