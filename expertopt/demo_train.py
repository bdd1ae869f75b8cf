"""One rank of the demo: DeepSpeed engine, training loop, held-out evaluation, counters.

Runs inside each process :func:`expertopt.demo.launch` starts. Every rank builds the same model
from the same seed, hands it to :func:`expertopt.initialize` (AutoEP shards the experts over
``ep`` ranks; ZeRO partitions the rest), and trains on its slice of the global batch. Rank 0
returns the per-step global mean losses, the held-out curve, and each rank's counted bytes and
Newton-Schulz FLOPs.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.flop_counter import FlopCounterMode

from expertopt.demo_comm import CollectiveBytes
from expertopt.demo_config import DemoConfig
from expertopt.demo_data import ByteCorpus, load_stdlib_corpus
from expertopt.demo_models import DEMO_MODELS, build_model
from expertopt.kernels import cpu_bf16_matmul_is_fast

__all__ = ["deepspeed_config", "newton_schulz_dtype", "train_rank", "warmup_cosine"]

# Train loss reported in the table: mean over the last this-many steps (or fewer).
FINAL_WINDOW = 20


def warmup_cosine(warmup_steps: int, total_steps: int, final_ratio: float = 0.1) -> Callable[[int], float]:
    """``LambdaLR`` factor: linear warmup to 1, then cosine decay to ``final_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def newton_schulz_dtype() -> str:
    """bf16 where the CPU multiplies bf16 natively, else fp32, spelled out for the demo's report.

    ``ns_dtype="auto"`` makes the same choice (``expertopt.kernels.cpu_bf16_matmul_is_fast``); the
    demo names the dtype so that its table says which one ran. A CPU without oneDNN bf16 matmul
    emulates it: 64x64 products ran at 0.9 GFLOP/s in bf16 against 19 in fp32 on the 2-core AVX2
    machine the demo was built on, which made the Muon step 7x slower than in fp32.
    """
    return "auto" if cpu_bf16_matmul_is_fast() else "float32"


