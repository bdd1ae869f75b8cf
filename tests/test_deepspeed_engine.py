"""expertopt inside a DeepSpeed engine: config parsing, checkpoints, schedulers, bf16.

Multi-rank checks share one 2-rank launch (DeepSpeed start-up costs seconds per process).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ToyMoE
from distributed import run_ranks
from torch.optim.lr_scheduler import LambdaLR

import expertopt
from expertopt.integrations.deepspeed import parse_optimizer_config

MICRO_BATCH = 2


def _config(stage: int, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "Muon", "params": {"lr": 0.02, "adamw_lr": 4e-3, "expert_lr_mult": 0.5}},
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        **extra,
    }


def _train(engine, rank: int, steps: range) -> None:
    for step in steps:
        tokens = torch.randint(0, 32, (2 * MICRO_BATCH, 8), generator=torch.Generator().manual_seed(step))
        local = tokens[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        logits = engine(local)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), local[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()


def _engine(config: dict, **kwargs):
    torch.manual_seed(0)
    engine, *_ = expertopt.initialize(model=ToyMoE(), config=config, **kwargs)
    return engine


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def _checkpoint_round_trip(rank: int, stage: int, directory: str) -> bool:
    uninterrupted = _engine(_config(stage))
    _train(uninterrupted, rank, range(4))
    first = _engine(_config(stage))
    _train(first, rank, range(2))
    first.save_checkpoint(directory, tag=f"stage{stage}")
    resumed = _engine(_config(stage))
    resumed.load_checkpoint(directory, tag=f"stage{stage}")
    _train(resumed, rank, range(2, 4))
    return all(torch.equal(a, b) for a, b in zip(_weights(uninterrupted), _weights(resumed), strict=True))


def _lrs_by_group(engine) -> dict[str, float]:
    optimizer = engine.basic_optimizer
    return {g["name"]: lr for g, lr in zip(optimizer.param_groups, optimizer.effective_lrs(), strict=True)}


def _engine_checks(rank: int, world_size: int, directory: str) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {f"resume_stage{s}": _checkpoint_round_trip(rank, s, f"{directory}/s{s}") for s in (0, 1, 2)}

    # DeepSpeed's WarmupLR from the config writes one lr into every group; ratios survive (F2).
    scheduled = _engine(
        _config(
            2,
            scheduler={
                "type": "WarmupLR",
                "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.03, "warmup_num_steps": 2},
            },
        )
    )
    _train(scheduled, rank, range(3))
    results["warmup_lrs"] = _lrs_by_group(scheduled)

    # A scheduler object (built on the engine's optimizer) drives expert groups too (F1).
    decayed = _engine(_config(1), lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda t: 0.5**t))
    _train(decayed, rank, range(3))
    results["lambda_lrs"] = _lrs_by_group(decayed)

    # bf16 with fp32 master weights at ZeRO-2: trains, stays finite.
    bf16 = _engine(_config(2, bf16={"enabled": True}))
    before = _weights(bf16)
    _train(bf16, rank, range(2))
    after = _weights(bf16)
    results["bf16_finite_and_moved"] = all(torch.isfinite(p).all() for p in after) and any(
        not torch.equal(a, b) for a, b in zip(before, after, strict=True)
    )
    return results


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    return run_ranks(_engine_checks, 2, str(tmp_path_factory.mktemp("checkpoints")))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_checkpoint_resume_is_bit_identical(engine_results, stage):
    assert all(r[f"resume_stage{stage}"] for r in engine_results)


def test_config_scheduler_keeps_muon_adamw_and_expert_ratios(engine_results):
    for lrs in (r["warmup_lrs"] for r in engine_results):
        assert lrs["muon"] == pytest.approx(0.03)
        assert lrs["adamw"] == pytest.approx(0.03 * 4e-3 / 0.02)
        assert lrs["expert_muon"] == pytest.approx(0.03 * 0.5)


def test_scheduler_object_drives_expert_groups(engine_results):
    for lrs in (r["lambda_lrs"] for r in engine_results):
        assert lrs["muon"] == pytest.approx(0.02 * 0.5**3)
        assert lrs["expert_muon"] == pytest.approx(0.02 * 0.5**3 * 0.5)


def test_bf16_with_fp32_master_weights(engine_results):
    assert all(r["bf16_finite_and_moved"] for r in engine_results)


# -- config parsing (no processes) --------------------------------------------------------------
def test_unknown_optimizer_param_is_an_error():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['momentun'\]; allowed: \[.*'momentum'"):
        parse_optimizer_config({"type": "Muon", "params": {"momentun": 0.9}})
    with pytest.raises(ValueError, match=r'"optimizer" has unknown key\(s\) \[\'param\'\]'):
        parse_optimizer_config({"type": "AdamW", "param": {}})


def test_optimizer_params_are_routed():
    spec = parse_optimizer_config(
        {
            "type": "muon",
            "params": {"muon_lr": 0.02, "adam_lr": 3e-4, "ns_method": "gram", "betas": [0.9, 0.95]},
        }
    )
    assert spec.kind == "muon"
    assert spec.group_options == {"lr": 0.02, "adamw_lr": 3e-4}
    assert spec.optimizer_options == {"ns_method": "gram", "betas": [0.9, 0.95]}
    assert parse_optimizer_config({"type": "Adam"}) is None  # DeepSpeed's own optimizers pass through


def test_zero3_settings_double_optimizer_and_no_grad_norm_are_refused():
    forced_all_reduce = _config(3)
    forced_all_reduce["zero_optimization"]["reduce_scatter"] = False
    with pytest.raises(ValueError, match='reduce_scatter": false doubles the gradient bytes'):
        expertopt.initialize(model=ToyMoE(), config=forced_all_reduce)
    no_norm = _config(2, gradient_clipping=0.0)
    no_norm["zero_optimization"]["compute_grad_norm"] = False
    with pytest.raises(ValueError, match='remove "compute_grad_norm"'):
        expertopt.initialize(model=ToyMoE(), config=no_norm)
    with pytest.raises(ValueError, match="an optimizer was passed too"):
        expertopt.initialize(
            model=ToyMoE(), optimizer=torch.optim.SGD(ToyMoE().parameters(), lr=0.1), config=_config(0)
        )


def _optimizer_state(engine) -> list[torch.Tensor]:
    state = engine.basic_optimizer.state
    return [v.clone() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _poisoned_step(rank: int, **extra) -> dict:
    engine = _engine(_config(2, **extra))
    _train(engine, rank, range(1))
    before, state_before = _weights(engine), _optimizer_state(engine)
    zero = engine.optimizer
    # The first parameter of the first Muon group lives at the start of rank 0's partition only.
    group = next(i for i, g in enumerate(engine.basic_optimizer.param_groups) if g["use_muon"])
    poisoned = zero.round_robin_bit16_groups[group][0]
    poisoned.register_hook(lambda grad: grad * float("nan"))
    _train(engine, rank, range(1, 2))
    return {
        "deepspeed_skipped": engine.skipped_steps,
        "expertopt_skipped": engine.basic_optimizer.nonfinite_steps,
        "weights_unchanged": all(torch.equal(a, b) for a, b in zip(before, _weights(engine), strict=True)),
        "state_unchanged": all(
            torch.equal(a, b) for a, b in zip(state_before, _optimizer_state(engine), strict=True)
        ),
        "holds_poison": zero.round_robin_bit16_offsets[group][0] < zero.partition_size[group] * (rank + 1)
        and rank == 0,
    }


def _nonfinite_on_one_partition(rank: int, world_size: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {
        "fp32": _poisoned_step(rank, gradient_clipping=0.0),
        # DeepSpeed 0.19.8 steps on non-finite gradients here; expertopt must skip, everywhere.
        "bf16_unchecked": _poisoned_step(rank, bf16={"enabled": True, "check_grad_overflow": False}),
    }


def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere():
    results = run_ranks(_nonfinite_on_one_partition, 2)
    for case in ("fp32", "bf16_unchecked"):
        ranks = [r[case] for r in results]
        assert [r["holds_poison"] for r in ranks] == [True, False], case
        assert all(r["weights_unchanged"] and r["state_unchanged"] for r in ranks), (case, ranks)
    # fp32: DeepSpeed skips by itself and expertopt's guard never sees the step.
    assert [r["fp32"]["deepspeed_skipped"] for r in results] == [1, 1]
    # bf16 unchecked: DeepSpeed steps; expertopt skips every group on every rank, on DeepSpeed's
    # global norm, and counts one step although DeepSpeed steps the optimizer group by group.
    assert [r["bf16_unchecked"]["deepspeed_skipped"] for r in results] == [0, 0]
    assert [r["bf16_unchecked"]["expertopt_skipped"] for r in results] == [1, 1]


def test_zero0_newton_schulz_mode_is_checked():
    spec = parse_optimizer_config({"type": "Muon", "params": {"zero0_newton_schulz": "redundant"}})
    assert spec.engine_options == {"zero0_newton_schulz": "redundant"}
    assert spec.optimizer_options == {}
    with pytest.raises(ValueError, match=r"zero0_newton_schulz\" must be one of \('owners', 'redundant'\)"):
        parse_optimizer_config({"type": "Muon", "params": {"zero0_newton_schulz": "owner"}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['zero0_newton_schulz'\]"):
        parse_optimizer_config({"type": "AdamW", "params": {"zero0_newton_schulz": "owners"}})
