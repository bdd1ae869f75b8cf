"""User overrides of the routing: ordered :class:`Rule` s, first match wins (torchtitan's
``ParamGroupConfig``); a rule that matches nothing is an error raised by the builder."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from expertopt.updates.muon import MATRIX_LAYOUTS

__all__ = ["RULE_KEYS", "Rule"]

RULE_KEYS = frozenset(
    {"use_muon", "weight_decay", "lr_mult", "num_heads", "expert", "name", "matrix_layout", "row_blocks"}
)


@dataclass(frozen=True)
class Rule:
    """Route the parameters ``match`` selects into a group of their own.

    ``match`` is a regex searched in the parameter's fully qualified name, or a predicate
    ``(name, param) -> bool``. ``options`` sets group keys: ``use_muon``, ``weight_decay``,
    ``lr_mult`` (relative to the scheduled lr), ``num_heads``, ``expert``, ``name``,
    ``matrix_layout`` ("out_in", "in_out" or "flatten": how each matrix is stored) and
    ``row_blocks`` (a 2-D tensor holding that many matrices stacked along its rows).
    Options a rule leaves out keep what the structural routing found.
    """

    match: str | Callable[[str, Tensor], bool]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.options) - RULE_KEYS
        if unknown:
            raise ValueError(
                f"Rule({self.match!r}) has unknown options {sorted(unknown)}; allowed: {sorted(RULE_KEYS)}"
            )
        layout = self.options.get("matrix_layout", "out_in")
        if layout not in MATRIX_LAYOUTS:
            raise ValueError(f"Rule({self.match!r}): matrix_layout={layout!r}; use one of {MATRIX_LAYOUTS}")
        blocks = self.options.get("row_blocks")
        if blocks is not None and not (isinstance(blocks, int) and blocks >= 1):
            raise ValueError(f"Rule({self.match!r}): row_blocks={blocks!r}; use a positive int or None")

    def matches(self, name: str, param: Tensor) -> bool:
        if callable(self.match):
            return bool(self.match(name, param))
        return re.search(self.match, name) is not None
