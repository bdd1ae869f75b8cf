"""DeepSpeed ZeRO-3 with expertopt (world 4): weights equal a single-process reference.

Every rank trains the same ToyMoE (attention-like matrices, a router, 3-D expert stacks,
per-expert ModuleList experts, embeddings, norms, biases) on its slice of a global batch, with
``stage3_param_persistence_threshold: 0`` (every parameter partitioned, so every matrix is cut
across the 4 ranks) and a small ``sub_group_size`` (several sub-groups per param group, each
stepped by its own call). The reference trains a copy on the whole global batch with expertopt's
single-process optimizer and ``clip_grad_norm_`` on the raw gradients, and the engine's global
gradient norm must equal the reference's (Muon's orthogonalization would hide a wrongly scaled
clip, F4). Newton-Schulz runs in fp32 (bf16 parity is meaningless, BRIEF section 6). Tolerance
2e-5: reduction order and fp32 Newton-Schulz on differently batched matrices, measured ~1e-6.

Dense Muon gradients reach their owners two ways (``"zero3_muon_gradients"``): "to_owner" (the
default: one reduce per owner, momentum at the owner, one all-to-all back per exchanging unit)
and "reduce_scatter" (DeepSpeed's reduce-scatter, then a gather to the owner and the way back:
two all-to-alls). The collectives each issues are counted, so a silent fall-back fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ToyMoE, toy_head_groups, toy_head_rules
from distributed import counting_newton_schulz, run_ranks

import expertopt

WORLD = 4
MICRO_BATCH = 1
STEPS = 3
LR, ADAMW_LR = 0.02, 3e-3
# q and o heads; 2 stacks x 4 experts; 4 listed experts; router (lm_head, embeddings: AdamW).
MUON_MATRICES = 4 + 2 + 4 * 2 + 4 + 1


def _global_batch(step: int, micro: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, 32, (WORLD * MICRO_BATCH, 8), generator=generator)


def _loss(model, tokens):
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))


def _ds_config(
    kind: str, accumulation: int, clipping: float, gradients: str = "", offload: bool = False
) -> dict:
    name, _, method = kind.partition(":")  # "Muon:gram": Muon with that ns_method
    params = {"lr": LR, "ns_dtype": "float32", "adamw_lr": ADAMW_LR} if name == "Muon" else {"lr": ADAMW_LR}
    if method:
        params["ns_method"] = method
    if gradients:
        params["zero3_muon_gradients"] = gradients
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": name, "params": params},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "sub_group_size": 400,
        },
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    } | ({} if not offload else {"zero_optimization": _offloaded()})


def _offloaded() -> dict:
    """The test's ZeRO-3 block with the fp32 partitions, optimizer state and parameters on the CPU."""
    return {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "sub_group_size": 400,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }


def _reference_optimizer(kind: str, model):
    name, _, method = kind.partition(":")
    if name == "Muon":
        groups = expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR, rules=toy_head_rules())
        return expertopt.Muon(groups, ns_dtype="float32", ns_method=method or "standard")
    groups = expertopt.build_param_groups(model, lr=ADAMW_LR, adamw_lr=ADAMW_LR)
    for group in groups:
        group["use_muon"] = False
    return expertopt.AdamW(groups)


