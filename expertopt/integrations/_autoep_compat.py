"""A shim that lets DeepSpeed 0.19.8's AutoEP convert transformers >= 5.x MoE models.

The cause. When AutoEP replaces a Mixtral / Qwen3-MoE block it re-points transformers'
router-logit recorder at its own router (``module_inject/auto_ep_presets/base.py``,
``_install_instance_transformers_output_recorders``). It treats
``transformers.utils.output_capturing._CAN_RECORD_REGISTRY`` as a plain dict keyed by
``str(cls)``: it saves entries with ``registry.get(key, default)``, installs the hooks, and
restores them with ``registry[key] = entry``. In transformers 5.24 the registry is a
``_CanRecordRegistry(dict)`` whose ``get(model)`` takes a *model* and no default, and whose
``__setitem__(model, value)`` stores under ``str(model.__class__)``. So ``get(key, default)``
raises ``TypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were given``
at ``deepspeed.initialize``, whatever the optimizer, and the restore would file every entry
under ``"<class 'str'>"``.

The shim. For the duration of ``deepspeed.initialize`` only, and only when the config enables
AutoEP and the installed registry rejects a default (probed, not guessed from versions), a
string key gets plain dict semantics in ``get`` and ``__setitem__``; a model key keeps
transformers' behaviour. That is exactly the contract DeepSpeed was written against, and
transformers' own calls (which pass models) are unchanged. The class is restored on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["autoep_enabled", "registry_needs_shim", "transformers_registry_shim"]

_PROBE_KEY = "expertopt: probe for a dict-style get(key, default)"


def autoep_enabled(config: dict[str, Any] | None) -> bool:
    """Whether a DeepSpeed config turns on AutoEP (``"expert_parallel": {"enabled": true}``)."""
    block = (config or {}).get("expert_parallel") or {}
    return bool(block.get("enabled", False)) if isinstance(block, dict) else False


def _registry() -> Any:
    try:
        from transformers.utils import output_capturing
    except ImportError:  # no transformers (or one without output capturing): nothing to shim
        return None
    return getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)


def registry_needs_shim(registry: Any = None) -> bool:
    """Whether transformers' recorder registry rejects DeepSpeed's ``get(key, default)``."""
    registry = _registry() if registry is None else registry
    if not isinstance(registry, dict):
        return False
    try:
        registry.get(_PROBE_KEY, None)
    except TypeError:
        return True
    return False


@contextlib.contextmanager
def transformers_registry_shim(config: dict[str, Any] | None) -> Iterator[bool]:
    """Give string keys dict semantics on transformers' registry while AutoEP converts the model.

    Yields whether the shim is active. A no-op unless ``config`` enables AutoEP and the
    installed transformers has the incompatible registry.
    """
    registry = _registry()
    if not autoep_enabled(config) or not registry_needs_shim(registry):
        yield False
        return
    cls = type(registry)
    original_get = cls.__dict__["get"]
    original_setitem = cls.__dict__.get("__setitem__", dict.__setitem__)

    def get(self: dict, key: Any, *default: Any) -> Any:
        if isinstance(key, str):
            return dict.get(self, key, *default)
        return original_get(self, key)

    def setitem(self: dict, key: Any, value: Any) -> None:
        if isinstance(key, str):
            dict.__setitem__(self, key, value)
        else:
            original_setitem(self, key, value)

    cls.get, cls.__setitem__ = get, setitem
    try:
        yield True
    finally:
        cls.get, cls.__setitem__ = original_get, original_setitem
