"""DeepSpeed MoE (expert parallelism) with expertopt: parity with a single-process reference.

World 4 (gloo, CPU), three topologies of one ``deepspeed.moe.layer.MoE`` layer with 4 experts:
EP=1 (experts replicated, reduced over all 4 ranks), EP=2 (EDP groups [0,2] and [1,3]) and
EP=4 (EDP size 1). Every rank trains a model (input Linear, MoE with top-1 gate and experts
``Sequential(Linear, Tanh, Linear)``, output Linear) on its slice of a global batch; the
reference is one process holding *all* experts (gathered from the ranks after init, each
counted once) trained with expertopt's single-process optimizer on the whole global batch,
with the same routing of parameters into groups (Muon for matrices incl. the router ``wg``
and each 2-D expert weight, AdamW for biases and the output head).

For every topology and every config of ZeRO {0, 1, 2} x {Muon, AdamW} x gradient
accumulation {1, 2} (plus clipping on with ZeRO-2 Muon, ZeRO-0 Muon and ZeRO-0 AdamW with
accumulation 2) we check:

- weights after 3 steps (dense and each rank's local experts, mapped to their global expert)
  equal the reference's within 2e-5, and the reference moved dense and expert weights by
  more than 1e-3 (so the comparison can fail);
- the gradients handed to expertopt's optimizer (captured by a step pre-hook: whole tensors
  at ZeRO-0, flat fp32 partitions at ZeRO-1/2, mapped back to parameter slices) equal the
  reference's global-batch gradients at every step. This checks gradient *scale* directly:
  Newton-Schulz and Adam are both scale-invariant, so weights alone would hide an expert
  gradient scaled by the EP size (F3) or a wrong clipping norm (F4/F5);
- at ZeRO-1/2 with Muon, every Muon matrix is orthogonalized by exactly one owner;
- with clipping, the engine's global norm equals the reference's norm over all parameters
  (each expert once). At ZeRO-0 that is expertopt's norm: DeepSpeed 0.19.8 averages per-rank
  norms there: measured 1.077 for a true 1.095 at EP 2, gradients 1.9% too large (relative
  error 0.019, weights within 9e-5), which the gradient check catches at once.

Newton-Schulz runs in fp32 (``ns_dtype="float32"``). Tolerances: weights 2e-5 absolute;
gradients 1e-5 relative to the largest reference gradient of their kind (dense / expert).
Both cover reduction-order noise (all-reduce and all-to-all versus one batched matmul, fp32
Newton-Schulz on matrices batched differently), measured at most 7.6e-7 on weights and 2.5e-7
on gradients. A wrong scale is an O(1) gradient error: with the reference's 1/accumulation
factor left out (gradients 2x), weights still agreed within 5.1e-6 (Adam and Newton-Schulz
absorb the scale) while the gradient error was 0.5.

Each topology is one ``run_ranks`` launch (DeepSpeed init dominates: ~25-40 s per launch on
2 CPU cores); all 15 configs run inside it, calling ``expertopt.initialize`` repeatedly.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_ranks
from torch import nn

import expertopt

WORLD = 4
D_IN, D, H, D_OUT = 6, 8, 16, 3  # input, model, expert hidden, output dims
EXPERTS = 4
TOKENS = 8  # per rank and micro-batch
STEPS = 3
LR, ADAMW_LR = 0.02, 3e-3
WEIGHT_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = 1e-5
# Muon matrices: dense inp.weight and the router wg; per expert two Linear weights.
DENSE_MUON_MATRICES = 2
EXPERT_MUON_MATRICES = 2 * EXPERTS


class _Net(nn.Module):
    """The DeepSpeed-side model; ``moe`` holds ``EXPERTS // ep_size`` local experts."""

    def __init__(self, ep_size: int) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        expert = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D))
        self.moe = MoE(
            hidden_size=D,
            expert=expert,
            num_experts=EXPERTS,
            ep_size=ep_size,
            k=1,
            drop_tokens=False,
            use_rts=False,
            min_capacity=0,
        )
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        m, _, _ = self.moe(h)
        return self.head(h + m)


