"""Parameter routing: which optimizer, which group and which matrix layout each parameter gets.

``structure`` reads what a parameter is from the model (module types, transformers declarations,
DeepSpeed/AutoEP tags, names as fallback); ``rules`` holds user overrides; ``builder`` turns
routes into scheduler-ready, linked param groups; ``table`` prints them (``python -m expertopt
groups``, ``docs/routing.md``).
"""

from expertopt.routing.builder import RoutedParam, build_param_groups, route_model
from expertopt.routing.rules import Rule
from expertopt.routing.structure import ROLES, Route, is_expert_param

__all__ = ["ROLES", "Route", "RoutedParam", "Rule", "build_param_groups", "is_expert_param", "route_model"]
