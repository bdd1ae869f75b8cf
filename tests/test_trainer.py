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

import tempfile

import pytest
import torch
from distributed import run_ranks

import expertopt
from expertopt.integrations.hf import MuonFactory

transformers = pytest.importorskip("transformers")

VOCAB, SEQ_LEN, SEQUENCES = 16, 16, 8
STEPS, WARMUP = 5, 2
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
