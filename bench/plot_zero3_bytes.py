"""Turn a pytest-benchmark JSON from ``bench/test_bench_zero3_comm.py`` into a bar chart.

Bytes each rank sends per ZeRO-3 step on the dense model, split into gradient reduction, the
rest of ``engine.step`` and expertopt's owner exchange, for DeepSpeed AdamW, DeepSpeed Muon and
expertopt's two ways of bringing Muon gradients to their owners. Reads only ``extra_info``.

    DS_ACCELERATOR=cpu python -m pytest bench/test_bench_zero3_comm.py -p no:cacheprovider -q \\
        --benchmark-json=/tmp/zero3.json
    python bench/plot_zero3_bytes.py /tmp/zero3.json --out docs/zero3_bytes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and the bench machine have no display
import matplotlib.pyplot as plt

__all__ = ["main", "plot"]

BARS = {
    "ds_adamw": "DeepSpeed\nAdamW",
    "ds_muon": "DeepSpeed\nMuon",
    "expertopt_muon": "expertopt\nto_owner",
    "expertopt_muon_rs": "expertopt\nreduce_scatter",
}
PARTS = {
    "grad_reduce": "gradient reduction",
    "step_other": "step (gathers, norms)",
    "exchange": "owner exchange",
}


def plot(info: dict[str, float], out: Path) -> Path:
    """Stacked KiB per rank per step, with each bar's ratio to DeepSpeed AdamW on top."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bottoms = [0.0] * len(BARS)
    for part, label in PARTS.items():
        heights = [info[f"{name}|{part}"] / 1024 for name in BARS]
        ax.bar(list(BARS.values()), heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    adamw = info["ds_adamw|total"]
    for index, name in enumerate(BARS):
        ax.annotate(
            f"{info[f'{name}|total'] / adamw:.3f}x", (index, bottoms[index]), ha="center", va="bottom"
        )
    ax.set_ylim(top=1.12 * max(bottoms))  # room for the ratios under the title
    ax.set_ylabel("KiB sent per rank per step")
    ax.set_title("ZeRO-3, 4 ranks, dense LM: bytes per rank (x DeepSpeed AdamW)")
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/zero3_bytes.png"))
    args = parser.parse_args()
    (bench,) = json.loads(args.json.read_text())["benchmarks"]
    print(plot(bench["extra_info"], args.out))


if __name__ == "__main__":
    main()