def _full_weights(engine) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _train(engine, rank: int, steps: range, accumulation: int) -> list[float]:
    """Train ``steps``; return the engine's global gradient norm after each."""
    norms = []
    for step in steps:
        for micro in range(accumulation):
            tokens = _global_batch(step, micro)[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
            engine.backward(_loss(engine, tokens))
            engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return norms


def _parity_case(
    rank: int, comm, kind: str, accumulation: int, clipping: float, gradients: str, offload: bool = False
) -> dict:
    torch.manual_seed(0)
    model = ToyMoE()
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    groups = toy_head_groups(model) if kind.startswith("Muon") else model.parameters()
    engine, *_ = expertopt.initialize(
        model=model,
        model_parameters=groups,
        config=_ds_config(kind, accumulation, clipping, gradients, offload),
    )
    ref_opt = _reference_optimizer(kind, reference)
    norms = []
    comm.reset()
    with counting_newton_schulz() as counter, comm.during("train"):
        engine_norms = _train(engine, rank, range(STEPS), accumulation)
    calls = {op: 0 for op in ("reduce", "all_to_all_single")}
    for (_, source, op, _, _), (count, *_) in comm.records.items():
        if source == "torch" and op in calls:
            calls[op] += count
    for step_index in range(STEPS):
        ref_opt.zero_grad()
        for micro in range(accumulation):
            (_loss(reference, _global_batch(step_index, micro)) / accumulation).backward()
        if clipping:
            norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clipping)))
        ref_opt.step()
    weights = _full_weights(engine)
    units = engine.basic_optimizer.shard_units if kind.startswith("Muon") else []
    return {
        "error": max(
            (a - b.detach()).abs().max().item() for a, b in zip(weights, reference.parameters(), strict=True)
        ),
        "moved": max(
            (p.detach() - q).abs().max().item() for p, q in zip(reference.parameters(), initial, strict=True)
        ),
        "ns_matrices_per_step": counter["matrices"] / STEPS,
        "owned": engine.basic_optimizer.owned_matrices() if kind.startswith("Muon") else 0,
        "ref_norms": norms,
        "engine_norms": engine_norms,
        "reduce_scatter": bool(engine.optimizer.reduce_scatter),
        "sub_groups": len(engine.optimizer.fp16_groups),
        "units": len(units),
        "units_to_owner": sum(u.gradients_at_owner for u in units),
        "exchanging_units": sum(not u.plan.local_only for u in units),
        "calls_per_step": {op: n / STEPS for op, n in calls.items()},
        "offloaded": bool(engine.optimizer.offload_optimizer) and bool(engine.optimizer.offload_param),
    }


def _resume_case(rank: int, directory: str, offload: bool = False) -> bool:
    def engine_():
        torch.manual_seed(0)
        model = ToyMoE()
        config = _ds_config("Muon", 1, 0.05, offload=offload)
        engine, *_ = expertopt.initialize(model=model, model_parameters=toy_head_groups(model), config=config)
        return engine

    uninterrupted = engine_()
    _train(uninterrupted, rank, range(4), 1)
    first = engine_()
    _train(first, rank, range(2), 1)
    tag = "zero3-offload" if offload else "zero3"
    first.save_checkpoint(directory, tag=tag)
    resumed = engine_()
    resumed.load_checkpoint(directory, tag=tag)
    _train(resumed, rank, range(2, 4), 1)
    return all(
        torch.equal(a, b) for a, b in zip(_full_weights(uninterrupted), _full_weights(resumed), strict=True)
    )


# (optimizer[:ns_method], gradient accumulation, clipping, "zero3_muon_gradients" or default,
# CPU offload of the optimizer and the parameters).
CASES = [
    ("Muon", 1, 0.0, "", False),
    ("Muon", 2, 0.05, "", False),
    ("Muon", 2, 0.05, "reduce_scatter", False),
    ("AdamW", 1, 0.0, "", False),
    ("AdamW", 2, 0.05, "", False),
    ("Muon", 2, 0.05, "", True),
    ("Muon", 1, 0.05, "reduce_scatter", True),
    ("AdamW", 1, 0.05, "", True),
] + [(f"Muon:{method}", 1, 0.05, "", False) for method in ("gram", "polar_express")]


