"""The doors users come through: ``expertopt.patch_deepspeed()`` (any caller of
``deepspeed.initialize``), and AutoEP on the installed transformers (the registry shim).

DeepSpeed checks share one 1-rank launch (DeepSpeed start-up costs seconds per process).
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from distributed import run_ranks
from moe_models import VOCAB, autoep_block, tiny_moe

import expertopt
from expertopt.integrations import _autoep_compat

MICRO_BATCH = 2


def _muon_config(stage: int = 1, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "Muon", "params": {"lr": 0.02, "adamw_lr": 3e-3, "ns_dtype": "float32"}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        **extra,
    }


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (MICRO_BATCH, 8), generator=torch.Generator().manual_seed(seed))


def _losses(model, tokens: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = model(input_ids=tokens, labels=tokens)
    return out.loss.item(), out.aux_loss.item()


def _patched_autoep(rank: int, directory: str) -> dict:
    """Through the patched ``deepspeed.initialize``: AutoEP converts a transformers 5.x Qwen3-MoE
    (the shim), expertopt builds the optimizer, and the converted model computes the HF model's
    loss and router aux loss (AutoEP size 1 reproduces it)."""
    import deepspeed
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    model = tiny_moe("qwen3_moe", router_logits=True)
    tokens = _tokens(0)
    reference = _losses(model, tokens)
    registry_get = type(_CAN_RECORD_REGISTRY).get
    expertopt.patch_deepspeed()
    expertopt.patch_deepspeed()  # idempotent: one wrapper, not two
    twice_patched = deepspeed.initialize.__wrapped__ is deepspeed.initialize.__expertopt_original__
    config = _muon_config(expert_parallel=autoep_block("qwen3_moe", 1))
    engine, *_ = deepspeed.initialize(model=model, config=config)
    converted = _losses(engine, tokens)
    engine.backward(engine(input_ids=tokens, labels=tokens).loss)
    engine.step()
    groups = engine.basic_optimizer.param_groups
    result = {
        "optimizer": type(engine.basic_optimizer).__name__,
        "twice_patched": twice_patched,
        "reference": reference,
        "converted": converted,
        "expert_names": sorted(n for g in groups if g["expert"] for n in g["param_names"]),
        "registry_restored": type(_CAN_RECORD_REGISTRY).get is registry_get,
        "registry_keys": sorted(_CAN_RECORD_REGISTRY),
        "trained": _losses(engine, tokens)[0] < converted[0],
    }

    # accelerate's call: config_params=, model_parameters= (its DummyOptim's params); a DeepSpeed
    # optimizer type passes through untouched, with AutoEP (the shim) on this path too.
    adam = {**_muon_config(), "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    adam["expert_parallel"] = autoep_block("qwen3_moe", 1)
    before = copy.deepcopy(adam)
    model = tiny_moe("qwen3_moe")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config_params=adam)
    result["adam_optimizer"] = type(engine.basic_optimizer).__module__
    result["adam_config_untouched"] = adam == before

    # The launcher's call: the config in args.deepspeed_config (a file path).
    path = f"{directory}/ds_config{rank}.json"
    with open(path, "w") as handle:
        json.dump(_muon_config(stage=2), handle)
    args = argparse.Namespace(deepspeed_config=path, local_rank=rank)
    engine, *_ = deepspeed.initialize(args=args, model=tiny_moe("mixtral"))
    result["args_optimizer"] = type(engine.basic_optimizer).__name__
    result["args_untouched"] = args.deepspeed_config == path

    expertopt.unpatch_deepspeed()
    expertopt.unpatch_deepspeed()
    result["unpatched"] = not hasattr(deepspeed.initialize, "__expertopt_original__")
    return result


# -- model_parameters through a real engine: DeepSpeed MoE and AutoEP, ZeRO 0/1/2 -----------------

FORMS = ("none", "iterator", "list", "subset", "groups")
# Left out of "subset": dense parameters of both kinds (matrix and vector) that no replacement touches.
LEFT_OUT = {
    "ds_moe": ("head.weight", "inp.bias"),
    "autoep": ("model.embed_tokens.weight", "self_attn.q_proj.weight"),
}


def _ds_moe_model():
    from test_deepspeed_moe import _Net

    torch.manual_seed(3)
    return _Net(ep_size=2)


def _ds_moe_loss(engine, rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 * step + rank)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    return torch.nn.functional.mse_loss(engine(x), y)


def _autoep_loss(engine, rank: int, step: int) -> torch.Tensor:
    tokens = _tokens(10 * step + rank)
    return engine(input_ids=tokens, labels=tokens).loss


def _model_parameters(form: str, model, kind: str):
    named = list(model.named_parameters())
    if form == "none":
        return None
    if form == "iterator":
        return model.parameters()
    if form == "list":
        return [p for _, p in named]
    if form == "subset":  # a tuple: expertopt hands DeepSpeed a list it can map onto AutoEP's replacements
        return tuple(p for n, p in named if not n.endswith(LEFT_OUT[kind]))
    plain = [p for n, p in named if "bias" not in n and "norm" not in n]
    rest = [p for n, p in named if "bias" in n or "norm" in n]
    return [{"params": plain, "lr": 0.01}, {"params": rest, "weight_decay": 0.0}]


def _form_case(rank: int, kind: str, stage: int, form: str) -> dict:
    model = _ds_moe_model() if kind == "ds_moe" else tiny_moe("qwen3_moe", seed=3)
    config = _muon_config(stage, gradient_clipping=0.0)
    if kind == "autoep":
        config["expert_parallel"] = autoep_block("qwen3_moe", 2)
    engine, *_ = expertopt.initialize(
        model=model, model_parameters=_model_parameters(form, model, kind), config=config
    )
    initial = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    loss = _ds_moe_loss if kind == "ds_moe" else _autoep_loss
    for step in range(2):
        engine.backward(loss(engine, rank, step))
        engine.step()
    groups = engine.basic_optimizer.param_groups
    named = dict(engine.module.named_parameters())
    return {
        "names": sorted(n for g in groups for n in g["param_names"]),
        "all_names": sorted(initial),
        "moved": {n: not torch.equal(p, initial[n]) for n, p in engine.module.named_parameters()},
        "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        "groups": [(g["name"], g["lr"], g["weight_decay"], g["use_muon"]) for g in groups],
        # ZeRO-1/2: each expert in a group of its expert-data-parallel process group.
        "experts_in_edp_groups": [
            bool(g.get("moe")) and g["name"] == named[n].group_name
            for g in groups
            for n in g["param_names"]
            if getattr(named[n], "allreduce", True) is False
        ],
    }


def _doors(rank: int, world_size: int, directory: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {"patched_autoep": _patched_autoep(rank, directory)}
    for kind in ("ds_moe", "autoep"):
        for stage in (0, 1, 2):
            for form in FORMS:
                results[kind, stage, form] = _form_case(rank, kind, stage, form)
    return results


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    return run_ranks(_doors, 2, str(tmp_path_factory.mktemp("doors")))


def test_patched_deepspeed_initialize_builds_expertopt_optimizer_with_autoep(doors):
    result = doors[0]["patched_autoep"]
    assert result["twice_patched"]
    assert result["optimizer"] == "Muon"
    assert result["expert_names"] == [f"model.layers.0.mlp.experts.w{i}" for i in (1, 2, 3)]
    # AutoEP size 1 computes what the HF model computes: loss and router aux loss (the recorder
    # DeepSpeed re-targets through transformers' registry, the call that crashed without the shim).
    assert result["converted"] == pytest.approx(result["reference"], rel=1e-6)
    assert result["trained"]
    assert result["registry_restored"]
    assert all("<class 'str'>" not in key for key in result["registry_keys"])
    assert result["unpatched"]


def test_patched_deepspeed_initialize_leaves_other_optimizers_untouched(doors):
    result = doors[0]["patched_autoep"]
    assert result["adam_optimizer"].startswith("deepspeed."), result["adam_optimizer"]
    assert result["adam_config_untouched"]


def test_patched_deepspeed_initialize_reads_config_from_args(doors):
    result = doors[0]["patched_autoep"]
    assert result["args_optimizer"] == "Muon"
    assert result["args_untouched"]


def test_registry_shim_gives_string_keys_dict_semantics_and_restores():
    """What DeepSpeed 0.19.8's AutoEP does to transformers' registry, inside and outside the shim."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry

    cls = type(registry)
    original = cls.get, cls.__setitem__
    key, sentinel = "<class 'expertopt.test.Block'>", object()
    if not _autoep_compat.registry_needs_shim():
        pytest.skip("the installed transformers accepts dict-style get(key, default); no shim needed")
    with pytest.raises(TypeError, match="positional argument"):
        registry.get(key, sentinel)  # the crash, without the shim
    with _autoep_compat.transformers_registry_shim({"expert_parallel": {"enabled": False}}) as active:
        assert not active
    with _autoep_compat.transformers_registry_shim(
        {"expert_parallel": autoep_block("qwen3_moe", 1)}
    ) as active:
        assert active
        assert registry.get(key, sentinel) is sentinel
        registry[key] = {"router_logits": 1}
        assert dict.get(registry, key) == {"router_logits": 1}
        assert "<class 'str'>" not in registry
        model = tiny_moe("qwen3_moe")
        assert registry.get(model) == dict.get(registry, str(type(model)))  # transformers' own calls
        registry.pop(key)
    assert (cls.get, cls.__setitem__) == original