class _Reference(nn.Module):
    """All experts in one process; parameter names mirror :class:`_Net` so routing is the same
    (``moe.deepspeed_moe.X`` is ``moe.X``, local expert ``l`` of EP rank ``k`` is global expert
    ``k * local + l``). Top-1 gating without capacity limit, as DeepSpeed's with ``drop_tokens=False``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, D)
        self.moe = nn.Module()
        self.moe.gate = nn.Module()
        self.moe.gate.wg = nn.Linear(D, EXPERTS, bias=False)
        self.moe.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D)) for _ in range(EXPERTS)
        )
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        gates = F.softmax(self.moe.gate.wg(h), dim=1)
        chosen = gates.argmax(1)
        outputs = torch.stack([expert(h) for expert in self.moe.experts])  # [E, S, D]
        m = outputs[chosen, torch.arange(h.shape[0])] * gates.gather(1, chosen[:, None])
        return self.head(h + m)


def _reference_name(name: str, ep_rank: int, local_experts: int) -> str:
    name = name.replace("moe.deepspeed_moe.", "moe.")
    match = re.fullmatch(r"moe\.experts\.deepspeed_experts\.(\d+)\.(.+)", name)
    if match:
        return f"moe.experts.{ep_rank * local_experts + int(match[1])}.{match[2]}"
    return name


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(model(x), y)


def _global_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + micro)
    return (
        torch.randn(WORLD * TOKENS, D_IN, generator=generator),
        torch.randn(WORLD * TOKENS, D_OUT, generator=generator),
    )


def _ds_config(kind: str, stage: int, accumulation: int, clipping: float) -> dict:
    muon = {"lr": LR, "adamw_lr": ADAMW_LR, "ns_dtype": "float32"}
    params = muon if kind == "Muon" else {"lr": ADAMW_LR}
    return {
        "train_micro_batch_size_per_gpu": TOKENS,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": kind, "params": params},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": clipping,
        "steps_per_print": 10**9,
    }


def _reference_optimizer(kind: str, model: nn.Module):
    if kind == "Muon":
        groups = expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR)
        return expertopt.Muon(groups, ns_dtype="float32")
    groups = expertopt.build_param_groups(model, lr=ADAMW_LR, adamw_lr=ADAMW_LR)
    for group in groups:
        group["use_muon"] = False
    return expertopt.AdamW(groups)


def _build_model(ep_size: int) -> tuple[_Net, int]:
    """A fresh model whose global experts differ from each other and agree within each EDP group.

    The experts are re-initialized (MoE deep-copies one expert) before ``expertopt.initialize``,
    so DeepSpeed's fp32 partitions start from them; the EP rank is known once the layer's
    process groups exist (created here as the engine would; the engine finds them by name).
    """
    from deepspeed.utils import groups

    torch.manual_seed(2)  # with the x3 router below, every expert gets tokens in every micro-batch
    net = _Net(ep_size)
    name = net.moe.expert_group_name
    if name not in groups._get_expert_parallel_group_dict():  # as MoE does at engine init
        groups._create_expert_and_data_parallel(ep_size)
    ep_rank = groups._get_expert_parallel_rank(name)
    local = EXPERTS // ep_size
    with torch.no_grad():
        for index, expert in enumerate(net.moe.deepspeed_moe.experts.deepspeed_experts):
            generator = torch.Generator().manual_seed(100 + ep_rank * local + index)
            for param in expert.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        net.moe.deepspeed_moe.gate.wg.weight.mul_(3.0)  # spread the tokens over the experts
    return net, ep_rank


def _gather_reference(net: _Net, ep_rank: int) -> _Reference:
    """The single-process reference, from the weights the ranks actually hold after init."""
    experts = net.moe.deepspeed_moe.experts.deepspeed_experts
    local = len(experts)
    flat = torch.cat([p.detach().reshape(-1) for p in experts.parameters()])
    flats = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(flats, flat)
    ep_ranks = [torch.zeros(1, dtype=torch.long) for _ in range(WORLD)]
    dist.all_gather(ep_ranks, torch.tensor([ep_rank]))
    by_ep_rank: dict[int, torch.Tensor] = {}
    for rank_flat, rank_ep in zip(flats, ep_ranks, strict=True):
        held = by_ep_rank.setdefault(int(rank_ep), rank_flat)
        assert torch.equal(held, rank_flat), "experts differ inside an EDP group"
    assert sorted(by_ep_rank) == list(range(EXPERTS // local))

    reference = _Reference()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in net.named_parameters():
            if not name.startswith("moe.deepspeed_moe.experts."):
                params[_reference_name(name, ep_rank, local)].copy_(param)
        shapes = [(name, p.shape) for name, p in experts.named_parameters()]
        for rank_ep, rank_flat in by_ep_rank.items():
            offset = 0
            for name, shape in shapes:
                target = params[
                    _reference_name(f"moe.deepspeed_moe.experts.deepspeed_experts.{name}", rank_ep, local)
                ]
                target.copy_(rank_flat[offset : offset + shape.numel()].view(shape))
                offset += shape.numel()
    first, second = (reference.moe.experts[e][0].weight for e in (0, 1))
    assert (first - second).abs().max() > 0.1, "global experts are not distinct"
    return reference


def _owned_slices(zero):
    """This rank's slices of a ZeRO-1/2 optimizer's flat fp32 partitions:
    ``(group index, param, flat_lo, flat_hi, param_lo, param_hi)`` (DeepSpeed 0.19.8 layout)."""
    import deepspeed.comm as ds_dist

    for index in range(len(zero.bit16_groups)):
        group = zero.real_dp_process_group[index]
        me = ds_dist.get_rank(group=group)
        size = int(zero.partition_size[index])
        lo_rank, hi_rank = me * size, (me + 1) * size
        for param, offset in zip(
            zero.round_robin_bit16_groups[index], zero.round_robin_bit16_offsets[index], strict=True
        ):
            lo, hi = max(offset, lo_rank), min(offset + param.numel(), hi_rank)
            if lo < hi:
                yield index, param, lo - lo_rank, hi - lo_rank, lo - offset, hi - offset


def _gradient_errors(engine, stage, captured, reference, reference_grad) -> dict[str, float]:
    """Max |grad handed to the optimizer - reference grad| over what this rank holds, divided by
    the reference's max |grad| over all parameters of that kind (dense / expert)."""
    from deepspeed.moe.utils import is_moe_param

    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"dense": [], "expert": []}
    if stage == 0:
        for param in engine.module.parameters():
            kind = "expert" if is_moe_param(param) else "dense"
            pairs[kind].append((captured[id(param)], reference_grad(param)))
    else:
        zero = engine.optimizer
        for index, param, flat_lo, flat_hi, param_lo, param_hi in _owned_slices(zero):
            got = captured[id(zero.single_partition_of_fp32_groups[index])][flat_lo:flat_hi]
            kind = "expert" if is_moe_param(param) else "dense"
            pairs[kind].append((got, reference_grad(param).reshape(-1)[param_lo:param_hi]))
    errors = {}
    for kind, kind_pairs in pairs.items():
        assert kind_pairs, f"rank holds no {kind} gradient"
        scale = max(
            p.grad.abs().max().item()
            for name, p in reference.named_parameters()
            if (".experts." in name) == (kind == "expert")
        )
        errors[kind] = max((got - ref).abs().max().item() for got, ref in kind_pairs) / scale
    return errors


