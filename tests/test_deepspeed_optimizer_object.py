"""The torch door into DeepSpeed: an ``expertopt.Muon`` object passed as ``optimizer=``.

DeepSpeed's tutorials build the optimizer themselves and hand it over
(``deepspeed.initialize(model=..., optimizer=optimizer, config=...)``, no "optimizer" block).
expertopt must then do what it does for the config door: prepare the config it hands DeepSpeed
(so no ``"zero_allow_untested_optimizer"`` here) and at ZeRO-1/2/3 place the flat partitions
DeepSpeed steps, so each matrix is orthogonalized whole, once. Checked at world 2,
ZeRO-0 to 3 (and ZeRO-2 with CPU offload), through ``expertopt.initialize`` and the patched
``deepspeed.initialize``: weights
after 3 steps equal a single-process reference on the same global batch (fp32 Newton-Schulz,
clipping active; 2e-5 as in tests/test_deepspeed_zero3.py). ``expertopt.MoEOptimizer`` cannot be
DeepSpeed's client optimizer (DeepSpeed replaces the groups' tensors with its flat partitions,
which the dense/expert pair does not follow): it is refused before DeepSpeed starts, with the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ToyMoE
from distributed import run_ranks

import expertopt

WORLD = 2
MICRO_BATCH = 2
STEPS = 3
LR, ADAMW_LR, CLIP = 0.02, 3e-3, 0.05
TOLERANCE = 2e-5
# (ZeRO stage, door, CPU offload of the optimizer)
CASES = [
    (0, "expertopt.initialize", False),
    (1, "expertopt.initialize", False),
    (2, "deepspeed.initialize", False),
    (3, "deepspeed.initialize", False),
    (2, "expertopt.initialize", True),
]


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 32, (WORLD * MICRO_BATCH, 8), generator=torch.Generator().manual_seed(step))


def _loss(model, tokens):
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))


def _optimizer(model):
    return expertopt.Muon(expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR), ns_dtype="float32")


def _config(stage: int, offload: bool = False) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
    }
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # matrices cut across ranks
    if offload:  # fp32 partitions and optimizer state on the CPU (expertopt lets DeepSpeed accept that)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config


def _case(rank: int, stage: int, door: str, offload: bool) -> dict:
    import deepspeed

    torch.manual_seed(0)
    model = ToyMoE()
    reference = copy.deepcopy(model)
    if door == "expertopt.initialize":
        engine, *_ = expertopt.initialize(
            model=model, optimizer=_optimizer(model), config=_config(stage, offload)
        )
    else:
        expertopt.patch_deepspeed()
        try:
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=_optimizer(model), config=_config(stage, offload)
            )
        finally:
            expertopt.unpatch_deepspeed()
    ref_opt = _optimizer(reference)
    norms = []
    for step in range(STEPS):
        tokens = _batch(step)
        engine.backward(_loss(engine, tokens[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]))
        engine.step()
        ref_opt.zero_grad()
        _loss(reference, tokens).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
        ref_opt.step()
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        error = max(
            (a.detach() - b.detach()).abs().max().item()
            for a, b in zip(params, reference.parameters(), strict=True)
        )
    optimizer = engine.basic_optimizer
    return {
        "error": error,
        "ref_norms": norms,
        "units": len(optimizer.shard_units),
        "owned": optimizer.owned_matrices(),
        "offloaded": bool(getattr(engine.optimizer, "cpu_offload", False)),
    }


def _all_cases(rank: int, world_size: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {case: _case(rank, *case) for case in CASES}


@pytest.fixture(scope="module")
def object_results():
    return run_ranks(_all_cases, WORLD)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"stage{c[0]}-{c[1]}" + ("-offload" if c[2] else ""))
def test_optimizer_object_matches_single_process_reference(object_results, case):
    results = [r[case] for r in object_results]
    assert all(r["error"] < TOLERANCE for r in results), [r["error"] for r in results]
    assert min(min(r["ref_norms"]) for r in results) > 2 * CLIP, "clipping was not active"
    assert all(r["offloaded"] == case[2] for r in results)
    # Placed like the config door: each matrix has one owner (ZeRO-0 owners by default too).
    assert all(r["units"] > 0 for r in results)
    assert sum(r["owned"] for r in results) == 4 * 2 + 4 + 1 + 2  # stacks, listed experts, router, q, o


def test_moe_optimizer_under_deepspeed_is_refused_with_the_fix():
    model = ToyMoE()
    optimizer = expertopt.MoEOptimizer.from_groups(expertopt.build_param_groups(model), expertopt.Muon)
    with pytest.raises(ValueError, match=r"MoEOptimizer cannot be DeepSpeed's optimizer.*expertopt\.Muon"):
        expertopt.initialize(model=model, optimizer=optimizer, config=_config(2))
