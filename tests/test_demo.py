"""The demo (``python -m expertopt demo``): its data, settings, counters, a short distributed run,
the CLI; and the built-in TinyMoE that ``python -m expertopt groups`` shows."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import expertopt
from expertopt.cli import main
from expertopt.demo import PLOT_NAME, RESULTS_NAME, run_demo
from expertopt.demo_config import DemoConfig
from expertopt.demo_data import HELDOUT_MODULUS, load_stdlib_corpus, stdlib_files
from expertopt.demo_models import build_model
from expertopt.kernels import ns_flops, resolve_ns_method
from expertopt.models import IGNORE_INDEX, TinyMoE, TinyMoEConfig, make_batch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread, as the demo uses: tiny matrices, and a busy CI core stalls two threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model() -> TinyMoE:
    torch.manual_seed(0)
    return TinyMoE()


def test_forward_backward_reaches_every_parameter(model: TinyMoE) -> None:
    inputs, targets = make_batch(model.config, 8, torch.Generator().manual_seed(0))
    logits = model(inputs)
    assert logits.shape == (8, model.config.seq_len, model.config.vocab)
    loss = model.loss(inputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []  # router and every expert included: top-2 of 4 over 256 tokens


def test_init_is_deterministic_under_manual_seed() -> None:
    torch.manual_seed(3)
    first = TinyMoE().state_dict()
    torch.manual_seed(3)
    second = TinyMoE().state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_make_batch_follows_the_rule() -> None:
    config = TinyMoEConfig(vocab=7, seq_len=10)
    inputs, targets = make_batch(config, 4, torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (4, 10)
    assert (targets[:, 0] == IGNORE_INDEX).all()
    assert torch.equal(targets[:, 1:-1], inputs[:, 2:])  # targets are inputs shifted by one
    assert torch.equal(targets[:, 1:], (inputs[:, 1:] + inputs[:, :-1]) % 7)


def test_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TinyMoEConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="top_k=3 exceeds n_experts=2"):
        TinyMoEConfig(n_experts=2, top_k=3)


def test_parameters_route_to_the_expected_groups(model: TinyMoE) -> None:
    groups = expertopt.build_param_groups(model)
    group_by_name = {name: group for group in groups for name in group["param_names"]}
    expected = {
        "blocks.0.attn.q_proj.weight": "muon",
        "blocks.1.attn.o_proj.weight": "muon",
        "blocks.0.moe.router.weight": "muon",
        "blocks.0.moe.experts.w_in": "expert_muon",
        "blocks.1.moe.experts.w_out": "expert_muon",
        "tok_emb.weight": "adamw",
        "pos_emb.weight": "adamw",
        "lm_head.weight": "adamw",
        "blocks.0.attn_norm.weight": "adamw_no_decay",
        "norm.weight": "adamw_no_decay",
    }
    assert {name: group_by_name[name]["name"] for name in expected} == expected
    experts = group_by_name["blocks.0.moe.experts.w_in"]
    assert experts["expert"] is True and experts["link"] == "muon" and experts["use_muon"] is True
    assert len(group_by_name) == len(list(model.parameters()))  # each parameter exactly once


def test_cli_groups_lists_every_group(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["groups"]) == 0
    out = capsys.readouterr().out
    for name in ("muon", "expert_muon", "adamw", "adamw_no_decay", "blocks.0.moe.experts.w_in"):
        assert name in out


# --- data -------------------------------------------------------------------------------------


def _write_tree(root: Path, count: int) -> list[str]:
    names = [f"pkg{i % 3}/module_{i}.py" for i in range(count)]
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"# file {i}\n".encode() + bytes(range(1, 200)) * 400)
    (root / "site-packages" / "third_party.py").parent.mkdir()
    (root / "site-packages" / "third_party.py").write_text("skipped = True\n")
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text("skipped = True\n")
    return names


def test_split_is_by_file_hash_and_skips_tests_and_site_packages(tmp_path: Path) -> None:
    names = _write_tree(tmp_path, 40)
    files = [path.relative_to(tmp_path).as_posix() for path in stdlib_files(tmp_path)]
    assert files == sorted(names)  # site-packages/ and test/ left out
    heldout = [name for name in names if zlib.crc32(name.encode()) % HELDOUT_MODULUS == 0]
    corpus = load_stdlib_corpus(tmp_path, min_bytes=1)
    assert (corpus.train_files, corpus.heldout_files) == (40 - len(heldout), len(heldout))
    # Each file's bytes land in exactly one stream: the header line of every held-out file is in
    # the held-out stream and not in the train stream.
    train, held = bytes(corpus.train.tolist()), bytes(corpus.heldout.tolist())
    for i, name in enumerate(names):
        header = f"# file {i}\n".encode()
        assert (header in held, header in train) == ((name in heldout), (name not in heldout))


def test_batches_depend_on_seed_and_step_only() -> None:
    corpus = load_stdlib_corpus()
    assert corpus.heldout_files > 10 and corpus.heldout.numel() > 1 << 16
    first = corpus.train_batch(step=3, seed=0, global_batch=8, length=32)
    assert torch.equal(first, corpus.train_batch(step=3, seed=0, global_batch=8, length=32))
    assert not torch.equal(first, corpus.train_batch(step=4, seed=0, global_batch=8, length=32))
    assert first.dtype == torch.long and int(first.max()) < 256
    held = corpus.heldout_batches(seed=0, batches=2, global_batch=8, length=32)
    assert len(held) == 2 and all(b.shape == (8, 32) for b in held)


def test_too_small_a_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="need 65536"):
        load_stdlib_corpus(tmp_path)


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"world": 4, "ep": 3}, r"--ep 3 does not divide --world 4.*use --ep in \[1, 2, 4\]"),
        ({"world": 6, "ep": 3}, r"--ep 3 does not divide the 8 experts of qwen3_moe; use --ep in \[1, 2\]"),
        ({"stage": 5}, r"--stage 5 is not a ZeRO stage; use 0, 1, 2 or 3"),
        (
            {"world": 9, "cpu_count": 2},
            r"--world 9 is more than 4 processes per core.*use --world 8 or fewer",
        ),
        ({"world": 3, "global_batch": 16}, r"--global-batch 16 is not divisible by --world 3"),
        ({"steps": 0}, r"--steps must be >= 1, got 0"),
        ({"model": "gpt2"}, r"--model 'gpt2' is not a demo model"),
        ({"optimizer": "sgd"}, r"--optimizer 'sgd'"),
        ({"muon_lr": 0.0}, r"--muon-lr must be > 0"),
    ],
)
def test_bad_combinations_say_what_to_change(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DemoConfig(**settings)


def test_default_ep_is_two_on_even_worlds() -> None:
    assert (DemoConfig().ep, DemoConfig(world=1).ep, DemoConfig(world=3, global_batch=15).ep) == (2, 1, 1)


def test_cli_stops_before_starting_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--world", "4", "--ep", "3"]) == 2
    assert "--ep 3 does not divide --world 4" in capsys.readouterr().err
    assert main(["demo", "--stage", "4"]) == 2
    assert "use 0, 1, 2 or 3" in capsys.readouterr().err
    assert main(["demo", "--optimizer", "sgd"]) == 2  # argparse lists the choices
    assert "invalid choice: 'sgd'" in capsys.readouterr().err
    assert main([]) == 2


# --- a short distributed run -------------------------------------------------------------------


def _muon_matrix_flops(model_name: str) -> int:
    """Newton-Schulz FLOPs of one step over every Muon matrix of the model, each counted once, in
    AutoEP's layout: the fused ``gate_up_proj [E, 2I, H]`` is two ``[E, I, H]`` stacks (w1, w3)."""
    total = 0
    torch.manual_seed(0)
    for group in expertopt.build_param_groups(build_model(model_name, 32), lr=0.02, adamw_lr=3e-3):
        for name, param in zip(group["param_names"], group["params"], strict=True):
            if not group["use_muon"]:
                continue
            shapes = [param.shape]
            if name.endswith("gate_up_proj"):
                experts, rows, cols = param.shape
                shapes = [(experts, rows // 2, cols)] * 2
            total += sum(ns_flops(tuple(s), method=resolve_ns_method("standard", s, "cpu")) for s in shapes)
    return total


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, dict, list[str]]:
    config = DemoConfig(
        world=2, ep=2, steps=4, global_batch=4, seq_len=32, eval_every=2, eval_batches=1,
        out=tmp_path_factory.mktemp("demo"), progress=False,
    )  # fmt: skip
    lines: list[str] = []
    shm_before = _deepspeed_shm_buffers()
    result = run_demo(config, print_fn=lines.append)
    # DeepSpeed's CPU shared-memory all-reduce buffers (69 MB a rank, never unlinked) must not be
    # created: a run may not leave RAM behind in /dev/shm.
    assert _deepspeed_shm_buffers() == shm_before
    return config, result, lines


def _deepspeed_shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


@pytest.mark.slow
def test_short_run_writes_table_plot_and_results(short_run) -> None:
    config, result, lines = short_run
    assert result["plot"] == config.out / PLOT_NAME
    assert result["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(lines)
    assert "Muon (expertopt)" in table and "AdamW" in table and "held-out loss Muon / AdamW" in table
    saved = json.loads((config.out / RESULTS_NAME).read_text())
    assert saved["settings"]["world"] == 2 and set(saved["runs"]) == {"muon", "adamw"}
    muon, adamw = result["records"]["muon"], result["records"]["adamw"]
    assert len(muon["train_losses"]) == len(adamw["train_losses"]) == 4
    assert [step for step, _ in muon["heldout"]] == [2, 4]
    # Same weights and first batch: the first loss (before any step) is the same number.
    assert muon["train_losses"][0] == adamw["train_losses"][0]


@pytest.mark.slow
def test_short_run_counts_each_matrix_once_and_the_expected_bytes(short_run) -> None:
    _, result, _ = short_run
    muon, adamw = result["records"]["muon"], result["records"]["adamw"]
    # F6: the ranks' Newton-Schulz FLOPs add up to one orthogonalization of every Muon matrix
    # (dense ones split between the 2 DP ranks, each rank's 4 local experts on that rank).
    assert sum(muon["ns_flops_per_rank_per_step"]) == _muon_matrix_flops("qwen3_moe")
    assert adamw["ns_flops_per_rank_per_step"] == [0, 0]
    # ZeRO-2 at EP 2 over 2 ranks: each rank sends half the fp32 dense gradients (reduce to the
    # partition owners) and half the fp32 dense parameters (all-gather) once per step; expert
    # gradients stay home (expert-data-parallel groups of one rank); AutoEP moves the tokens.
    torch.manual_seed(0)
    model = build_model("qwen3_moe", 32)
    dense = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    for record in (muon, adamw):
        per_op = record["bytes_by_op_rank0"]
        assert per_op["deepspeed.reduce"] == per_op["deepspeed.all_gather_into_tensor"] == dense * 4 / 2
        assert per_op["deepspeed.all_to_all_single"] > 0


@pytest.mark.slow
def test_same_settings_repeat_the_losses_bit_for_bit(short_run) -> None:
    config, result, _ = short_run
    again = run_demo(
        DemoConfig(**{**config.summary(), "optimizer": "muon", "eval_every": 2, "eval_batches": 1,
                      "out": config.out / "again", "progress": False}),
        print_fn=lambda _: None,
    )  # fmt: skip
    first, second = result["records"]["muon"], again["records"]["muon"]
    assert second["train_losses"] == first["train_losses"]
    assert second["heldout"] == first["heldout"]
    assert second["bytes_per_rank_per_step"] == first["bytes_per_rank_per_step"]


@pytest.mark.slow
def test_one_process_reference_gives_the_same_losses(short_run) -> None:
    """World 2 with experts sharded (EP 2) against one process holding everything (EP 1): the same
    global batches and the same AutoEP w1/w2/w3 layout, so the same training up to the order of
    fp32 sums (the loss is a mean of per-rank means there; gradients are averaged over ranks).
    Newton-Schulz runs in fp32 here (no native bf16 on the CI CPU), where that order moves the
    update by ~1e-7; measured difference 1e-7 relative, tolerance 1e-5."""
    config, result, _ = short_run
    single = run_demo(
        DemoConfig(**{**config.summary(), "world": 1, "ep": 1, "eval_every": 2, "eval_batches": 1,
                      "out": config.out / "single", "progress": False}),
        print_fn=lambda _: None,
    )  # fmt: skip
    for name in ("muon", "adamw"):
        reference, distributed = single["records"][name], result["records"][name]
        torch.testing.assert_close(
            torch.tensor(distributed["train_losses"]),
            torch.tensor(reference["train_losses"]),
            rtol=1e-5,
            atol=0,
        )
        torch.testing.assert_close(
            torch.tensor(distributed["heldout"]), torch.tensor(reference["heldout"]), rtol=1e-5, atol=0
        )
