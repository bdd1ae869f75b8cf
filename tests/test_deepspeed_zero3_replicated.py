"""ZeRO-3 with AutoEP experts in the "replicated" placement (world 4): parity, collectives, resume.

``"expert_placement": "replicated"`` keeps every AutoEP expert whole on each rank of its
expert-data-parallel (EDP) group as a ZeRO-3 persistent parameter; gradients, fp32 masters and
optimizer state stay partitioned over EDP and the step is the "sharded" one
(expertopt/integrations/deepspeed_zero3.py). We check, on a tiny Qwen3-MoE converted by AutoEP:

- weights after 3 steps equal a single-process fp32 reference (AutoEP's split ``w1``/``w2``/
  ``w3`` layout, the whole global batch, ``clip_grad_norm_`` active, tests/test_autoep.py) at
  EP 1, 2 and 4, gradient accumulation 1 and 2, with a ``LambdaLR`` scheduler driving both
  (an expert group left out of the schedule, F1, would miss by the lr ratio), and the engine's
  global gradient norm equals the reference's (Muon would hide a wrongly scaled clip, F4);
- per-rank Newton-Schulz counts add up to one per matrix (each global expert once);
- experts that get no tokens (EP 2: every token routed to experts 0 and 1, so one EP rank's
  experts get none) neither hang nor lose parity, and every rank keeps the same state keys;
- forward and backward issue no all-gather over the EDP group once the first step has recorded
  ZeRO-3's trace; the "sharded" placement does (counted by ``bench.zero_harness.CommCounter``);
- ``engine.save_checkpoint`` / ``engine.load_checkpoint`` resume bit-identically;
- bf16 (both placements, EP 2): the fp32 masters after 3 steps are within 0.2 of the reference's
  move from a bf16 single-process reference (fp32 masters, bf16 forward and backward per rank's
  rows; measure and tolerance of tests/test_deepspeed_bf16.py; measured 0.046, half the lr 1.01),
  and every EDP rank's whole bf16 expert is its fp32 master partitions rounded.

Tolerance 2e-5 as in tests/test_autoep.py (reduction order; measured ~6e-7).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from distributed import counting_newton_schulz, run_ranks

import expertopt

WORLD = 4
STEPS = 3
PRESET = "qwen3_moe"
WEIGHT_TOLERANCE = 2e-5

pytestmark = pytest.mark.slow

# (placement, EP size, gradient accumulation, variant). Variants: "dead", every token routed to
# experts 0 and 1; "mixed", DeepSpeed itself keeps the small dense parameters (norms) persistent
# over the 4 ranks, so its post-step all-gather spans two process groups (DP and EDP);
# "deepspeed.initialize", the patched ``deepspeed.initialize`` with ``model_parameters``.
PARITY_CASES = [
    ("replicated", 1, 1, ""),
    ("replicated", 2, 1, ""),
    ("replicated", 2, 2, ""),
    ("replicated", 4, 2, ""),
    ("replicated", 2, 1, "dead"),
    ("replicated", 2, 2, "mixed"),
    ("replicated", 2, 1, "deepspeed.initialize"),
    ("sharded", 2, 2, ""),
]
# Elements: the norms (16) stay whole, every matrix and expert stack (>= 128) is partitioned.
MIXED_PERSISTENCE_THRESHOLD = 64


def _schedule(step: int) -> float:
    return 1.0 / (1.0 + step)


def _config(placement: str, ep_size: int, accumulation: int, persistence_threshold: int = 0) -> dict:
    import test_autoep as autoep

    config = autoep._config(PRESET, ep_size, 3)
    config["gradient_accumulation_steps"] = accumulation
    config["optimizer"]["params"]["expert_placement"] = placement
    # Threshold 0: every parameter partitioned, dense ones over the 4 ranks, experts over EDP.
    config["zero_optimization"]["stage3_param_persistence_threshold"] = persistence_threshold
    return config


def _tokens(step: int, micro: int) -> torch.Tensor:
    import test_autoep as autoep
    from moe_models import VOCAB

    generator = torch.Generator().manual_seed(100 * step + micro)
    return torch.randint(0, VOCAB, (WORLD * autoep.SEQUENCES, autoep.LENGTH), generator=generator)


def _engine(placement: str, ep_size: int, accumulation: int, variant: str = ""):
    import test_autoep as autoep
    from moe_models import tiny_moe

    model = tiny_moe(PRESET, seed=1)
    if variant == "dead":
        autoep._kill_experts(model)
    threshold = MIXED_PERSISTENCE_THRESHOLD if variant == "mixed" else 0
    reference = autoep._reference(model)
    arguments = {
        "model": model,
        "config": _config(placement, ep_size, accumulation, threshold),
        "lr_scheduler": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule),
    }
    if variant != "deepspeed.initialize":
        return expertopt.initialize(**arguments)[0], reference
    # DeepSpeed's tutorial idiom, through the patched deepspeed.initialize (the Trainer's door).
    import deepspeed

    expertopt.patch_deepspeed()
    try:
        return deepspeed.initialize(**arguments, model_parameters=model.parameters())[0], reference
    finally:
        expertopt.unpatch_deepspeed()


def _train(engine, rank: int, steps: range, accumulation: int, counter=None) -> list[float]:
    """Train ``steps``; returns the engine's global gradient norm of each (before clipping)."""
    import test_autoep as autoep

    rows = slice(rank * autoep.SEQUENCES, (rank + 1) * autoep.SEQUENCES)
    phase = counter.during if counter is not None else lambda _name: contextlib.nullcontext()
    norms = []
    for step in steps:
        if counter is not None and step == 1:  # step 0 records ZeRO-3's trace; count from step 1
            counter.reset()
        for micro in range(accumulation):
            mine = _tokens(step, micro)[rows]
            with phase("fwd"):
                loss = engine(input_ids=mine, labels=mine).loss
            with phase("bwd"):
                engine.backward(loss)
            with phase("step"):
                engine.step()
        norms.append(float(engine.get_global_grad_norm()))
    return norms