# -- model_parameters in every form DeepSpeed takes (routing, without an engine) ---------------


def _route(model, model_parameters, **options):
    from expertopt.integrations._model_parameters import route_model_parameters

    return route_model_parameters(model, model_parameters, options)


def _summary(groups) -> list[tuple]:
    keys = ("name", "use_muon", "expert", "link", "lr", "lr_mult", "weight_decay", "param_names")
    return [tuple(g[k] for k in keys) for g in groups]


def test_all_parameters_route_like_the_whole_model(toy_moe):
    """``model_parameters=model.parameters()``, DeepSpeed's tutorial call: the router's groups."""
    whole = expertopt.build_param_groups(toy_moe, lr=0.01)
    assert _summary(_route(toy_moe, toy_moe.parameters(), lr=0.01)) == _summary(whole)


def test_a_subset_routes_exactly_those_parameters(toy_moe):
    named = dict(toy_moe.named_parameters())
    chosen = ["q_proj.weight", "norm.weight", "w_in", "experts.1.bias", "lm_head.weight"]
    groups = _route(toy_moe, [named[n] for n in chosen])
    assert sorted(n for g in groups for n in g["param_names"]) == sorted(chosen)
    kind = {n: (g["use_muon"], g["expert"]) for g in groups for n in g["param_names"]}
    assert kind == {
        "q_proj.weight": (True, False),
        "norm.weight": (False, False),
        "w_in": (True, True),
        "experts.1.bias": (False, True),
        "lm_head.weight": (False, False),
    }


