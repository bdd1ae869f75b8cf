"""``python -m expertopt demo``: distributed MoE training on real text, Muon against AdamW.

Starts ``world`` local CPU processes (gloo, one torch thread each) and, in each, trains a tiny
transformers Qwen3-MoE (from a config, no download) through :func:`expertopt.initialize`: DeepSpeed
with ZeRO-2 and AutoEP expert parallelism (EP 2 by default), on the Python standard library's own
source as byte-level tokens (:mod:`expertopt.demo_data`). It runs once with expertopt's Muon and
once with AdamW, from the same weights, on the same batches, under the same warmup+cosine
schedule, and prints a table (train and held-out loss, tokens/s, bytes each rank sends per step,
Newton-Schulz FLOPs per rank per step) and the path of a PNG with both loss curves.

Same settings, same numbers: losses, bytes and FLOPs repeat exactly on the same machine; tokens/s
is wall clock and the table states its spread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from expertopt.demo_config import DemoConfig
from expertopt.local_ranks import run_local_ranks

__all__ = ["PLOT_NAME", "RESULTS_NAME", "format_table", "launch", "plot_losses", "run_demo"]

PLOT_NAME = "demo_loss.png"
RESULTS_NAME = "demo_results.json"
_LABELS = {"muon": "Muon (expertopt)", "adamw": "AdamW"}


def _demo_rank(rank: int, world_size: int, config: DemoConfig) -> dict[str, Any] | None:
    """One rank's training (the process group is up); rank 0 returns the records."""
    from expertopt.demo_train import train_rank

    return train_rank(config)


def launch(config: DemoConfig) -> dict[str, Any]:
    """Run the demo's ranks as ``config.world`` local processes (:mod:`expertopt.local_ranks`,
    which also keeps DeepSpeed from leaving shared-memory buffers behind); rank 0's records."""
    return run_local_ranks(_demo_rank, config.world, config, deepspeed=True)[0]


def format_table(config: DemoConfig, records: dict[str, Any]) -> str:
    """The results table, its settings line and what repeats exactly and what is noise."""
    header = (f"{'optimizer':<17} {'train loss':>10} {'held-out':>9} {'tokens/s':>9} "
              f"{'MB/rank/step':>12} {'NS GFLOP/rank/step':>18}")  # fmt: skip
    lines = [
        f"{config.model}, world {config.world}, EP {config.ep}, ZeRO-{config.stage}, {config.steps} steps of "
        f"{config.global_batch} x {config.seq_len} bytes, seed {config.seed}",
        header,
        "-" * len(header),
    ]
    spreads = []
    if "muon" in records:
        lines[0] += f"; Newton-Schulz in {records['muon']['ns_dtype'].replace('auto', 'bf16 (auto)')}"
    for name, record in records.items():
        sent = record["bytes_per_rank_per_step"]
        flops = record["ns_flops_per_rank_per_step"]
        lines.append(
            f"{_LABELS[name]:<17} {record['train_loss']:>10.4f} {record['heldout_loss']:>9.4f} "
            f"{record['tokens_per_second']:>9.0f} {max(sent) / 1e6:>12.3f} {max(flops) / 1e9:>18.4f}"
        )
        low, median, high = record["step_seconds_quartiles"]
        spreads.append(f"{name} {100 * (high - low) / median:.0f}%")
    lines += [
        "losses: nats per byte (train: mean of the last 20 steps). MB and GFLOP: the busiest rank "
        "(Newton-Schulz counted with torch's FlopCounterMode in the optimizer step).",
        "Same settings and seed repeat losses, MB and GFLOP exactly; tokens/s is wall clock (median "
        f"step; interquartile spread of step times: {', '.join(spreads)}).",
    ]
    if set(records) == {"muon", "adamw"}:
        ratio = records["muon"]["heldout_loss"] / records["adamw"]["heldout_loss"]
        lines.append(f"held-out loss Muon / AdamW: {ratio:.3f}")
    return "\n".join(lines)


def plot_losses(config: DemoConfig, records: dict[str, Any], path: Path) -> Path:
    """Train (light: per step; dark: 10-step mean) and held-out loss of each run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (name, record), color in zip(records.items(), ("tab:blue", "tab:orange"), strict=False):
        losses = torch.tensor(record["train_losses"])
        steps = torch.arange(1, len(losses) + 1)
        window = min(10, len(losses))
        smooth = losses.unfold(0, window, 1).mean(dim=1)
        axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
        axes.plot(steps[window - 1 :], smooth, color=color, label=f"{_LABELS[name]} train")
        held_steps, held_losses = zip(*record["heldout"], strict=True)
        axes.plot(held_steps, held_losses, "o--", color=color, label=f"{_LABELS[name]} held-out")
    steps_run = len(next(iter(records.values()))["train_losses"])
    if steps_run >= 20:  # the first steps (loss ~5.5 = ln 256) would flatten the rest of the curve
        tail = [loss for record in records.values() for loss in record["train_losses"][steps_run // 10 :]]
        axes.set_ylim(min(tail) - 0.05, max(tail) + 0.1)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per byte)")
    axes.set_title(f"{config.model}, {config.world} ranks, EP {config.ep}, ZeRO-{config.stage}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def run_demo(config: DemoConfig | None = None, print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, then print the table and the plot's path; returns the records and the output paths."""
    config = config or DemoConfig()
    print_fn(
        f"expertopt demo: {config.world} CPU process(es), {config.model}, EP {config.ep}, ZeRO-{config.stage}, "
        f"{config.steps} steps, optimizers {', '.join(config.optimizers)}"
    )
    start = time.perf_counter()
    records = launch(config)
    plot = plot_losses(config, records, config.out / PLOT_NAME)
    results = config.out / RESULTS_NAME
    results.write_text(
        json.dumps({"settings": config.summary() | {"out": str(config.out)}, "runs": records}, indent=1)
    )
    print_fn(format_table(config, records))
    print_fn(f"loss curves: {plot}\nall numbers: {results}\n({time.perf_counter() - start:.0f} s in total)")
    return {"records": records, "plot": plot, "results": results}