def _run_case(rank: int, ep_size: int, kind: str, stage: int, accumulation: int, clipping: float) -> dict:
    net, ep_rank = _build_model(ep_size)
    engine, *_ = expertopt.initialize(model=net, config=_ds_config(kind, stage, accumulation, clipping))
    reference = _gather_reference(net, ep_rank)
    local = EXPERTS // ep_size
    ref_params = dict(reference.named_parameters())
    names = {id(p): n for n, p in net.named_parameters()}

    def reference_of(param: torch.Tensor) -> torch.Tensor:
        return ref_params[_reference_name(names[id(param)], ep_rank, local)]

    def reference_grad(param: torch.Tensor) -> torch.Tensor:
        return reference_of(param).grad

    initial = {n: p.detach().clone() for n, p in ref_params.items()}
    ref_opt = _reference_optimizer(kind, reference)

    captured: dict[int, torch.Tensor] = {}

    def capture(optimizer, args, kwargs):  # called per group at ZeRO-1/2, once at ZeRO-0
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    captured[id(param)] = param.grad.detach().clone()

    engine.basic_optimizer.register_step_pre_hook(capture)
    # Matrices this rank orthogonalizes inside the engine's optimizer steps (not the reference's):
    # every Newton-Schulz path (whole, sharded, replicated) calls this module's kernel.
    counting = {"on": False, "matrices": 0}
    kernel = expertopt.updates.muon.orthogonalize

    def counted_kernel(x, *args, **kwargs):
        if counting["on"]:
            counting["matrices"] += x.reshape(-1, *x.shape[-2:]).shape[0]
        return kernel(x, *args, **kwargs)

    expertopt.updates.muon.orthogonalize = counted_kernel
    engine.basic_optimizer.register_step_pre_hook(lambda *_: counting.update(on=True))
    engine.basic_optimizer.register_step_post_hook(lambda *_: counting.update(on=False))
    gradient_errors = []
    for step in range(STEPS):
        captured.clear()
        ref_opt.zero_grad()
        for micro in range(accumulation):
            x, y = _global_batch(step, micro)
            mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
            engine.backward(_loss(engine, x[mine], y[mine]))
            engine.step()
            (_loss(reference, x, y) / accumulation).backward()
        # The reference's global norm, every expert once (then clipped like DeepSpeed clips).
        ref_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in reference.parameters()])
        ).item()
        if clipping:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clipping)
        gradient_errors.append(_gradient_errors(engine, stage, captured, reference, reference_grad))
        ref_opt.step()

    weight_error = {"dense": 0.0, "expert": 0.0}
    for name, param in net.named_parameters():
        kind_ = "expert" if ".experts." in name else "dense"
        error = (param.detach() - reference_of(param).detach()).abs().max().item()
        weight_error[kind_] = max(weight_error[kind_], error)
    moved = {"dense": 0.0, "expert": 0.0}
    for name, param in ref_params.items():
        kind_ = "expert" if ".experts." in name else "dense"
        moved[kind_] = max(moved[kind_], (param.detach() - initial[name]).abs().max().item())
    expertopt.updates.muon.orthogonalize = kernel
    routing = {
        name: (group["use_muon"], group["expert"])
        for group in engine.basic_optimizer.param_groups
        for name in group["param_names"]
    }
    return {
        "routing": routing,
        "weight_error": weight_error,
        "gradient_error": {k: max(e[k] for e in gradient_errors) for k in ("dense", "expert")},
        "moved": moved,
        "owned": engine.basic_optimizer.owned_matrices() if kind == "Muon" else 0,
        "ns_matrices_per_step": counting["matrices"] / STEPS,
        "ref_norm": ref_norm,
        "ds_norm": float(engine.get_global_grad_norm()) if stage in (1, 2) or clipping else None,
    }


