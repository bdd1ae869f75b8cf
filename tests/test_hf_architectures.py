"""Every MoE architecture of the installed transformers, built from a tiny config: each
parameter's family, layout and lr multiplier as the architecture declares it, then three
training steps with a finite, falling loss.

The expectations are read from what each architecture declares, not from the router's code:
routers are the modules transformers records ``router_logits`` from (``_can_record_outputs``),
plus a shared expert's gate; experts are tensors whose leading dim (or, for a 2-D stack, whose
rows) count the config's routed experts; an expert matrix's orientation follows from its role
(an in-projection reads the model width H, an out-projection writes it) and its shape, which the
tiny config makes unambiguous (H=32, expert intermediate 48, see ``tiny_transformers``).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import expertopt  # noqa: E402
from expertopt.routing import build_param_groups  # noqa: E402
from expertopt.routing.tiny_transformers import (  # noqa: E402
    EXPERT_INTERMEDIATE,
    EXPERTS,
    HIDDEN,
    build_tiny_model,
    moe_model_types,
)

LR, ADAMW_LR, EXPERT_LR_MULT = 0.02, 3e-3, 0.5
IN_PROJECTIONS = ("gate_up_proj", "up_proj", "gate_proj", "w1", "v1", "w3", "input_linear", "wi", "fc1")
OUT_PROJECTIONS = ("down_proj", "w2", "output_linear", "wo", "fc2")
SSM_NAMES = ("A_log", "D", "dt_bias")


def _build(model_type: str) -> nn.Module:
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_tiny_model(model_type)
    except Exception as error:  # a config or model transformers cannot build small: say why
        pytest.skip(f"{model_type} does not build from a tiny config: {type(error).__name__}: {error}"[:300])


def _router_modules(model: nn.Module) -> list[nn.Module]:
    """Modules the architecture records router logits from, and shared-expert gates."""
    recorders = []
    for module in model.modules():
        declared = getattr(type(module), "_can_record_outputs", None) or {}
        if "router_logits" in declared:
            recorders.append(declared["router_logits"])
    found = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Router"):  # declared by its class (e.g. DeepSeek-V4's hash router)
            found.append(module)
        for recorder in recorders:
            target = getattr(recorder, "target_class", recorder)
            layer = getattr(recorder, "layer_name", None)
            if isinstance(module, target) and (layer is None or name.endswith(layer)):
                found.extend(_logit_layers(module))
        if name.endswith("shared_expert_gate"):
            found.append(module)
    return found


def _logit_layers(module: nn.Module) -> list[nn.Module]:
    """A recorded router itself, or, when transformers records a whole MoE block (Doge), the
    linear layers inside it that output one logit per expert."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) <= 1 or "Router" in type(module).__name__:
        return [module]
    return [m for m in linears if m.out_features == EXPERTS]


def _expert_matrix(name: str, param: torch.Tensor) -> tuple[bool, int | None]:
    """(routed expert tensor, row_blocks) from the config's expert count."""
    if ".experts." in name and any(f".experts.{k}" in name for k in ("expert_", *map(str, range(EXPERTS)))):
        return True, None  # one module per expert (Switch, NLLB)
    if param.ndim >= 3 and param.shape[0] == EXPERTS:
        return True, None
    if param.ndim == 2 and param.shape[0] == EXPERTS * EXPERT_INTERMEDIATE:
        return True, EXPERTS  # DBRX-style [E*I, H]
    if param.ndim == 2 and param.shape[0] == EXPERTS and name.endswith("bias"):
        return True, None  # per-expert biases [E, n] (gpt-oss)
    return False, None


def _orientation(name: str, matrix_shape: torch.Size) -> str:
    """'out_in' or 'in_out' for an expert matrix, from its role and which dim is the model width."""
    attr = name.rpartition(".")[2] if not name.endswith(".weight") else name.rsplit(".", 2)[1]
    rows, cols = matrix_shape[-2:]
    if attr in IN_PROJECTIONS:  # reads the model width: fan-in is H
        return "out_in" if cols == HIDDEN else "in_out"
    if attr in OUT_PROJECTIONS:  # writes the model width: fan-out is H
        return "out_in" if rows == HIDDEN else "in_out"
    raise AssertionError(f"expert tensor {name} {tuple(matrix_shape)} has no known role; extend the test")


