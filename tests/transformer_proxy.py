"""Tiny pre-norm GPTs on generated tasks: small-scale proxies in the sense of Wortsman et al. 2023
("Small-scale proxies for large-scale Transformer training instabilities", arXiv 2309.14322),
scaled down to train in seconds on a CPU.

`PROXIES` are four recipes (`Recipe`) that differ in task, width, depth, heads, learning rate and
warm-up. `markov` is the one the first rule was calibrated on: a second-order Markov chain over
`VOCAB` tokens with 2 successors per pair of previous tokens, so the loss falls past what unigram
and bigram statistics give (2.0 nats) only when attention learns to look back (floor log 2 =
0.69 nats). `copy`, `reverse` and `sort` score the second half of a sequence that repeats,
reverses or sorts its first half. Training is AdamW (β = 0.9, 0.95; weight decay 1e-4), linear
warm-up, then cosine decay to 0. The attention is written four ways (`ATTENTION`): an explicit
softmax over q·kᵀ, `F.scaled_dot_product_attention`, `nn.MultiheadAttention`, or Hugging Face
GPT-2 (eager or sdpa, built from a config: nothing is downloaded). `qk_norm` puts LayerNorm on
queries and keys per head (Dehghani et al. 2023); GPT-2 gets it through a registered Hugging Face
attention function, nn.MultiheadAttention cannot take it.

`python tests/transformer_proxy.py [THREADS]` prints the tables of docs/early-warning.md.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradwatch as gw

VOCAB = 16
LENGTH = 32
BATCH = 16
WIDTH = 32
HEADS = 4
LAYERS = 2
WARM_UP = 20
ATTENTION = ("explicit", "sdpa", "mha", "gpt2-eager", "gpt2-sdpa")
# The learning rate where each is unstable without qk-layernorm and trains with it (GPT-2's
# initialisation and tied embeddings make it unstable sooner; with qk-layernorm it does not
# learn at 0.2 either).
UNSTABLE_LR = {"explicit": 0.2, "sdpa": 0.2, "mha": 0.2, "gpt2-eager": 0.1, "gpt2-sdpa": 0.1}
# Seeds (initialisation and batch order) over which the early-warning lead is measured.
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Recipe:
    """One small transformer and its training: the task (`batches`), the shape, and the
    schedule (AdamW, linear warm-up for `warm_up` steps, cosine to 0 over `steps`). `lr` is the
    learning rate where it is unstable without qk-layernorm and trains with it."""

    name: str
    task: str
    vocab: int = VOCAB
    order: int = 2  # markov: how many previous tokens decide the next
    length: int = LENGTH
    width: int = WIDTH
    heads: int = HEADS
    layers: int = LAYERS
    warm_up: int = WARM_UP
    steps: int = 200
    lr: float = 0.2
    batch: int = BATCH


MARKOV = Recipe("markov", "markov")
# The proxies the early-warning rule is judged on: they differ in task, width, depth, heads,
# learning rate and warm-up. `markov` is the one the first rule was calibrated on.
PROXIES = {
    r.name: r
    for r in (
        MARKOV,
        Recipe("copy", "copy", vocab=24, width=48, layers=3, warm_up=50, steps=300, lr=0.05),
        Recipe("reverse", "reverse", vocab=32, width=64, heads=8, warm_up=100, steps=250, lr=0.1),
        Recipe("sort", "sort", heads=2, layers=4, warm_up=30, steps=300, lr=0.1),
    )
}


def make_text(n: int = 20_000, seed: int = 0, vocab: int = VOCAB, order: int = 2) -> Tensor:
    """A Markov chain over `vocab` tokens where the last `order` tokens allow 2 successors."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (vocab,) * order + (2,), generator=g)
    choice = torch.randint(0, 2, (n,), generator=g).tolist()
    text = list(range(order))
    for c in choice:
        text.append(int(table[tuple(text[-order:])][c]))
    return torch.tensor(text)


