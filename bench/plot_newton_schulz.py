"""Turn a pytest-benchmark JSON from ``bench/test_bench_newton_schulz.py`` into tables and a figure.

Prints the markdown tables that go into ``docs/benchmarks.md`` and writes ``docs/ns_batching.png``
(left: batched-vs-loop speedup heat map; right: time and FLOPs of each method relative to standard
bf16 per aspect ratio). Reads only ``extra_info``, where the benchmarks store their same-run ratios.

    python bench/plot_newton_schulz.py bench/ns.json --out docs/ns_batching.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and the bench machine have no display
import matplotlib.pyplot as plt

__all__ = ["load_extra_infos", "main"]


def load_extra_infos(path: Path) -> dict[str, list[dict]]:
    """Group the benchmarks' extra_info dicts by benchmark group (ns-batching, ns-flop-rate, ns-methods-rN)."""
    infos_by_group: dict[str, list[dict]] = {}
    for bench in json.loads(path.read_text())["benchmarks"]:
        group = bench["group"] or ""
        key = "ns-methods" if group.startswith("ns-methods") else group
        infos_by_group.setdefault(key, []).append(bench["extra_info"])
    return infos_by_group


def _shape_name(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _format_speedup(speedup: float) -> str:
    """Two decimals near 1x, where "never slower" is decided; one above 10x."""
    return f"{speedup:.1f}x" if speedup >= 10 else f"{speedup:.2f}x"


def _batching_table(infos: list[dict]) -> tuple[list[int], list[str], dict[tuple[int, str], float]]:
    speedup_by_cell = {(info["experts"], _shape_name(info["shape"])): info["speedup"] for info in infos}
    experts = sorted({e for e, _ in speedup_by_cell})
    shapes = sorted({s for _, s in speedup_by_cell}, key=lambda s: [int(x) for x in s.split("x")])
    return experts, shapes, speedup_by_cell


def print_tables(infos_by_group: dict[str, list[dict]]) -> None:
    """Print the three markdown tables (batching speedup, FLOP rate, methods)."""
    if infos := infos_by_group.get("ns-batching"):
        experts, shapes, speedup_by_cell = _batching_table(infos)
        print("| experts E | " + " | ".join(shapes) + " |")
        print("|---:|" + "---:|" * len(shapes))
        for e in experts:
            cells = [
                _format_speedup(speedup_by_cell[(e, s)]) if (e, s) in speedup_by_cell else "-" for s in shapes
            ]
            print(f"| {e} | " + " | ".join(cells) + " |")
        print()
    if infos := infos_by_group.get("ns-flop-rate"):
        print("| batch x m x n | NS GFLOP/s | bf16 bmm GFLOP/s | NS / bmm |")
        print("|---|---:|---:|---:|")
        for info in infos:
            print(
                f"| {_shape_name(info['shape'])} | {info['ns_gflops']:.0f} | {info['gemm_gflops']:.0f} "
                f"| {info['rate_ratio']:.2f} |"
            )
        print()
    if infos := infos_by_group.get("ns-methods"):
        print(
            "| aspect ratio | method | dtype | counted FLOPs vs standard | time vs standard bf16 | standard bf16 ms |"
        )
        print("|---:|---|---|---:|---:|---:|")
        for info in sorted(infos, key=lambda i: i["aspect_ratio"]):
            print(
                f"| {info['aspect_ratio']} | {info['method']} | {info['dtype']} | {info['flop_ratio']:.2f} "
                f"| {info['time_ratio']:.2f} | {info['standard_s'] * 1e3:.1f} |"
            )
        print()


def plot(infos_by_group: dict[str, list[dict]], out: Path) -> None:
    """Speedup heat map next to grouped bars of the methods' time ratios (FLOP ratios as markers)."""
    fig, (ax_heat, ax_bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    experts, shapes, speedup_by_cell = _batching_table(infos_by_group.get("ns-batching", []))
    grid = [[speedup_by_cell.get((e, s), float("nan")) for s in shapes] for e in experts]
    image = ax_heat.imshow(grid, cmap="viridis", norm=matplotlib.colors.LogNorm(), aspect="auto")
    for row, e in enumerate(experts):
        for col, s in enumerate(shapes):
            if (e, s) in speedup_by_cell:
                value = grid[row][col]
                color = "black" if value >= 10 else "white"  # viridis turns yellow at the top
                ax_heat.text(col, row, _format_speedup(value), ha="center", va="center", color=color)
    ax_heat.set_xticks(range(len(shapes)), shapes)
    ax_heat.set_yticks(range(len(experts)), experts)
    ax_heat.set_xlabel("expert matrix (out x in)")
    ax_heat.set_ylabel("experts E")
    ax_heat.set_title("per-expert loop time / batched time (bf16 standard NS)")
    fig.colorbar(image, ax=ax_heat)

    methods = infos_by_group.get("ns-methods", [])
    ratios = sorted({info["aspect_ratio"] for info in methods})
    variants = list(dict.fromkeys((info["method"], info["dtype"]) for info in methods))
    width = 0.8 / max(len(variants), 1)
    for k, variant in enumerate(variants):
        rows = {i["aspect_ratio"]: i for i in methods if (i["method"], i["dtype"]) == variant}
        xs = [r + (k - (len(variants) - 1) / 2) * width for r in range(len(ratios))]
        label = f"{variant[0]} {variant[1]}"
        ax_bars.bar(xs, [rows[r]["time_ratio"] for r in ratios], width, label=label, zorder=2)
        ax_bars.scatter(
            xs, [rows[r]["flop_ratio"] for r in ratios], color="black", marker="_", s=200, zorder=3
        )
    ax_bars.axhline(1.0, color="grey", linewidth=0.8)
    ax_bars.set_xticks(range(len(ratios)), [f"{r}" for r in ratios])
    ax_bars.set_xlabel("aspect ratio (8 x 256 x 256r)")
    ax_bars.set_ylabel("relative to standard bf16 (bars: time, ticks: counted FLOPs)")
    ax_bars.set_title("NS methods on CPU")
    ax_bars.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="file written by pytest --benchmark-json")
    parser.add_argument("--out", type=Path, default=Path("docs/ns_batching.png"))
    args = parser.parse_args(argv)
    infos_by_group = load_extra_infos(args.json)
    print_tables(infos_by_group)
    plot(infos_by_group, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