def _train_and_compare(rank: int, world_size: int, ep_size: int, cases: list[tuple], directory: str) -> dict:
    import deepspeed

    assert world_size == WORLD
    deepspeed.init_distributed(dist_backend="gloo")
    results = {case: _run_case(rank, ep_size, *case) for case in cases}
    if ep_size == 2:
        results["reshard"] = {
            stage: _load_at_another_ep(rank, stage, f"{directory}/s{stage}") for stage in (0, 2)
        }
    return results


def _one_step_engine(rank: int, ep_size: int, stage: int, steps: int = 1):
    torch.manual_seed(0)
    engine, *_ = expertopt.initialize(model=_Net(ep_size), config=_ds_config("Muon", stage, 1, 0.0))
    if not steps:
        return engine
    x, y = _global_batch(0, 0)
    rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
    engine.backward(_loss(engine, x[rows], y[rows]))
    engine.step()
    return engine


def _load_at_another_ep(rank: int, stage: int, directory: str) -> dict:
    """Save at EP=2, load at EP=4 (same world, same ZeRO stage): a clear error for the optimizer
    state (F9); the weights alone still load."""
    saved = _one_step_engine(rank, 2, stage)
    saved.save_checkpoint(directory, tag="t")
    other = _one_step_engine(rank, 4, stage)
    errors = []
    for args, kwargs in ((("t",), {}), (("t", True, True), {})):  # options by keyword or by position
        try:
            other.load_checkpoint(directory, *args, **kwargs)
            errors.append(None)
        except ValueError as caught:
            errors.append(str(caught))
    error, positional_error = errors
    fresh = _one_step_engine(rank, 4, stage, steps=0)  # initial weights: only a load moves them
    path, _ = fresh.load_checkpoint(
        directory, tag="t", load_optimizer_states=False, load_lr_scheduler_states=False
    )
    dense = {n: p for n, p in saved.module.named_parameters() if ".experts." not in n}
    loaded = {n: p for n, p in fresh.module.named_parameters() if ".experts." not in n}
    same = all(torch.equal(dense[n], loaded[n]) for n in dense)
    return {"error": error, "positional_error": positional_error, "weights_loaded": path is not None and same}