def _state_tensors(optimizer) -> list[torch.Tensor]:
    return [v.clone() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def _nonfinite_case(rank: int) -> dict:
    """A NaN gradient on rank 0 only, in a matrix reduced to its owner: every rank skips the
    step (the owned gradients' norm is part of DeepSpeed's global norm), nothing moves, and the
    poison does not linger in the owned gradient buffers."""
    torch.manual_seed(0)
    model = ToyMoE()
    engine, *_ = expertopt.initialize(
        model=model, model_parameters=toy_head_groups(model), config=_ds_config("Muon", 1, 0.05)
    )
    _train(engine, rank, range(1), 1)
    optimizer = engine.basic_optimizer
    before = _full_weights(engine)
    state_before = _state_tensors(optimizer)
    poison = model.q_proj.weight.register_hook(lambda grad: grad * float("nan" if rank == 0 else 1.0))
    _train(engine, rank, range(1, 2), 1)
    after = _full_weights(engine)
    state_after = _state_tensors(optimizer)
    clean = all(u.owned_gradient.count_nonzero() == 0 for u in optimizer.shard_units if u.gradients_at_owner)
    poison.remove()
    return {
        "skipped": engine.skipped_steps,
        "weights_unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
        "state_unchanged": all(torch.equal(a, b) for a, b in zip(state_before, state_after, strict=True)),
        "owned_gradients_cleared": clean,
    }


def _mismatched_resume_case(rank: int, directory: str) -> str:
    """Momentum saved partition-shaped ("reduce_scatter") cannot load into owner-shaped momentum
    ("to_owner"): the topology check refuses it, naming the cause, before DeepSpeed loads."""

    def engine_(gradients: str):
        torch.manual_seed(0)
        model = ToyMoE()
        config = _ds_config("Muon", 1, 0.05, gradients)
        return expertopt.initialize(model=model, model_parameters=toy_head_groups(model), config=config)[0]

    saved = engine_("reduce_scatter")
    _train(saved, rank, range(1), 1)
    saved.save_checkpoint(directory, tag="reduce-scatter")
    try:
        engine_("to_owner").load_checkpoint(directory, tag="reduce-scatter")
    except ValueError as error:
        return str(error)
    return ""


def _discarded_backward_case(rank: int) -> bool:
    """A backward discarded by ``zero_grad`` leaves nothing behind in the owners' gradients:
    backward, zero_grad, backward, step lands on the bits of backward, step."""

    def engine_():
        torch.manual_seed(0)
        model = ToyMoE()
        config = _ds_config("Muon", 1, 0.05)
        return expertopt.initialize(model=model, model_parameters=toy_head_groups(model), config=config)[0]

    mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
    discarded, straight = engine_(), engine_()
    discarded.backward(_loss(discarded, _global_batch(7, 0)[mine]))
    discarded.optimizer.zero_grad()
    _train(discarded, rank, range(1), 1)
    _train(straight, rank, range(1), 1)
    return all(
        torch.equal(a, b) for a, b in zip(_full_weights(discarded), _full_weights(straight), strict=True)
    )


def _all_checks(rank: int, world_size: int, directory: str) -> dict:
    import deepspeed

    from bench.zero_harness import CommCounter

    assert world_size == WORLD
    deepspeed.init_distributed(dist_backend="gloo")
    comm = CommCounter().install()
    results = {case: _parity_case(rank, comm, *case) for case in CASES}
    results["resume"] = _resume_case(rank, directory)
    results["resume_offload"] = _resume_case(rank, directory, offload=True)
    results["nonfinite"] = _nonfinite_case(rank)
    results["discarded_backward"] = _discarded_backward_case(rank)
    results["mismatched_resume"] = _mismatched_resume_case(rank, directory)
    return results


@pytest.fixture(scope="module")
def zero3_results(tmp_path_factory):
    return run_ranks(_all_checks, WORLD, str(tmp_path_factory.mktemp("zero3")))


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c))
def test_zero3_matches_single_process_reference(zero3_results, case):
    results = [r[case] for r in zero3_results]
    assert results[0]["moved"] > 1e-3, "the reference did not train"
    assert all(r["error"] < 2e-5 for r in results), results
    assert all(r["reduce_scatter"] for r in results)  # gradients reduce-scattered, never all-reduced (F12)
    assert results[0]["sub_groups"] > 2  # several sub-groups, each stepped by its own call
    assert all(r["offloaded"] == case[4] for r in results)
    clipping = case[2]
    if clipping:
        assert min(min(r["ref_norms"]) for r in results) > 2 * clipping, "clipping was not active"
        for r in results:  # the clip DeepSpeed applied used the reference's global norm
            torch.testing.assert_close(r["engine_norms"], r["ref_norms"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("Muon")], ids=lambda c: str(c))