def _no_decay_by_declaration(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """1-D tensors, biases, SSM decay/skip/dt parameters and norm weights."""
    if param.ndim == 1 or name.endswith("bias") or name.rpartition(".")[2] in SSM_NAMES:
        return True
    return "norm" in type(module).__name__.lower() or "norm" in name.rsplit(".", 2)[-2].lower()


def _expected(model: nn.Module, routers: list[nn.Module]) -> dict[str, dict]:
    """name -> family, layout, row_blocks, expert for every trainable parameter."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings.add(id(model.get_input_embeddings().weight))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = id(output.weight) if output is not None else None
    router_params = {id(p) for module in routers for p in module.parameters()}
    expected = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = model.get_submodule(name.rpartition(".")[0])
        expert, blocks = _expert_matrix(name, param)
        entry = {"expert": expert, "layout": None, "row_blocks": None}
        if id(param) in embeddings or id(param) == head:
            entry["family"] = "adamw"
        elif _no_decay_by_declaration(name, param, module):
            entry["family"] = "adamw_no_decay"
        elif isinstance(module, nn.modules.conv._ConvNd):
            depthwise = module.groups == module.in_channels
            entry.update(family="adamw") if depthwise else entry.update(family="muon", layout="flatten")
        elif id(param) in router_params:
            entry["family"] = "adamw"  # router="adamw"
        elif expert and (param.ndim >= 3 or blocks or ".experts." in name):
            matrix = param.shape if blocks is None else (param.shape[0] // blocks, param.shape[1])
            layout = _orientation(name, matrix) if param.ndim >= 3 or blocks else "out_in"
            entry.update(family="muon", layout=layout, row_blocks=blocks)
        elif expert:
            entry["family"] = "adamw_no_decay"  # per-expert vectors [E, n]
        else:
            entry.update(family="muon", layout="out_in")
        expected[name] = entry
    return expected


def _lr_multiplier(entry: dict, shape: torch.Size) -> float:
    """Expected step size relative to the scheduled lr: lr_mult times sqrt(fan_out / fan_in)."""
    mult = EXPERT_LR_MULT if entry["expert"] else 1.0
    if entry["family"] != "muon":
        return mult * ADAMW_LR / LR
    if entry["layout"] == "flatten":
        fan_out, fan_in = shape[0], math.prod(shape[1:])
    else:
        rows = shape[-2] // (entry["row_blocks"] or 1)
        fan_out, fan_in = (shape[-1], rows) if entry["layout"] == "in_out" else (rows, shape[-1])
    return mult * math.sqrt(max(1.0, fan_out / fan_in))


def _actual(groups: list[dict]) -> dict[str, dict]:
    from expertopt.updates.muon import adjusted_lr, matrix_view

    actual = {}
    for group in groups:
        for name, param in zip(group["param_names"], group["params"], strict=True):
            family = (
                "muon" if group["use_muon"] else ("adamw" if group["weight_decay"] > 0 else "adamw_no_decay")
            )
            entry = {"family": family, "expert": group["expert"], "layout": None, "row_blocks": None}
            multiplier = group["lr_mult"]
            if group["use_muon"]:
                entry.update(layout=group["matrix_layout"], row_blocks=group["row_blocks"])
                view = matrix_view(
                    torch.empty(param.shape, device="meta"),
                    is_expert=group["expert"],
                    matrix_layout=group["matrix_layout"],
                    row_blocks=group["row_blocks"],
                )
                multiplier *= adjusted_lr(1.0, None, view.shape[-2:], group["matrix_layout"])
            actual[name] = {**entry, "lr": multiplier}
    return actual


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: the model's own loss for causal LMs, tied logits otherwise."""
    if model.config.is_encoder_decoder:
        hidden = model(input_ids=tokens, decoder_input_ids=tokens, use_cache=False).last_hidden_state
    elif type(model).__name__.endswith("ForCausalLM"):
        return model(input_ids=tokens, labels=tokens, use_cache=False).loss
    else:
        hidden = model(input_ids=tokens, use_cache=False).last_hidden_state
    logits = hidden @ model.get_input_embeddings().weight.T
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def _optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    options = {"ns_dtype": "float32"}
    if any(g["expert"] for g in groups) and not all(g["expert"] for g in groups):
        return expertopt.MoEOptimizer.from_groups(groups, **options)
    return expertopt.Muon(groups, **options)


MODEL_TYPES = moe_model_types()


def _routed_model(model_type: str) -> tuple[nn.Module, list[dict]]:
    model = _build(model_type)
    groups = build_param_groups(
        model, lr=LR, adamw_lr=ADAMW_LR, expert_lr_mult=EXPERT_LR_MULT, router="adamw", weight_decay=0.1
    )
    return model, groups


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_parameter_routed_as_the_architecture_declares(model_type):
    model, groups = _routed_model(model_type)
    expected, actual = _expected(model, _router_modules(model)), _actual(groups)
    assert sorted(actual) == sorted(expected)  # every trainable parameter, once
    shapes = {name: p.shape for name, p in model.named_parameters()}
    wrong = []
    for name, entry in expected.items():
        want = {**entry, "lr": pytest.approx(_lr_multiplier(entry, shapes[name]))}
        if actual[name] != want:
            wrong.append(f"{name} {tuple(shapes[name])}: expected {want}, got {actual[name]}")
    assert not wrong, "\n".join(wrong)
    if not any(entry["expert"] for entry in expected.values()):
        pytest.skip(
            f"{model_type}: routed as declared, but the tiny config builds no stacked or listed experts"
        )


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_three_steps_lower_the_loss(model_type):
    torch.set_num_threads(1)  # tiny matrices; one thread per test process is fastest and fair to neighbours
    model, groups = _routed_model(model_type)
    tokens = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        first = _loss(model, tokens)
    except Exception as error:  # transformers' forward of this tiny config: not ours to fix here
        pytest.skip(f"{model_type} forward fails on the tiny config: {type(error).__name__}: {error}"[:300])
    optimizer = _optimizer(groups)
    losses, loss = [], first
    for _ in range(3):
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss = _loss(model, tokens)
    losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses


def test_groups_command_prints_every_parameter_of_an_architecture(capsys):
    from expertopt.cli import main

    assert main(["groups", "--model", "gpt_oss", "--router", "adamw"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    # gpt-oss stores gate_up_proj [E, H, 2I] = [4, 32, 128]: fan-out 128 / fan-in 32, step x sqrt(4) = 2.
    gate_up = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up[1:5] == ["4x32x128", "expert", "expert_muon_in_out", "4x"] and gate_up[-2:] == ["2", "0.1"]
    assert rows["model.layers.0.mlp.router.weight"][2:4] == ["router", "adamw"]
    assert rows["model.layers.0.mlp.experts.down_proj_bias"][3] == "expert_adamw_no_decay"


def test_groups_command_rejects_an_unknown_model(capsys):
    from expertopt.cli import main

    assert main(["groups", "--model", "no_such_model"]) == 2
    assert "unknown model type 'no_such_model'" in capsys.readouterr().err
