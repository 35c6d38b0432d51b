"""`gradwatch run SCRIPT [ARGS...]`: run an unmodified training script and watch what it trains.

The script runs as `python SCRIPT ARGS` would run it (`__name__ == "__main__"`, `sys.argv`, its
directory first on `sys.path`, its globals kept until the interpreter exits); its exit code and
its exceptions pass through. While it runs:

- global forward hooks note the outermost modules called (those not called from within another
  module's forward), until the first optimizer step; then they are removed;
- a global optimizer step pre-hook meets each optimizer at its first `step()` and calls `gw.watch`
  on the model it trains: the outermost module called so far that holds the most of that
  optimizer's parameters (names as in its `named_parameters()`; DDP's and torch.compile's
  wrappers are removed by `gw.watch`). The watcher's own hooks, registered there, record that
  same step;
- the scalar that `.backward()` was last called on is stored as `loss` at each optimizer step;
- `torch.distributed.destroy_process_group()` first closes the watchers, so that their last steps
  are combined across ranks while the process group still exists.

Several optimizers: one run store each, in the order of their first step: the first at RUN_DIR,
the k-th after it at RUN_DIR-optimizer<k> (a GAN's discriminator and generator, say). An
optimizer whose parameters no module called before the first step holds, or whose model another
optimizer's watcher already watches, is reported and not watched. Under torchrun every rank runs
the same script, and each optimizer's watcher is made on all ranks at the same step.
"""

from __future__ import annotations

import builtins
import datetime
import logging
import runpy
import sys
import types
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import gradwatch as gw
from gradwatch.integrations.settings import optimizer_run_dir
from gradwatch.inventory import optimizer_parameters
from gradwatch.script_models import holding, live, reached_parameters
from gradwatch.stats.hooks import Failsafe

logger = logging.getLogger("gradwatch")
_DISTRIBUTED = torch.distributed.is_available()

GUARDS: dict[str, Any] = {
    "zclip": lambda: gw.guards.ZClip(),
    "autoclip": lambda: gw.guards.AutoClip(),
    "agc": lambda: gw.guards.AGC(),
    "skip-nonfinite": lambda: gw.guards.SkipNonFinite(),
    "rollback": lambda: gw.guards.Rollback(),
    "clip-norm": lambda value: gw.guards.ClipNorm(value),
    "clip-value": lambda value: gw.guards.ClipValue(value),
}


def make_guard(spec: str) -> Any:
    """A guard from its command-line name: `zclip`, `skip-nonfinite`, `clip-norm=1.0`, ..."""
    name, _, value = spec.partition("=")
    if name not in GUARDS:
        raise ValueError(f"unknown guard {spec!r}; choose from {', '.join(GUARDS)}")
    needs_value = name in ("clip-norm", "clip-value")
    if needs_value != bool(value):
        form = f"{name}=VALUE" if needs_value else name
        raise ValueError(f"guard {spec!r}: write it as {form}")
    if not needs_value:
        return GUARDS[name]()
    try:
        threshold = float(value)
    except ValueError:
        raise ValueError(
            f"guard {spec!r}: {value!r} is not a number; write it as {name}=1.0"
        ) from None
    return GUARDS[name](threshold)


@dataclass
class WatchOptions:
    """What `gradwatch run` passes to each `gw.watch`; checked when made (ValueError)."""

    run_dir: Path
    every: int = 1
    probe_every: int | None = 10
    flush_every: int = 50
    guards: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        gw.WatchConfig(str(self.run_dir), self.every, self.probe_every, self.flush_every)
        for spec in self.guards:
            make_guard(spec)


def default_run_dir(script: str | Path, module: bool = False) -> Path:
    """runs/<script's stem, or the module's last name>-<date-time>."""
    name = str(script).rpartition(".")[2] if module else Path(script).stem
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{stamp}"