def batches(recipe: Recipe, seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (inputs, targets) of `recipe.task`, [batch, length] each; a target of -100 is not
    scored (a token no rule can predict).

    - markov: windows of `make_text` (the same text for every seed), every next token scored;
    - copy: n random tokens, then the same n again; the second copy is scored;
    - reverse: n random tokens, then the same reversed; the reversed half is scored;
    - sort: n random tokens, then the same sorted; the sorted half is scored.
    """
    g = torch.Generator().manual_seed(1 + seed)
    size, n = (recipe.batch, recipe.length), recipe.length // 2
    text = make_text(vocab=recipe.vocab, order=recipe.order) if recipe.task == "markov" else None
    while True:
        if text is not None:
            start = torch.randint(0, len(text) - recipe.length - 1, (recipe.batch,), generator=g)
            x = torch.stack([text[s : s + recipe.length] for s in start])
            y = torch.stack([text[s + 1 : s + recipe.length + 1] for s in start])
            yield x, y
            continue
        head = torch.randint(0, recipe.vocab, (recipe.batch, n), generator=g)
        tail = {"copy": head, "reverse": head.flip(-1), "sort": head.sort(-1).values}
        x = torch.cat([head, tail[recipe.task]], 1)
        scored = torch.zeros(size, dtype=torch.bool)
        scored[:, n - 1 : -1] = True
        y = torch.full(size, -100).masked_scatter(scored, x.roll(-1, 1)[scored])
        yield x, y


class SelfAttention(nn.Module):
    """Causal multi-head self-attention written by hand (explicit softmax) or with SDPA."""

    def __init__(self, sdpa: bool, qk_norm: bool, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        head = width // heads
        self.q_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
            y = scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class TorchAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        return self.attn(x, x, x, attn_mask=future, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, attention: str, qk_norm: bool, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = (
            TorchAttention(width, heads)
            if attention == "mha"
            else SelfAttention(attention == "sdpa", qk_norm, width, heads)
        )
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(
        self, attention: str = "explicit", qk_norm: bool = False, recipe: Recipe = MARKOV
    ) -> None:
        super().__init__()
        width = recipe.width
        self.tok = nn.Embedding(recipe.vocab, width)
        self.pos = nn.Parameter(torch.zeros(recipe.length, width))
        self.blocks = nn.ModuleList(
            Block(attention, qk_norm, width, recipe.heads) for _ in range(recipe.layers)
        )
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, recipe.vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_model(
    attention: str = "explicit", qk_norm: bool = False, seed: int = 0, recipe: Recipe = MARKOV
) -> nn.Module:
    torch.manual_seed(seed)
    if attention.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        implementation = attention.removeprefix("gpt2-")
        if qk_norm:
            implementation = _register_qk_norm(implementation)
        config = GPT2Config(
            vocab_size=recipe.vocab, n_positions=recipe.length, n_embd=recipe.width,
            n_layer=recipe.layers, n_head=recipe.heads, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        config._attn_implementation = implementation
        model = GPT2LMHeadModel(config)
        if qk_norm:
            for block in model.transformer.h:
                block.attn.q_norm = nn.LayerNorm(recipe.width // recipe.heads)
                block.attn.k_norm = nn.LayerNorm(recipe.width // recipe.heads)
        return model
    return GPT(attention, qk_norm, recipe)


def _register_qk_norm(implementation: str) -> str:
    """A Hugging Face attention function that puts the module's q_norm / k_norm on queries and
    keys, then runs `implementation` ("eager" or "sdpa"); returns its registered name."""
    from transformers import AttentionInterface
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    inner = eager_attention_forward if implementation == "eager" else None
    name = f"qk_norm_{implementation}"

    def attention(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        run = inner or AttentionInterface._global_mapping[implementation]
        return run(
            module, module.q_norm(query), module.k_norm(key), value, attention_mask, **kwargs
        )

    AttentionInterface.register(name, attention)
    return name


@dataclass
class Result:
    losses: np.ndarray
    findings: list[gw.Finding] = field(default_factory=list)
    run_dir: str = ""
    published: dict[str, int] = field(default_factory=dict)  # kind -> step it was known after


def train(
    attention: str = "explicit",
    qk_norm: bool = False,
    lr: float | None = None,
    steps: int | None = None,
    weight_decay: float = 1e-4,
    z_loss: float = 0.0,
    eps: float = 1e-8,
    bias_drift: float = 0.0,
    warm_up: int | None = None,
    watch: bool = True,
    flush_every: int = 10,
    run_dir: str | None = None,
    seed: int = 0,
    recipe: Recipe = MARKOV,
    stop: int | None = None,
) -> Result:
    """Train `recipe` (its lr, steps and warm-up unless given); with `watch`, under gw.watch,
    noting after which step each finding kind was first known (`watcher.findings()`: after the
    flush of the block that holds it). `seed` sets the initialisation and the batches (the
    markov text stays the same). `stop` ends training early on the same schedule."""
    lr = recipe.lr if lr is None else lr
    steps = recipe.steps if steps is None else steps
    warm_up = recipe.warm_up if warm_up is None else warm_up
    model = make_model(attention, qk_norm, seed=seed, recipe=recipe)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, eps=eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warm_up) * 0.5 * (1 + math.cos(math.pi * s / steps)),
    )
    data = batches(recipe, seed)
    run_dir = run_dir or tempfile.mkdtemp(prefix="gw-proxy-")
    watcher = (
        gw.watch(model, optimizer, run_dir=run_dir, flush_every=flush_every) if watch else None
    )
    result = Result(np.zeros(steps if stop is None else stop), run_dir=run_dir)
    for step in range(len(result.losses)):
        x, y = next(data)
        output = model(x)
        logits = output.logits if hasattr(output, "logits") else output
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        total = loss + z_loss * torch.logsumexp(logits, dim=-1).square().mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        if bias_drift:  # a forced drift of every output logit, step by step
            with torch.no_grad():
                model.head.bias -= bias_drift
        result.losses[step] = loss.item()
        if watcher is not None:
            for f in watcher.findings():
                result.published.setdefault(f.kind, step)
    if watcher is not None:
        watcher.close()
        result.findings = watcher.findings()
    return result


def smoothed(losses: np.ndarray, beta: float = 0.9) -> np.ndarray:
    out, ema = np.empty_like(losses), losses[0]
    for i, loss in enumerate(losses):
        ema = beta * ema + (1 - beta) * loss
        out[i] = ema
    return out


def separation(unstable: np.ndarray, stable: np.ndarray, margin: float = 0.05) -> int | None:
    """The first step from which the unstable run's smoothed loss stays more than `margin`
    (relative) above the stable run's to the end; None if it never does.

    One seed's separation is a noisy measure: the ratio grows slowly through the margin, so
    rounding (another thread count) moved it from step 116 to 163 on one seed. `mean_separation`
    averages seeds first."""
    return _stays_above(smoothed(unstable) / smoothed(stable), 1 + margin)


def mean_separation(
    unstable: list[np.ndarray], stable: list[np.ndarray], margin: float = 0.05
) -> int | None:
    """`separation` of the seed-averaged ratio of the smoothed losses (the unstable run of each
    seed over the stable run of the same seed): over SEEDS, rounding moved it by 4 steps."""
    ratios = [smoothed(u) / smoothed(s) for u, s in zip(unstable, stable, strict=True)]
    return _stays_above(np.mean(ratios, axis=0), 1 + margin)


def _stays_above(ratio: np.ndarray, level: float) -> int | None:
    """The first step from which `ratio` stays above `level` to the end; None if it ends below."""
    above = ratio > level
    if not above[-1]:
        return None
    below = np.flatnonzero(~above)
    return int(below[-1] + 1) if len(below) else 0


# The unstable settings of the early-warning table: (recipe, attention, lr).
EARLY_WARNING = (
    ("markov", "explicit", 0.2),
    ("markov", "sdpa", 0.2),
    ("markov", "mha", 0.2),
    ("markov", "gpt2-eager", 0.1),
    ("copy", "explicit", 0.05),
    ("reverse", "explicit", 0.1),
    ("sort", "explicit", 0.1),
)
# Runs without qk-layernorm that tempt the rule: sharp heads, logits in the hundreds.
TEMPTING = (("explicit", 0.1), ("mha", 0.1), ("gpt2-sdpa", 0.08))
KIND = "attention_logit_growth"


@dataclass
class Lead:
    """`attention_logit_growth` on one unstable setting over seeds, against each seed's
    qk-layernorm twin (for nn.MultiheadAttention: the explicit-softmax twin)."""

    named: list[float]  # per seed, the step the finding names (NaN: none)
    known: list[float]  # per seed, the step after which it was known (NaN: none)
    separations: list[int | None]  # per seed, `separation`
    separation: int | None  # `mean_separation` of the seeds
    runs: list[Result]
    twins: list[Result]

    @property
    def lead(self) -> float:
        """Steps from the mean named step to the separation of the mean loss ratio."""
        return math.nan if self.separation is None else self.separation - np.mean(self.named)


def early_warning(
    name: str, attention: str, lr: float, seeds: tuple[int, ...] = SEEDS, stop: int | None = None
) -> Lead:
    """`attention_logit_growth` on recipe `name` at `lr` over `seeds`; with `stop`, both runs
    end there (on the full schedule) and no separation is measured."""
    recipe = PROXIES[name]
    twin = attention if attention != "mha" else "explicit"
    unstable = [train(attention, lr=lr, recipe=recipe, seed=seed, stop=stop) for seed in seeds]
    stable = [
        train(twin, qk_norm=True, lr=lr, recipe=recipe, seed=seed, stop=stop) for seed in seeds
    ]
    found = [[f for f in u.findings if f.kind == KIND] for u in unstable]
    return Lead(
        named=[f[0].step if f else math.nan for f in found],
        known=[u.published.get(KIND, math.nan) for u in unstable],
        separations=[separation(u.losses, s.losses) for u, s in zip(unstable, stable, strict=True)],
        separation=mean_separation([u.losses for u in unstable], [s.losses for s in stable]),
        runs=unstable,
        twins=stable,
    )


def attention_at(result: Result, until: int | None = None) -> tuple[float, float]:
    """The largest max attention logit and the lowest head entropy of a watched run, over its
    probe steps up to `until` (all of them: None)."""
    run = gw.open_run(result.run_dir)
    rows = run.steps <= (run.steps[-1] if until is None else until)
    largest, lowest = run.series("attn_max_logit")[rows], run.series("attn_entropy")[rows]
    if not np.isfinite(largest).any():
        return math.nan, math.nan
    return float(np.nanmax(largest)), float(np.nanmin(lowest))


def _steps(values: list[float] | list[int | None]) -> str:
    return ", ".join("none" if v is None or v != v else str(int(v)) for v in values)


def early(lead: Lead) -> str:
    """Per seed, the largest max logit and lowest entropy up to 50 steps before the separation
    of the mean loss ratio: what a finding 50 steps ahead would have to go on."""
    if lead.separation is None:
        return "no separation"
    if lead.separation < 50:
        return "before training"
    seen = [attention_at(r, lead.separation - 50) for r in lead.runs]
    return ", ".join(f"{m:.0f} / {e:.2f}" for m, e in seen)


def table() -> None:  # pragma: no cover - prints the table of docs/early-warning.md
    """The early-warning table: each unstable setting over SEEDS, then the healthy runs (the
    qk-layernorm twins, each recipe at lr 0.01, the TEMPTING runs) with their largest logit,
    lowest head entropy and findings."""
    print("| proxy | attention | lr, warm-up | finding names step | known after | loss "
          "separates at (per seed) | lead | 50 steps before: max logit, entropy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    healthy: list[tuple[str, Result, Result | None]] = []
    for name, attention, lr in EARLY_WARNING:
        recipe, lead = PROXIES[name], early_warning(name, attention, lr)
        print(
            f"| {name} | {attention} | {lr}, {recipe.warm_up} | {_steps(lead.named)} | "
            f"{_steps(lead.known)} | {lead.separation} ({_steps(lead.separations)}) | "
            f"{'none' if lead.separation is None else f'{lead.lead:.0f}'} | {early(lead)} |",
            flush=True,
        )
        healthy += [
            (f"{name}, {attention}, qk-layernorm, seed {s}", t, None)
            for s, t in enumerate(lead.twins)
        ]
    for name, recipe in PROXIES.items():
        healthy.append((f"{name}, explicit, lr 0.01", train(recipe=recipe, lr=0.01), None))
    for attention, lr in TEMPTING:
        for seed in SEEDS:
            twin = train(attention if attention != "mha" else "explicit", True, lr, seed=seed)
            result = train(attention, lr=lr, seed=seed)
            healthy.append((f"markov, {attention}, lr {lr}, seed {seed}", result, twin))
    print("\n| healthy run | largest max logit | lowest head entropy | final loss / qk twin's "
          "| findings |")  # fmt: skip
    print("|---|---|---|---|---|")
    for label, result, twin in healthy:
        largest, lowest = attention_at(result)
        kinds = sorted({f.kind for f in result.findings}) or ["none"]
        ratio = (
            "" if twin is None else f"{smoothed(result.losses)[-1] / smoothed(twin.losses)[-1]:.2f}"
        )
        print(
            f"| {label} | {largest:.0f} | {lowest:.2f} | {ratio} | {', '.join(kinds)} |", flush=True
        )


def drift() -> None:  # pragma: no cover - prints the log Z table of docs/early-warning.md
    """Runs without weight decay, 1000 steps each, where an output-logit drift could arise by
    itself: the mean log Z every 100 steps and the findings."""
    print("| run | log Z at steps 0, 100, ..., 900 | findings |")
    print("|---|---|---|")
    for name, qk_norm, lr in (
        ("markov", False, 0.01),
        ("markov", True, 0.05),
        ("copy", True, 0.01),
    ):
        result = train(
            recipe=PROXIES[name], qk_norm=qk_norm, lr=lr, steps=1000, weight_decay=0.0, warm_up=20
        )
        run = gw.open_run(result.run_dir)
        lse = run.series("logit_lse")[run.steps % 100 == 0]
        kinds = sorted({f.kind for f in result.findings}) or ["none"]
        label = f"{name}, {'qk-layernorm, ' if qk_norm else ''}lr {lr}"
        print(
            f"| {label} | {', '.join(f'{v:.1f}' for v in lse)} | {', '.join(kinds)} |", flush=True
        )


if __name__ == "__main__":  # pragma: no cover
    # python tests/transformer_proxy.py [THREADS]: the early-warning tables (about 15 minutes on
    # 2 CPU cores); python tests/transformer_proxy.py --drift: the log Z table
    import warnings

    warnings.filterwarnings("ignore")
    if sys.argv[1:] == ["--drift"]:
        drift()
    else:
        torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
        table()