def test_zero3_muon_gradients_travel_as_configured(zero3_results, case):
    results = [r[case] for r in zero3_results]
    exchanging = results[0]["exchanging_units"]
    assert exchanging > 0  # matrices cut across ranks: the owners' exchange is exercised
    calls = [r["calls_per_step"] for r in results]
    if case[3] == "reduce_scatter":
        assert all(r["units_to_owner"] == 0 for r in results)
        # A gather to the owner and the way back per exchanging unit; no reduce to owners.
        assert all(c == {"reduce": 0, "all_to_all_single": 2 * exchanging} for c in calls), calls
    else:
        assert all(r["units_to_owner"] == exchanging for r in results)
        # Only the way back; gradients arrive by reduces (at least one per micro-batch).
        assert all(c["all_to_all_single"] == exchanging for c in calls), calls
        assert all(c["reduce"] >= case[1] for c in calls), calls


@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("Muon")], ids=lambda c: str(c))
def test_zero3_orthogonalizes_each_matrix_once(zero3_results, case):
    results = [r[case] for r in zero3_results]
    # Per-rank Newton-Schulz counts add up to the number of matrices: each once, on its owner.
    assert sum(r["ns_matrices_per_step"] for r in results) == MUON_MATRICES
    assert sum(r["owned"] for r in results) == MUON_MATRICES
    assert all(r["ns_matrices_per_step"] == r["owned"] for r in results)


@pytest.mark.parametrize("key", ["resume", "resume_offload"])
def test_zero3_checkpoint_resume_is_bit_identical(zero3_results, key):
    assert all(r[key] for r in zero3_results)


def test_zero3_resume_under_another_momentum_layout_is_refused(zero3_results):
    for result in zero3_results:
        message = result["mismatched_resume"]
        assert "shard_descriptions" in message and "zero3_muon_gradients" in message, message


def test_zero3_backward_discarded_by_zero_grad_leaves_no_gradient_behind(zero3_results):
    assert all(r["discarded_backward"] for r in zero3_results)


def test_zero3_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(zero3_results):
    results = [r["nonfinite"] for r in zero3_results]
    assert all(r["skipped"] == 1 for r in results), results
    assert all(r["weights_unchanged"] and r["state_unchanged"] for r in results), results
    assert all(r["owned_gradients_cleared"] for r in results), results


@pytest.mark.parametrize(
    ("stage", "value", "message"),
    [
        (3, "all_reduce", "must be one of"),
        (2, "to_owner", "applies to ZeRO stage 3 only"),
    ],
)
def test_zero3_muon_gradients_key_is_checked(stage, value, message):
    config = _ds_config("Muon", 1, 0.0, value)
    config["zero_optimization"]["stage"] = stage
    with pytest.raises(ValueError, match=message):
        expertopt.initialize(model=ToyMoE(), config=config)


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_zero3_nvme_offload_is_refused_with_the_fix(key):
    config = _ds_config("Muon", 1, 0.0)
    config["zero_optimization"][key] = {"device": "nvme", "nvme_path": "/tmp"}
    with pytest.raises(ValueError, match=f'use "device": "cpu" or remove "{key}"'):
        expertopt.initialize(model=ToyMoE(), config=config)


def test_zero3_cpu_offload_with_forced_deepspeed_cpu_optimizer_is_refused():
    config = _ds_config("Muon", 1, 0.0, offload=True)
    config["zero_force_ds_cpu_optimizer"] = True
    with pytest.raises(ValueError, match='remove "zero_force_ds_cpu_optimizer"'):
        expertopt.initialize(model=ToyMoE(), config=config)


