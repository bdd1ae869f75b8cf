"""DeepSpeed glue: ``"optimizer": {"type": "Muon"}`` in a DeepSpeed config, at ZeRO stage 0, 1, 2 or 3.

:func:`initialize` takes and returns what ``deepspeed.initialize`` does; :func:`patch_deepspeed`
makes ``deepspeed.initialize`` itself do it, for callers we do not control (the Hugging Face
Trainer through accelerate). When the config names ``Muon`` or ``AdamW`` it removes the
optimizer block (so DeepSpeed neither builds its own Muon nor tags parameters ``use_muon``,
which would switch on DeepSpeed's in-ZeRO Newton-Schulz), builds expertopt's optimizer from the
routed param groups of the model or of ``model_parameters`` (after AutoEP has replaced modules),
and tells it where each matrix lives (flat partitions at ZeRO-1/2, sub-group chunks at ZeRO-3,
replicas at ZeRO-0; ``deepspeed_shards`` / ``deepspeed_zero3``) so every matrix is
orthogonalized once by one owner inside its DP (dense) or EDP (expert) group. At ZeRO-0 with
experts it replaces DeepSpeed's clipping norm, which is wrong there.

What DeepSpeed 0.19.8 already does right and we rely on (verified, see docs/deepspeed.md): at
ZeRO-1/2 the optimizer receives gradients averaged over the global batch (experts included),
averaged over micro-batches, unscaled, and clipped with the correct global norm.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import deepspeed
import deepspeed.comm as ds_dist
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config
from deepspeed.runtime.utils import is_invalid_grad_norm
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import nn

from expertopt.integrations._autoep_compat import transformers_registry_shim
from expertopt.integrations._model_parameters import normalize, route_model_parameters
from expertopt.integrations.deepspeed_shards import (
    bf16_optimizer_placements,
    check_offloaded_exchange,
    zero0_placements,
    zero12_placements,
)
from expertopt.integrations.deepspeed_zero3 import EXPERT_PLACEMENTS, attach_zero3, check_zero3_config
from expertopt.integrations.deepspeed_zero3_owners import ZERO3_MUON_GRADIENTS
from expertopt.optim._base import SharedFiniteCheck
from expertopt.optim.adamw import AdamW
from expertopt.optim.expert import MoEOptimizer
from expertopt.optim.muon import Muon
from expertopt.param_groups import build_param_groups

__all__ = [
    "OptimizerSpec",
    "attach",
    "initialize",
    "parse_optimizer_config",
    "patch_deepspeed",
    "unpatch_deepspeed",
]

# Keys of "optimizer": {"params": {...}} and where each goes: the group builder or the optimizer.
_GROUP_KEYS = {
    "lr",
    "muon_lr",
    "adamw_lr",
    "adam_lr",
    "weight_decay",
    "adamw_weight_decay",
    "expert_lr_mult",
    "router",
}
_MUON_KEYS = {"momentum", "nesterov", "ns_method", "ns_steps", "ns_dtype", "ns_coefficients", "adjust_lr_fn", "eps",
              "betas", "adamw_eps"}  # fmt: skip
_ADAMW_KEYS = {"betas", "eps", "amsgrad"}
_ADAMW_GROUP_KEYS = {"lr", "weight_decay", "expert_lr_mult"}
# Keys for the engine glue itself: how ZeRO-0 runs Newton-Schulz (deepspeed_shards.zero0_placements),
# where AutoEP experts live at ZeRO-3 and how dense Muon gradients reach their owners there
# (deepspeed_zero3.attach_zero3).
_ENGINE_KEYS = {"zero0_newton_schulz", "expert_placement", "zero3_muon_gradients"}
_ADAMW_ENGINE_KEYS = {"expert_placement"}
ZERO0_MODES = ("owners", "redundant")
_MOE_OPTIMIZER_UNDER_DEEPSPEED = (
    "expertopt.MoEOptimizer cannot be DeepSpeed's optimizer: DeepSpeed steps one client optimizer "
    "on its own flat partitions and copies, which the dense/expert pair does not follow. Pass "
    "optimizer=expertopt.Muon(expertopt.build_param_groups(model)) instead (expert groups live in "
    "the same optimizer, with their own process groups, and follow every scheduler), or name "
    '"optimizer": {"type": "Muon"} in the DeepSpeed config and drop optimizer='
)
_NEEDS_GRAD_NORM = (
    '"zero_optimization": {"compute_grad_norm": false} is not supported with expertopt\'s optimizers: '
    "at ZeRO-1/2 every rank skips a non-finite step on DeepSpeed's global gradient norm, so that all "
    'ranks and groups decide alike; remove "compute_grad_norm" (default true)'
)


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed ``"optimizer"`` block: which class, group-builder options, optimizer options."""

    kind: str  # "muon" or "adamw"
    group_options: dict[str, Any] = field(default_factory=dict)
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)


