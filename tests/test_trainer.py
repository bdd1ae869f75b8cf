"""The Hugging Face Trainer with expertopt, run for real on a tiny Qwen3-MoE built from a config.

Without DeepSpeed the Trainer builds the optimizer through transformers' factory hook
(``optimizer_cls_and_kwargs=(MuonFactory, kwargs)``). Checked: the optimizer is expertopt's with
the expert groups and lr ratios of ``build_param_groups``; the Trainer's scheduler moves every
group's lr, experts included; the loss falls; and the weights after the Trainer's steps equal a
hand-written loop (same model, groups, schedule, clipping, global batch) with expertopt's
optimizer, single process and DDP on 2 gloo ranks.

The data: 8 Fibonacci-mod-16 sequences, one global batch per step (the whole set), so every step
sees the same tokens and the loss must fall. Newton-Schulz in fp32 for parity (BRIEF section 6).
Tolerance 2e-5: reduction order (DDP averages two half-batch gradients) through fp32
Newton-Schulz; measured below 1e-6.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch
from distributed import run_ranks

import expertopt
from expertopt.integrations.hf import MuonFactory

transformers = pytest.importorskip("transformers")

VOCAB, SEQ_LEN, SEQUENCES = 16, 16, 8
STEPS, WARMUP = 5, 2
SAVE_STEP = 2  # resumed runs restart from the checkpoint written after this step
LR, ADAMW_LR, MAX_GRAD_NORM = 0.02, 3e-3, 1.0
FACTORY_KWARGS = {"lr": LR, "adamw_lr": ADAMW_LR, "ns_dtype": "float32"}
TOLERANCE = 2e-5


def tiny_qwen3_moe() -> torch.nn.Module:
    """Qwen3-MoE, 2 layers, 4 experts of width 16, top-2: fused ``gate_up_proj [E, 2I, H]`` experts."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config)


def fibonacci_dataset() -> list[dict[str, torch.Tensor]]:
    """Sequences ``x[t] = (x[t-1] + x[t-2]) % VOCAB`` from random seeds; the seeds are not targets."""
    generator = torch.Generator().manual_seed(0)
    sequences = torch.empty(SEQUENCES, SEQ_LEN, dtype=torch.long)
    sequences[:, :2] = torch.randint(0, VOCAB, (SEQUENCES, 2), generator=generator)
    for t in range(2, SEQ_LEN):
        sequences[:, t] = (sequences[:, t - 1] + sequences[:, t - 2]) % VOCAB
    labels = sequences.clone()
    labels[:, :2] = -100
    return [{"input_ids": s, "labels": y} for s, y in zip(sequences, labels, strict=True)]


class RecordGroupLrs(transformers.TrainerCallback):
    """Each group's lr and effective lr (lr * lr_mult) after every step, as the next step will use them."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.effective: list[list[float]] = []

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wrapper
        self.lrs.append([float(group["lr"]) for group in inner.param_groups])
        self.effective.append(inner.effective_lrs())


def training_args(output_dir: str, per_device_batch: int, **overrides) -> transformers.TrainingArguments:
    options = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=STEPS,
        warmup_steps=WARMUP,
        lr_scheduler_type="linear",
        max_grad_norm=MAX_GRAD_NORM,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def train_with_factory(per_device_batch: int) -> tuple[transformers.Trainer, RecordGroupLrs]:
    recorder = RecordGroupLrs()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = transformers.Trainer(
            model=tiny_qwen3_moe(),
            args=training_args(output_dir, per_device_batch),
            train_dataset=fibonacci_dataset(),
            optimizer_cls_and_kwargs=(MuonFactory, dict(FACTORY_KWARGS)),
            callbacks=[recorder],
        )
        trainer.train()
    return trainer, recorder


def reference_weights() -> dict[str, torch.Tensor]:
    """The same training written by hand: expertopt's groups and optimizer, transformers' linear
    schedule, torch's clipping, the whole data set as one batch per step."""
    model = tiny_qwen3_moe()
    groups = expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR)
    optimizer = expertopt.MoEOptimizer.from_groups(groups, expertopt.Muon, lr=LR, ns_dtype="float32")
    scheduler = transformers.get_scheduler(
        "linear", optimizer, num_warmup_steps=WARMUP, num_training_steps=STEPS
    )
    batch = torch.utils.data.default_collate(fibonacci_dataset())
    for _ in range(STEPS):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trained_weights(trainer: transformers.Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=TOLERANCE, rtol=0, msg=name)