# -- AutoEP experts at ZeRO-3, "sharded" placement ---------------------------------------------
# AutoEP partitions each expert tensor over its expert-data-parallel group; expertopt takes that
# partitioning as it is (one unit per expert sub-group, over EDP). With 4 experts, EP 2 gives 2
# local experts per rank and EDP 2: each EDP rank's chunk is exactly one whole expert of w1, w2
# and w3, so every expert is orthogonalized where it lives, with no exchange at all. EP 4 gives
# EDP 1. EP 1 keeps all 4 experts on every rank, partitioned over EDP 4 (one whole expert per
# rank), trained with gradient accumulation 2. Reference and tolerances: tests/test_autoep.py
# (AutoEP's split w1/w2/w3 layout, one process, the whole global batch, clip_grad_norm_ active).
AUTOEP_CASES = [("qwen3_moe", 2, 1), ("qwen3_moe", 4, 1), ("deepseek_v3", 2, 1), ("qwen3_moe", 1, 2)]


def _autoep_batch(step: int, micro: int) -> torch.Tensor:
    import test_autoep as autoep
    from moe_models import VOCAB

    generator = torch.Generator().manual_seed(100 * step + micro)
    return torch.randint(0, VOCAB, (WORLD * autoep.SEQUENCES, autoep.LENGTH), generator=generator)


def _expert_units(engine) -> list[bool]:
    """For each placed unit, in order, whether it is an expert sub-group (AutoEP's experts carry
    ``allreduce=False``); at EP 1 the EDP group spans the world, so its size cannot tell."""
    zero, groups = engine.optimizer, engine.basic_optimizer.param_groups
    return [
        getattr(params[0], "allreduce", True) is False
        for index, params in enumerate(zero.fp16_groups)
        if groups[zero.sub_group_to_group_id[index]]["use_muon"]
    ]


def _autoep_case(rank: int, preset: str, ep_size: int, accumulation: int) -> dict:
    import deepspeed
    import test_autoep as autoep
    from deepspeed.utils import groups
    from moe_models import EXPERTS, tiny_moe

    model = tiny_moe(preset, seed=1)
    reference = autoep._reference(model)
    config = autoep._config(preset, ep_size, 3)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config["optimizer"]["params"]["expert_placement"] = "sharded"  # "replicated": its own test file
    config["gradient_accumulation_steps"] = accumulation
    engine, *_ = expertopt.initialize(model=model, config=config)
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep_size}")
    local = slice(ep_rank * EXPERTS // ep_size, (ep_rank + 1) * EXPERTS // ep_size)
    ref_params = dict(reference.named_parameters())
    ref_opt = expertopt.Muon(
        expertopt.build_param_groups(reference, lr=autoep.LR, adamw_lr=autoep.ADAMW_LR), ns_dtype="float32"
    )
    norms = []
    for step in range(autoep.STEPS):
        ref_opt.zero_grad()
        for micro in range(accumulation):
            tokens = _autoep_batch(step, micro)
            mine = tokens[rank * autoep.SEQUENCES : (rank + 1) * autoep.SEQUENCES]
            engine.backward(engine(input_ids=mine, labels=mine).loss)
            engine.step()
            (reference(input_ids=tokens, labels=tokens).loss / accumulation).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), autoep.CLIP)))
        ref_opt.step()
    error = 0.0
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            want = ref_params[autoep._reference_name(name)].detach()
            want = want[local] if getattr(param, "allreduce", True) is False else want
            error = max(error, (param.detach() - want).abs().max().item())
    units, experts = engine.basic_optimizer.shard_units, _expert_units(engine)
    if len(units) != len(experts):
        raise RuntimeError(f"{len(units)} units placed for {len(experts)} Muon sub-groups")
    return {
        "matrices": _muon_matrices(ref_opt),
        "error": error,
        "ref_norms": norms,
        "owned": engine.basic_optimizer.owned_matrices(),
        "experts_local_only": all(u.plan.local_only for u, e in zip(units, experts, strict=True) if e),
        "expert_units": sum(experts),
        "edp_size": {u.layout.world_size for u, e in zip(units, experts, strict=True) if e},
    }