class ScriptWatcher:
    """The global hooks that find the models, optimizers and losses of a script."""

    def __init__(self, options: WatchOptions) -> None:
        self.options = options
        self.watchers: list[gw.Watcher] = []
        self._roots: list[weakref.ref[nn.Module]] = []
        self._depth = 0
        self._seen: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._by_optimizer: weakref.WeakKeyDictionary[Any, gw.Watcher] = weakref.WeakKeyDictionary()
        self._loss: torch.Tensor | None = None
        self._backward = torch.Tensor.backward
        self._destroy = torch.distributed.destroy_process_group if _DISTRIBUTED else None
        self._handles: list[Any] = []
        self._forward_handles: list[Any] = []
        self.rank = 0  # the global rank, read at the first optimizer step
        self.optimizers_seen = 0
        self._manual: gw.Watcher | None = None  # the model a script trains without torch.optim
        self._manual_decided = False
        self._in_backward = False
        # Its own hooks run in the script's training: a failure in them is reported, not raised.
        self._failsafe = Failsafe("gradwatch run's model discovery")

    def install(self) -> None:
        module_hooks = nn.modules.module
        shield = self._failsafe.shield
        self._forward_handles = [
            module_hooks.register_module_forward_pre_hook(shield(self._enter)),
            module_hooks.register_module_forward_hook(shield(self._leave), always_call=True),
        ]
        self._handles = [
            register_optimizer_step_pre_hook(shield(self._before_step)),
            register_optimizer_step_post_hook(shield(self._after_step)),
        ]
        backward = self._backward
        before, after = shield(self._before_backward), shield(self._after_backward)

        def capturing_backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            # Under a torch-function mode (the attention probes') backward dispatches through
            # the mode, which calls Tensor.backward, this function, again: once is the call.
            if self._in_backward:
                return backward(tensor, *args, **kwargs)
            self._in_backward = True
            try:
                before(tensor)
                result = backward(tensor, *args, **kwargs)
            finally:
                self._in_backward = False
            after(tensor)
            return result

        torch.Tensor.backward = capturing_backward  # type: ignore[method-assign]
        if self._destroy is not None:
            destroy = self._destroy

            def closing_destroy(*args: Any, **kwargs: Any) -> Any:
                self.close()
                return destroy(*args, **kwargs)

            torch.distributed.destroy_process_group = closing_destroy

    def uninstall(self) -> None:
        torch.Tensor.backward = self._backward  # type: ignore[method-assign]
        if self._destroy is not None:
            torch.distributed.destroy_process_group = self._destroy
        for handle in self._handles + self._forward_handles:
            handle.remove()
        self._handles.clear()
        self._forward_handles.clear()

    def close(self) -> list[gw.Watcher]:
        """Close every watcher (flushing its store); returns them in order. Idempotent."""
        for watcher in self.watchers:
            try:
                watcher.close()
            except Exception as exc:  # the script's own outcome matters more
                logger.error("gradwatch: closing %s failed: %s", watcher.run_dir, exc)
        return self.watchers

    # ---- hooks ---------------------------------------------------------------------------------
    def _before_backward(self, tensor: torch.Tensor) -> None:
        """A scalar's backward is a loss's: stored as `loss`; the first one also tells whether
        the script trains without torch.optim (`_watch_manual_training`)."""
        if tensor.numel() != 1:
            return
        self._loss = tensor.detach()
        if not self._manual_decided:
            self._watch_manual_training(tensor)

    def _after_backward(self, tensor: torch.Tensor) -> None:
        """Training by hand: each loss's backward is a step (its gradients are complete now;
        the script applies them after)."""
        if self._manual is not None and tensor.numel() == 1:
            self._manual.log(loss=tensor.detach())
            self._manual.step()

    def _watch_manual_training(self, loss: torch.Tensor) -> None:
        """At the first loss's backward: if no live optimizer holds any parameter of the model
        that holds the parameters the loss reaches (frozen ones included: an optimizer built
        from the frozen part is `not_updated`'s), the script updates them by hand
        (`p.data.add_(p.grad, alpha=-lr)`): watch that model without an optimizer, one step per
        backward."""
        reached = reached_parameters(loss)
        if not reached:
            return  # a loss of no parameter: decide at the next one
        self._manual_decided = True
        roots = [module for ref in self._roots if (module := ref()) is not None]
        model = holding(set(reached), roots) or holding(set(reached), live(nn.Module))
        if model is None:
            logger.warning("gradwatch run: the loss reaches parameters of no module; not watched")
            return
        optimized = {
            id(p)
            for optimizer in live(torch.optim.Optimizer)
            for p in optimizer_parameters(optimizer)
        }
        if any(id(p) in optimized for p in model.parameters()):
            return  # an optimizer holds this model's parameters (frozen ones too): its step
        if self.options.guards:
            logger.warning(
                "gradwatch run: guards act inside optimizer.step(); this script updates its "
                "parameters by hand, so --guard is ignored"
            )
        options = self.options
        try:
            self._manual = gw.watch(
                model,
                run_dir=optimizer_run_dir(options.run_dir, len(self.watchers)),
                every=options.every,
                probe_every=options.probe_every,
                flush_every=options.flush_every,
            )
        except Exception as exc:
            logger.warning("gradwatch run: the model trained by hand is not watched: %s", exc)
            return
        self.watchers.append(self._manual)

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0 and not any(ref() is module for ref in self._roots):
            self._roots.append(weakref.ref(module))
        self._depth += 1

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in self._seen:
            return
        self._seen.add(optimizer)
        self.optimizers_seen += 1
        if _DISTRIBUTED and torch.distributed.is_initialized():
            self.rank = torch.distributed.get_rank()
        for handle in self._forward_handles:  # the models are known once training steps
            handle.remove()
        self._forward_handles.clear()
        model = self._model_of(optimizer)
        if model is None:
            logger.warning(
                "gradwatch run: optimizer #%d (%s) updates parameters that no module called "
                "before the first optimizer step holds; it is not watched",
                len(self._seen) - 1,
                type(optimizer).__name__,
            )
            return
        index = len(self.watchers)
        options = self.options
        try:
            watcher = gw.watch(
                model,
                optimizer,
                run_dir=optimizer_run_dir(options.run_dir, index),
                every=options.every,
                probe_every=options.probe_every,
                flush_every=options.flush_every,
                guards=[make_guard(g) for g in options.guards],
            )
        except Exception as exc:  # a set-up gw.watch refuses: reported, the script trains on
            logger.warning(
                "gradwatch run: optimizer #%d (%s) is not watched, the script trains on: %s",
                index,
                type(optimizer).__name__,
                exc,
            )
            return
        self.watchers.append(watcher)
        self._by_optimizer[optimizer] = watcher

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        watcher = self._by_optimizer.get(optimizer)
        if watcher is not None and self._loss is not None:
            watcher.log(loss=self._loss)  # the watcher's own post-hook has counted the step

    def _model_of(self, optimizer: torch.optim.Optimizer) -> nn.Module | None:
        """The model `optimizer` trains: the outermost module called in forward that holds its
        parameters; when no module was called yet (its first forward runs inside an LBFGS
        closure) or none is called through its hooks (`.forward()` called directly), the live
        module that holds most of them (`holding`)."""
        params = {id(p) for p in optimizer_parameters(optimizer)}
        roots = [module for ref in self._roots if (module := ref()) is not None]
        return holding(params, roots) or holding(params, live(nn.Module))