def losses(trainer: transformers.Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# -- the factory alone ----------------------------------------------------------------------------
def test_factory_routes_qwen3_moe_like_build_param_groups():
    model = tiny_qwen3_moe()
    optimizer = MuonFactory()(model, **FACTORY_KWARGS, expert_lr_mult=0.5)
    assert isinstance(optimizer, expertopt.MoEOptimizer)
    expected = expertopt.build_param_groups(model, lr=LR, adamw_lr=ADAMW_LR, expert_lr_mult=0.5)
    assert [g["param_names"] for g in optimizer.param_groups] == [
        g["param_names"] for g in sorted(expected, key=lambda g: g["expert"])
    ]
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["expert_muon"]["param_names"] == [
        f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")
    ]
    assert by_name["expert_muon"]["link"] == "muon"
    # The router is a Muon matrix; embeddings and the head AdamW at adamw_lr / lr.
    assert "model.layers.0.mlp.gate.weight" in by_name["muon"]["param_names"]
    assert by_name["adamw"]["param_names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert optimizer.effective_lrs() == pytest.approx(
        [LR * {"muon": 1.0, "expert_muon": 0.5}.get(g["name"], ADAMW_LR / LR) for g in optimizer.param_groups]
    )
    assert optimizer.dense.defaults["ns_dtype"] == "float32"


def test_import_expertopt_imports_no_transformers():
    code = "import sys, expertopt; assert expertopt.MuonFactory; print('transformers' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "False"


def test_factory_without_experts_returns_muon():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    optimizer = MuonFactory()(model, lr=0.01)
    assert type(optimizer) is expertopt.Muon
    assert [g["name"] for g in optimizer.param_groups] == ["muon", "adamw_no_decay"]


def test_factory_errors_name_the_fix():
    model = tiny_qwen3_moe()
    with pytest.raises(TypeError, match=r"needs lr.*optimizer_cls_and_kwargs"):
        MuonFactory()(model)
    with pytest.raises(TypeError, match=r"unknown options \['learning_rate'\]"):
        MuonFactory()(model, lr=LR, learning_rate=LR)
    with pytest.raises(TypeError, match="expects the model"):
        MuonFactory()(list(model.parameters()), lr=LR)


# -- the Trainer, single process and DDP ----------------------------------------------------------
def check_trained(trainer: transformers.Trainer, recorder: RecordGroupLrs) -> None:
    optimizer = trainer.optimizer.optimizer  # under accelerate's AcceleratedOptimizer
    assert isinstance(optimizer, expertopt.MoEOptimizer)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == ["adamw", "muon", "adamw_no_decay", "expert_muon"]
    # The linear schedule (warmup 2, then decay to 0 at step 5), in every group, experts included.
    schedule = [LR * min(s / WARMUP, (STEPS - s) / (STEPS - WARMUP)) for s in range(1, STEPS + 1)]
    assert recorder.lrs == [pytest.approx([lr] * len(names)) for lr in schedule]
    ratios = [ADAMW_LR / LR, 1.0, ADAMW_LR / LR, 1.0]
    assert recorder.effective == [pytest.approx([lr * r for r in ratios]) for lr in schedule]
    history = losses(trainer)
    assert len(history) == STEPS
    assert history[-1] < history[0] - 0.1, history


def test_trainer_single_process_with_factory():
    trainer, recorder = train_with_factory(per_device_batch=SEQUENCES)
    check_trained(trainer, recorder)
    assert_same_weights(trained_weights(trainer), reference_weights())


def _ddp_rank(rank: int, world_size: int) -> dict:
    trainer, recorder = train_with_factory(per_device_batch=SEQUENCES // world_size)
    assert trainer.args.parallel_mode == transformers.training_args.ParallelMode.DISTRIBUTED
    check_trained(trainer, recorder)
    return trained_weights(trainer)


@pytest.mark.slow
def test_trainer_ddp_with_factory_matches_single_process():
    results = run_ranks(_ddp_rank, 2)
    expected = reference_weights()
    for weights in results:
        assert_same_weights(weights, expected)


def train_with_factory_saving(output_dir: str, resume_from: str | None = None) -> transformers.Trainer:
    """The single-process factory run, saving a checkpoint every SAVE_STEP steps.

    transformers 5.24's Trainer saves a checkpoint with ``save_pretrained``, which by default
    converts fused experts back to the hub's per-expert keys (``save_original_format=True``), and
    resumes with a plain ``load_state_dict(strict=False)`` that does not convert them: the expert
    weights are silently not restored ("missing keys" warning). Saving the training layout avoids
    that transformers bug; the optimizer side is what this run checks.
    """
    model = tiny_qwen3_moe()
    model.save_pretrained = functools.partial(model.save_pretrained, save_original_format=False)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(output_dir, SEQUENCES, save_strategy="steps", save_steps=SAVE_STEP),
        train_dataset=fibonacci_dataset(),
        optimizer_cls_and_kwargs=(MuonFactory, dict(FACTORY_KWARGS)),
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


@pytest.mark.slow
def test_trainer_factory_resume_continues_bit_identically(tmp_path):
    """The Trainer saves MoEOptimizer's state in torch's layout (optimizer.pt) and resumes from it:
    same weights, bit for bit, as the run that was never interrupted (issue 10)."""
    uninterrupted = train_with_factory_saving(str(tmp_path / "a"))
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE_STEP}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert set(saved) == {"state", "param_groups"}
    assert [g["name"] for g in saved["param_groups"]] == ["adamw", "muon", "adamw_no_decay", "expert_muon"]
    indices = [i for g in saved["param_groups"] for i in g["params"]]
    assert indices == list(range(len(indices))) == sorted(saved["state"])  # one index space
    experts = saved["param_groups"][-1]
    assert all(saved["state"][i]["momentum_buffer"].ndim == 3 for i in experts["params"])

    resumed = train_with_factory_saving(str(tmp_path / "b"), resume_from=str(checkpoint))
    assert resumed.state.global_step == STEPS
    assert losses(resumed) == losses(uninterrupted)  # the Trainer keeps the saved history
    expected = trained_weights(uninterrupted)
    for name, value in trained_weights(resumed).items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)


