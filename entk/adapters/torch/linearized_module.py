"""Linearizing a PyTorch network around its current (e.g. pretrained) weights, in PyTorch.

    f_lin(θ, x) = f(θ₀, x) + J(θ₀, x) (θ − θ₀),   J = ∂f/∂θ at θ₀

`linearize(module)` returns a `torch.nn.Module` computing `f_lin` with one `torch.func.jvp` per forward
pass (no Jacobian is ever formed), whose trainable parameters are θ (initialised to θ₀), so any torch
optimizer trains the linearized network — the model whose training dynamics the NTK describes.
θ₀ is held in buffers: it moves with `.to()` and is saved in `state_dict()`, but is never trained.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from entk.adapters.torch.bridge import _eval_mode, forward_mode_ready

__all__ = ["linearize", "LinearizedModule"]


def _attribute(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor at dotted `name` in `module` (a parameter, a buffer, or what replaced them)."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _tree_add(a: Any, b: Any) -> Any:
    return torch.utils._pytree.tree_map(torch.add, a, b)


class LinearizedModule(torch.nn.Module):
    """`f(θ₀, x) + J(θ₀, x)(θ − θ₀)` for a copy of a module; see `linearize`.

    Attributes:
      module: a copy of the original module whose parameters are θ (trainable ones only; parameters
        with `requires_grad=False` stay fixed at their value and are not linearized).
      theta0: a module tree mirroring `module` that holds θ₀ as buffers, under the same names.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"linearize(module=...): expected a torch.nn.Module, got "
                            f"{type(module).__name__}.")
        self.module = copy.deepcopy(module)
        self._names = tuple(n for n, p in self.module.named_parameters() if p.requires_grad)
        if not self._names:
            raise ValueError("linearize: the module has no parameter with requires_grad=True; there is "
                             "nothing to linearize in.")
        for name in self._names:
            p = self.module.get_parameter(name)
            if not p.is_floating_point():
                raise TypeError(f"linearize: parameter {name!r} has dtype {p.dtype}; only "
                                f"floating-point parameters can be linearized (set "
                                f"requires_grad=False to keep it fixed).")
        self.theta0 = torch.nn.Module()
        for name in self._names:
            *path, leaf = name.split(".")
            holder = self.theta0
            for part in path:
                if not hasattr(holder, part):
                    holder.add_module(part, torch.nn.Module())
                holder = getattr(holder, part)
            holder.register_buffer(leaf, self.module.get_parameter(name).detach().clone())

    @property
    def linearized_parameter_names(self) -> tuple[str, ...]:
        """Names (as in the original module's `named_parameters()`) of the linearized parameters θ."""
        return self._names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """`f(θ₀, x) + J(θ₀, x)(θ − θ₀)`, differentiable with respect to θ.

        The original network is evaluated in eval mode (dropout off, BatchNorm on running statistics),
        so the linearization is that of the inference function whatever `self.training` is.
        """
        # Attribute lookups, not get_parameter/get_buffer: under torch.func.functional_call (a
        # torch.func Jacobian of this module) the parameters are plain tensors.
        theta = {n: _attribute(self.module, n) for n in self._names}
        theta0 = {n: _attribute(self.theta0, n) for n in self._names}
        delta = {n: theta[n] - theta0[n] for n in self._names}
        module = self.module

        def f(params: dict[str, torch.Tensor]) -> Any:
            return torch.func.functional_call(module, params, args, kwargs, strict=False)

        with _eval_mode(module), forward_mode_ready():
            out, tangent = torch.func.jvp(f, (theta0,), (delta,))
        return _tree_add(out, tangent)

    def extra_repr(self) -> str:
        return f"linearized around θ₀ in {len(self._names)} parameter tensors"


def linearize(module: torch.nn.Module) -> LinearizedModule:
    """The first-order Taylor expansion of `module` in its parameters, as a trainable torch module.

    Args:
      module: any `torch.nn.Module` (typically pretrained). It is copied; the original is not changed.

    Returns:
      A `LinearizedModule` `lin` with `lin(*inputs) == module(*inputs)` initially (in eval mode) and
      `lin(*inputs) = f(θ₀, x) + J(θ₀, x)(θ − θ₀)` once its parameters θ (`lin.parameters()`,
      named `"module." + original name`) have moved. Train it with any torch optimizer.
    """
    return LinearizedModule(module)
