"""Reference eNTKs computed by PyTorch itself (torch.func), shared by the torch adapter tests.

`torch_func_ntk(module, x1, x2)` differentiates the module with `torch.func.jacrev` (reverse mode:
PyTorch's own autograd semantics, `detach`, `no_grad` and custom Function backwards included), so
entk's kernels of a converted module can be compared with it in float64.
"""

from __future__ import annotations

import string

import numpy as np
import torch
from torch import nn


def torch_func_ntk(module: nn.Module, x1, x2, *, eager: bool = False) -> np.ndarray:
    """The NTK with the last output axis traced, from torch.func: per-example Jacobians
    (`vmap(jacrev)`, a loop of `jacrev` where vmap cannot batch the module) of every named
    parameter, contracted by hand. `eager=True` takes them from plain `torch.autograd` instead (a
    loop of backward passes), for modules torch.func cannot transform (`torch.inference_mode()`
    blocks).

    For outputs of shape (N, *S, C) the result is Θ[n, m, s1.., s2..] = Σ_p Σ_c J1 J2 / C with the
    free axes interleaved (N1, N2, S1_1, S2_1, ...) as entk lays them out.
    """
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def single(p, x):
        return torch.func.functional_call(module, (p, buffers), (x[None],))[0]

    def eager_jacrev(p, x):
        names = list(p)
        jac = torch.autograd.functional.jacobian(
            lambda *values: single(dict(zip(names, values)), x), tuple(p.values()))
        return dict(zip(names, jac))

    def jac(x):
        if eager:
            per_example = [eager_jacrev(params, xi) for xi in x]
            return {k: torch.stack([j[k] for j in per_example]) for k in params}
        try:
            return torch.func.vmap(torch.func.jacrev(single), in_dims=(None, 0))(params, x)
        except RuntimeError:  # ops torch.func.vmap cannot batch (cuDNN-style RNN kernels): loop
            per_example = [torch.func.jacrev(single)(params, xi) for xi in x]
            return {k: torch.stack([j[k] for j in per_example]) for k in params}

    j1 = jac(x1)
    j2 = j1 if x2 is None else jac(x2)
    out_ndim = single(params, x1[0]).ndim  # per-example output dims, the last one traced
    letters = iter(string.ascii_letters)
    n, m, p = next(letters), next(letters), next(letters)
    free1 = [next(letters) for _ in range(out_ndim - 1)]
    free2 = [next(letters) for _ in range(out_ndim - 1)]
    c = next(letters)
    spec = (f"{n}{''.join(free1)}{c}{p},{m}{''.join(free2)}{c}{p}->{n}{m}"
            + "".join(a + b for a, b in zip(free1, free2)))
    total = 0
    for name in params:
        a = j1[name].reshape(j1[name].shape[:1 + out_ndim] + (-1,))
        b = j2[name].reshape(j2[name].shape[:1 + out_ndim] + (-1,))
        total = total + torch.einsum(spec, a, b)
    channels = j1[next(iter(params))].shape[out_ndim]
    return (total / channels).detach().numpy()


def assert_strategies_match(model, x1, x2, reference: np.ndarray, strategies, **ntk_kwargs) -> None:
    """Every strategy's eNTK of a converted module (`entk.Model`), compiled together in one jit,
    equals `reference` (e.g. `torch_func_ntk`'s) to 1e-10 of its largest entry (float64 models)."""
    import jax

    import entk
    from entk.adapters.torch import to_jax

    fns = [entk.empirical_ntk_fn(model, implementation=s, **ntk_kwargs) for s in strategies]
    kernels = jax.jit(lambda a, b, p: [fn(a, b, p) for fn in fns])(to_jax(x1), to_jax(x2),
                                                                   model.params)
    for strategy, kernel in zip(strategies, kernels):
        assert kernel.shape == reference.shape, strategy
        np.testing.assert_allclose(np.asarray(kernel), reference, rtol=0,
                                   atol=1e-10 * np.max(np.abs(reference)), err_msg=strategy)