CASES = [
    (kind, stage, accumulation, 0.0)
    for kind in ("Muon", "AdamW")
    for stage in (0, 1, 2)
    for accumulation in (1, 2)
] + [("Muon", 2, 1, 0.05), ("Muon", 0, 1, 0.05), ("AdamW", 0, 2, 0.05)]  # clipping active: global norm ~1-2


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda ep: f"ep{ep}")
def expert_parallel_run(request, tmp_path_factory):
    ep_size = request.param
    return ep_size, run_ranks(_train_and_compare, WORLD, ep_size, CASES, str(tmp_path_factory.mktemp("ckpt")))


def test_expert_parallel_matches_single_process_reference(expert_parallel_run):
    ep_size, per_rank = expert_parallel_run
    for case in CASES:
        results = [r[case] for r in per_rank]
        print(
            f"ep={ep_size} {case}: weight error "
            f"{max(r['weight_error']['dense'] for r in results):.2e} (dense) "
            f"{max(r['weight_error']['expert'] for r in results):.2e} (experts); gradient error "
            f"{max(r['gradient_error']['dense'] for r in results):.2e} (dense) "
            f"{max(r['gradient_error']['expert'] for r in results):.2e} (experts); "
            f"norm {results[0]['ds_norm']} vs {results[0]['ref_norm']}"
        )
        for rank, result in enumerate(results):
            where = (ep_size, case, rank, result)
            assert min(result["moved"].values()) > 1e-3, f"the reference did not train: {where}"
            assert max(result["weight_error"].values()) < WEIGHT_TOLERANCE, where
            assert max(result["gradient_error"].values()) < GRADIENT_TOLERANCE, where
        kind, stage, _, clipping = case
        for result in results:
            # Routing: 2-D weights to Muon (router wg and each expert matrix included) except the
            # head; biases and the head to AdamW; experts (allreduce=False) in expert groups.
            expected = {
                name: (
                    kind == "Muon" and name.endswith("weight") and not name.startswith("head"),
                    ".experts." in name,
                )
                for name in result["routing"]
            }
            assert result["routing"] == expected, (ep_size, case)
            assert len(expected) == 2 + 1 + 4 * EXPERTS // ep_size + 2
        if stage in (1, 2) or clipping:
            # The global norm used to clip is the true one, every expert counted once (F4): DeepSpeed's
            # at ZeRO-1/2, expertopt's at ZeRO-0 (DeepSpeed's averages per-rank norms there).
            for result in results:
                assert result["ds_norm"] == pytest.approx(result["ref_norm"], rel=1e-5), (ep_size, case)
        if clipping:
            assert min(r["ref_norm"] for r in results) > 2 * clipping, "clipping was not active"
        if kind == "Muon":
            # Newton-Schulz runs once per matrix across the world, at ZeRO-0 too (owners, then an
            # all-gather): dense matrices once over DP, each EDP group's experts once over EDP.
            counts = [r["ns_matrices_per_step"] for r in results]
            assert sum(counts) == DENSE_MUON_MATRICES + EXPERT_MUON_MATRICES, (ep_size, case, counts)
        if kind == "Muon" and stage in (1, 2):
            # Each Muon matrix has one owner. Dense matrices are sharded over all 4 ranks; each EDP
            # group ([0,1,2,3] at EP=1, [0,2] and [1,3] at EP=2, single ranks at EP=4) holds a
            # distinct set of global experts (EP rank k holds experts k*local..), and together the
            # EDP groups hold every global expert once: dense + all global expert matrices.
            owned = sum(r["owned"] for r in results)
            assert owned == DENSE_MUON_MATRICES + EXPERT_MUON_MATRICES, (ep_size, case, owned)


def test_loading_optimizer_state_at_another_ep_size_is_a_clear_error(expert_parallel_run):
    ep_size, per_rank = expert_parallel_run
    if ep_size != 2:
        pytest.skip("checked in the EP=2 launch (saved at EP=2, loaded at EP=4)")
    for stage in (0, 2):
        for result in (r["reshard"][stage] for r in per_rank):
            assert result["error"] is not None, f"ZeRO-{stage}: loaded optimizer state across EP sizes"
            assert "expert_groups: saved ['ep_size_2'], now ['ep_size_4']" in result["error"]
            assert "load_optimizer_states=False" in result["error"]
            assert result["positional_error"] == result["error"]
            assert result["weights_loaded"], f"ZeRO-{stage}: weights-only load failed (dense weights differ)"
