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

from entk.stax.attention import AttentionMechanism, GlobalSelfAttention, PositionalEmbedding
from entk.stax.batch_norm import BatchNorm
from entk.stax.combinators import (FanInConcat, FanInProd, FanInSum, FanOut, parallel, repeat,
                                   serial)
from entk.stax.dot_general import DotGeneral
from entk.stax.elementwise import (ABRelu, Abs, Cos, Elementwise, ElementwiseNumerical, Erf, Exp,
                                   ExpNormalized, Gabor, Gaussian, Gelu, Identity, LeakyRelu, Rbf,
                                   Relu, Sigmoid_like, Sign, Sin)
from entk.stax.elementwise_polynomial import Hermite, Monomial, Polynomial, RectifiedMonomial
from entk.stax.graph import Aggregate, AggregateImplementation
from entk.stax.indexing import Index, Slice
from entk.stax.kernel import AnalyticKernelFn, Kernel, Layer
from entk.stax.linear import Conv, ConvLocal, ConvTranspose, Dense
from entk.stax.masking import MaskedArray, unmask_fn
from entk.stax.normalization import Dropout, LayerNorm
from entk.stax.pooling import AvgPool, Flatten, GlobalAvgPool, GlobalSumPool, SumPool
from entk.stax.recurrent import RNN
from entk.stax.resize import ImageResize
from entk.stax.spatial import Padding

__all__ = [
    "ABRelu", "Abs", "Aggregate", "AggregateImplementation", "AnalyticKernelFn", "AttentionMechanism", "AvgPool", "BatchNorm", "Conv", "ConvLocal",
    "ConvTranspose", "Cos", "Dense", "DotGeneral", "Dropout", "Elementwise", "ElementwiseNumerical",
    "Erf", "Exp", "ExpNormalized", "FanInConcat", "FanInProd", "FanInSum", "FanOut", "Flatten",
    "Gabor", "Gaussian", "Gelu", "GlobalAvgPool", "GlobalSelfAttention", "GlobalSumPool", "Hermite",
    "Identity", "ImageResize", "Index", "Kernel", "Layer", "LayerNorm", "LeakyRelu", "Monomial",
    "Padding", "Polynomial", "PositionalEmbedding", "RNN", "Rbf", "RectifiedMonomial", "Relu", "Sigmoid_like", "Sign",
    "Sin", "Slice", "SumPool", "MaskedArray", "parallel", "repeat", "serial", "unmask_fn",
]