def deepspeed_config(config: DemoConfig, optimizer: str) -> dict[str, Any]:
    """The DeepSpeed config of one run: the same everywhere except the optimizer block."""
    if optimizer == "muon":
        block = {"type": "Muon", "params": {"lr": config.muon_lr, "adamw_lr": config.muon_adamw_lr,
                                            "betas": [0.9, 0.95], "weight_decay": 0.1,
                                            "ns_dtype": newton_schulz_dtype()}}  # fmt: skip
    else:
        block = {
            "type": "AdamW",
            "params": {"lr": config.adamw_lr, "betas": [0.9, 0.95], "weight_decay": 0.1},
        }
    ds_config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": block,
        "zero_optimization": {"stage": config.stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 1 << 30,
    }
    # AutoEP at every size, 1 included: experts then always live in AutoEP's w1/w2/w3 layout, so
    # Muon orthogonalizes the same matrices at every world and EP size (the fused gate_up_proj
    # [E, 2I, H] would be one matrix per expert instead of two) and runs compare step for step.
    preset = DEMO_MODELS[config.model].autoep_preset
    ds_config["expert_parallel"] = {"enabled": True, "autoep_size": config.ep, "preset_model": preset}
    return ds_config


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (every rank holds as many tokens, so this is the global token mean)."""
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def _heldout_loss(engine: Any, batches: list[torch.Tensor], rows: slice) -> float:
    """Global mean held-out loss; every rank runs every batch (AutoEP's all-to-alls need all)."""
    engine.eval()
    with torch.no_grad():
        losses = torch.stack([engine(input_ids=b[rows], labels=b[rows]).loss for b in batches])
    engine.train()
    return _global_mean(losses).mean().item()


def _progress(config: DemoConfig, name: str, rank: int) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None
    if rank != 0 or not config.progress:
        return None
    return tqdm(total=config.steps, desc=f"{name:>5}", file=sys.stderr, dynamic_ncols=True, leave=True)


def _build_engine(config: DemoConfig, name: str) -> Any:
    import expertopt

    torch.manual_seed(config.seed)  # same initial weights on every rank and for both optimizers
    model = build_model(config.model, config.seq_len)
    schedule = warmup_cosine(max(1, round(config.warmup * config.steps)), config.steps)
    engine, _, _, _ = expertopt.initialize(
        model=model, config=deepspeed_config(config, name), lr_scheduler=lambda opt: LambdaLR(opt, schedule)
    )
    return engine


def _train_one(config: DemoConfig, name: str, corpus: ByteCorpus, counter: CollectiveBytes) -> dict[str, Any]:
    """Train one optimizer for ``config.steps`` steps; rank 0's record of the run."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * config.micro_batch, (rank + 1) * config.micro_batch)
    engine = _build_engine(config, name)
    heldout = corpus.heldout_batches(config.seed, config.eval_batches, config.global_batch, config.seq_len)
    losses, step_seconds, evals, flops = [], [], [], 0
    counter.reset()
    bar = _progress(config, name, rank)
    for step in range(config.steps):
        batch = corpus.train_batch(step, config.seed, config.global_batch, config.seq_len)[rows]
        start = time.perf_counter()
        with counter.counting():
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            # Matmuls inside the optimizer step are Newton-Schulz's; one step is the same as any.
            flop_counter = FlopCounterMode(display=False) if step == 0 else contextlib.nullcontext()
            with flop_counter:
                engine.step()
            if step == 0:
                flops = flop_counter.get_total_flops()
        losses.append(_global_mean(loss).item())  # a sync point: the step is over on every rank
        step_seconds.append(time.perf_counter() - start)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evals.append((step + 1, _heldout_loss(engine, heldout, rows)))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", heldout=f"{evals[-1][1]:.3f}" if evals else "-")
            bar.update()
    if bar is not None:
        bar.close()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (counter.total / config.steps, flops, dict(counter.bytes_by_op)))
    return _record(config, name, losses, evals, step_seconds, per_rank)


def _record(config: DemoConfig, name: str, losses: list[float], evals: list[tuple[int, float]],
            step_seconds: list[float], per_rank: list[Any]) -> dict[str, Any]:  # fmt: skip
    # The first steps pay one-time costs (allocations, DeepSpeed's first bucket set-up).
    timed = step_seconds[min(2, len(step_seconds) - 1) :]
    quartiles = statistics.quantiles(timed, n=4) if len(timed) > 1 else [timed[0]] * 3
    tokens_per_step = config.global_batch * config.seq_len
    window = losses[-min(FINAL_WINDOW, len(losses)) :]
    return {
        "optimizer": name,
        "ns_dtype": newton_schulz_dtype() if name == "muon" else None,
        "train_losses": losses,
        "heldout": evals,
        "train_loss": sum(window) / len(window),
        "heldout_loss": evals[-1][1],
        "tokens_per_second": tokens_per_step / statistics.median(timed),
        "step_seconds_quartiles": quartiles,
        "bytes_per_rank_per_step": [entry[0] for entry in per_rank],
        "ns_flops_per_rank_per_step": [entry[1] for entry in per_rank],
        "bytes_by_op_rank0": {op: b / config.steps for op, b in per_rank[0][2].items()},
    }


def _quiet() -> None:
    """Keep the terminal to the progress bars and the table: DeepSpeed logs info on every rank."""
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def train_rank(config: DemoConfig) -> dict[str, Any] | None:
    """Train every optimizer of ``config`` on this rank; rank 0 returns ``{name: record}``.

    The process group must already be up (``deepspeed.init_distributed``).
    """
    _quiet()
    corpus = load_stdlib_corpus()
    counter = CollectiveBytes().install()
    try:
        records = {name: _train_one(config, name, corpus, counter) for name in config.optimizers}
    finally:
        counter.uninstall()
    return records if dist.get_rank() == 0 else None
