"""Shape, indexing and tensor-creation ATen ops.

Sizes arrive as Python ints (symbolic sizes of a dynamic-batch export are already evaluated against
the actual input shapes by the exporter), so every shape computed here is static for JAX.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
import numpy as np

from entk.adapters.torch.aten import ShapeAssertionError, as_int_list, norm_dim, norm_dims, register

_INT64_MAX = 2**63 - 1

# ---------------------------------------------------------------- views


@register("view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias")
def view(self, size, *args):
    return jnp.reshape(self, tuple(as_int_list(size)))


@register("permute", "permute_copy")
def permute(self, dims):
    return jnp.transpose(self, tuple(norm_dim(d, self.ndim) for d in dims))


@register("transpose.int", "transpose_copy.int", "swapaxes", "swapdims")
def transpose(self, dim0, dim1):
    if self.ndim < 2:
        return self
    return jnp.swapaxes(self, norm_dim(dim0, self.ndim), norm_dim(dim1, self.ndim))


@register("t", "t_copy", "numpy_T")
def t(self):
    return self.T


@register("expand", "expand_copy")
def expand(self, size, *, implicit=False):
    size = as_int_list(size)
    lead = len(size) - self.ndim
    shape = tuple(self.shape[i - lead] if s == -1 else s for i, s in enumerate(size))
    return jnp.broadcast_to(self, shape)


@register("expand_as")
def expand_as(self, other):
    return jnp.broadcast_to(self, other.shape)


@register("unsqueeze", "unsqueeze_copy")
def unsqueeze(self, dim):
    return jnp.expand_dims(self, norm_dim(dim, self.ndim + 1))


@register("squeeze.dims", "squeeze.dim", "squeeze.default", "squeeze_copy.dims",
          "squeeze_copy.dim", "squeeze_copy.default")
def squeeze(self, dim=None):
    if self.ndim == 0 or (isinstance(dim, (list, tuple)) and not dim):
        return self  # squeeze.dims(x, []) squeezes nothing
    dims = norm_dims(dim, self.ndim) if dim is not None else tuple(range(self.ndim))
    return jnp.squeeze(self, tuple(d for d in dims if self.shape[d] == 1))


@register("flatten.using_ints")
def flatten(self, start_dim=0, end_dim=-1):
    if self.ndim == 0:
        return jnp.reshape(self, (1,))
    s, e = norm_dim(start_dim, self.ndim), norm_dim(end_dim, self.ndim)
    return jnp.reshape(self, self.shape[:s] + (-1,) + self.shape[e + 1:])


@register("unflatten.int")
def unflatten(self, dim, sizes):
    d = norm_dim(dim, self.ndim)
    return jnp.reshape(self, self.shape[:d] + tuple(as_int_list(sizes)) + self.shape[d + 1:])


def _slice_bounds(start, end, step, size):
    start = 0 if start is None else start
    end = size if end is None or end >= _INT64_MAX else end
    return slice(*slice(start, end, step).indices(size))


@register("slice.Tensor", "slice_copy.Tensor")
def slice_(self, dim=0, start=None, end=None, step=1):
    d = norm_dim(dim, self.ndim)
    s = _slice_bounds(start, end, step, self.shape[d])
    index = [slice(None)] * self.ndim
    index[d] = s
    return self[tuple(index)]


@register("select.int", "select_copy.int")
def select(self, dim, index):
    d = norm_dim(dim, self.ndim)
    index = index + self.shape[d] if index < 0 else index
    return lax.index_in_dim(self, index, axis=d, keepdims=False)


@register("narrow")
def narrow(self, dim, start, length):
    d = norm_dim(dim, self.ndim)
    start = start + self.shape[d] if start < 0 else start
    return lax.slice_in_dim(self, start, start + length, axis=d)


@register("diagonal", "diagonal_copy")
def diagonal(self, offset=0, dim1=0, dim2=1):
    return jnp.diagonal(self, offset, norm_dim(dim1, self.ndim), norm_dim(dim2, self.ndim))


@register("unfold")
def unfold(self, dimension, size, step):
    """Sliding windows of `size` along `dimension`, appended as the last axis (Tensor.unfold)."""
    if self.ndim == 0:
        return jnp.reshape(self, (1,))
    d = norm_dim(dimension, self.ndim)
    n = (self.shape[d] - size) // step + 1
    idx = np.arange(n)[:, None] * step + np.arange(size)[None, :]
    out = jnp.take(self, jnp.asarray(idx.reshape(-1)), axis=d)
    out = jnp.reshape(out, self.shape[:d] + (n, size) + self.shape[d + 1:])
    return jnp.moveaxis(out, d + 1, -1)


# ---------------------------------------------------------------- joining and splitting


@register("cat")
def cat(tensors, dim=0):
    # PyTorch skips legacy empty 1-d tensors of shape (0,) when concatenating higher-rank tensors.
    ranks = [t.ndim for t in tensors]
    keep = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0 and max(ranks) > 1)]
    keep = keep or list(tensors[:1])
    return jnp.concatenate(keep, axis=norm_dim(dim, keep[0].ndim))


@register("stack")
def stack(tensors, dim=0):
    return jnp.stack(tensors, axis=norm_dim(dim, tensors[0].ndim + 1))


def _split_at(self, sizes, d):
    bounds = np.cumsum([0] + list(sizes))
    return tuple(lax.slice_in_dim(self, int(a), int(b), axis=d)
                 for a, b in zip(bounds[:-1], bounds[1:]))


@register("split_with_sizes", "split_with_sizes_copy")
def split_with_sizes(self, split_sizes, dim=0):
    return _split_at(self, as_int_list(split_sizes), norm_dim(dim, self.ndim))


@register("split.Tensor", "split_copy.Tensor")
def split(self, split_size, dim=0):
    d = norm_dim(dim, self.ndim)
    n = self.shape[d]
    sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else [])
    return _split_at(self, sizes or [0], d)


@register("unbind.int", "unbind_copy.int")
def unbind(self, dim=0):
    d = norm_dim(dim, self.ndim)
    return tuple(lax.index_in_dim(self, i, axis=d, keepdims=False) for i in range(self.shape[d]))


@register("chunk")
def chunk(self, chunks, dim=0):
    d = norm_dim(dim, self.ndim)
    size = -(-self.shape[d] // chunks)
    return split(self, size, d)


# ---------------------------------------------------------------- indexing and scattering


def _check_index(index, op):
    if index.dtype == jnp.bool_:
        raise NotImplementedError(
            f"{op} with a boolean mask has a data-dependent output shape, which plain JAX cannot "
            "express; index with integer tensors, or use mode='bridge'.")


@register("index.Tensor", "_unsafe_index.Tensor")
def index(self, indices):
    key = []
    for i in indices:
        if i is None:
            key.append(slice(None))
        else:
            _check_index(i, "aten.index")
            key.append(i)
    return self[tuple(key)]


@register("index_select")
def index_select(self, dim, index):
    return jnp.take(self, jnp.reshape(index, (-1,)), axis=norm_dim(dim, self.ndim))


def _grid(index, d):
    """Full index arrays for a scatter/gather along `d`: `index` on axis d, iotas elsewhere."""
    grids = list(jnp.indices(index.shape, sparse=True))
    grids[d] = index
    return tuple(grids)


def _leading_block(x, shape):
    return x[tuple(slice(0, s) for s in shape)]


@register("gather")
def gather(self, dim, index, *, sparse_grad=False):
    if self.ndim == 0:
        return self
    d = norm_dim(dim, self.ndim)
    # torch.gather allows index to be smaller than self in every dim but `dim`.
    return self[_grid(index, d)]


@register("scatter.src", "scatter.value")
def scatter(self, dim, index, src):
    d = norm_dim(dim, self.ndim)
    values = src if not hasattr(src, "shape") else _leading_block(src, index.shape)
    return self.at[_grid(index, d)].set(values, mode="promise_in_bounds")


@register("scatter_add")
def scatter_add(self, dim, index, src):
    d = norm_dim(dim, self.ndim)
    return self.at[_grid(index, d)].add(_leading_block(src, index.shape))


@register("scatter_reduce.two")
def scatter_reduce(self, dim, index, src, reduce, *, include_self=True):
    d = norm_dim(dim, self.ndim)
    where, values = _grid(index, d), _leading_block(src, index.shape)
    if reduce in ("sum", "mean"):
        base = self if include_self else self.at[where].set(0)
        out = base.at[where].add(values)
        if reduce == "sum":
            return out
        counts = jnp.zeros(self.shape, self.dtype).at[where].add(1) + (1 if include_self else 0)
        out = out / jnp.maximum(counts, 1)
        return out.astype(self.dtype) if jnp.issubdtype(self.dtype, jnp.floating) else out
    fill = {"prod": 1, "amax": -jnp.inf, "amin": jnp.inf}.get(reduce)
    if fill is None:
        raise NotImplementedError(f"aten.scatter_reduce with reduce={reduce!r}")
    base = self if include_self else self.at[where].set(jnp.asarray(fill, self.dtype))
    method = {"prod": "multiply", "amax": "max", "amin": "min"}[reduce]
    out = getattr(base.at[where], method)(values)
    if not include_self:  # positions no index touches keep their original value
        touched = jnp.zeros(self.shape, bool).at[where].set(True)
        out = jnp.where(touched, out, self)
    return out


@register("index_put")
def index_put(self, indices, values, accumulate=False):
    key = []
    for i in indices:
        if i is not None:
            _check_index(i, "aten.index_put")
        key.append(slice(None) if i is None else i)
    ref = self.at[tuple(key)]
    return ref.add(values) if accumulate else ref.set(values)


@register("index_add")
def index_add(self, dim, index, source, *, alpha=1):
    d = norm_dim(dim, self.ndim)
    key = [slice(None)] * self.ndim
    key[d] = index
    return self.at[tuple(key)].add(jnp.moveaxis(jnp.moveaxis(source, d, 0) * alpha, 0, d))


@register("index_copy")
def index_copy(self, dim, index, source):
    d = norm_dim(dim, self.ndim)
    key = [slice(None)] * self.ndim
    key[d] = index
    return self.at[tuple(key)].set(source)


@register("select_scatter")
def select_scatter(self, src, dim, index):
    d = norm_dim(dim, self.ndim)
    key = [slice(None)] * self.ndim
    key[d] = index + self.shape[d] if index < 0 else index
    return self.at[tuple(key)].set(src)


@register("slice_scatter")
def slice_scatter(self, src, dim=0, start=None, end=None, step=1):
    d = norm_dim(dim, self.ndim)
    key = [slice(None)] * self.ndim
    key[d] = _slice_bounds(start, end, step, self.shape[d])
    return self.at[tuple(key)].set(src)


@register("masked_scatter")
def masked_scatter(self, mask, source):
    raise NotImplementedError(
        "aten.masked_scatter places values at data-dependent positions; use mode='bridge'.")


# ---------------------------------------------------------------- reordering and padding


@register("flip")
def flip(self, dims):
    return jnp.flip(self, norm_dims(list(dims), self.ndim)) if len(dims) else self


@register("roll")
def roll(self, shifts, dims=()):
    shifts = as_int_list(shifts)
    if not dims:
        return jnp.reshape(jnp.roll(jnp.reshape(self, (-1,)), shifts[0]), self.shape)
    return jnp.roll(self, shifts, tuple(norm_dim(d, self.ndim) for d in as_int_list(dims)))


@register("repeat")
def repeat(self, repeats):
    repeats = as_int_list(repeats)
    x = jnp.reshape(self, (1,) * (len(repeats) - self.ndim) + self.shape)
    return jnp.tile(x, repeats)


@register("tril")
def tril(self, diagonal=0):
    return jnp.tril(self, diagonal)


@register("triu")
def triu(self, diagonal=0):
    return jnp.triu(self, diagonal)


def _pad_pairs(pad, ndim):
    """PyTorch's flat `pad` list (last dim first) → per-axis (low, high) pairs."""
    pad = as_int_list(pad)
    pairs = [(0, 0)] * ndim
    for i in range(len(pad) // 2):
        pairs[ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return pairs


@register("constant_pad_nd")
def constant_pad_nd(self, pad, value=0):
    config = [(lo, hi, 0) for lo, hi in _pad_pairs(pad, self.ndim)]
    return lax.pad(self, jnp.asarray(value, self.dtype), config)


def _padded(mode):
    def translate(self, padding):
        return jnp.pad(self, _pad_pairs(padding, self.ndim), mode=mode)
    return translate


for _n in (1, 2, 3):
    register(f"reflection_pad{_n}d")(_padded("reflect"))
    register(f"replication_pad{_n}d")(_padded("edge"))
register("_pad_circular")(_padded("wrap"))


@register("pad")
def pad(self, pad, mode="constant", value=None):
    if mode == "constant":
        return constant_pad_nd(self, pad, 0 if value is None else value)
    modes = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    if mode not in modes:
        raise NotImplementedError(f"aten.pad with mode={mode!r}")
    return jnp.pad(self, _pad_pairs(pad, self.ndim), mode=modes[mode])


# ---------------------------------------------------------------- creation


def _dtype(dtype, like=None):
    if dtype is not None:
        return dtype
    return None if like is None else like.dtype


@register("full")
def full(size, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None):
    return jnp.full(tuple(as_int_list(size)), fill_value, dtype=dtype)


@register("full_like")
def full_like(self, fill_value, *, dtype=None, **_):
    return jnp.full(self.shape, fill_value, dtype=_dtype(dtype, self))


@register("zeros_like", "empty_like")
def zeros_like(self, *, dtype=None, **_):
    return jnp.zeros(self.shape, dtype=_dtype(dtype, self))


@register("ones_like")
def ones_like(self, *, dtype=None, **_):
    return jnp.ones(self.shape, dtype=_dtype(dtype, self))


@register("rand_like", "randn_like", "rand", "randn", "bernoulli", "randint", "randperm",
          "normal", "uniform", "exponential")
def random_op(*args, **kwargs):
    raise NotImplementedError(
        "random ops have no deterministic JAX translation; convert the model in eval mode "
        "(the default: dropout off), remove the randomness, or use mode='bridge'.")


@register("zeros", "empty.memory_format", "new_zeros", "new_empty")
def zeros(*args, dtype=None, **_):
    like, size = (args[0], args[1]) if len(args) > 1 else (None, args[0])
    return jnp.zeros(tuple(as_int_list(size)), dtype=_dtype(dtype, like))


@register("empty_strided", "new_empty_strided")
def empty_strided(*args, dtype=None, **_):
    like, size = (args[0], args[1]) if len(args) > 2 else (None, args[0])
    return jnp.zeros(tuple(as_int_list(size)), dtype=_dtype(dtype, like))


@register("ones", "new_ones")
def ones(*args, dtype=None, **_):
    like, size = (args[0], args[1]) if len(args) > 1 else (None, args[0])
    return jnp.ones(tuple(as_int_list(size)), dtype=_dtype(dtype, like))


@register("new_full")
def new_full(self, size, fill_value, *, dtype=None, **_):
    return jnp.full(tuple(as_int_list(size)), fill_value, dtype=_dtype(dtype, self))


@register("scalar_tensor")
def scalar_tensor(s, *, dtype=None, **_):
    return jnp.asarray(s, dtype=dtype)


@register("arange.default", "arange.start", "arange.start_step")
def arange(*args, dtype=None, **_):
    return jnp.arange(*args, dtype=dtype)


@register("linspace")
def linspace(start, end, steps, *, dtype=None, **_):
    return jnp.linspace(start, end, steps, dtype=dtype)


@register("eye")
def eye(n, m=None, *, dtype=None, **_):
    return jnp.eye(n, m, dtype=dtype)


# ---------------------------------------------------------------- symbolic sizes and assertions


@register("sym_size.int")
def sym_size(self, dim):
    return int(self.shape[norm_dim(dim, self.ndim)])


@register("sym_numel")
def sym_numel(self):
    return int(np.prod(self.shape))


@register("sym_stride.int")
def sym_stride(self, dim):
    # The translation only sees values, never memory; report the contiguous stride.
    return int(np.prod(self.shape[norm_dim(dim, self.ndim) + 1:]))


@register("sym_storage_offset")
def sym_storage_offset(self):
    return 0


@register("_assert_scalar")
def assert_scalar(condition, message=""):
    if isinstance(condition, (bool, int, np.bool_)) and not condition:
        raise ShapeAssertionError(f"the exported model asserts {message!r}, which fails for these "
                                  "input shapes")


@register("_assert_tensor_metadata", "sym_constrain_range", "sym_constrain_range_for_size",
          "_assert_async", "_print", "_functional_sym_constrain_range",
          "_functional_sym_constrain_range_for_size", "_functional_assert_async")
def no_op(*args, **kwargs):
    return None


@register("_local_scalar_dense", "item")
def local_scalar_dense(self):
    raise NotImplementedError(
        "reading a tensor's value as a Python number (.item()) makes the model's control flow "
        "data-dependent; use mode='bridge'.")


__all__: list[str] = []
