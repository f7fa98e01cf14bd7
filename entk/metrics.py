"""Kernel diagnostics: spectrum, conditioning, trace, kernel-target alignment, kernel distance, rank.

These are the numbers most studies compute on an empirical NTK: the eigenspectrum and condition
number at initialisation (trainability, training-free architecture search), kernel-target alignment
(how well the kernel fits a task), the distance between two kernels (how far the kernel moved while
training), and an effective rank (how many directions the kernel really uses).

Accepted kernels. Every function takes

- a traced kernel `(N, N)` (the default of `entk.ntk` / `empirical_ntk_fn`, logits averaged), or
- a full kernel `(N, N, O, O)` (`trace_axes=()`), and more generally any interleaved layout
  `(N1, N2, A1, A2, B1, B2, ...)` that `empirical_ntk_fn` produces without diagonal axes.

A full kernel is flattened to the `(N·O, N·O)` matrix whose row/column `n·O + o` is the pair
(example `n`, output `o`), i.e. `K.transpose(0, 2, 1, 3).reshape(N·O, N·O)` (output axes in
row-major order when there are several). Targets `y` of shape `(N, O)` are flattened the same way
(`y.reshape(N·O)`), so the two always line up.

Arrays may be NumPy, JAX, PyTorch or TensorFlow; torch and TF are never imported here, they are
recognised by the module of the array's type. The numbers are computed in float64 NumPy on the host
(the matrices are small: probe sets of tens to a few thousand rows); vectors come back as NumPy
arrays and scalars as Python floats.

Every function checks that the matrix is square and symmetric within a tolerance (default relative
`1e-8` for float64, `1e-4` for float32, `1e-2` for 16-bit inputs; pass `rtol=` to change it) and then uses
its symmetric part, so round-off asymmetry from the kernel computation does not leak into the
eigenvalues.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from entk import adapters

__all__ = ["as_matrix", "spectrum", "condition_number", "trace", "kernel_alignment", "kernel_distance",
           "effective_rank"]

ArrayLike = Any  # NumPy / JAX / torch / TF array or nested lists

_RTOL_LOW_PRECISION = 1e-4  # float32 kernels: J J^T summed in different orders per entry
_RTOL_FLOAT64 = 1e-8
_RTOL_HALF = 1e-2  # float16 / bfloat16


# ----------------------------------------------------------------------------------------------
# Conversion and validation


def _to_numpy(x: ArrayLike, name: str) -> tuple[np.ndarray, np.dtype]:
    """`x` as a float64 NumPy array, plus the dtype it arrived in (for the symmetry tolerance)."""
    arr = adapters.to_numpy(x)
    if arr.dtype == object:
        raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__} that cannot be read as a "
                        f"numeric array; pass a NumPy, JAX, torch or TensorFlow array.")
    if np.iscomplexobj(arr):
        raise TypeError(f"{name} has complex dtype {arr.dtype}; kernel metrics need a real kernel.")
    dtype = arr.dtype
    # kind "V": ml_dtypes' bfloat16 / float8, as JAX hands them to NumPy.
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_) or dtype.kind == "V"):
        raise TypeError(f"{name} has dtype {dtype}; kernel metrics need a real numeric array.")
    return arr.astype(np.float64), dtype


def _flatten_kernel(k: np.ndarray, name: str) -> tuple[np.ndarray, int, tuple[int, ...]]:
    """Interleaved `(N1, N2, A1, A2, ...)` → `(N·A·..., N·A·...)`; also returns N and the output shape."""
    if k.ndim < 2 or k.ndim % 2:
        hint = (" A kernel with diagonal_axes has an odd number of axes: compute it without "
                "diagonal_axes to get a matrix." if k.ndim > 2 else "")
        raise ValueError(f"{name} has shape {k.shape}; expected a traced kernel (N, N) or a full one "
                         f"(N, N, O, O) (axes interleaved as entk.empirical_ntk_fn lays them out).{hint}")
    pairs = [(k.shape[2 * i], k.shape[2 * i + 1]) for i in range(k.ndim // 2)]
    for i, (a, b) in enumerate(pairs):
        if a != b:
            which = "examples (axes 0, 1)" if i == 0 else f"output axes {2 * i}, {2 * i + 1}"
            raise ValueError(f"{name} is not square: shape {k.shape} has {a} rows but {b} columns for "
                             f"the {which}. These metrics need a kernel of a probe set with itself, "
                             f"K(x, x): call entk.ntk(model, x) with x2=None.")
    rows = tuple(a for a, _ in pairs)
    size = math.prod(rows)
    order = list(range(0, k.ndim, 2)) + list(range(1, k.ndim, 2))
    return k.transpose(order).reshape(size, size), rows[0], rows[1:]


def _check_symmetric(m: np.ndarray, dtype: np.dtype, rtol: float | None, name: str) -> np.ndarray:
    if not np.all(np.isfinite(m)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(m))[0])
        raise ValueError(f"{name} has a non-finite entry (NaN or inf) at flattened index {bad}; "
                         f"the kernel computation overflowed or the model produced NaNs.")
    if rtol is None:
        size = np.dtype(dtype).itemsize
        rtol = _RTOL_FLOAT64 if size >= 8 else _RTOL_HALF if size <= 2 else _RTOL_LOW_PRECISION
    scale = float(np.max(np.abs(m))) if m.size else 0.0
    asym = float(np.max(np.abs(m - m.T))) if m.size else 0.0
    if asym > rtol * scale:
        i, j = np.unravel_index(int(np.argmax(np.abs(m - m.T))), m.shape)
        raise ValueError(f"{name} is not symmetric: entries ({i}, {j}) and ({j}, {i}) differ by "
                         f"{asym:.3g}, more than rtol={rtol:g} times its largest entry ({scale:.3g}). "
                         f"An NTK K(x, x) is symmetric; if this is a kernel between two different "
                         f"sets, these metrics do not apply; if it is round-off, pass a larger rtol.")
    return (m + m.T) / 2


def as_matrix(k: ArrayLike, *, rtol: float | None = None, name: str = "k") -> np.ndarray:
    """The kernel as a symmetric float64 `(N·O, N·O)` NumPy matrix (see the module docstring).

    Raises ValueError if `k` is not square (per axis pair) or not symmetric within `rtol`.
    """
    arr, dtype = _to_numpy(k, name)
    matrix, _, _ = _flatten_kernel(arr, name)
    return _check_symmetric(matrix, dtype, rtol, name)


def _targets(y: ArrayLike, n: int, out_shape: tuple[int, ...]) -> np.ndarray:
    """Targets as a `(rows, C)` matrix `Y` whose `Y Yᵀ` is the target kernel for this kernel matrix.

    Traced kernel (N, N): `y` is `(N,)` or `(N, C)`; `Y Yᵀ = Σ_c y_c y_cᵀ`.
    Full kernel (N·O rows): `y` has shape `(N, *O)` and is flattened to a column of N·O entries.
    """
    arr, _ = _to_numpy(y, "y")
    if not out_shape:
        if arr.ndim not in (1, 2) or arr.shape[0] != n:
            raise ValueError(f"y has shape {arr.shape}; for a traced kernel of {n} examples it must be "
                             f"({n},) or ({n}, C) (one-hot rows for classes).")
        return arr.reshape(n, -1)
    if arr.shape != (n, *out_shape):
        raise ValueError(f"y has shape {arr.shape}; for a full kernel of {n} examples and outputs "
                         f"{out_shape} it must be {(n, *out_shape)}, matching the model output.")
    return arr.reshape(-1, 1)


def _center(m: np.ndarray, n: int) -> np.ndarray:
    """`(H ⊗ I) M (H ⊗ I)` with `H = I_N − 11ᵀ/N`: centers each output over the N examples."""
    per = m.shape[0] // n
    blocks = m.reshape(n, per, n, per)
    blocks = blocks - blocks.mean(axis=0, keepdims=True)
    blocks = blocks - blocks.mean(axis=2, keepdims=True)
    return blocks.reshape(m.shape)


def _frobenius_cosine(a: np.ndarray, b: np.ndarray, what: str) -> float:
    # The cosine does not depend on scale: dividing each matrix by its largest entry first keeps the
    # norms and the inner product from overflowing (a diverging network's kernel passes 1e154).
    a, b = (m / top if np.isfinite(top := np.max(np.abs(m), initial=0.0)) and top > 0 else m
            for m in (a, b))
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise ValueError(f"{what} is undefined: a matrix has zero Frobenius norm (an all-zero kernel, "
                         f"or constant targets with centered=True).")
    return float(np.sum(a * b) / (na * nb))


# ----------------------------------------------------------------------------------------------
# Metrics


def spectrum(k: ArrayLike, top: int | None = None, *, rtol: float | None = None) -> np.ndarray:
    """Eigenvalues of the kernel matrix, largest first: float64 array of `N·O` (or `top`) values.

    Tiny negative values can appear from round-off on a singular PSD kernel; they are returned as is.
    """
    m = as_matrix(k, rtol=rtol)
    values = np.linalg.eigvalsh(m)[::-1]
    if top is not None:
        if top < 1:
            raise ValueError(f"top={top}; ask for at least one eigenvalue.")
        values = values[:top]
    return np.ascontiguousarray(values)


def condition_number(k: ArrayLike, *, rtol: float | None = None) -> float:
    """`λ_max / λ_min` of the kernel matrix; `inf` when `λ_min ≤ 0` (singular, e.g. N·O > #params)."""
    values = spectrum(k, rtol=rtol)
    lo, hi = values[-1], values[0]
    return float(hi / lo) if lo > 0 else math.inf


def trace(k: ArrayLike, *, rtol: float | None = None) -> float:
    """Sum of the diagonal of the kernel matrix (all N·O (example, output) pairs of a full kernel)."""
    return float(np.trace(as_matrix(k, rtol=rtol)))


def kernel_alignment(k: ArrayLike, y: ArrayLike, *, centered: bool = False,
                     rtol: float | None = None) -> float:
    """Kernel-target alignment `⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)`, in [-1, 1] (in [0, 1] for PSD K).

    Args:
      k: traced `(N, N)` or full `(N, N, O, O)` kernel.
      y: targets. Traced kernel: `(N,)` or `(N, C)` (one-hot rows for classification; the target
        kernel is `Y Yᵀ`). Full kernel: the model-output shape `(N, O)`, flattened like the kernel.
      centered: Cortes et al. (2012) centered alignment: both matrices are replaced by
        `(H ⊗ I_O) M (H ⊗ I_O)`, `H = I_N − 11ᵀ/N`, i.e. each output (and each target column) is
        centered over the examples. For a full kernel this is consistent with the traced case: the
        trace over outputs of the centered full kernel is the centered traced kernel.
    """
    arr, dtype = _to_numpy(k, "k")
    matrix, n, out_shape = _flatten_kernel(arr, "k")
    matrix = _check_symmetric(matrix, dtype, rtol, "k")
    ys = _targets(y, n, out_shape)
    target = ys @ ys.T
    if centered:
        matrix, target = _center(matrix, n), _center(target, n)
    return _frobenius_cosine(matrix, target, "kernel_alignment" + (" (centered)" if centered else ""))


def kernel_distance(k1: ArrayLike, k2: ArrayLike, *, rtol: float | None = None) -> float:
    """`1 − ⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)`: 0 for kernels equal up to scale, at most 2 (1 for PSD pairs).

    Both kernels must have the same shape (e.g. the probe-set kernel at two training steps).
    """
    a_arr, a_dtype = _to_numpy(k1, "k1")
    b_arr, b_dtype = _to_numpy(k2, "k2")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"k1 has shape {a_arr.shape} but k2 has {b_arr.shape}; kernel_distance compares "
                         f"kernels of the same probe set with the same trace_axes.")
    a = _check_symmetric(_flatten_kernel(a_arr, "k1")[0], a_dtype, rtol, "k1")
    b = _check_symmetric(_flatten_kernel(b_arr, "k2")[0], b_dtype, rtol, "k2")
    return 1.0 - min(_frobenius_cosine(a, b, "kernel_distance"), 1.0)  # cos ≤ 1 but for round-off


def effective_rank(k: ArrayLike, *, method: str = "entropy", rtol: float | None = None) -> float:
    """A continuous count of the directions the kernel uses, between 1 and N·O.

    `method="entropy"` (Roy & Vetterli, 2007): `exp(−Σ p_i log p_i)` with `p_i = λ_i / Σ λ`.
    `method="participation"`: the participation ratio `(Σ λ)² / Σ λ²`.
    Negative eigenvalues (round-off on a singular PSD kernel) count as zero.
    """
    if method not in ("entropy", "participation"):
        raise ValueError(f"method={method!r}; use 'entropy' or 'participation'.")
    values = np.clip(spectrum(k, rtol=rtol), 0.0, None)
    if values.sum() <= 0:
        raise ValueError("effective_rank is undefined for a kernel with no positive eigenvalue.")
    if method == "participation":
        return float(values.sum() ** 2 / np.sum(values ** 2))
    return _entropy_rank(values)


def _entropy_rank(values: np.ndarray) -> float:
    """Entropy effective rank from eigenvalues (NaN when none is positive)."""
    values = np.clip(values, 0.0, None)
    total = values.sum()
    if total <= 0:
        return math.nan
    p = values[values > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
