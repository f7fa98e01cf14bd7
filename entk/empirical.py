"""The empirical kernels of a function `f(params, x, **kw)`: NTK, NNGP, both, and NTK-vector products.

Conventions are neural-tangents' (so its users feel at home), for every output leaf of `f`:
- the kernel of an output of shape `(N, A, B)` is laid out `(N1, N2, A1, A2, B1, B2)`; `trace_axes`
  are averaged away (summed, divided by their size) and `diagonal_axes` appear once
  (see `entk.algorithms.axes`);
- `x2=None` means `x1`;
- keyword arguments go to `f`; an `rng` key is shared when `x2` is `None` or `x1`, else `x2` gets
  `random.fold_in(rng, 1)`; a tuple of two values gives the first to `f(x1)` and the second to `f(x2)`.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from entk import _compilation_cache
from entk._get import canonical_get
from entk import algorithms
from entk.algorithms import Strategy
from entk.algorithms._apply import output_shapes, split_kwargs
from entk.algorithms.axes import KernelAxes, VmapAxes
from entk.model import ALL_STRATEGIES, Model

PyTree = Any
KernelFn = Callable[..., PyTree]

EmpiricalKernel = collections.namedtuple("EmpiricalKernel", ["nngp", "ntk"])


# ----------------------------------------------------------------------------------------------
# Public API


def empirical_ntk_fn(f: Callable[..., PyTree] | Model, trace_axes: int | Sequence[int] = (-1,),
                     diagonal_axes: int | Sequence[int] = (), vmap_axes: Any = None,
                     implementation: Strategy | str | int = "auto",
                     memory_budget: int | None = None) -> KernelFn:
    """Returns `ntk_fn(x1, x2, params, **kw)`, the empirical NTK `J(x1) J(x2)ᵀ` of `f`.

    Args:
      f: `f(params, x, **kw) -> array or pytree`, pure JAX, or an `entk.Model`.
      trace_axes: output axes to average over (default: the last, the logits).
      diagonal_axes: output axes on which only `x1`/`x2` entries with equal index are kept.
      vmap_axes: `None`, an int, `(in_axes, out_axes, kwargs_axes)`, or `"auto"`: where the batch axis
        is, for a model that treats examples independently; strategies then work one example at a
        time, which is much cheaper. The model is verified once per shapes, eagerly and under
        `jax.jit` alike (a structural proof over its jaxpr, plus two forward passes when values are
        concrete; `entk.algorithms.batch_independence`), and refused with an error naming the
        operation and source line if it couples examples (e.g. BatchNorm in training mode) or takes
        an undeclared per-example keyword argument (declare it in `kwargs_axes`, e.g.
        `(0, 0, {"mask": 0})`). `"auto"`: batch axis 0 on inputs (keyword arguments shared) where the
        analysis proves independence, the whole batch at once otherwise, silently.
      implementation: `"auto"`, `"jc"` (Jacobian contraction), `"ntvp"` (NTK-vector products),
        `"sd"` (structured derivatives), an `entk.Strategy`, or the ints 0-3. `"auto"` runs the
        strategy the cost model (`entk.algorithms.cost`) predicts fastest among those whose peak memory
        fits `memory_budget`; the choice is made once per shapes/dtypes and cached.
      memory_budget: bytes `"auto"` may use (default: half the device's free memory).

    Returns:
      `ntk_fn(x1, x2, params, **kw)`: the kernel, a pytree like `f`'s output, each leaf laid out
      `(N1, N2, O1, O2, ...)` less traced axes and with diagonal axes once. Works under `jax.jit`.
    """
    f, capabilities = _unwrap_model(f)
    axes = KernelAxes.create(trace_axes, diagonal_axes)
    vmap = AUTO if _is_auto(vmap_axes) else VmapAxes.create(vmap_axes)
    strategy = Strategy.parse(implementation)
    _check_supported(strategy, capabilities)

    def ntk_fn(x1: PyTree, x2: PyTree | None, params: PyTree, **apply_fn_kwargs: Any) -> PyTree:
        _compilation_cache.enable()  # compile once per machine (see entk/_compilation_cache.py)
        call = _prepare(f, x1, x2, params, apply_fn_kwargs, axes, vmap)
        chosen = strategy
        if strategy is Strategy.AUTO:
            from entk.algorithms import cost

            chosen = cost.select(f, x1, call.x2, params, apply_fn_kwargs,
                                 {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes,
                                  "vmap_axes": call.vmap},
                                 capabilities=capabilities, memory_budget=memory_budget)
        return algorithms.get(chosen)(f, call.x1, call.x2, params, call.kwargs1, call.kwargs2,
                                      axes, call.vmap)

    ntk_fn.__doc__ = f"Empirical NTK ({strategy.short_name}); see entk.empirical_ntk_fn."
    return ntk_fn


def empirical_nngp_fn(f: Callable[..., PyTree] | Model, trace_axes: int | Sequence[int] = (-1,),
                      diagonal_axes: int | Sequence[int] = ()) -> KernelFn:
    """Returns `nngp_fn(x1, x2, params, **kw)`, the empirical NNGP `f(x1) f(x2)ᵀ` of `f`.

    Same axis conventions and output layout as `empirical_ntk_fn`.
    """
    f, _ = _unwrap_model(f)
    axes = KernelAxes.create(trace_axes, diagonal_axes)

    def nngp_fn(x1: PyTree, x2: PyTree | None, params: PyTree, **apply_fn_kwargs: Any) -> PyTree:
        call = _prepare(f, x1, x2, params, apply_fn_kwargs, axes, None)
        fx1 = f(params, call.x1, **call.kwargs1)
        fx2 = fx1 if call.x2 is None else f(params, call.x2, **call.kwargs2)

        def one_leaf(a: jax.Array, b: jax.Array) -> jax.Array:
            leaf_axes = axes.for_leaf(a.ndim)
            canonical = leaf_axes.contract(a, b) / leaf_axes.trace_size(a.shape)
            return leaf_axes.to_output_layout(canonical)

        return jax.tree_util.tree_map(one_leaf, fx1, fx2)

    return nngp_fn


def empirical_kernel_fn(f: Callable[..., PyTree] | Model, trace_axes: int | Sequence[int] = (-1,),
                        diagonal_axes: int | Sequence[int] = (), vmap_axes: Any = None,
                        implementation: Strategy | str | int = "auto") -> KernelFn:
    """Returns `kernel_fn(x1, x2=None, get=None, params=None, **kw)` computing NNGP and/or NTK.

    `get` is `"nngp"`, `"ntk"`, or a tuple of them (a namedtuple in that order comes back); `None`
    means both (an `EmpiricalKernel(nngp, ntk)`).
    """
    fns = {"nngp": empirical_nngp_fn(f, trace_axes, diagonal_axes),
           "ntk": empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation)}

    def kernel_fn(x1: PyTree, x2: PyTree | None = None, get: str | Sequence[str] | None = None,
                  params: PyTree = None, **apply_fn_kwargs: Any) -> Any:
        if params is None:
            raise TypeError("kernel_fn needs params=...: the parameters to differentiate.")
        names, single = canonical_get(get, ("nngp", "ntk"), default=("nngp", "ntk"), noun="kernel")
        values = [fns[name](x1, x2, params, **apply_fn_kwargs) for name in names]
        if single:
            return values[0]
        if names == ("nngp", "ntk"):
            return EmpiricalKernel(*values)
        return collections.namedtuple("EmpiricalKernel", names)(*values)

    return kernel_fn


def empirical_ntk_vp_fn(f: Callable[..., PyTree] | Model, x1: PyTree, x2: PyTree | None,
                        params: PyTree, **apply_fn_kwargs: Any) -> Callable[[PyTree], PyTree]:
    """Returns `v ↦ Θ(x1, x2) v` without forming Θ: a VJP through `f(x2)` then a JVP through `f(x1)`.

    `v` has the structure and shapes of `f(params, x2)`; the result those of `f(params, x1)`. No axis
    is traced or averaged: this is the full kernel as a linear operator.
    """
    f, _ = _unwrap_model(f)
    call = _prepare(f, x1, x2, params, apply_fn_kwargs, KernelAxes((), ()), None)
    x2_, kw2 = (call.x1, call.kwargs1) if call.x2 is None else (call.x2, call.kwargs2)
    _, vjp2 = jax.vjp(lambda p: f(p, x2_, **kw2), params)
    _, jvp1 = jax.linearize(lambda p: f(p, call.x1, **call.kwargs1), params)

    def ntk_vp(cotangents: PyTree) -> PyTree:
        return jvp1(vjp2(cotangents)[0])

    return ntk_vp


def ntk(model: Any, x1: Any, x2: Any = None, *, params: PyTree = None, **ntk_kwargs: Any) -> Any:
    """The empirical NTK of any supported model in one call: arrays of the model's kind in and out.

    `model` is an `entk.Model`, a PyTorch module, a Keras model or `tf.function`, or a plain
    `f(params, x)` (then pass `params=`). Torch tensors in give a torch tensor out (TF and NumPy
    likewise). `ntk_kwargs` are those of `empirical_ntk_fn`, except that `vmap_axes` defaults to
    `"auto"` (per-example computation wherever the batch-independence analysis proves it right; pass
    `vmap_axes=None` for the whole batch at once). A model is converted once and its kernel
    function compiled once per set of `ntk_kwargs`, then reused across calls.

    Never stale: a torch module's weights are read at every call (without copying), and a change to
    anything its conversion baked in (dtypes, submodules, plain attributes, ...) converts it again;
    Keras / TF variables are read at every call too. Float64 in, float64 computed: a float64 model or
    float64 inputs are computed with JAX's 64-bit mode on for this call (`jax.enable_x64`), even in a
    process that runs JAX in 32 bits; float32 models and JAX arrays are left as they are.
    """
    from entk import adapters

    ntk_kwargs.setdefault("vmap_axes", "auto")  # per-example wherever independence is proven
    with adapters.precision_scope(model, x1, x2, params):
        converted = adapters.to_model(model, x1, params=params, live=True)
        to_jax, to_native = adapters.array_converters(x1)
        jx1 = jax.tree_util.tree_map(to_jax, x1)
        jx2 = None if x2 is None else jax.tree_util.tree_map(to_jax, x2)
        fn = _compiled_ntk_fn(converted, ntk_kwargs)
        # Done before returning: the model's arrays may alias the torch module's tensors.
        kernel = jax.block_until_ready(fn(jx1, jx2, converted.params if params is None else params))
        return jax.tree_util.tree_map(lambda k: to_native(k, x1), kernel)


# Compiled kernel functions, keyed by the model's apply function (not the Model object), so a Model
# rebuilt with new weights (training, a re-read torch module) reuses them: params and state are
# arguments of the compiled function, never constants baked into it.
_COMPILED: "collections.OrderedDict[Any, tuple[Callable, dict]]" = collections.OrderedDict()
_COMPILED_MAX = 64


def _compiled_ntk_fn(model: Model, ntk_kwargs: dict) -> Callable[..., PyTree]:
    """`(x1, x2, params) -> kernel`, jitted once per apply function, capabilities and settings."""
    fn = model.apply_with_state
    entry = _COMPILED.get(id(fn))
    if entry is None or entry[0] is not fn:
        entry = (fn, {})  # holding fn keeps its id from being reused while cached
        _COMPILED[id(fn)] = entry
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    per_fn = entry[1]
    key = (repr(sorted(ntk_kwargs.items())), tuple(sorted(model.capabilities)))
    if key not in per_fn:
        capabilities = model.capabilities

        def kernel(x1, x2, params, state):
            bound = Model(fn, params, state, capabilities=capabilities)
            return empirical_ntk_fn(bound, **ntk_kwargs)(x1, x2, params)

        per_fn[key] = jax.jit(kernel)
    compiled = per_fn[key]
    return lambda x1, x2, params: compiled(x1, x2, params, model.state)


# ----------------------------------------------------------------------------------------------
# Validation and argument preparation

AUTO = "auto"  # `vmap_axes="auto"`: resolved per shapes by `batch_independence.auto_vmap_axes`


def _is_auto(vmap_axes: Any) -> bool:
    return isinstance(vmap_axes, str) and vmap_axes.strip().lower() == AUTO


class _Call(collections.namedtuple("_Call", "x1 x2 kwargs1 kwargs2 fx1 fx2 vmap")):
    """A validated call: inputs (x2 None when it is x1), split kwargs, output shapes, and the
    verified `VmapAxes` (`"auto"` resolved: None means the whole batch at once)."""


def _unwrap_model(f: Any) -> tuple[Callable[..., PyTree], frozenset]:
    if isinstance(f, Model):
        return f.apply, f.capabilities
    if not callable(f):
        raise TypeError(f"f must be a function f(params, x, **kw) or an entk.Model, got {type(f)}.")
    return f, ALL_STRATEGIES


def _check_supported(strategy: Strategy, capabilities: frozenset) -> None:
    if strategy is not Strategy.AUTO and strategy.short_name not in capabilities:
        raise ValueError(f"implementation={strategy.short_name!r} is not supported by this model "
                         f"(it supports {sorted(capabilities)}); e.g. a model that calls back into "
                         f"PyTorch or TensorFlow cannot use structured derivatives.")


def _prepare(f, x1, x2, params, kwargs, axes: KernelAxes, vmap: VmapAxes | str | None) -> _Call:
    _check_params(params)
    if x2 is x1:
        x2 = None
    in_axes = (vmap.input_axes(x1) if isinstance(vmap, VmapAxes)
               else jax.tree_util.tree_map(lambda _: 0, x1))
    if x2 is not None:
        _check_inputs(x1, x2, in_axes)
    kwargs1, kwargs2 = split_kwargs(kwargs, x1, x2)
    if x2 is None:
        kwargs2 = kwargs1
    fx1 = output_shapes(f, x1, kwargs1, params)
    fx2 = fx1 if x2 is None else output_shapes(f, x2, kwargs2, params)
    _check_outputs(fx1, fx2, axes)
    if vmap == AUTO:
        from entk.algorithms.batch_independence import auto_vmap_axes

        vmap = auto_vmap_axes(f, x1, x2, params, kwargs1, kwargs2)
    elif vmap is not None:
        _check_batch_independent(f, x1, params, kwargs1, vmap)
        if x2 is not None:
            _check_batch_independent(f, x2, params, kwargs2, vmap)
    return _Call(x1, x2, kwargs1, kwargs2, fx1, fx2, vmap)


def _path(keypath) -> str:
    return jax.tree_util.keystr(keypath) or "(root)"


def _check_params(params: PyTree) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(f"params{_path(path)} is a {type(leaf).__name__} ({leaf!r}), not an array; "
                            f"parameters must be floating-point arrays (wrap it in jnp.asarray(..., "
                            f"dtype=jnp.float32) or move it out of params).")
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(f"params{_path(path)} has dtype {leaf.dtype}; only floating-point "
                            f"parameters can be differentiated. Move integer leaves (indices, "
                            f"step counters) out of params, e.g. into the model's state or kwargs.")


def _check_inputs(x1: PyTree, x2: PyTree, in_axes: PyTree) -> None:
    s1, s2 = jax.tree_util.tree_structure(x1), jax.tree_util.tree_structure(x2)
    if s1 != s2:
        raise ValueError(f"x1 and x2 must have the same structure, got {s1} and {s2}.")
    for (path, a), b, axis in zip(jax.tree_util.tree_leaves_with_path(x1),
                                  jax.tree_util.tree_leaves(x2), jax.tree_util.tree_leaves(in_axes)):
        sa, sb = list(jnp.shape(a)), list(jnp.shape(b))
        if len(sa) != len(sb) or (sa[:axis] + sa[axis + 1:]) != (sb[:axis] + sb[axis + 1:]):
            raise ValueError(f"x1{_path(path) if path else ''} has shape {tuple(sa)} and x2 has "
                             f"{tuple(sb)}: they may differ only in the batch axis {axis}.")


def _check_outputs(fx1: PyTree, fx2: PyTree, axes: KernelAxes) -> None:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fx1), jax.tree_util.tree_leaves(fx2)):
        where = f"the output{_path(path) if path else ''} of shape {a.shape}"
        leaf_axes = axes.for_leaf(len(a.shape), where)
        for name, group in (("trace_axes", leaf_axes.trace), ("diagonal_axes", leaf_axes.diagonal)):
            for axis in group:
                if a.shape[axis] != b.shape[axis]:
                    raise ValueError(
                        f"{name} includes axis {axis} of {where}, which has size {a.shape[axis]} for "
                        f"x1 but {b.shape[axis]} for x2; a {name[:-5]} axis pairs entries with equal "
                        f"index, so both sizes must agree (e.g. use the same batch size for x1 and x2 "
                        f"or drop axis {axis} from {name}).")


def _check_batch_independent(f, x, params, kwargs, vmap: VmapAxes) -> None:
    """Refuses `vmap_axes` for a model whose outputs mix examples, eagerly and under tracing alike.

    A structural proof over `f`'s jaxpr, plus a numerical probe (whole batch vs one example at a
    time) when values are concrete; both cached per function and shapes. See
    `entk.algorithms.batch_independence`.
    """
    from entk.algorithms import batch_independence

    batch_independence.check(f, x, params, kwargs, vmap)
