"""Muon vs. AdamW on :class:`expertopt.models.TinyMoE`, from the same weights and the same batches.

Run (a) uses what expertopt is for: ``build_param_groups`` routes hidden matrices, the router and
the stacked experts to Muon and the rest to AdamW, and ``MoEOptimizer`` steps the dense and the
expert optimizer as one, so a single ``LambdaLR`` drives both. Run (b) is the usual baseline:
AdamW over ``model.parameters()`` with its own (swept, see ``BASELINE_LR``) lr and the same
schedule. ``python -m expertopt demo`` runs it in well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from expertopt.models import TinyMoE, TinyMoEConfig, make_batch
from expertopt.optim import AdamW, MoEOptimizer, Muon
from expertopt.param_groups import build_param_groups

__all__ = [
    "ADAMW_LR",
    "BASELINE_LR",
    "MUON_LR",
    "build_adamw",
    "build_muon",
    "run_demo",
    "smoothed_endpoints",
    "torch_threads",
    "train",
    "warmup_cosine",
]

MUON_LR = 0.02
# Baseline lr: best final loss of {1e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2} on the default demo (seeds
# 0-2). Run (a) uses it for its AdamW half too, so the two runs differ only on the matrices.
BASELINE_LR = 1e-2
ADAMW_LR = BASELINE_LR


def warmup_cosine(warmup_steps: int, total_steps: int, final_ratio: float = 0.1) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warmup to 1, then cosine decay to ``final_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_muon(model: nn.Module, lr: float = MUON_LR, adamw_lr: float = ADAMW_LR) -> MoEOptimizer:
    """Run (a): expertopt's routing, Muon for matrices and experts, AdamW for the rest."""
    groups = build_param_groups(model, lr=lr, adamw_lr=adamw_lr)
    # ns_dtype="auto" is bf16 on CPU; the dense and expert optimizer share these defaults.
    return MoEOptimizer.from_groups(groups, Muon, lr=lr, ns_dtype="auto")


def build_adamw(model: nn.Module, lr: float = BASELINE_LR) -> AdamW:
    """Run (b): one AdamW over every parameter, betas as in run (a)'s AdamW half."""
    return AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def train(
    model: TinyMoE,
    optimizer: Optimizer,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    label: str,
    log_every: int = 0,
    print_fn: Callable[[str], None] = print,
) -> list[float]:
    """Train under a warmup+cosine ``LambdaLR``; returns the loss of every step.

    Batches come from a generator seeded with ``seed``, so two runs see the same data order.
    """
    scheduler = LambdaLR(optimizer, warmup_cosine(max(1, steps // 10), steps))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        inputs, targets = make_batch(model.config, batch_size, generator)
        lr = optimizer.param_groups[0]["lr"]  # scheduled lr (before lr_mult) this step uses
        loss = model.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print_fn(f"[{label:>5}] step {step:4d}  loss {loss.item():.4f}  lr {lr:.2e}")
    return losses


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``num_threads`` intra-op threads (None: leave torch's setting), then restore."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def smoothed_endpoints(losses: list[float], window: int) -> tuple[float, float]:
    """Mean loss over the first and over the last ``window`` steps."""
    window = max(1, min(window, len(losses)))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def format_table(rows: dict[str, dict[str, Any]], window: int) -> str:
    """The end-points table: one row per run, then Muon's final loss relative to AdamW's."""
    lines = [
        f"{'optimizer':<28} {'first loss':>10} {'final loss':>10} {'time (s)':>9}",
        "-" * 60,
    ]
    for row in rows.values():
        lines.append(f"{row['label']:<28} {row['first']:>10.4f} {row['final']:>10.4f} {row['seconds']:>9.1f}")
    lines.append(f"(losses are means over the first / last {window} steps)")
    if rows.get("adamw", {}).get("final") and "muon" in rows:
        lines.append(f"final loss Muon / AdamW: {rows['muon']['final'] / rows['adamw']['final']:.3g}")
    return "\n".join(lines)


def run_demo(
    steps: int = 300,
    seed: int = 0,
    *,
    batch_size: int = 32,
    config: TinyMoEConfig | None = None,
    muon_lr: float = MUON_LR,
    adamw_lr: float = ADAMW_LR,
    baseline_lr: float = BASELINE_LR,
    log_every: int | None = None,
    num_threads: int | None = 1,
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train TinyMoE with Muon (expertopt) and with AdamW from the same init; print and return losses.

    ``num_threads=1`` by default: on these tiny matrices intra-op threads cost more in
    synchronization than they save, and on a busy 2-core machine two threads made each step 6-8x
    slower (measured). Returns ``{"muon": [...], "adamw": [...], "endpoints": {label: {"first",
    "final", "seconds"}}}`` where the lists hold every step's loss.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    log_every = max(1, steps // 6) if log_every is None else log_every
    torch.manual_seed(seed)
    model = TinyMoE(config)
    initial_state = copy.deepcopy(model.state_dict())
    runs = {
        "muon": (f"Muon+AdamW (lr {muon_lr:g}/{adamw_lr:g})", lambda m: build_muon(m, muon_lr, adamw_lr)),
        "adamw": (f"AdamW (lr {baseline_lr:g})", lambda m: build_adamw(m, baseline_lr)),
    }
    results: dict[str, Any] = {"endpoints": {}}
    window = max(1, min(20, steps // 10))
    print_fn(
        f"{steps} steps, batch {batch_size}; 'lr' is the scheduled lr (AdamW groups of the Muon run x lr_mult)"
    )
    for key, (label, build) in runs.items():
        model.load_state_dict(initial_state)
        start = time.perf_counter()
        with torch_threads(num_threads):
            losses = train(
                model, build(model), steps=steps, batch_size=batch_size, seed=seed, label=key,
                log_every=log_every, print_fn=print_fn,
            )  # fmt: skip
        first, final = smoothed_endpoints(losses, window)
        results[key] = losses
        seconds = time.perf_counter() - start
        results["endpoints"][key] = {"label": label, "first": first, "final": final, "seconds": seconds}
    print_fn(format_table(results["endpoints"], window))
    return results
