"""What ``python -m expertopt demo`` runs, checked before any process starts.

Every combination that cannot work stops here with a message that names the flag and what to
change, instead of failing minutes later inside DeepSpeed on some rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from expertopt.demo_models import DEMO_MODELS

__all__ = [
    "ADAMW_BASELINE_LR",
    "MUON_ADAMW_LR",
    "MUON_LR",
    "OPTIMIZER_CHOICES",
    "DemoConfig",
    "default_ep",
]

# Learning rates: see docs/guide.md ("The demo") for the sweep behind them.
MUON_LR = 0.02
MUON_ADAMW_LR = 3e-3  # embeddings, head, norms inside the Muon run
ADAMW_BASELINE_LR = 3e-3
OPTIMIZER_CHOICES = {"muon": ("muon",), "adamw": ("adamw",), "both": ("muon", "adamw")}
# More processes than this per core and the demo spends its time context switching.
PROCESSES_PER_CORE = 4


def default_ep(world: int) -> int:
    """EP 2 where the world is even (experts sharded over pairs of ranks), else 1 (every rank
    holds every expert)."""
    return 2 if world % 2 == 0 else 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """One demo: the model, the parallel layout, the optimizers and the training length."""

    world: int = 4
    """Local CPU processes (gloo); 1 is a single process."""
    ep: int | None = None
    """AutoEP expert-parallel size; must divide ``world``; 1 keeps every expert on every rank.
    None: :func:`default_ep`."""
    stage: int = 2
    """ZeRO stage (0, 1, 2 or 3)."""
    steps: int = 200
    optimizer: str = "both"
    """``muon``, ``adamw`` or ``both`` (Muon first)."""
    model: str = "qwen3_moe"
    out: Path = Path("expertopt-demo")
    """Directory for the plot and the results (created)."""
    seed: int = 0
    global_batch: int = 16
    """Sequences per step over all ranks; must be divisible by ``world``."""
    seq_len: int = 128
    """Bytes per sequence."""
    eval_every: int = 25
    eval_batches: int = 4
    muon_lr: float = MUON_LR
    muon_adamw_lr: float = MUON_ADAMW_LR
    adamw_lr: float = ADAMW_BASELINE_LR
    warmup: float = 0.1
    """Fraction of the steps with linear warmup; then cosine to 10% of the peak lr."""
    progress: bool = True
    cpu_count: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.ep is None:
            object.__setattr__(self, "ep", default_ep(self.world))
        for problem in self.problems():
            raise ValueError(problem)

    @property
    def optimizers(self) -> tuple[str, ...]:
        return OPTIMIZER_CHOICES[self.optimizer]

    @property
    def micro_batch(self) -> int:
        return self.global_batch // self.world

    def problems(self) -> list[str]:
        """Every reason this combination cannot run, each with the fix (empty when it can)."""
        found = self._size_problems()
        if found:  # the checks below divide by these
            return found
        return found + self._layout_problems() + self._training_problems()

    def _size_problems(self) -> list[str]:
        found = [
            f"--{flag.replace('_', '-')} must be >= 1, got {value}"
            for flag, value in (("world", self.world), ("ep", self.ep), ("steps", self.steps),
                                ("global_batch", self.global_batch), ("seq_len", self.seq_len),
                                ("eval_every", self.eval_every), ("eval_batches", self.eval_batches))
            if value < 1
        ]  # fmt: skip
        limit = PROCESSES_PER_CORE * self.cpu_count
        if self.world > limit:
            found.append(
                f"--world {self.world} is more than {PROCESSES_PER_CORE} processes per core on this "
                f"machine's {self.cpu_count} cores; use --world {limit} or fewer"
            )
        return found

    def _layout_problems(self) -> list[str]:
        found = []
        if self.model not in DEMO_MODELS:
            found.append(f"--model {self.model!r} is not a demo model; choose one of {sorted(DEMO_MODELS)}")
        if self.world % self.ep:
            found.append(
                f"--ep {self.ep} does not divide --world {self.world}: expert-parallel groups split the "
                f"ranks evenly; use --ep in {_divisors(self.world)} or change --world"
            )
        elif self.model in DEMO_MODELS and DEMO_MODELS[self.model].num_experts % self.ep:
            experts = DEMO_MODELS[self.model].num_experts
            found.append(
                f"--ep {self.ep} does not divide the {experts} experts of {self.model}; use --ep in "
                f"{[d for d in _divisors(experts) if self.world % d == 0]}"
            )
        if self.stage not in (0, 1, 2, 3):
            found.append(f"--stage {self.stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        if self.global_batch % self.world:
            found.append(
                f"--global-batch {self.global_batch} is not divisible by --world {self.world}; every rank "
                f"trains on the same number of sequences: use a multiple of {self.world}"
            )
        return found

    def _training_problems(self) -> list[str]:
        found = []
        if self.optimizer not in OPTIMIZER_CHOICES:
            found.append(f"--optimizer {self.optimizer!r}: choose one of {sorted(OPTIMIZER_CHOICES)}")
        for flag in ("muon_lr", "muon_adamw_lr", "adamw_lr"):
            if not getattr(self, flag) > 0:
                found.append(f"--{flag.replace('_', '-')} must be > 0, got {getattr(self, flag)}")
        if not 0 <= self.warmup < 1:
            found.append(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup}")
        return found

    def summary(self) -> dict[str, Any]:
        """The settings that determine the numbers (for the results file and the table header)."""
        keys = ("world", "ep", "stage", "steps", "model", "seed", "global_batch", "seq_len",
                "muon_lr", "muon_adamw_lr", "adamw_lr", "warmup")  # fmt: skip
        return {key: getattr(self, key) for key in keys}
