"""DeepSpeed ZeRO-0/1/2 with expertopt: weights after 3 steps equal a single-process reference.

Every rank trains the same ToyMoE (attention-like matrices, a router, 3-D expert stacks,
per-expert ModuleList experts, embeddings, norms, biases) on its slice of a global batch; the
reference trains a copy on the whole global batch with expertopt's single-process optimizer.
Newton-Schulz runs in fp32 (bf16 parity is meaningless, BRIEF section 6). Tolerance 2e-5:
reduction order and fp32 Newton-Schulz on differently batched matrices, measured ~1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ToyMoE
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
    params = {"lr": LR, "ns_dtype": "float32"} if kind == "Muon" else {"lr": ADAMW_LR}
    if kind == "Muon":
        params["adamw_lr"] = ADAMW_LR
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": kind, "params": params},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    }


def _reference_optimizer(kind: str, model):
    if kind == "Muon":
        groups = expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR)
        return expertopt.Muon(groups, ns_dtype="float32")
    groups = expertopt.build_param_groups(model, lr=ADAMW_LR, adamw_lr=ADAMW_LR)
    for group in groups:
        group["use_muon"] = False
    return expertopt.AdamW(groups)


def _train_and_compare(rank, world_size, cases):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for kind, stage, accumulation, clipping in cases:
        torch.manual_seed(0)
        model = ToyMoE()
        reference = copy.deepcopy(model)
        initial = [p.detach().clone() for p in model.parameters()]
        engine, *_ = expertopt.initialize(model=model, config=_ds_config(kind, stage, accumulation, clipping))
        ref_opt = _reference_optimizer(kind, reference)
        for step in range(STEPS):
            ref_opt.zero_grad()
            for micro in range(accumulation):
                tokens = _global_batch(step, micro, world_size)
                local = tokens[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
                engine.backward(_loss(engine, local))
                engine.step()
                (_loss(reference, tokens) / accumulation).backward()
            if clipping:
                torch.nn.utils.clip_grad_norm_(reference.parameters(), clipping)
            ref_opt.step()
        moved = max(
            (p.detach() - q).abs().max().item() for p, q in zip(reference.parameters(), initial, strict=True)
        )
        error = max(
            (p.detach() - q.detach()).abs().max().item()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        )
        owned = engine.basic_optimizer.owned_matrices() if kind == "Muon" else 0
        results[(kind, stage, accumulation, clipping)] = {"error": error, "moved": moved, "owned": owned}
    return results


CASES = [
    (kind, stage, accumulation, 0.0)
    for kind in ("Muon", "AdamW")
    for stage in (0, 1, 2)
    for accumulation in (1, 2)
] + [("Muon", 2, 1, 0.05)]


@pytest.mark.parametrize("world_size", [2])
def test_zero_stages_match_single_process_reference(world_size):
    per_rank = run_ranks(_train_and_compare, world_size, CASES)
    for case in CASES:
        first = per_rank[0][case]
        assert first["moved"] > 1e-3, f"{case}: the reference did not train"
        for rank_results in per_rank:
            assert rank_results[case]["error"] < 2e-5, (case, rank_results[case])
    # Every Muon matrix orthogonalized once at every stage: owners across ranks add up to the count.
    matrices = 2 + 4 * 2 + 4 + 1  # q, o; 2 x 4 stacked experts; 4 listed experts; router
    for case in CASES:
        if case[0] == "Muon":
            assert sum(r[case]["owned"] for r in per_rank) == matrices, case
