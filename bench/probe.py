"""The op-count probe of issue 12: aten ops dispatched by one optimizer step, at any depth.

On a GPU every aten op is (at least) one kernel launch, so a step whose op count grows with the
number of layers is launch-bound on fine-grained MoE models. The probe model is what issue 12
names: per layer, a fused ``qkv`` and a ``proj`` matrix, a router, two 16-expert stacks and two
norms. Three optimizers step it:

- ``expertopt``: ``expertopt.Muon(expertopt.build_param_groups(model))`` (the user's idiom);
- ``torch``: ``torch.optim.Muon`` on every 2-D matrix, experts passed one 2-D matrix each (it
  refuses 3-D), plus a fused ``torch.optim.AdamW`` for the norms;
- ``deepspeed``: DeepSpeed 0.19.8's ``SingleDeviceMuonWithAuxAdam``, expert stacks as they are,
  run with ``torch.compiler.set_stance("force_eager")`` so that its ``torch.compile``d
  ``muon_update`` dispatches the same aten ops as it would traced (and every one is counted).

Ops are counted with a ``TorchDispatchMode``: every call that reaches the dispatcher's Python
mode, views and ``empty`` included; a foreach op is one op (on a GPU it is a few launches).
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede the first deepspeed import

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import expertopt

__all__ = [
    "PROBE_OPTIMIZERS",
    "OpCounter",
    "PeakMemory",
    "ProbeMoE",
    "count_step_ops",
    "peak_step_memory",
    "probe_optimizer",
]

NUM_EXPERTS = 16


class ProbeLayer(nn.Module):
    def __init__(self, d: int, d_ff: int, num_experts: int, split_experts: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.moe_norm = nn.RMSNorm(d)
        self.router = nn.Linear(d, num_experts, bias=False)
        if split_experts:  # what torch.optim.Muon can take: one 2-D matrix per expert
            self.experts = nn.ModuleList(
                nn.ParameterDict(
                    {"w_in": nn.Parameter(torch.randn(d_ff, d)), "w_out": nn.Parameter(torch.randn(d, d_ff))}
                )
                for _ in range(num_experts)
            )
        else:
            self.w_in = nn.Parameter(torch.randn(num_experts, d_ff, d) / d**0.5)
            self.w_out = nn.Parameter(torch.randn(num_experts, d, d_ff) / d_ff**0.5)


class ProbeMoE(nn.Module):
    """The probe model (no forward: a step only reads gradients, which :meth:`fill_grads` sets)."""

    def __init__(self, layers: int, *, d: int = 64, d_ff: int = 32, split_experts: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(ProbeLayer(d, d_ff, NUM_EXPERTS, split_experts) for _ in range(layers))

    def fill_grads(self) -> None:
        generator = torch.Generator().manual_seed(1)
        for param in self.parameters():
            param.grad = torch.randn(param.shape, generator=generator) * 1e-3


def _expertopt(layers: int) -> torch.optim.Optimizer:
    model = ProbeMoE(layers)
    model.fill_grads()
    return expertopt.Muon(expertopt.build_param_groups(model))


class _TorchPair(torch.optim.Optimizer):
    """torch.optim.Muon on the matrices and fused torch.optim.AdamW on the norms, stepped together."""

    def __init__(self, model: nn.Module) -> None:
        matrices = [p for p in model.parameters() if p.ndim == 2]
        vectors = [p for p in model.parameters() if p.ndim < 2]
        self.muon = torch.optim.Muon(matrices, lr=0.02)
        self.adamw = torch.optim.AdamW(vectors, lr=3e-4, weight_decay=0.0, fused=True)
        super().__init__(model.parameters(), {})

    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()


def _torch(layers: int) -> torch.optim.Optimizer:
    model = ProbeMoE(layers, split_experts=True)
    model.fill_grads()
    return _TorchPair(model)


def _deepspeed(layers: int) -> torch.optim.Optimizer:
    from deepspeed.runtime.zero.muon.original_muon import SingleDeviceMuonWithAuxAdam

    model = ProbeMoE(layers)
    model.fill_grads()
    muon, adam = [], []
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            param.is_expert_group = name.endswith(("w_in", "w_out"))
            muon.append(param)
        else:
            adam.append(param)
    return SingleDeviceMuonWithAuxAdam(
        [
            {"params": muon, "use_muon": True, "lr": 0.02, "weight_decay": 0.1},
            {"params": adam, "use_muon": False, "lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.0},
        ]
    )


PROBE_OPTIMIZERS: dict[str, Callable[[int], torch.optim.Optimizer]] = {
    "expertopt": _expertopt,
    "torch": _torch,
    "deepspeed": _deepspeed,
}


def probe_optimizer(name: str, layers: int) -> torch.optim.Optimizer:
    """An optimizer over a fresh probe model of ``layers`` layers, stepped once (state exists)."""
    optimizer = PROBE_OPTIMIZERS[name](layers)
    with torch.compiler.set_stance("force_eager"):
        optimizer.step()
    return optimizer


class OpCounter(TorchDispatchMode):
    """Counts aten ops by overload name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_step_ops(optimizer: torch.optim.Optimizer) -> OpCounter:
    """The aten ops of one ``optimizer.step()`` (compiled code run eagerly, so every op is seen)."""
    with torch.compiler.set_stance("force_eager"), torch.no_grad(), OpCounter() as counter:
        optimizer.step()
    return counter


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages allocated by ops while active and still referenced.

    An op output whose storage is not one of its inputs' is a new allocation; it counts until the
    last tensor object that refers to it, view or not, is collected. Storages that existed before
    (parameters, state, a plan's workspace) are never counted: this is the step's *extra* memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # data_ptr -> [live tensor objects, bytes]

    def _release(self, pointer: int) -> None:
        entry = self._refs[pointer]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[pointer]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(result):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in inputs and pointer not in self._refs:
                continue  # in place, out= or a view of a storage that predates the mode
            if pointer not in self._refs:
                self._refs[pointer] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[pointer][0] += 1
            weakref.finalize(tensor, self._release, pointer)
        return result


def peak_step_memory(optimizer: torch.optim.Optimizer) -> int:
    """Peak extra bytes one ``optimizer.step()`` allocates (see :class:`PeakMemory`)."""
    with torch.compiler.set_stance("force_eager"), torch.no_grad(), PeakMemory() as memory:
        optimizer.step()
    return memory.peak
