"""Analytic infinite-width networks (neural-tangents' `stax` conventions) on entk's interface.

Every layer is a `Layer(init_fn, apply_fn, kernel_fn)`:

- `init_fn(rng, input_shape) -> (output_shape, params)` and `apply_fn(params, x, **kw)` define the
  finite network, a plain `f(params, x)` that `entk.empirical_ntk_fn`, `entk.ntk` and `entk.compare`
  accept;
- `kernel_fn(x1, x2=None, get=None)` is its infinite-width limit: the NNGP and NTK (`Kernel`), or the
  entries named by `get`; `kernel_fn(kernel)` continues from an earlier network's `Kernel`.

Conventions: channels-last inputs (`(N, C)`, `(N, W, C)`, NHWC, ...), NTK parameterization by default
(`parameterization="standard"` too), `W_std` / `b_std` weight and bias scales.

    >>> from entk import stax
    >>> init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(512), stax.Relu(), stax.Dense(1))
    >>> ntk = kernel_fn(x1, x2, "ntk")
"""

from entk.stax.combinators import FanInConcat, FanInSum, FanOut, parallel, serial
from entk.stax.elementwise import (ABRelu, Abs, ElementwiseNumerical, Erf, Gelu, Identity, LeakyRelu,
                                   Relu, Sin)
from entk.stax.kernel import AnalyticKernelFn, Kernel, Layer
from entk.stax.linear import Conv, Dense
from entk.stax.normalization import Dropout, LayerNorm
from entk.stax.pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from entk.stax.spatial import Padding

__all__ = [
    "ABRelu", "Abs", "AnalyticKernelFn", "AvgPool", "Conv", "Dense", "Dropout", "ElementwiseNumerical",
    "Erf", "FanInConcat", "FanInSum", "FanOut", "Flatten", "Gelu", "GlobalAvgPool", "GlobalSumPool",
    "Identity", "Kernel", "Layer", "LayerNorm", "LeakyRelu", "Padding", "Relu", "Sin", "SumPool",
    "parallel", "serial",
]
