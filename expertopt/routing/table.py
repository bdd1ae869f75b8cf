"""The routing as a table, one row per parameter: what ``python -m expertopt groups --model``
prints and what ``docs/routing.md`` is generated from, so a user sees before training which
optimizer, layout and step size every tensor gets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from expertopt.routing.builder import RoutedParam
from expertopt.updates.muon import adjusted_lr, matrix_view

__all__ = ["RoutingRow", "format_routing", "routing_rows"]

COLUMNS = ("parameter", "shape", "role", "group", "layout", "lr x", "wd")


@dataclass(frozen=True, slots=True)
class RoutingRow:
    """One parameter: its group, layout, step size relative to the scheduled lr, weight decay.

    ``lr_multiplier`` is the group's ``lr_mult`` times, for Muon, the per-matrix
    ``sqrt(max(1, fan_out / fan_in))`` of the matrix the layer computes with (torch's rule).
    """

    name: str
    shape: tuple[int, ...]
    role: str
    group: str
    layout: str
    lr_multiplier: float
    weight_decay: float


def _layout_label(group: dict[str, Any], shape: torch.Size) -> tuple[str, float]:
    """('out_in' / 'in_out' / 'flatten', with 'E x' for stacks), and the AdjustLR factor."""
    view = matrix_view(
        torch.empty(shape, device="meta"),
        is_expert=group["expert"],
        num_heads=group.get("num_heads"),
        matrix_layout=group["matrix_layout"],
        row_blocks=group["row_blocks"],
    )
    count = view.numel() // (view.shape[-2] * view.shape[-1])
    label = group["matrix_layout"]
    if group["row_blocks"]:
        label = f"rows/{group['row_blocks']} {label}"
    if count > 1:
        label = f"{count}x {label}"
    return label, adjusted_lr(1.0, None, view.shape[-2:], group["matrix_layout"])


def routing_rows(routed: Sequence[RoutedParam], groups: Sequence[dict[str, Any]]) -> list[RoutingRow]:
    """Rows in parameter order from :func:`route_model`'s routes and the groups built from them."""
    group_of = {id(p): g for g in groups for p in g["params"]}
    rows = []
    for item in routed:
        group = group_of[id(item.param)]
        label, factor = ("-", 1.0)
        if group["use_muon"]:
            label, factor = _layout_label(group, item.param.shape)
        rows.append(
            RoutingRow(
                item.name,
                tuple(item.param.shape),
                item.route.role,
                group["name"],
                label,
                group["lr_mult"] * factor,
                group["weight_decay"],
            )
        )
    return rows


def format_routing(rows: Sequence[RoutingRow], *, markdown: bool = False) -> str:
    """A fixed-width text table, or a Markdown table with ``markdown=True``."""
    cells = [
        (
            r.name,
            "x".join(map(str, r.shape)),
            r.role,
            r.group,
            r.layout,
            f"{r.lr_multiplier:.4g}",
            f"{r.weight_decay:g}",
        )
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join([*lines, *("| " + " | ".join((f"`{c[0]}`", *c[1:])) + " |" for c in cells)])
    widths = [max(len(str(x)) for x in column) for column in zip(COLUMNS, *cells, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    header = line.format(*COLUMNS)
    return "\n".join([header, "-" * len(header), *(line.format(*c) for c in cells)])