def _train_reference(reference, accumulation: int):
    """The reference's clipped-away norms and its optimizer after :data:`STEPS` steps."""
    import test_autoep as autoep

    optimizer = expertopt.Muon(
        expertopt.build_param_groups(reference, lr=autoep.LR, adamw_lr=autoep.ADAMW_LR), ns_dtype="float32"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
    norms = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for micro in range(accumulation):
            tokens = _tokens(step, micro)
            (reference(input_ids=tokens, labels=tokens).loss / accumulation).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), autoep.CLIP)))
        optimizer.step()
        scheduler.step()
    return norms, optimizer


def _weight_error(engine, reference, ep_size: int) -> float:
    import deepspeed
    import test_autoep as autoep
    from deepspeed.utils import groups
    from moe_models import EXPERTS

    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep_size}")
    local = slice(ep_rank * EXPERTS // ep_size, (ep_rank + 1) * EXPERTS // ep_size)
    ref_params = dict(reference.named_parameters())
    error = 0.0
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            want = ref_params[autoep._reference_name(name)].detach()
            want = want[local] if getattr(param, "allreduce", True) is False else want
            error = max(error, (param.detach() - want).abs().max().item())
    return error


def _edp_gathers(records: dict, edp_size: int) -> dict[str, int]:
    """All-gather calls over a group of the EDP size (dense parameters gather over all 4 ranks)."""
    calls = dict.fromkeys(("fwd", "bwd", "step"), 0)
    for (phase, _source, op, size, _dtype), (count, _payload, _wire) in records.items():
        if "gather" in op and size == edp_size:
            calls[phase] += int(count)
    return calls


def _parity_case(rank: int, counter, placement: str, ep_size: int, accumulation: int, variant: str) -> dict:
    from test_deepspeed_zero3 import _muon_matrices

    engine, reference = _engine(placement, ep_size, accumulation, variant)
    with counting_newton_schulz() as ns:
        engine_norms = _train(engine, rank, range(STEPS), accumulation, counter)
        counter.phase = None
    gathers = _edp_gathers(counter.records, WORLD // ep_size)
    persistent = {id(p) for p in engine.optimizer.persistent_parameters}
    experts = [p for p in engine.module.parameters() if getattr(p, "allreduce", True) is False]
    norms, ref_optimizer = _train_reference(reference, accumulation)
    engine.optimizer._set_fp32_optimizer_param_groups()  # ZeRO-3 empties the groups between steps
    state = engine.basic_optimizer.state_dict()["state"]
    engine.optimizer._clear_fp32_optimizer_param_groups()
    return {
        "error": _weight_error(engine, reference, ep_size),
        "ref_norms": norms,
        "engine_norms": engine_norms,
        "ns_matrices_per_step": ns["matrices"] / STEPS,
        "owned": engine.basic_optimizer.owned_matrices(),
        "matrices": _muon_matrices(ref_optimizer),
        "edp_gathers": gathers,
        "experts_persistent": bool(experts) and all(id(p) in persistent for p in experts),
        "persistent_groups": len({id(p.ds_process_group) for p in engine.optimizer.persistent_parameters}),
        "state_keys": sorted(sorted(v) for v in state.values()),
        "tokens_per_expert": [m.tokens.tolist() for m in reference.modules() if hasattr(m, "tokens")],
    }


def _resume_case(rank: int, directory: str) -> bool:
    uninterrupted, _ = _engine("replicated", 2, 1)
    _train(uninterrupted, rank, range(4), 1)
    first, _ = _engine("replicated", 2, 1)
    _train(first, rank, range(2), 1)
    first.save_checkpoint(directory, tag="replicated")
    resumed, _ = _engine("replicated", 2, 1)
    resumed.load_checkpoint(directory, tag="replicated")
    _train(resumed, rank, range(2, 4), 1)

    def weights(engine):
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    return all(torch.equal(a, b) for a, b in zip(weights(uninterrupted), weights(resumed), strict=True))


def _all_checks(rank: int, world_size: int, directory: str) -> dict:
    import deepspeed

    from bench.zero_harness import CommCounter

    assert world_size == WORLD
    deepspeed.init_distributed(dist_backend="gloo")
    counter = CommCounter().install()
    results = {}
    for case in PARITY_CASES:
        counter.reset()
        results[case] = _parity_case(rank, counter, *case)
    results["resume"] = _resume_case(rank, directory)
    results["no_experts"] = _no_experts_message()
    results["bf16"] = _bf16_case(rank)
    results["bf16_parity"] = {
        placement: _bf16_parity_case(rank, placement) for placement in ("replicated", "sharded")
    }
    return results


def _bf16_case(rank: int) -> dict:
    """bf16 experts: whole bf16 copies on every EDP rank, refreshed from fp32 master partitions."""
    import test_autoep as autoep
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from moe_models import tiny_moe

    config = _config("replicated", 2, 1)
    config["bf16"] = {"enabled": True}
    engine, *_ = expertopt.initialize(model=tiny_moe(PRESET, seed=1), config=config)
    _train(engine, rank, range(2), 1)
    zero = engine.optimizer
    checks = {"whole": True, "same_on_edp": True, "master_fp32": True, "matches_master": True}
    for sub_group, params in enumerate(zero.fp16_groups):
        if not any(getattr(q, "allreduce", True) is False for q in params):
            continue
        masters = zero.fp32_partitioned_groups_flat[sub_group].split([q.ds_tensor.numel() for q in params])
        checks["master_fp32"] &= zero.fp32_partitioned_groups_flat[sub_group].dtype == torch.float32
        for param, master in zip(params, masters, strict=True):
            checks["whole"] &= param.ds_status == ZeroParamStatus.AVAILABLE and param.dtype == torch.bfloat16
            # This rank's piece of the whole weight it computes with is its fp32 master, rounded.
            start = dist.get_rank(group=param.ds_process_group) * param.ds_tensor.numel()
            piece = param.data.reshape(-1)[start : start + param.ds_tensor.numel()]
            checks["matches_master"] &= torch.equal(piece, master[: piece.numel()].to(torch.bfloat16))
            copies = [
                torch.empty_like(param.data) for _ in range(dist.get_world_size(param.ds_process_group))
            ]
            dist.all_gather(copies, param.data, group=param.ds_process_group)
            checks["same_on_edp"] &= all(torch.equal(copy, param.data) for copy in copies)
    rows = slice(rank * autoep.SEQUENCES, (rank + 1) * autoep.SEQUENCES)
    checks["finite_loss"] = bool(
        torch.isfinite(engine(input_ids=_tokens(9, 0)[rows], labels=_tokens(9, 0)[rows]).loss)
    )
    return checks


def _bf16_reference(reference, lr_scale: float = 1.0):
    """:data:`STEPS` steps of fp32 masters with forward and backward on a bf16 copy, each rank's
    rows apart and their gradients summed in fp32, clipped, stepped (tests/test_deepspeed_bf16.py)."""
    import copy

    import test_autoep as autoep

    masters = copy.deepcopy(reference).requires_grad_(True)
    optimizer = expertopt.Muon(
        expertopt.build_param_groups(masters, lr=autoep.LR * lr_scale, adamw_lr=autoep.ADAMW_LR * lr_scale),
        ns_dtype="float32",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule)
    compute = copy.deepcopy(masters).to(torch.bfloat16)
    params = list(compute.parameters())
    for step in range(STEPS):
        with torch.no_grad():
            for low, master in zip(params, masters.parameters(), strict=True):
                low.copy_(master)
        grads = [torch.zeros_like(p) for p in masters.parameters()]
        for rows in _tokens(step, 0).split(autoep.SEQUENCES):  # as each rank computes
            loss = compute(input_ids=rows, labels=rows).loss / WORLD
            for grad, low in zip(grads, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
                if low is not None:
                    grad += low.float()
        for grad, master in zip(grads, masters.parameters(), strict=True):
            master.grad = grad
        torch.nn.utils.clip_grad_norm_(masters.parameters(), autoep.CLIP)
        optimizer.step()
        scheduler.step()
    return masters


def _bf16_parity_case(rank: int, placement: str) -> dict:
    """bf16 AutoEP at ZeRO-3, EP 2: the engine's fp32 masters after 3 steps against
    :func:`_bf16_reference`, as a distance relative to the reference's move (the measure and
    the reasons for its tolerance: tests/test_deepspeed_bf16.py)."""
    import test_autoep as autoep
    from deepspeed.utils import groups, safe_get_full_fp32_param
    from moe_models import EXPERTS, tiny_moe

    model = tiny_moe(PRESET, seed=1)
    initial = autoep._reference(model)
    config = _config(placement, 2, 1)
    config["bf16"] = {"enabled": True}
    engine = expertopt.initialize(
        model=model,
        config=config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule),
    )[0]
    _train(engine, rank, range(STEPS), 1)
    ep_rank = groups._get_expert_parallel_rank("ep_size_2")
    local = slice(ep_rank * EXPERTS // 2, (ep_rank + 1) * EXPERTS // 2)
    start = dict(initial.named_parameters())
    pairs = []  # (engine fp32 master, the same tensor's initial value, reference name)
    for name, param in engine.module.named_parameters():
        reference_name = autoep._reference_name(name)
        want = start[reference_name].detach()
        want = want[local] if getattr(param, "allreduce", True) is False else want
        pairs.append((safe_get_full_fp32_param(param).detach().clone(), want, reference_name, local))

    def distance(reference) -> float:
        weights = dict(reference.named_parameters())
        gap = move = 0.0
        for master, begin, name, rows in pairs:
            want = weights[name].detach()
            want = want[rows] if want.shape != master.shape else want
            gap += float((master - want).square().sum())
            move += float((want - begin).square().sum())
        return (gap / move) ** 0.5

    return {
        "dtype": next(engine.module.parameters()).dtype,
        "error": distance(_bf16_reference(initial)),
        "half_lr_error": distance(_bf16_reference(initial, lr_scale=0.5)),
    }


def _no_experts_message() -> str:
    """What "replicated" says at ZeRO-3 on a model without AutoEP experts (after initialize)."""
    from conftest import ToyMoE

    config = _config("replicated", 2, 1)
    del config["expert_parallel"]
    try:
        expertopt.initialize(model=ToyMoE(), config=config)
    except ValueError as error:
        return str(error)
    return ""


@pytest.fixture(scope="module")
def replicated_results(tmp_path_factory):
    return run_ranks(_all_checks, WORLD, str(tmp_path_factory.mktemp("replicated")))


def _case_id(case) -> str:
    placement, ep_size, accumulation, variant = case
    return f"{placement}-ep{ep_size}-gas{accumulation}" + (f"-{variant}" if variant else "")


@pytest.mark.parametrize("case", PARITY_CASES, ids=_case_id)
def test_experts_match_single_process_reference(replicated_results, case):
    import test_autoep as autoep

    results = [r[case] for r in replicated_results]
    assert all(r["error"] < WEIGHT_TOLERANCE for r in results), [r["error"] for r in results]
    assert min(min(r["ref_norms"]) for r in results) > 2 * autoep.CLIP, "clipping was not active"
    # The clipping norm counts every expert once (F4): Muon hides a wrong scale in the weights.
    for result in results:
        assert result["engine_norms"] == pytest.approx(result["ref_norms"], rel=1e-5)
    # Placement "replicated": every expert a persistent parameter; "sharded": none.
    assert all(r["experts_persistent"] == (case[0] == "replicated") for r in results)


@pytest.mark.parametrize("case", PARITY_CASES, ids=_case_id)
def test_each_matrix_orthogonalized_once(replicated_results, case):
    results = [r[case] for r in replicated_results]
    # Per-rank Newton-Schulz counts add up to the number of matrices (each global expert once).
    assert sum(r["ns_matrices_per_step"] for r in results) == results[0]["matrices"]
    assert all(r["ns_matrices_per_step"] == r["owned"] for r in results)


def test_experts_without_tokens_do_not_hang_and_keep_state_keys(replicated_results):
    results = [r[("replicated", 2, 1, "dead")] for r in replicated_results]
    # Precondition: experts 2 and 3 (EP rank 1's) got no token in any step.
    (tokens,) = results[0]["tokens_per_expert"]
    assert tokens[2] == tokens[3] == 0 and min(tokens[:2]) > 0, tokens
    assert all(r["state_keys"] == results[0]["state_keys"] for r in results)


def test_forward_and_backward_gather_no_experts_when_replicated(replicated_results):
    replicated = [
        r[case]["edp_gathers"]
        for r in replicated_results
        for case in (("replicated", 2, 2, ""), ("replicated", 2, 2, "mixed"))
    ]
    sharded = [r[("sharded", 2, 2, "")]["edp_gathers"] for r in replicated_results]
    for gathers in replicated:
        assert gathers["fwd"] == gathers["bwd"] == 0, gathers
        assert gathers["step"] > 0, gathers  # the post-step all-gather of the updated experts
    for gathers in sharded:
        assert gathers["fwd"] + gathers["bwd"] > 0, gathers
        assert gathers["step"] == 0, gathers


def test_post_step_gather_spans_dense_and_expert_groups(replicated_results):
    # DeepSpeed's own persistent norms (over the 4 ranks) and the experts (over EDP) in one list:
    # its _all_gather groups them by process group; parity above shows both are refreshed.
    assert all(r[("replicated", 2, 2, "mixed")]["persistent_groups"] == 2 for r in replicated_results)


def test_bf16_experts_are_whole_copies_of_their_fp32_masters(replicated_results):
    for result in replicated_results:
        assert all(result["bf16"].values()) and len(result["bf16"]) == 5, result["bf16"]


@pytest.mark.parametrize("placement", ["replicated", "sharded"])
def test_bf16_experts_match_bf16_single_process_reference(replicated_results, placement):
    from test_deepspeed_bf16 import WHOLE_TOLERANCE

    results = [r["bf16_parity"][placement] for r in replicated_results]
    assert all(r["dtype"] == torch.bfloat16 for r in results)
    assert all(r["error"] < WHOLE_TOLERANCE for r in results), [r["error"] for r in results]
    # The tolerance separates: half the lr lands far outside it.
    assert all(r["half_lr_error"] > 2 * WHOLE_TOLERANCE for r in results), [
        r["half_lr_error"] for r in results
    ]


def test_checkpoint_resume_is_bit_identical(replicated_results):
    assert all(r["resume"] for r in replicated_results)


def test_replicated_without_experts_is_refused(replicated_results):
    for result in replicated_results:
        assert "has none" in result["no_experts"] and 'remove "expert_placement"' in result["no_experts"]


def test_placement_errors_name_the_key():
    import test_autoep as autoep
    from moe_models import tiny_moe

    with pytest.raises(ValueError, match=r"expert_placement.*must be one of"):
        expertopt.initialize(model=tiny_moe(PRESET), config=_config("everywhere", 2, 1))
    config = autoep._config(PRESET, 2, 2)
    config["optimizer"]["params"]["expert_placement"] = "replicated"
    with pytest.raises(ValueError, match=r'stage 3 only.*remove "expert_placement"'):
        expertopt.initialize(model=tiny_moe(PRESET), config=config)