def parse_optimizer_config(block: dict[str, Any]) -> OptimizerSpec | None:
    """Parse ``{"type": "Muon"|"AdamW", "params": {...}}``; None for any other type (DeepSpeed's own).

    An unknown key is an error, never ignored.
    """
    kind = str(block.get("type", "")).lower()
    if kind not in ("muon", "adamw"):
        return None
    unknown_block = set(block) - {"type", "params"}
    if unknown_block:
        raise ValueError(f'"optimizer" has unknown key(s) {sorted(unknown_block)}; allowed: "type", "params"')
    params = dict(block.get("params", {}))
    group_keys, optimizer_keys = (
        (_GROUP_KEYS, _MUON_KEYS) if kind == "muon" else (_ADAMW_GROUP_KEYS, _ADAMW_KEYS)
    )
    engine_keys = _ENGINE_KEYS if kind == "muon" else _ADAMW_ENGINE_KEYS
    unknown = set(params) - group_keys - optimizer_keys - engine_keys
    if unknown:
        raise ValueError(
            f'"optimizer.params" for {block["type"]} has unknown key(s) {sorted(unknown)}; '
            f"allowed: {sorted(group_keys | optimizer_keys | engine_keys)}"
        )
    engine = {k: params[k] for k in engine_keys if k in params}
    if engine.get("zero0_newton_schulz", "owners") not in ZERO0_MODES:
        raise ValueError(
            f'"optimizer.params.zero0_newton_schulz" must be one of {ZERO0_MODES}, '
            f"got {engine['zero0_newton_schulz']!r}"
        )
    if engine.get("expert_placement", EXPERT_PLACEMENTS[0]) not in EXPERT_PLACEMENTS:
        raise ValueError(
            f'"optimizer.params.expert_placement" must be one of {EXPERT_PLACEMENTS}, '
            f"got {engine['expert_placement']!r}"
        )
    if engine.get("zero3_muon_gradients", ZERO3_MUON_GRADIENTS[0]) not in ZERO3_MUON_GRADIENTS:
        raise ValueError(
            f'"optimizer.params.zero3_muon_gradients" must be one of {ZERO3_MUON_GRADIENTS}, '
            f"got {engine['zero3_muon_gradients']!r}"
        )
    groups = {k: v for k, v in params.items() if k in group_keys}
    if kind == "muon":
        if "muon_lr" in groups:
            groups["lr"] = groups.pop("muon_lr")
        if "adam_lr" in groups:
            groups["adamw_lr"] = groups.pop("adam_lr")
    else:  # one lr for every group; weight decay on matrices and embeddings alike
        groups.setdefault("lr", 1e-3)
        groups["adamw_lr"] = groups["lr"]
        if "weight_decay" in groups:
            groups["adamw_weight_decay"] = groups["weight_decay"]
    return OptimizerSpec(kind, groups, {k: v for k, v in params.items() if k in optimizer_keys}, engine)


def _load_config(config: Any, args: Any) -> tuple[dict[str, Any] | None, bool]:
    """The config as a dict (path, base64 or dict, read like DeepSpeed reads it), and whether it
    came from ``args.deepspeed_config``; None when no config was given."""
    from_args = config is None and getattr(args, "deepspeed_config", None) is not None
    if from_args:
        config = args.deepspeed_config
    if config is None:
        return None, False
    return dict(load_ds_config(os.fspath(config) if isinstance(config, os.PathLike) else config)), from_args


