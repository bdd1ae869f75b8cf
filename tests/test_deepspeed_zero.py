"""DeepSpeed ZeRO-0/1/2 with expertopt: weights after 3 steps equal a single-process reference.

Every rank trains the same ToyMoE (attention-like matrices, a router, 3-D expert stacks,
per-expert ModuleList experts, embeddings, norms, biases) on its slice of a global batch; the
reference trains a copy on the whole global batch with expertopt's single-process optimizer.
Newton-Schulz runs in fp32 (bf16 parity is meaningless, BRIEF section 6). Tolerance 2e-5:
reduction order and fp32 Newton-Schulz on differently batched matrices, measured ~1e-6.

Every Muon engine gets ``q_proj`` as 4 heads and ``o_proj`` as 2 through ``model_parameters``
groups with ``num_heads`` (the user's idiom), the reference the same heads through router rules;
each stage runs each ``ns_method`` once. The heads change the trajectory far beyond the tolerance
(checked), so a head count lost on the way to the step fails the parity.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TOY_HEADS, ToyMoE, toy_head_groups, toy_head_rules
from distributed import run_ranks

import expertopt

MICRO_BATCH = 2
STEPS = 3
LR, ADAMW_LR = 0.02, 3e-3


def _global_batch(step: int, micro: int, world_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(0, 32, (world_size * MICRO_BATCH, 8), generator=generator)


def _loss(model, tokens):
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))


def _ds_config(kind: str, stage: int, accumulation: int, clipping: float) -> dict:
    name, _, method = kind.partition(":")  # "Muon:gram": Muon with that ns_method
    params = (
        {"lr": LR, "ns_dtype": "float32", "adamw_lr": ADAMW_LR, "ns_method": method}
        if method
        else {"lr": ADAMW_LR}
    )
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": name, "params": params},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    }


def _reference_optimizer(kind: str, model, heads: bool = True):
    name, _, method = kind.partition(":")
    if name == "Muon":
        rules = toy_head_rules() if heads else []
        groups = expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR, rules=rules)
        return expertopt.Muon(groups, ns_dtype="float32", ns_method=method)
    groups = expertopt.build_param_groups(model, lr=ADAMW_LR, adamw_lr=ADAMW_LR)
    for group in groups:
        group["use_muon"] = False
    return expertopt.AdamW(groups)


def _trajectory(engine, reference, ref_opt, rank, world_size, accumulation, clipping):
    """3 steps of the engine on this rank's slice and of the reference on the whole batch."""
    for step in range(STEPS):
        ref_opt.zero_grad()
        for micro in range(accumulation):
            tokens = _global_batch(step, micro, world_size)
            if engine is not None:
                engine.backward(_loss(engine, tokens[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]))
                engine.step()
            (_loss(reference, tokens) / accumulation).backward()
        if clipping:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clipping)
        ref_opt.step()


def _heads_effect(kind, model, reference, world_size, accumulation, clipping) -> float:
    """How far the headed reference's q and o move from a reference without heads."""
    plain = copy.deepcopy(model)
    _trajectory(
        None,
        plain,
        _reference_optimizer(kind, plain, heads=False),
        0,
        world_size,
        accumulation,
        clipping,
    )
    named = dict(plain.named_parameters())
    return max((p - named[n]).abs().max().item() for n, p in reference.named_parameters() if n in TOY_HEADS)


def _train_and_compare(rank, world_size, cases):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for kind, stage, accumulation, clipping in cases:
        torch.manual_seed(0)
        model = ToyMoE()
        reference = copy.deepcopy(model)
        initial = copy.deepcopy(model)
        muon = kind.startswith("Muon")
        engine, *_ = expertopt.initialize(
            model=model,
            model_parameters=toy_head_groups(model) if muon else model.parameters(),
            config=_ds_config(kind, stage, accumulation, clipping),
        )
        ref_opt = _reference_optimizer(kind, reference)
        _trajectory(engine, reference, ref_opt, rank, world_size, accumulation, clipping)
        moved = max(
            (p.detach() - q).abs().max().item()
            for p, q in zip(reference.parameters(), initial.parameters(), strict=True)
        )
        error = max(
            (p.detach() - q.detach()).abs().max().item()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        )
        results[(kind, stage, accumulation, clipping)] = {
            "error": error,
            "moved": moved,
            "owned": engine.basic_optimizer.owned_matrices() if muon else 0,
            "heads_effect": _heads_effect(kind, initial, reference, world_size, accumulation, clipping)
            if muon
            else 0,
        }
    return results


# Each stage runs each Newton-Schulz method once (accumulation 1, 2, and 1 with clipping active).
_METHODS = ("standard", "gram", "polar_express")
CASES = [
    (f"Muon:{_METHODS[(stage + i) % 3]}", stage, accumulation, clipping)
    for stage in (0, 1, 2)
    for i, (accumulation, clipping) in enumerate([(1, 0.0), (2, 0.0), (1, 0.05)])
] + [("AdamW", stage, accumulation, 0.0) for stage in (0, 1, 2) for accumulation in (1, 2)]


@pytest.mark.parametrize("world_size", [2])
def test_zero_stages_match_single_process_reference(world_size):
    per_rank = run_ranks(_train_and_compare, world_size, CASES)
    for case in CASES:
        first = per_rank[0][case]
        assert first["moved"] > 1e-3, f"{case}: the reference did not train"
        for rank_results in per_rank:
            assert rank_results[case]["error"] < 2e-5, (case, rank_results[case])
    # Every Muon matrix orthogonalized once at every stage: owners across ranks add up to the count.
    matrices = 4 + 2 + 4 * 2 + 4 + 1  # q and o heads; 2 x 4 stacked experts; 4 listed experts; router
    for case in CASES:
        if case[0].startswith("Muon"):
            assert sum(r[case]["owned"] for r in per_rank) == matrices, case
            assert per_rank[0][case]["heads_effect"] > 1000 * 2e-5, "heads do not matter here: no proof"