def run_script(
    script: str | Path, script_args: Sequence[str], options: WatchOptions, module: bool = False
) -> int:
    """Run `script` (or, with `module`, the module of that name, as `python -m` does) watched;
    close the watchers; print the findings and the reports' paths. Returns the script's exit
    code; its exceptions propagate after the runs are closed."""
    if module:
        argv0, search = str(script), str(Path.cwd())  # runpy sets argv[0] to the module's file
    else:
        path = Path(script)
        if not path.is_file():
            raise FileNotFoundError(f"no script at {str(script)!r}")
        argv0, search = str(path), str(path.resolve().parent)
    watcher = ScriptWatcher(options)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [argv0, *script_args]
    sys.path.insert(0, search)
    watcher.install()
    code = 0
    try:
        if module:
            _SCRIPTS.append(runpy.run_module(str(script), run_name="__main__", alter_sys=True))
        else:
            _execute(path)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    finally:
        watcher.uninstall()
        sys.argv, sys.path[:] = saved_argv, saved_path
        watcher.close()
        _announce(watcher)
    return code


# The scripts' modules, kept until the interpreter exits, as python keeps a script's globals:
# freeing them as soon as the script returns destroyed a DDP Reducer, whose gloo process group
# joins a thread that waits for the GIL held by the freeing thread (a hang seen under torchrun).
_SCRIPTS: list[types.ModuleType | dict[str, Any]] = []


def _execute(path: Path) -> None:
    """Run the script as `python SCRIPT` would: a fresh `__main__` module (also in sys.modules,
    for pickling and spawned workers, while it runs) that outlives the run."""
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    module.__builtins__ = builtins
    _SCRIPTS.append(module)
    code = compile(path.read_bytes(), str(path), "exec")
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _announce(script_watcher: ScriptWatcher) -> None:
    """Print each run's findings and write its report (global rank 0 only)."""
    if script_watcher.rank != 0:
        return
    if not script_watcher.watchers:
        reason = (
            "no optimizer was watched (see the warnings above)"
            if script_watcher.optimizers_seen
            else "no optimizer step was taken; nothing was watched"
        )
        print(f"gradwatch run: {reason}", file=sys.stderr)
    for watcher in script_watcher.watchers:
        findings = watcher.findings()
        print(f"gradwatch: {watcher.run_dir}: {len(findings)} finding(s)", file=sys.stderr)
        for finding in findings:
            print(f"  {finding}", file=sys.stderr)
        try:
            page = gw.report(watcher.run_dir, Path(watcher.run_dir) / "report.html")
            print(f"gradwatch: report {page}", file=sys.stderr)
        except ImportError as exc:
            print(f"gradwatch: no report ({exc})", file=sys.stderr)
