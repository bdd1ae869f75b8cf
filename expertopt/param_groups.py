"""Compatibility home of the param-group builder; the code lives in :mod:`expertopt.routing`."""

from expertopt.routing import Rule, build_param_groups, is_expert_param

__all__ = ["Rule", "build_param_groups", "is_expert_param"]
