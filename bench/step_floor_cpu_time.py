"""Step over its Newton-Schulz GEMMs alone, timed in thread CPU time (for an overloaded machine).

``bench/test_bench_step_floor.py`` times wall clock, as every benchmark here. When the machine
is shared by many more processes than cores, wall-clock rounds of one step spread over a 3-5x
range; the CPU time of the (single) torch thread, ``time.thread_time``, is what this script
compares instead: the step and the GEMMs alone interleaved round by round, medians::

    PYTHONPATH=. python bench/step_floor_cpu_time.py [rounds] [ns_dtype] [compile]

``ns_dtype`` (default bfloat16) is set on every Muon group and used for the GEMMs alone: on a CPU
without native bf16 matmul (no AVX-512 BF16 / AMX), bf16 GEMMs are emulated, ~10x slower than
fp32, and hide any overhead; float32 is then the fairer floor. ``compile`` times the step through
``torch.compile`` (inductor; compiled in two untimed steps) instead of eagerly.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from bench.test_bench_optimizer_step import OURS, _make
from bench.test_bench_step_floor import MODELS, _gemms_alone

__all__: list[str] = []


def main(rounds: int, ns_dtype: str, compiled: bool = False) -> None:
    torch.set_num_threads(1)  # every op then runs on the calling thread, which thread_time measures
    for model in MODELS:
        optimizer = _make(model, OURS, warm=True)
        for group in optimizer.param_groups:
            group["ns_dtype"] = ns_dtype
        optimizer.step()  # re-plans for ns_dtype
        step_fn = torch.compile(optimizer.step) if compiled else optimizer.step
        step_fn()  # compiles
        gemms = _gemms_alone(optimizer, getattr(torch, ns_dtype))
        gemms()
        steps, floors = [], []
        for _ in range(rounds):
            start = time.thread_time()
            step_fn()
            steps.append(time.thread_time() - start)
            start = time.thread_time()
            gemms()
            floors.append(time.thread_time() - start)
        step, floor = statistics.median(steps), statistics.median(floors)
        # Other processes only ever add time (cache and memory-bandwidth contention), so the
        # fastest round of each is the least disturbed one: printed beside the medians.
        print(
            f"{model}: {'compiled ' if compiled else ''}step {step * 1e3:.1f} ms / its NS GEMMs alone {floor * 1e3:.1f} ms (thread CPU time, "
            f"median of {rounds}, {ns_dtype}) = {step / floor:.2f}x; fastest rounds "
            f"{min(steps) * 1e3:.1f} / {min(floors) * 1e3:.1f} ms = {min(steps) / min(floors):.2f}x; "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 11,
        sys.argv[2] if len(sys.argv) > 2 else "bfloat16",
        compiled=len(sys.argv) > 3 and sys.argv[3] == "compile",
    )