def _muon_matrices(optimizer) -> int:
    """Matrices the single-process reference orthogonalizes per step (each expert of a stack)."""
    from expertopt.updates.muon import matrix_view

    views = [
        matrix_view(p, is_expert=g["expert"], num_heads=g["num_heads"])
        for g in optimizer.param_groups
        if g["use_muon"]
        for p in g["params"]
    ]
    return sum(v.numel() // (v.shape[-2] * v.shape[-1]) for v in views)


def _autoep_checks(rank: int, world_size: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {case: _autoep_case(rank, *case) for case in AUTOEP_CASES}


@pytest.fixture(scope="module")
def autoep_zero3_results():
    return run_ranks(_autoep_checks, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("case", AUTOEP_CASES, ids=lambda c: f"{c[0]}-ep{c[1]}-accumulation{c[2]}")
def test_autoep_experts_at_zero3_match_reference_without_exchange(autoep_zero3_results, case):
    results = [r[case] for r in autoep_zero3_results]
    assert all(r["error"] < 2e-5 for r in results), [r["error"] for r in results]
    assert min(min(r["ref_norms"]) for r in results) > 2 * 0.05, "clipping was not active"
    assert all(r["expert_units"] > 0 for r in results)
    assert all(r["edp_size"] == {WORLD // case[1]} for r in results)  # experts partitioned over EDP
    # Every matrix (dense over DP, each global expert over its EDP group) has exactly one owner.
    assert sum(r["owned"] for r in results) == results[0]["matrices"]
    # Whole experts in every EDP rank's partition: orthogonalized where they live, no exchange.
    assert all(r["experts_local_only"] for r in results)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"all2all_process_group": object()},
            'zero_quantized_gradients.*"zero3_muon_gradients": "reduce_scatter"',
        ),
        (
            {"model_parallel_group": object()},
            'model \\(tensor\\) parallelism.*"zero3_muon_gradients": "reduce_scatter"',
        ),
        ({"torch_autocast_gradscaler": object()}, 'autocast.*"zero3_muon_gradients": "reduce_scatter"'),
        ({"reduce_scatter": False}, "reduce_scatter.: false bypasses the reduction to owners"),
    ],
)
def test_to_owner_refuses_stage3_settings_that_own_the_reduction(settings, message):
    from types import SimpleNamespace

    from expertopt.integrations.deepspeed_zero3_owners import check_supported

    zero = SimpleNamespace(
        reduce_scatter=True,
        all2all_process_group=None,
        model_parallel_group=None,
        torch_autocast_gradscaler=None,
    )
    check_supported(zero)  # DeepSpeed's defaults are served
    for key, value in settings.items():
        setattr(zero, key, value)
    with pytest.raises(ValueError, match=message):
        check_supported(zero)


@pytest.mark.parametrize(
    ("zero_block", "message"),
    [
        ({"offload_optimizer": {"device": "cpu", "super_offload": True}}, 'remove "super_offload"'),
        ({"zenflow": {"topk_ratio": 0.1}}, 'remove "zenflow"'),
    ],
)
def test_zero3_settings_that_replace_the_client_step_are_refused(zero_block, message):
    config = _ds_config("Muon", 1, 0.0)
    config["zero_optimization"].update(zero_block)
    with pytest.raises(ValueError, match=message):
        expertopt.initialize(model=ToyMoE(), config=config)


def test_offloaded_muon_exchange_on_a_group_without_cpu_support_is_refused(monkeypatch):
    from types import SimpleNamespace

    import expertopt.integrations.deepspeed_shards as shards

    unit = SimpleNamespace(plan=SimpleNamespace(local_only=False), group=None)
    placements = [(torch.zeros(4), unit)]
    monkeypatch.setattr(shards.dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    shards.check_offloaded_exchange(placements)  # gloo carries the CPU partitions
    monkeypatch.setattr(shards.dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match='cannot carry CPU tensors: remove "offload_optimizer"'):
        shards.check_offloaded_exchange(placements)