def test_each_group_splits_into_muon_and_adamw_halves_keeping_its_own_keys(toy_moe):
    """Trainer-style decay / no-decay groups: each half keeps the group's lr and weight decay, the
    router's lr ratio (the AdamW half steps at lr * adamw_lr / lr), and its expert link."""
    named = dict(toy_moe.named_parameters())
    plain = [n for n in named if "bias" not in n and "norm" not in n]
    decay = {"params": [named[n] for n in plain], "weight_decay": 0.05, "lr": 0.01, "betas": (0.8, 0.9)}
    no_decay = {"params": [named[n] for n in named if n not in plain], "weight_decay": 0.0, "name": "nd"}
    groups = _route(toy_moe, [decay, no_decay], lr=0.02, adamw_lr=3e-3)
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == [
        "group0-adamw", "group0-expert_muon", "group0-muon", "nd-adamw_no_decay", "nd-expert_adamw_no_decay",
    ]  # fmt: skip
    for name, group in by_name.items():
        own = decay if name.startswith("group0") else no_decay
        assert group["weight_decay"] == own["weight_decay"]
        assert group["lr"] == own.get("lr", 0.02)
        assert group["lr_mult"] == pytest.approx(1.0 if group["use_muon"] else 3e-3 / 0.02)
    assert by_name["group0-muon"]["betas"] == (0.8, 0.9)
    assert by_name["group0-expert_muon"]["link"] == "group0-muon"
    assert by_name["nd-expert_adamw_no_decay"]["link"] == "nd-adamw_no_decay"
    assert sorted(n for g in groups for n in g["param_names"]) == sorted(named)
    expertopt.Muon(groups)  # a valid optimizer


def test_a_group_forces_its_family_with_use_muon(toy_moe):
    named = dict(toy_moe.named_parameters())
    forced = {"params": [named["q_proj.weight"], named["w_in"]], "use_muon": False}
    groups = _route(toy_moe, [forced, {"params": [named["o_proj.weight"]]}], adamw_lr=3e-3)
    kind = {n: (g["use_muon"], g["expert"], g["lr_mult"]) for g in groups for n in g["param_names"]}
    assert kind == {
        "q_proj.weight": (False, False, pytest.approx(3e-3 / 0.02)),
        "w_in": (False, True, pytest.approx(3e-3 / 0.02)),
        "o_proj.weight": (True, False, 1.0),
    }
    # Refused by the router before any optimizer exists, naming the parameter.
    with pytest.raises(ValueError, match=r"'norm.weight' \(shape \(16,\)\).*Muon needs matrices"):
        expertopt.Muon(_route(toy_moe, [{"params": [named["norm.weight"]], "use_muon": True}]))


