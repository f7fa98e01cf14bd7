"""Predictions from kernels: gradient-flow training in closed form or by ODE, and GP posteriors.

Signatures, normalisations and array layouts follow neural-tangents 0.6.5, so its users get the same
numbers:

- kernels are laid out `(N1, N2, A1, A2, ...)` for outputs `(N, A, ..., C)` whose `trace_axes`
  (default: the last, the logits) are absent: the kernel is `Θ ⊗ I` along them;
- the MSE loss is `0.5 · mean((f − y)²)` over *all* entries of `y`, so gradient flow is
  `df/dt = −(η / y.size) Θ (f − y)` and time `t` counts steps of size `learning_rate` (`η t`);
- `diag_reg` adds `diag_reg · mean(diag K)` to the train kernel's diagonal (`diag_reg_absolute_scale=
  True`: `diag_reg` itself).

Kernels may be arrays or objects with `nngp` / `ntk` attributes (an `entk.stax.Kernel`, the namedtuples
`kernel_fn(..., get=("nngp", "ntk"))` returns). Bad shapes, and train kernels that cannot be
factorised, raise errors that say what to change.
"""

from entk.predict._common import Gaussian
from entk.predict.gp import gp_inference
from entk.predict.mse import (gradient_descent_mse, gradient_descent_mse_ensemble,
                                      max_learning_rate)
from entk.predict.ode import ODEState, gradient_descent

__all__ = ["Gaussian", "ODEState", "gp_inference", "gradient_descent", "gradient_descent_mse",
           "gradient_descent_mse_ensemble", "max_learning_rate"]