# -- the Trainer with a DeepSpeed config: ZeRO-2, AutoEP EP=2, config optimizer "Muon" ---------------
AUTOEP_SIZE = 2


def deepspeed_config(scheduler_block: bool, stage: int = 2) -> dict:
    """ZeRO-2 (or 3, every parameter partitioned) with AutoEP over both ranks; "auto" values are
    filled by the Trainer from its arguments."""
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage}
        | ({"stage3_param_persistence_threshold": 0} if stage == 3 else {}),
        "expert_parallel": {"enabled": True, "autoep_size": AUTOEP_SIZE, "preset_model": "qwen3_moe"},
        "optimizer": {
            "type": "Muon",
            "params": {"lr": "auto", "weight_decay": "auto", "adamw_lr": ADAMW_LR, "ns_dtype": "float32"},
        },
        "steps_per_print": 10**9,
    }
    if scheduler_block:
        config["scheduler"] = {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": "auto",
                "warmup_max_lr": "auto",
                "warmup_num_steps": "auto",
                "total_num_steps": "auto",
                "warmup_type": "linear",
            },
        }
    return config


class RecordEngineGroups(transformers.TrainerCallback):
    """Each group's lr and effective lr of the expertopt optimizer inside the DeepSpeed engine."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.effective: list[list[float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        groups = basic_optimizer(optimizer).param_groups
        self.lrs.append([float(group["lr"]) for group in groups])
        self.effective.append([expertopt.effective_lr(group) for group in groups])


def basic_optimizer(optimizer):
    """expertopt's optimizer under accelerate's wrapper and DeepSpeed's ZeRO optimizer."""
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def train_with_deepspeed(
    output_dir: str, scheduler_block: bool, resume_from: str | None = None, stage: int = 2
):
    expertopt.patch_deepspeed()
    recorder = RecordEngineGroups()
    args = training_args(
        output_dir,
        SEQUENCES // AUTOEP_SIZE,
        deepspeed=deepspeed_config(scheduler_block, stage),
        learning_rate=LR,
        weight_decay=0.1,
        save_strategy="steps",
        save_steps=SAVE_STEP,
    )
    trainer = transformers.Trainer(
        model=tiny_qwen3_moe(), args=args, train_dataset=fibonacci_dataset(), callbacks=[recorder]
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer, recorder


def engine_summary(trainer, recorder) -> dict:
    """What the checks need, in plain data: optimizer class, groups and their parameters, lrs, weights."""
    engine = trainer.model_wrapped
    zero = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    autoep = {n for n, p in engine.module.named_parameters() if is_autoep_expert(p)}
    return {
        "optimizer": type(engine.basic_optimizer),
        "groups": [
            {"name": g["name"], "moe": g.get("moe", False), "params": [names[id(p)] for p in params]}
            for g, params in zip(engine.basic_optimizer.param_groups, zero.bit16_groups, strict=True)
        ],
        "autoep_experts": autoep,
        "lrs": recorder.lrs,
        "effective": recorder.effective,
        "losses": losses(trainer),
        "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
    }


def zero3_summary(trainer, recorder) -> dict:
    """At ZeRO-3 (the Trainer builds the model under ``deepspeed.zero.Init``): optimizer class,
    how dense Muon gradients reach their owners, lrs, losses and the gathered weights."""
    import deepspeed

    engine = trainer.model_wrapped
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        weights = {n: p.detach().clone() for n, p in params.items()}
    units = engine.basic_optimizer.shard_units
    return {
        "optimizer": type(engine.basic_optimizer),
        "units_to_owner": sum(u.gradients_at_owner for u in units),
        "lrs": recorder.lrs,
        "losses": losses(trainer),
        "weights": weights,
    }


def is_autoep_expert(param: torch.Tensor) -> bool:
    return getattr(param, "ds_zero_placement_family", None) == "autoep_expert"


def _autoep_rank(rank: int, world_size: int, shared_dir: str) -> dict:
    uninterrupted = engine_summary(*train_with_deepspeed(f"{shared_dir}/a", scheduler_block=False))
    resumed = engine_summary(
        *train_with_deepspeed(
            f"{shared_dir}/b", scheduler_block=False, resume_from=f"{shared_dir}/a/checkpoint-{SAVE_STEP}"
        )
    )
    ds_scheduled = engine_summary(*train_with_deepspeed(f"{shared_dir}/c", scheduler_block=True))
    refusal = factory_refusal_under_deepspeed(f"{shared_dir}/d")
    zero3 = zero3_summary(*train_with_deepspeed(f"{shared_dir}/e", scheduler_block=False, stage=3))
    return {
        "zero3": zero3,
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "ds_scheduled": ds_scheduled,
        "refusal": refusal,
    }


def factory_refusal_under_deepspeed(output_dir: str) -> str:
    """A DeepSpeed config without "optimizer" makes the Trainer call the factory; ZeRO would then
    step expertopt's optimizer on flat partitions, so the factory must refuse before any step."""
    config = deepspeed_config(scheduler_block=False)
    del config["optimizer"]
    trainer = transformers.Trainer(
        model=tiny_qwen3_moe(),
        args=training_args(output_dir, SEQUENCES // AUTOEP_SIZE, deepspeed=config, learning_rate=LR),
        train_dataset=fibonacci_dataset(),
        optimizer_cls_and_kwargs=(MuonFactory, dict(FACTORY_KWARGS)),
    )
    with pytest.raises(ValueError) as error:
        trainer.train()
    return str(error.value)


@pytest.fixture(scope="module")
def autoep_runs():
    with tempfile.TemporaryDirectory() as shared_dir:
        return run_ranks(_autoep_rank, AUTOEP_SIZE, shared_dir)


DENSE_GROUPS = ["adamw", "muon", "adamw_no_decay"]
# Effective lr over scheduled lr, by group: AdamW groups at adamw_lr / lr, Muon and expert Muon at 1.
RATIOS = [ADAMW_LR / LR, 1.0, ADAMW_LR / LR, 1.0]


@pytest.mark.slow
def test_deepspeed_trainer_builds_expertopt_with_autoep_expert_groups(autoep_runs):
    for rank_runs in autoep_runs:
        summary = rank_runs["uninterrupted"]
        assert summary["optimizer"] is expertopt.Muon  # not DeepSpeed's MuonWithAuxAdam
        groups = summary["groups"]
        assert [g["name"] for g in groups if not g["moe"]] == DENSE_GROUPS
        experts = [name for g in groups if g["moe"] for name in g["params"]]
        # AutoEP's own tensors (split w1/w3 and w2), each in an expert group, none in a dense one.
        assert sorted(experts) == sorted(summary["autoep_experts"])
        assert sorted(experts) == [f"model.layers.{i}.mlp.experts.w{j}" for i in range(2) for j in (1, 2, 3)]
        muon = next(g for g in groups if g["name"] == "muon")
        assert "model.layers.0.mlp.router.gate.weight" in muon["params"]  # AutoEP moved it


@pytest.mark.slow
def test_deepspeed_trainer_at_zero3_trains_like_zero2(autoep_runs):
    """The same Trainer run at ZeRO-3 (parameters partitioned, AutoEP experts replicated over EDP,
    dense Muon gradients reduced to their owners) lands where ZeRO-2 does."""
    for rank_runs in autoep_runs:
        zero2, zero3 = rank_runs["uninterrupted"], rank_runs["zero3"]
        assert zero3["optimizer"] is expertopt.Muon
        assert zero3["units_to_owner"] > 0
        assert zero3["lrs"] == zero2["lrs"]
        assert zero3["losses"] == pytest.approx(zero2["losses"], rel=1e-5)
        for name, value in zero2["weights"].items():
            torch.testing.assert_close(zero3["weights"][name], value, atol=TOLERANCE, rtol=0, msg=name)


@pytest.mark.slow
def test_deepspeed_trainer_scheduler_drives_every_group(autoep_runs):
    schedule = [LR * min(s / WARMUP, (STEPS - s) / (STEPS - WARMUP)) for s in range(1, STEPS + 1)]
    for rank_runs in autoep_runs:
        summary = rank_runs["uninterrupted"]
        assert summary["lrs"] == [pytest.approx([lr] * len(RATIOS)) for lr in schedule]
        assert summary["effective"] == [pytest.approx([lr * r for r in RATIOS]) for lr in schedule]
        history = summary["losses"]
        assert len(history) == STEPS
        assert history[-1] < history[0] - 0.1, history


def deepspeed_warmup_decay_lrs() -> list[float]:
    """DeepSpeed's own WarmupDecayLR on a one-parameter SGD, stepped once per training step."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = WarmupDecayLR(
        optimizer, total_num_steps=STEPS, warmup_min_lr=0, warmup_max_lr=LR, warmup_num_steps=WARMUP,
        warmup_type="linear",
    )  # fmt: skip
    lrs = []
    for _ in range(STEPS):
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.slow
def test_deepspeed_scheduler_block_drives_every_group(autoep_runs):
    schedule = deepspeed_warmup_decay_lrs()
    assert max(schedule) == pytest.approx(LR)  # the reference warms up and decays: not a constant
    for rank_runs in autoep_runs:
        summary = rank_runs["ds_scheduled"]
        # WarmupDecayLR writes one lr into every group; lr_mult keeps the AdamW and expert ratios (F2).
        assert summary["lrs"] == [pytest.approx([lr] * len(RATIOS)) for lr in schedule]
        assert summary["effective"] == [pytest.approx([lr * r for r in RATIOS]) for lr in schedule]
        assert summary["losses"][-1] < summary["losses"][0] - 0.05, summary["losses"]


@pytest.mark.slow
def test_factory_under_deepspeed_refuses_with_the_fix(autoep_runs):
    for rank_runs in autoep_runs:
        assert rank_runs["refusal"].startswith("MuonFactory is for the Trainer without DeepSpeed")
        assert "expertopt.patch_deepspeed()" in rank_runs["refusal"]


@pytest.mark.slow
def test_deepspeed_trainer_resume_continues_identically(autoep_runs):
    for rank_runs in autoep_runs:
        uninterrupted, resumed = rank_runs["uninterrupted"], rank_runs["resumed"]
        # The resumed run stepped only after the checkpoint, from the saved schedule position.
        assert resumed["lrs"] == uninterrupted["lrs"][SAVE_STEP:]
        assert resumed["losses"] == uninterrupted["losses"]  # the Trainer keeps the saved history
        # Same tensors, same operations in the same order: bitwise equal (measured: 0.0).
        for name, value in uninterrupted["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], value, atol=0, rtol=0, msg=name)
    # Each rank holds its own experts (EP=2): the ranks' expert weights differ, dense ones agree.
    rank0, rank1 = (r["uninterrupted"]["weights"] for r in autoep_runs)
    assert not torch.equal(rank0["model.layers.0.mlp.experts.w1"], rank1["model.layers.0.mlp.experts.w1"])
    torch.testing.assert_close(rank0["lm_head.weight"], rank1["lm_head.weight"], atol=0, rtol=0)


# -- docs/trainer.md runs as written --------------------------------------------------------------
def docs_snippets() -> list[str]:
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "trainer.md")
    with open(path) as handle:
        text = handle.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_docs_factory_snippet_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet writes to "out"
    namespace = {"model": tiny_qwen3_moe(), "dataset": fibonacci_dataset()}
    exec(docs_snippets()[0], namespace)
    trainer = namespace["trainer"]
    assert isinstance(trainer.optimizer.optimizer, expertopt.MoEOptimizer)
    assert trainer.state.global_step == STEPS


def test_docs_deepspeed_snippet_matches_the_tested_config():
    snippet = docs_snippets()[1]
    config_source = re.search(r"^ds_config = \{.*?^\}", snippet, flags=re.DOTALL | re.MULTILINE).group(0)
    namespace: dict = {}
    exec(config_source, namespace)
    tested = deepspeed_config(scheduler_block=False)
    del tested["steps_per_print"], tested["optimizer"]["params"]["ns_dtype"]  # test-only settings
    assert namespace["ds_config"] == tested
    assert "expertopt.patch_deepspeed()" in snippet
