"""Bad input gets a clear error naming the culprit and the fix; same error types as torch."""

from __future__ import annotations

import pytest
import torch

import expertopt


def _matrix():
    return torch.nn.Parameter(torch.randn(4, 4))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lr": -1.0}, "Learning rate should be >= 0"),
        ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
        ({"momentum": -0.5}, "momentum should be >= 0"),
        ({"weight_decay": -0.1}, "weight decay should be >= 0"),
        ({"adjust_lr_fn": "linear"}, "Adjust learning rate function linear is not supported"),
    ],
)
def test_invalid_hyperparameters_raise_like_torch(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        torch.optim.Muon([_matrix()], **kwargs)
    with pytest.raises(ValueError, match=pattern):
        expertopt.Muon([_matrix()], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"ns_method": "svd"},
            r"ns_method='svd' is unknown; use one of \('standard', 'gram', 'polar_express', 'auto'\)",
        ),
        ({"ns_dtype": "int8"}, r"Unknown Newton-Schulz dtype 'int8'"),
        ({"ns_steps": 0}, r"ns_steps must be an int in \[1, 100\)"),
        ({"ns_steps": 100}, r"ns_steps must be an int in \[1, 100\)"),
        ({"ns_coefficients": (1.0, 2.0)}, r"ns_coefficients must be 3 numbers"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"betas": (0.9, 1.5)}, r"betas must be two numbers in \[0, 1\)"),
    ],
)
def test_invalid_expertopt_settings(kwargs, pattern):
    groups = [{"params": [_matrix()]}, {"params": [torch.nn.Parameter(torch.randn(4))], "use_muon": False}]
    with pytest.raises(ValueError, match=pattern):
        expertopt.Muon(groups, **kwargs)


def test_group_level_errors_name_the_group():
    groups = [{"params": [_matrix()], "name": "attention", "lr": -0.1}]
    with pytest.raises(ValueError, match=r"param group 0 \('attention'\)"):
        expertopt.Muon(groups)


def test_vector_in_muon_group_names_it_and_suggests_adamw(toy_moe):
    with pytest.raises(
        ValueError, match=r"parameter 'norm.weight' \(shape \(16,\)\) is 1-D .* use_muon=False \(AdamW\)"
    ):
        expertopt.Muon(toy_moe.named_parameters())
    with pytest.raises(ValueError, match=r"parameter #1 \(shape \(4,\)\) is 1-D"):
        expertopt.Muon([_matrix(), torch.nn.Parameter(torch.randn(4))])


def test_parameter_in_two_groups_is_named():
    shared = _matrix()
    with pytest.raises(
        ValueError, match=r"parameter 'w' \(shape \(4, 4\)\) is in param group 1 and in param group 0"
    ):
        expertopt.Muon([{"params": [("w", shared)]}, {"params": [("w", shared)]}])


def test_parameter_in_dense_and_expert_optimizer_is_named():
    shared = _matrix()
    dense = expertopt.Muon([{"params": [shared], "param_names": ["mlp.w"]}])
    experts = expertopt.Muon([{"params": [shared], "param_names": ["mlp.w"], "expert": True}])
    with pytest.raises(ValueError, match=r"parameter 'mlp.w' .* also in the dense optimizer"):
        expertopt.MoEOptimizer(dense, experts)


def test_complex_and_sparse_raise_runtime_error_like_torch():
    complex_param = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    complex_param.grad = torch.randn(4, 4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="Muon does not support complex parameters"):
        expertopt.Muon([complex_param]).step()
    sparse = _matrix()
    sparse.grad = torch.eye(4).to_sparse()
    with pytest.raises(RuntimeError, match="Muon does not support sparse gradients"):
        expertopt.Muon([sparse]).step()


def test_bad_num_heads():
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        expertopt.Muon([{"params": [_matrix()], "num_heads": 0}])
    weight = torch.nn.Parameter(torch.randn(6, 4))
    weight.grad = torch.randn(6, 4)
    with pytest.raises(
        ValueError,
        match=r"num_heads=4 needs a 2-D weight whose rows split evenly into heads; got shape \(6, 4\)",
    ):
        expertopt.Muon([{"params": [weight], "num_heads": 4}]).step()


def test_unknown_link_target():
    dense = expertopt.Muon([{"params": [_matrix()], "name": "muon"}])
    experts = expertopt.Muon([{"params": [_matrix()], "expert": True, "link": "mlp"}])
    with pytest.raises(
        ValueError, match=r"links to dense group 'mlp', which does not exist; dense group names: \['muon'\]"
    ):
        expertopt.MoEOptimizer(dense, experts)


def test_moe_optimizer_needs_expertopt_optimizers():
    dense = torch.optim.SGD([_matrix()], lr=0.1)
    experts = expertopt.Muon([_matrix()])
    with pytest.raises(TypeError, match="must be an expertopt optimizer"):
        expertopt.MoEOptimizer(dense, experts)


def test_adamw_rejects_muon_groups():
    with pytest.raises(ValueError, match=r"use expertopt\.Muon for Muon groups"):
        expertopt.AdamW([{"params": [_matrix()], "use_muon": True}])


def test_build_param_groups_bad_router(toy_moe):
    with pytest.raises(ValueError, match="router='sgd': use 'muon' or 'adamw'"):
        expertopt.build_param_groups(toy_moe, router="sgd")
