"""`ModelLayout`: what the detectors know about the watched model, fixed at the first flush."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """Names and kinds behind the columns of a statistics block.

    `tensors` / `tensor_modules` name the per-tensor columns and the module owning each tensor;
    `modules` names the per-module columns in forward order, with each module's class name and
    whether it owns parameters, is one of torch.nn's own layers, is a zeroing (ReLU-family) or a
    saturating (sigmoid/tanh-family) activation. `world_size` is the number of ranks whose
    batches the statistics describe; `tensor_dtypes` the parameters' dtypes and `module_dtypes`
    the dtype of each module's output ("" where unseen; fp16 under autocast); `tensor_ranks` the
    number of dimensions of each parameter. `called` tells which modules ran in a forward pass
    before the first flush; `tensor_lr` is the learning rate of the optimizer's parameter group
    that holds each tensor at the first flush (None where no group holds it; all 1.0 without an
    optimizer, whose updates gradwatch cannot see).
    """

    tensors: tuple[str, ...]
    tensor_modules: tuple[str, ...]
    modules: tuple[str, ...]
    module_types: tuple[str, ...]
    owns_parameters: tuple[bool, ...]
    builtin: tuple[bool, ...]
    zeroing: tuple[bool, ...]
    saturating: tuple[bool, ...]
    world_size: int = 1
    tensor_dtypes: tuple[str, ...] = ()
    module_dtypes: tuple[str, ...] = ()
    tensor_ranks: tuple[int, ...] = ()
    called: tuple[bool, ...] = ()
    tensor_lr: tuple[float | None, ...] = ()

    def module_type(self, module: str) -> str:
        """The class name of a probed module ("" for one gradwatch does not probe)."""
        return self.module_types[self.modules.index(module)] if module in self.modules else ""

    def precision(self, tensor: int) -> str:
        """The lowest floating-point precision tensor `tensor` trains in: its own dtype, or its
        module's output dtype (autocast), as "float32", "bfloat16", "float16", ..."""
        dtypes = {self.tensor_dtypes[tensor]} if self.tensor_dtypes else set()
        if self.module_dtypes and self.tensor_modules[tensor] in self.modules:
            dtypes.add(self.module_dtypes[self.modules.index(self.tensor_modules[tensor])])
        for low in ("float16", "bfloat16"):
            if low in dtypes:
                return low
        return self.tensor_dtypes[tensor] if self.tensor_dtypes else "float32"

    def low_precision(self, tensor: int) -> bool:
        return self.precision(tensor) in ("float16", "bfloat16")

    def zeroing_around(self, module: str) -> list[int]:
        """The columns of the ReLU-family activations right before and right after `module` in
        forward order (the units that feed it and that it feeds)."""
        if module not in self.modules:
            return []
        column = self.modules.index(module)
        around = [c for c in (column - 1, column + 1) if 0 <= c < len(self.modules)]
        return [c for c in around if self.zeroing[c]]

    def feeding_layer(self, column: int) -> int:
        """The nearest module before `column` in forward order that owns parameters (the layer
        whose output an activation transforms), or `column` itself if there is none."""
        for earlier in range(column - 1, -1, -1):
            if self.owns_parameters[earlier]:
                return earlier
        return column

    def starves_training(self, column: int) -> bool:
        """Whether units stuck at 0 or at a bound in module `column` cost the model learning.

        They do when the module is a hidden activation (a layer with parameters follows it in
        forward order) and a trainable parameter lies upstream (at it or before it in forward
        order, or in a module gradwatch does not probe): its gradient passes through them. They
        do not at the model's output (a confident sigmoid output under BCE still passes the
        gradient p − y to its logit) nor after a frozen backbone with nothing trainable before.
        """
        hidden = any(self.owns_parameters[c] for c in range(column + 1, len(self.modules)))
        position = {name: c for c, name in enumerate(self.modules)}
        upstream = any(position.get(m, -1) <= column for m in self.tensor_modules)
        return hidden and upstream

    def updates_representable(self, tensor: int) -> bool:
        """Whether a small update to the parameter survives rounding: False for fp16/bf16
        parameters, whose updates below their resolution (~1e-3 of the value) round away."""
        return not self.tensor_dtypes or self.tensor_dtypes[tensor] not in ("float16", "bfloat16")

    def weight_tensors(self) -> list[int]:
        """Tensors of 2 or more dimensions (the weights of layers), by index."""
        return [t for t, rank in enumerate(self.tensor_ranks) if rank >= 2]

    def common_module(self, tensors: list[int]) -> str:
        """The innermost module holding all of `tensors` ("" for the whole model)."""
        parts = [self.tensors[t].split(".")[:-1] for t in tensors]
        common: list[str] = []
        for names in zip(*parts, strict=False):
            if len(set(names)) > 1:
                break
            common.append(names[0])
        return ".".join(common)

    def layer_columns(self) -> list[int]:
        """Module columns that own parameters, in forward order."""
        return [i for i, owns in enumerate(self.owns_parameters) if owns]