def test_model_parameters_errors_name_the_fix(toy_moe):
    stray = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"not parameters of the model.*AutoEP"):
        _route(toy_moe, [*toy_moe.parameters(), stray])
    with pytest.raises(ValueError, match=r"sets \['expert'\].*use_muon"):
        _route(toy_moe, [{"params": list(toy_moe.parameters()), "expert": True}])
    with pytest.raises(ValueError, match='no "params"'):
        _route(toy_moe, [{"lr": 0.1}])


def test_normalize_keeps_iterators_lazy_and_copies_lists(toy_moe):
    from expertopt.integrations._model_parameters import normalize

    lazy = toy_moe.parameters()
    assert normalize(lazy) is lazy and normalize(None) is None
    params = list(toy_moe.parameters())
    assert normalize(tuple(params)) == params and normalize(params) is not params
    group = {"params": params[:2], "lr": 0.1}
    (copied,) = normalize(group)
    assert copied == group and copied["params"] is not group["params"]
    mixed = normalize([group, params[2]])
    assert mixed == [group, {"params": [params[2]]}]


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("kind", ["ds_moe", "autoep"])
def test_model_parameters_forms_in_an_engine(doors, kind, stage):
    """Each form of model_parameters, DeepSpeed MoE (EP 2) and AutoEP (EP 2), 2 ranks."""
    for rank, results in enumerate(doors):
        cases = {form: results[kind, stage, form] for form in FORMS}
        where = (kind, stage, rank)
        whole = cases["none"]
        assert whole["names"] == whole["all_names"], where
        assert all(whole["moved"].values()), where
        # model.parameters() (DeepSpeed's tutorial call) and a list of all: the same training.
        for form in ("iterator", "list"):
            assert cases[form]["names"] == whole["names"], (where, form)
            for name, weight in whole["weights"].items():
                assert torch.equal(cases[form]["weights"][name], weight), (where, form, name)
        # A subset: exactly those are trained (after AutoEP, their replacements), the rest are not.
        subset = cases["subset"]
        left_out = [n for n in whole["all_names"] if n.endswith(LEFT_OUT[kind])]
        assert len(left_out) == 2, left_out
        assert subset["names"] == sorted(set(whole["all_names"]) - set(left_out)), where
        assert {n: m for n, m in subset["moved"].items() if not m} == dict.fromkeys(left_out, False), where
        # Groups: every half keeps its group's lr (decay group) or weight decay (no-decay group).
        groups = cases["groups"]
        assert groups["names"] == whole["names"], where
        for name, lr, weight_decay, _ in groups["groups"]:
            assert (lr == 0.01) != (weight_decay == 0.0), (where, name, lr, weight_decay)
        assert {use_muon for *_, use_muon in groups["groups"]} == {True, False}
        for form, case in cases.items():
            if stage in (1, 2):
                assert case["experts_in_edp_groups"] and all(case["experts_in_edp_groups"]), (where, form)


def test_normalize_refuses_bad_groups_before_deepspeed_sees_them(toy_moe):
    from expertopt.integrations._model_parameters import normalize

    with pytest.raises(ValueError, match='group #1 has no "params"'):
        normalize([{"params": list(toy_moe.parameters())}, {"lr": 0.1}])
    with pytest.raises(ValueError, match=r"sets \['link'\]"):
        normalize({"params": list(toy_moe.parameters()), "link": "muon"})


def test_a_single_named_group_names_its_halves(toy_moe):
    groups = _route(toy_moe, [{"params": list(toy_moe.parameters()), "name": "body"}])
    assert {g["name"] for g in groups} == {
        "body-muon", "body-adamw", "body-adamw_no_decay", "body-expert_muon", "body-expert_adamw_no_decay",
    }  # fmt: skip
    assert {g["name"]: g["link"] for g in groups if g["expert"]} == {
        "body-expert_muon": "body-muon",
        "body-expert_adamw_no_decay": "body-adamw_no_decay",
    }