def _build_groups(
    model: nn.Module, spec: OptimizerSpec, stage: int, model_parameters: Any = None
) -> list[dict[str, Any]]:
    """expertopt's routed groups, of the whole model or of ``model_parameters`` (DeepSpeed's list,
    read after AutoEP); at ZeRO-1/2 DeepSpeed MoE and AutoEP experts are split into EDP groups."""
    if model_parameters is None:
        groups = build_param_groups(model, **spec.group_options)
    else:
        groups = route_model_parameters(model, model_parameters, spec.group_options)
    if spec.kind == "adamw":
        for group in groups:
            group["use_muon"] = False
    if stage in (1, 2) and any(is_moe_param(p) for g in groups for p in g["params"]):
        names = {id(p): n for n, p in model.named_parameters()}
        for group in groups:
            group.pop("param_names")  # split_params... copies the list into every split group
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
        groups = [g for g in groups if g["params"]]
        for group in groups:
            group["param_names"] = [names[id(p)] for p in group["params"]]
    return groups


def _check_stage3_options(options: dict[str, Any], stage: int) -> None:
    """The engine keys that only mean something at ZeRO-3 are refused elsewhere, with the fix."""
    if options.get("expert_placement") is not None and stage != 3:
        raise ValueError(
            f'"optimizer.params.expert_placement" applies to ZeRO stage 3 only (at stage {stage} every '
            'expert is whole on its expert-data-parallel ranks already): remove "expert_placement"'
        )
    if options.get("zero3_muon_gradients") is not None and stage != 3:
        raise ValueError(
            f'"optimizer.params.zero3_muon_gradients" applies to ZeRO stage 3 only (at stage {stage} '
            'gradients are reduced by DeepSpeed before the step): remove "zero3_muon_gradients"'
        )


def _check_supported(config: dict[str, Any]) -> int:
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:
        check_zero3_config(config["zero_optimization"])
    if stage in (1, 2) and config["zero_optimization"].get("compute_grad_norm", True) is False:
        raise ValueError(_NEEDS_GRAD_NORM)
    if stage > 0 and config["zero_optimization"].get("zenflow"):
        raise ValueError(
            '"zero_optimization.zenflow" replaces the optimizer step and its clipping with its own, which '
            'expertopt\'s optimizers do not follow: remove "zenflow"'
        )
    return stage


def initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with expertopt's Muon / AdamW when the config names one.

    Takes DeepSpeed's arguments (by position or keyword, ``config`` or ``config_params`` or
    ``args.deepspeed_config``) and returns ``(engine, optimizer, training_dataloader,
    lr_scheduler)`` like DeepSpeed. Any other optimizer type goes to DeepSpeed unchanged.
    """
    return _initialize(_unpatched_initialize(), *args, **kwargs)


def _initialize(ds_initialize: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
    """The body of :func:`initialize` and of the patched ``deepspeed.initialize``."""
    call = inspect.signature(ds_initialize).bind(*args, **kwargs)
    given = call.arguments
    config = given.get("config")
    loaded, from_args = _load_config(
        config if config is not None else given.get("config_params"), given.get("args")
    )
    block = (loaded or {}).get("optimizer")
    spec = parse_optimizer_config(block) if block else None
    if isinstance(given.get("optimizer"), MoEOptimizer):
        raise ValueError(_MOE_OPTIMIZER_UNDER_DEEPSPEED)
    if spec is not None:
        given.update(_engine_arguments(spec, block, loaded, from_args, given))
    elif isinstance(given.get("optimizer"), (Muon, AdamW)) and loaded is not None:
        # The optimizer-object door: the same config treatment as the config door.
        given.update(
            _config_arguments(_config_for_expertopt(loaded, _check_supported(loaded)), from_args, given)
        )
    with transformers_registry_shim(loaded):
        engine, engine_optimizer, loader, scheduler = ds_initialize(*call.args, **call.kwargs)
    attach(engine, **(spec.engine_options if spec is not None else {}))
    return engine, engine_optimizer, loader, scheduler


def _engine_arguments(
    spec: OptimizerSpec, block: dict[str, Any], loaded: dict[str, Any], from_args: bool, given: dict[str, Any]
) -> dict[str, Any]:
    """The ``deepspeed.initialize`` arguments that build expertopt's optimizer: the config
    without its optimizer block and a callable optimizer DeepSpeed calls after AutoEP."""
    model = given.get("model")
    if given.get("optimizer") is not None:
        raise ValueError(
            f'the DeepSpeed config names "optimizer": {block["type"]!r} and an optimizer was passed too; '
            "keep one of them"
        )
    if model is None:
        raise ValueError("expertopt.initialize needs the model to route its parameters")
    stage = _check_supported(loaded)
    _check_stage3_options(spec.engine_options, stage)
    loaded = _config_for_expertopt(loaded, stage)
    arguments = {
        "optimizer": _optimizer_factory(
            model, spec, stage, given.get("model_parameters") is None, _wrapped_at_zero0(loaded, stage)
        ),
        # DeepSpeed maps these onto AutoEP's replacements and hands them to the optimizer callable.
        "model_parameters": normalize(given.get("model_parameters")),
    }
    return arguments | _config_arguments(loaded, from_args, given)


def _config_arguments(loaded: dict[str, Any], from_args: bool, given: dict[str, Any]) -> dict[str, Any]:
    """The ``deepspeed.initialize`` arguments that hand DeepSpeed ``loaded`` as its config."""
    arguments: dict[str, Any] = {"config": loaded, "config_params": None}
    if from_args:  # DeepSpeed refuses a config both in args and as an argument
        arguments["args"] = copy.copy(given["args"])
        arguments["args"].deepspeed_config = None
    return arguments


def _config_for_expertopt(loaded: dict[str, Any], stage: int) -> dict[str, Any]:
    """The config DeepSpeed gets with expertopt's optimizer, whichever door it came by: no
    optimizer block, expertopt's optimizers allowed under ZeRO (and with CPU offload), and at
    ZeRO-1/2 gradients reduced to their partition owner unless the user says otherwise."""
    loaded = {k: v for k, v in loaded.items() if k != "optimizer"}
    loaded["zero_allow_untested_optimizer"] = True
    offload = (loaded.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device")
    if stage > 0 and offload == "cpu":
        # DeepSpeed refuses a client optimizer with CPU offload unless told otherwise: expertopt's
        # steps run on the CPU partitions as they are (tests/test_deepspeed_zero3.py and
        # tests/test_deepspeed_optimizer_object.py, offload cases).
        if loaded.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(
                '"zero_force_ds_cpu_optimizer": true makes DeepSpeed refuse expertopt\'s optimizer with '
                '"offload_optimizer"; remove "zero_force_ds_cpu_optimizer"'
            )
        loaded["zero_force_ds_cpu_optimizer"] = False
    if stage in (1, 2):
        # One reduce per partition owner moves half the gradient bytes of DeepSpeed's default
        # bucket all-reduce (docs/benchmarks.md, ZeRO section); an explicit user value wins.
        zero = dict(loaded["zero_optimization"])
        zero.setdefault("use_multi_rank_bucket_allreduce", False)
        loaded["zero_optimization"] = zero
    return loaded


_ORIGINAL = "__expertopt_original__"  # marks the patched deepspeed.initialize, holds the original


def _unpatched_initialize() -> Callable[..., Any]:
    return getattr(deepspeed.initialize, _ORIGINAL, deepspeed.initialize)


def patch_deepspeed() -> None:
    """Make every caller of ``deepspeed.initialize`` build expertopt's optimizer when the config's
    optimizer type is ``"Muon"`` or ``"AdamW"`` (the Hugging Face Trainer and accelerate,
    Lightning, a user's script); every other config goes to DeepSpeed untouched. The AutoEP
    transformers shim applies on this path too. Idempotent; :func:`unpatch_deepspeed` undoes it.

    Callers that look ``deepspeed.initialize`` up when they call it see the patch (accelerate
    does); a ``from deepspeed import initialize`` made before patching keeps the original.
    """
    current = deepspeed.initialize
    if hasattr(current, _ORIGINAL):
        return

    @functools.wraps(current)
    def patched_initialize(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        return _initialize(current, *args, **kwargs)

    setattr(patched_initialize, _ORIGINAL, current)
    deepspeed.initialize = patched_initialize


def unpatch_deepspeed() -> None:
    """Restore the ``deepspeed.initialize`` that :func:`patch_deepspeed` replaced (no-op if unpatched)."""
    deepspeed.initialize = _unpatched_initialize()


def _wrapped_at_zero0(config: dict[str, Any], stage: int) -> bool:
    """Whether DeepSpeed 0.19.8 wraps the client optimizer in ``FP16_UnfusedOptimizer``: ZeRO-0
    with bf16 or fp16 (``engine._do_optimizer_sanity_check``)."""
    half = any((config.get(key) or {}).get("enabled", False) for key in ("bf16", "bfloat16", "fp16"))
    return stage == 0 and half


def _skip_state_warmup(optimizer: Muon | AdamW) -> None:
    """Make the one ``step()`` DeepSpeed's ``FP16_UnfusedOptimizer`` calls at construction a no-op.

    It sets every fp32 master's gradient to zero and steps once to create optimizer state
    (``initialize_optimizer_states``). expertopt creates state eagerly, and that step would apply
    weight decay to the masters and count an AdamW step that no training step asked for (the
    single-process reference takes neither). Only that first call, and only when every gradient
    is zero, is skipped; :func:`attach` re-keys state by the fp32 masters afterwards.
    """

    def warmup_step(closure: Any = None) -> Any:
        del optimizer.step  # the class's step from now on
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        if any(grad is None or grad.any() for grad in grads):
            return optimizer.step(closure)
        return None

    optimizer.step = warmup_step


def _optimizer_factory(
    model: nn.Module, spec: OptimizerSpec, stage: int, whole_model: bool, wrapped_at_zero0: bool = False
) -> Callable[[Any], Muon | AdamW]:
    """A callable DeepSpeed calls after AutoEP has replaced modules, so groups see the final model.

    DeepSpeed passes ``model_parameters`` as it resolved them (``model.parameters()`` when none
    were given, which routes the whole model, as does ``None``).
    """
    cls = Muon if spec.kind == "muon" else AdamW

    def build(model_parameters: Any) -> Muon | AdamW:
        groups = _build_groups(model, spec, stage, None if whole_model else model_parameters)
        optimizer = cls(groups, **spec.optimizer_options)
        if wrapped_at_zero0:
            _skip_state_warmup(optimizer)
        return optimizer

    return build


def _shared_finite_check(engine: Any, zero: DeepSpeedZeroOptimizer) -> SharedFiniteCheck:
    """The rank-identical "all gradients finite" verdict for a sharded step, keyed by engine step.

    Each rank sees only its own partition of the gradients, and DeepSpeed steps the optimizer
    one group at a time, so a local check would let ranks, or groups, disagree. DeepSpeed 0.19.8
    skips a non-finite step itself in fp32, fp16 and bf16 with ``check_grad_overflow`` (the
    default), but steps on it in bf16 without. Its global gradient norm, computed before the
    first group steps (all-reduced; inf on every rank when any gradient is non-finite), is the
    verdict for every group at no extra communication.
    """
    if not zero.compute_grad_norm:
        raise ValueError(_NEEDS_GRAD_NORM)
    return lambda _grads: (not is_invalid_grad_norm(zero._global_grad_norm), engine.global_steps)


def _attach_bf16_optimizer(engine: Any, optimizer: Muon | AdamW, bf16: BF16_Optimizer) -> None:
    """bf16 with ZeRO-1 and fp32 gradient accumulation (DeepSpeed's ``BF16_Optimizer``).

    It all-reduces the fp32 gradients, clips them with the global norm of the raw gradients
    (F5 does not arise), skips a non-finite step before the client sees it, and steps the client
    once with each group's flat fp32 partition: Muon places those partitions like ZeRO-1/2's.
    """
    optimizer.shared_finite_check = lambda _grads: (
        not is_invalid_grad_norm(bf16._global_grad_norm),
        engine.global_steps,
    )
    if isinstance(optimizer, Muon):
        optimizer.place_shards(bf16_optimizer_placements(optimizer, bf16))
    else:
        optimizer.rebind_state()


def _attach_zero0_clipping(engine: Any, optimizer: Muon | AdamW) -> None:
    """ZeRO-0 with experts: clip with the true global norm instead of DeepSpeed's.

    DeepSpeed 0.19.8 clips at stage 0 with the mean over ranks of each rank's local norm
    (``runtime/utils.py`` ``clip_grad_norm_``), which counts only the rank's own experts (F4;
    measured at EP 2 on 4 ranks: norm 1.077 for a true 1.095, gradients 1.9% too large). Experts are
    known only here, after ``deepspeed.initialize``: AutoEP tags them inside it. Without
    experts every rank holds the same gradients and DeepSpeed's norm is right, so it stays.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if engine.gradient_clipping() <= 0 or not any(is_moe_param(p) for p in params):
        return
    if engine.mpu is not None or engine.fp16_enabled() or engine.bfloat16_enabled():
        # fp16 / bf16 engines clip elsewhere (or not at all) at stage 0, with DeepSpeed's norm.
        raise NotImplementedError(
            "ZeRO stage 0 with experts and gradient clipping is supported in fp32 without model parallelism "
            '(mpu) only; use "zero_optimization": {"stage": 1} or 2, or set "gradient_clipping": 0'
        )
    from deepspeed.utils import groups

    def clip_fp32_gradients() -> torch.Tensor:
        norm = _expert_aware_grad_norm(params, groups._get_data_parallel_group())
        torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm  # what engine.get_global_grad_norm() reports
        return norm

    engine.clip_fp32_gradients = clip_fp32_gradients


def _expert_aware_grad_norm(params: list[torch.Tensor], data_parallel: Any) -> torch.Tensor:
    """The 2-norm of the global gradient at ZeRO-0, every dense and every expert parameter once.

    After the engine's all-reduce, dense gradients are identical on every rank, and an expert's
    gradient is identical on the ``edp`` ranks of its expert-data-parallel group, whose union
    over expert-parallel ranks is the data-parallel group. Summing ``||g||^2 / edp`` of the
    experts over the data-parallel group therefore counts each expert once (one all-reduce of
    one scalar).
    """
    from deepspeed.utils import groups

    dense = [p.grad for p in params if p.grad is not None and not is_moe_param(p)]
    expert_squares = torch.zeros((), dtype=torch.float32)
    for name in sorted({p.group_name for p in params if is_moe_param(p)}):
        grads = [p.grad for p in params if p.grad is not None and is_moe_param(p) and p.group_name == name]
        edp_size = ds_dist.get_world_size(group=groups._get_expert_data_parallel_group(name))
        if grads:
            expert_squares += torch.nn.utils.get_total_norm(grads).float().square() / edp_size
    ds_dist.all_reduce(expert_squares, group=data_parallel)
    dense_squares = torch.nn.utils.get_total_norm(dense).float().square() if dense else 0.0
    return (dense_squares + expert_squares).sqrt()


TOPOLOGY_FILE = "expertopt_topology.json"


def topology(engine: Any) -> dict[str, Any]:
    """What expertopt's optimizer state depends on: it is partitioned by these, so a checkpoint
    only resumes under the same values."""
    stage = engine.zero_optimization_stage()
    return {
        "world_size": ds_dist.get_world_size(),
        "data_parallel_size": engine.dp_world_size,
        "expert_groups": sorted({p.group_name for p in engine.module.parameters() if is_moe_param(p)}),
        "optimizer_state": {0: "whole parameters", 3: "ZeRO-3 partitions"}.get(stage, "flat ZeRO partitions"),
        "shard_descriptions": _shard_descriptions(engine),
    }


def _shard_descriptions(engine: Any) -> list[str]:
    """Every rank's digest of its placed units (layouts, owners, whether gradients arrive at the
    owner): Muon momentum is laid out by them (whole owned matrices with ZeRO-3's "to_owner"),
    and a resume under other owners (another ``ns_method``, ``zero3_muon_gradients`` or expertopt
    version) would read it into the wrong matrices. A collective: every rank calls it."""
    units = getattr(engine.basic_optimizer, "shard_units", [])
    mine = hashlib.sha256(b"".join(unit.fingerprint() for unit in units)).hexdigest()[:16]
    everyone: list[str | None] = [None] * ds_dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [str(digest) for digest in everyone]


def _save_with_topology(engine: Any, save: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(save)
    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"  # DeepSpeed's default
        result = save(save_dir, tag, *args, **kwargs)
        record = topology(engine)  # on every rank: it gathers the shard descriptions
        if ds_dist.get_rank() == 0:
            with open(os.path.join(save_dir, tag, TOPOLOGY_FILE), "w") as handle:
                json.dump(record, handle, indent=1)
        ds_dist.barrier()
        return result

    return save_checkpoint


def _load_checking_topology(engine: Any, load: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(load)

    @functools.wraps(load)
    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)  # DeepSpeed's own defaults, however passed
        call.apply_defaults()
        given = call.arguments
        if given["load_optimizer_states"] and not given["load_module_only"]:
            check_topology(engine, given["load_dir"], given["tag"])
        return load(*args, **kwargs)

    return load_checkpoint


def check_topology(engine: Any, load_dir: str, tag: Any = None) -> None:
    """Refuse, with the fix, to load optimizer state saved under another topology (F9).

    DeepSpeed 0.19.8 fails on such a checkpoint with messages that do not name the cause
    (parameter alignment, group sizes, missing files), and a layout that happened to match would
    load momentum into the wrong matrices. Checkpoints without expertopt's record pass through.
    """
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return
        with open(latest) as handle:
            tag = handle.read().strip()
    path = os.path.join(load_dir, str(tag), TOPOLOGY_FILE)
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        saved = json.load(handle)
    current = topology(engine)
    # Keys a record lacks were not recorded yet (older expertopt): they pass, except the shard
    # descriptions where momentum may now be laid out by owner (ZeRO-3 "to_owner").
    owner_laid = any(u.gradients_at_owner for u in getattr(engine.basic_optimizer, "shard_units", []))
    changed = {
        k: (saved.get(k), v)
        for k, v in current.items()
        if (k in saved or (k == "shard_descriptions" and owner_laid)) and saved.get(k) != v
    }
    if changed:
        details = "; ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"checkpoint {os.path.join(load_dir, str(tag))} holds expertopt optimizer state for another "
            f"topology ({details}). Optimizer state cannot be resharded yet: resume with the saved "
            "world size, expert-parallel sizes, ZeRO stage family and Muon settings that place the "
            "matrices (ns_method, zero3_muon_gradients), or load the weights only with "
            "engine.load_checkpoint(..., load_optimizer_states=False, load_lr_scheduler_states=False)"
        )


def attach(
    engine: Any,
    zero0_newton_schulz: str = "owners",
    expert_placement: str | None = None,
    zero3_muon_gradients: str | None = None,
) -> None:
    """Register each Muon group's flat ZeRO-1/2 partition (or, at ZeRO-0, its replica process
    group; at ZeRO-3 its sub-group chunks, with AutoEP experts in ``expert_placement`` and dense
    gradients reduced as ``zero3_muon_gradients`` says) with expertopt's optimizer, and record
    and check the topology in checkpoints.

    A no-op when the engine's optimizer is not expertopt's.
    """
    optimizer = getattr(engine, "basic_optimizer", None)
    if not isinstance(optimizer, (Muon, AdamW)):
        return
    engine.save_checkpoint = _save_with_topology(engine, engine.save_checkpoint)
    engine.load_checkpoint = _load_checking_topology(engine, engine.load_checkpoint)
    tagged = [p for g in optimizer.param_groups for p in g["params"] if getattr(p, "use_muon", False)]
    if tagged:
        raise ValueError(
            "parameters carry DeepSpeed's `use_muon` tag, which switches on DeepSpeed's own Newton-Schulz "
            'inside ZeRO; do not set "type": "muon" for DeepSpeed and expertopt at once'
        )
    zero = engine.optimizer
    _check_stage3_options(
        {"expert_placement": expert_placement, "zero3_muon_gradients": zero3_muon_gradients},
        engine.zero_optimization_stage(),
    )
    if engine.zero_optimization_stage() == 3:
        attach_zero3(engine, optimizer, zero, expert_placement, zero3_muon_gradients)
        return
    if isinstance(zero, BF16_Optimizer):
        _attach_bf16_optimizer(engine, optimizer, zero)
        return
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        if zero is not optimizer:  # FP16_UnfusedOptimizer (bf16 / fp16): its fp32 masters are the params now
            optimizer.rebind_state()
        if isinstance(optimizer, Muon) and zero0_newton_schulz == "owners":
            optimizer.place_shards(zero0_placements(engine, optimizer))
        _attach_zero0_clipping(engine, optimizer)
        return
    optimizer.shared_finite_check = _shared_finite_check(engine, zero)
    if not isinstance(optimizer, Muon):
        optimizer.rebind_state()  # AdamW is elementwise: the flat partitions are all it needs
        return
    placements = zero12_placements(optimizer, zero)
    check_offloaded_exchange(placements)
    optimizer.place_shards(placements)
