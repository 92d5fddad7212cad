"""Training loop for the language models: AdamW, a tqdm progress bar, periodic evaluation, a history table.

Run it outside Jupyter too (the command is :func:`sparse_tutorial.run.main`)::

    python -m sparse_tutorial.train --ff sparse --steps 500

The last line printed is the final validation loss.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import config as run_config
from ._checks import real_number
from .data import TextData
from .measure.timing import spread
from .model import ModelConfig, TransformerLM

__all__ = ["TrainConfig", "hard_prob_at", "book_train_config", "seed_train_config", "estimate_loss", "train_lm",
           "compare_step_times"]


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1     # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    seed: int = 1337
    #: anneal the sparse FF layers' hard-mask share linearly from their ``hard_prob`` to this value, over the
    #: steps from ``hard_anneal_start * steps`` to the end (None: keep it constant). Evaluation always uses the
    #: hard mask, so ending training at 1.0 makes the two agree.
    hard_prob_final: float | None = None
    hard_anneal_start: float = 0.5

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        real_number("lr", self.lr, 0.0, low_open=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0 (0: no warm-up), "
                             f"got warmup_steps={self.warmup_steps!r}")
        real_number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0,
                    hint=" (the cosine decays lr to lr * min_lr_ratio)")
        real_number("weight_decay", self.weight_decay, 0.0, hint=" (0: no weight decay)")
        real_number("grad_clip", self.grad_clip, 0.0,
                    hint=" (the largest gradient norm; 0 turns clipping off, a negative one would flip the gradients)")
        if self.hard_prob_final is not None:
            real_number("hard_prob_final", self.hard_prob_final, 0.0, 1.0, hint=" (or None: no schedule)")
        real_number("hard_anneal_start", self.hard_anneal_start, 0.0, 1.0, hint=" (a fraction of the steps)")

    def to_dict(self) -> dict:
        return asdict(self)


def book_train_config(**overrides) -> TrainConfig:
    """The book's training run for :func:`sparse_tutorial.model.book_config` (tiny in fast mode)."""
    base = run_config.pick(
        default=dict(steps=1500, batch_size=32, lr=2e-3, warmup_steps=100, eval_every=100, eval_batches=10),
        fast=dict(steps=30, batch_size=8, lr=2e-3, warmup_steps=5, eval_every=15, eval_batches=2),
    )
    base.update(overrides)
    return TrainConfig(**base)


def seed_train_config(**overrides) -> TrainConfig:
    """The earlier project's run: batch 64, lr 3e-4, 6000 steps."""
    base = dict(steps=6000, batch_size=64, lr=3e-4, warmup_steps=100, eval_every=500, eval_batches=50)
    base.update(overrides)
    return TrainConfig(**base)


@torch.no_grad()
def estimate_loss(model: TransformerLM, data: TextData, batch_size: int, batches: int,
                  seed: int = 0) -> dict[str, float]:
    """Mean loss over the same ``batches`` random windows of each split (fixed seed, eval mode)."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(batches):
            x, y = data.get_batch(split, batch_size, model.cfg.context_length, generator=g)
            losses.append(model(x, y)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train(was_training)
    return out


def _lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def hard_prob_at(step: int, tc: TrainConfig, start_prob: float) -> float:
    """The hard-mask share of training step ``step``: ``start_prob``, then linear to ``tc.hard_prob_final``."""
    if tc.hard_prob_final is None:
        return start_prob
    begin = tc.hard_anneal_start * tc.steps
    if step < begin:
        return start_prob
    frac = min(1.0, (step + 1 - begin) / max(1.0, tc.steps - begin))
    return start_prob + frac * (tc.hard_prob_final - start_prob)


def train_lm(model: TransformerLM, data: TextData, tc: TrainConfig, *, progress: bool = True,
             desc: str | None = None) -> pd.DataFrame:
    """Train ``model`` in place; return the history as a DataFrame.

    Columns: ``step``, ``train_loss``, ``val_loss`` (evaluated every ``eval_every`` steps and at the end),
    ``lr`` and ``sec_per_step`` (mean wall time of the training steps since the previous evaluation).
    """
    torch.manual_seed(tc.seed)
    g = torch.Generator().manual_seed(tc.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.99))
    rows, step_time, steps_timed = [], 0.0, 0
    sparse_layers = [m for m in model.modules() if hasattr(m, "hard_prob")]   # the FF layers with a hard mask
    start_probs = [m.hard_prob for m in sparse_layers]
    model.train()
    bar = tqdm(range(tc.steps), desc=desc or f"train {model.cfg.ff} FF", disable=not progress)
    for step in bar:
        lr = _lr_at(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        for layer, p0 in zip(sparse_layers, start_probs):
            layer.hard_prob = hard_prob_at(step, tc, p0)
        x, y = data.get_batch("train", tc.batch_size, model.cfg.context_length, generator=g)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        aux = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
        if aux:                                    # e.g. a mixture of experts' load-balancing loss
            loss = loss + sum(aux)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step_time += time.perf_counter() - t0
        steps_timed += 1
        last = step == tc.steps - 1
        if (step + 1) % tc.eval_every == 0 or last:
            losses = estimate_loss(model, data, tc.batch_size, tc.eval_batches)
            rows.append(dict(step=step + 1, train_loss=losses["train"], val_loss=losses["val"], lr=lr,
                             sec_per_step=step_time / steps_timed))
            step_time, steps_timed = 0.0, 0
            bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
    for layer, p0 in zip(sparse_layers, start_probs):
        layer.hard_prob = p0                   # the model keeps its configured share
    model.eval()
    return pd.DataFrame(rows)


def compare_step_times(configs: dict[str, ModelConfig], data: TextData, tc: TrainConfig, *, steps: int = 10,
                       warmup: int = 2, progress: bool = True) -> pd.DataFrame:
    """Median seconds of one training step (forward, backward, AdamW) of fresh models, interleaved.

    Every round runs one step of each model on the same batch, so a slow spell of a shared machine hurts
    all of them alike; the table has ``seconds per step``, its spread over the steps (``IQR / median``,
    :func:`~sparse_tutorial.measure.timing.spread`) and the ratio to the first config.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got steps={steps!r}")
    if not configs:
        raise ValueError("configs must name at least one model config")
    runs = {}
    for name, cfg in configs.items():
        torch.manual_seed(tc.seed)
        model = TransformerLM(cfg).train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay))
    g = torch.Generator().manual_seed(tc.seed)
    samples: dict[str, list[float]] = {name: [] for name in configs}
    context = max(cfg.context_length for cfg in configs.values())
    for i in tqdm(range(warmup + steps), desc="timing training steps", disable=not progress):
        x, y = data.get_batch("train", tc.batch_size, context, generator=g)
        for name, (model, opt) in runs.items():
            T = model.cfg.context_length
            t0 = time.perf_counter()
            _, loss = model(x[:, :T], y[:, :T])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            if i >= warmup:
                samples[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(s) for name, s in samples.items()}
    first = next(iter(med.values()))
    return pd.DataFrame({"model": list(med), "seconds per step": list(med.values()),
                         "IQR / median": [spread(s) for s in samples.values()],
                         "ratio to " + next(iter(med)): [m / first for m in med.values()]})


if __name__ == "__main__":
    # ``python -m sparse_tutorial.train``: the command lives in run.py, above this module and checkpoint.py,
    # because it also saves checkpoints (this file runs as ``__main__`` here, so run.py imports it afresh).
    from .run import main

    main()
