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
import inspect
from typing import Any, Callable, Sequence

import jax

from entk import _compilation_cache, adapters
from entk._get import canonical_get
from entk.algorithms import Strategy
from entk.algorithms.axes import KernelAxes
from entk.algorithms.call import kernel_settings, prepare
from entk.kernel_programs import NtkPrograms
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
      f: the model: `f(params, x, **kw) -> array or pytree` (pure JAX), an `entk.Model`, a
        `(flax_module, variables)` pair, a `torch.nn.Module`, or a Keras model / `tf.function`.
        Framework models are converted when the kernel function is first called (the adapters
        cache the conversion and read the current weights at every call); their inputs may be
        the framework's own arrays (the kernel comes back as JAX arrays; `entk.ntk` gives the
        framework's kind back).
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
      `ntk_fn(x1, x2=None, params=None, **kw)`: the kernel, a pytree like `f`'s output, each leaf
      laid out `(N1, N2, O1, O2, ...)` less traced axes and with diagonal axes once. `params=None`
      means the model's own weights (required for a plain `f`). Works under `jax.jit` (pass
      `params` there for a framework model, so its weights are not baked into the compiled code).
    """
    settings = dict(trace_axes=trace_axes, diagonal_axes=diagonal_axes, vmap_axes=vmap_axes,
                    implementation=implementation, memory_budget=memory_budget)
    if adapters.needs_example(f):
        return _converting(f, "ntk", settings)
    f, capabilities, own_params = _unwrap_model(f)
    axes, vmap = kernel_settings(trace_axes, diagonal_axes, vmap_axes)
    strategy = Strategy.parse(implementation)
    _check_supported(strategy, capabilities)

    def ntk_fn(x1: PyTree, x2: PyTree | None = None, params: PyTree = None,
               **apply_fn_kwargs: Any) -> PyTree:
        _compilation_cache.enable()  # compile once per machine (see entk/_compilation_cache.py)
        params = _params(params, own_params, "ntk_fn(x1, x2, params)")
        call = prepare(f, x1, x2, params, apply_fn_kwargs, axes, vmap)
        chosen = strategy
        if strategy is Strategy.AUTO:
            from entk.algorithms import cost

            chosen = cost.select(f, x1, call.x2, params, apply_fn_kwargs,
                                 {"trace_axes": trace_axes, "diagonal_axes": diagonal_axes,
                                  "vmap_axes": call.vmap},
                                 capabilities=capabilities, memory_budget=memory_budget, call=call)
        return call.run(chosen)

    ntk_fn.__doc__ = f"Empirical NTK ({strategy.short_name}); see entk.empirical_ntk_fn."
    return ntk_fn


def empirical_nngp_fn(f: Callable[..., PyTree] | Model, trace_axes: int | Sequence[int] = (-1,),
                      diagonal_axes: int | Sequence[int] = ()) -> KernelFn:
    """Returns `nngp_fn(x1, x2, params, **kw)`, the empirical NNGP `f(x1) f(x2)ᵀ` of `f`.

    Same models, axis conventions, output layout and `params=None` default as `empirical_ntk_fn`.
    """
    if adapters.needs_example(f):
        return _converting(f, "nngp", dict(trace_axes=trace_axes, diagonal_axes=diagonal_axes))
    f, _, own_params = _unwrap_model(f)
    axes = KernelAxes.create(trace_axes, diagonal_axes)

    def nngp_fn(x1: PyTree, x2: PyTree | None = None, params: PyTree = None,
                **apply_fn_kwargs: Any) -> PyTree:
        params = _params(params, own_params, "nngp_fn(x1, x2, params)")
        call = prepare(f, x1, x2, params, apply_fn_kwargs, axes, None)
        fx1 = f(params, call.x1, **call.kwargs1)
        fx2 = fx1 if call.x2 is None else f(params, call.x2, **call.kwargs2)

        def one_leaf(a: jax.Array, b: jax.Array) -> jax.Array:
            leaf_axes = axes.for_leaf(a.ndim)
            return leaf_axes.finish(leaf_axes.contract(a, b), a.shape)

        return jax.tree_util.tree_map(one_leaf, fx1, fx2)

    return nngp_fn


def empirical_kernel_fn(f: Callable[..., PyTree] | Model, trace_axes: int | Sequence[int] = (-1,),
                        diagonal_axes: int | Sequence[int] = (), vmap_axes: Any = None,
                        implementation: Strategy | str | int = "auto") -> KernelFn:
    """Returns `kernel_fn(x1, x2=None, get=None, params=None, **kw)` computing NNGP and/or NTK.

    `get` is `"nngp"`, `"ntk"`, or a tuple of them (a namedtuple in that order comes back); `None`
    means both (an `EmpiricalKernel(nngp, ntk)`). `f` is any model `empirical_ntk_fn` takes;
    `params=None` means the model's own weights (required for a plain `f`).
    """
    holds_weights = adapters.needs_example(f) or _unwrap_model(f)[2] is not None
    fns = {"nngp": empirical_nngp_fn(f, trace_axes, diagonal_axes),
           "ntk": empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation)}

    def kernel_fn(x1: PyTree, x2: PyTree | None = None, get: str | Sequence[str] | None = None,
                  params: PyTree = None, **apply_fn_kwargs: Any) -> Any:
        if params is None and not holds_weights:
            raise TypeError("kernel_fn needs params=...: the parameters to differentiate (f is a "
                            "plain function; pass the model object itself to use its weights).")
        names, single = canonical_get(get, ("nngp", "ntk"), default=("nngp", "ntk"), noun="kernel")
        values = [fns[name](x1, x2, params, **apply_fn_kwargs) for name in names]
        if single:
            return values[0]
        if names == ("nngp", "ntk"):
            return EmpiricalKernel(*values)
        return collections.namedtuple("EmpiricalKernel", names)(*values)

    return kernel_fn


def empirical_ntk_vp_fn(f: Any, x1: PyTree, x2: PyTree | None = None, params: PyTree = None,
                        **apply_fn_kwargs: Any) -> Callable[[PyTree], PyTree]:
    """Returns `v ↦ Θ(x1, x2) v` without forming Θ: a VJP through `f(x2)` then a JVP through `f(x1)`.

    `v` has the structure and shapes of `f(params, x2)`; the result those of `f(params, x1)`. No axis
    is traced or averaged: this is the full kernel as a linear operator. `f` is any model
    `empirical_ntk_fn` takes (framework models are converted here, with `x1`; their inputs may be
    the framework's arrays); `params=None` means the model's own weights.
    """
    if adapters.needs_example(f):
        f = adapters.to_model(f, x1, params=params)
        to_jax, _ = adapters.array_converters(x1)
        x1, x2 = jax.tree_util.tree_map(to_jax, (x1, x2))
        params = None
    f, _, own_params = _unwrap_model(f)
    params = _params(params, own_params, "empirical_ntk_vp_fn(f, x1, x2, params)")
    call = prepare(f, x1, x2, params, apply_fn_kwargs, KernelAxes((), ()), None)
    x2_, kw2 = (call.x1, call.kwargs1) if call.x2 is None else (call.x2, call.kwargs2)
    _, vjp2 = jax.vjp(lambda p: f(p, x2_, **kw2), params)
    _, jvp1 = jax.linearize(lambda p: f(p, call.x1, **call.kwargs1), params)

    def ntk_vp(cotangents: PyTree) -> PyTree:
        return jvp1(vjp2(cotangents)[0])

    return ntk_vp


def ntk(model: Any, x1: Any, x2: Any = None, *, params: PyTree = None, **ntk_kwargs: Any) -> Any:
    """The empirical NTK of any supported model in one call: arrays of the model's kind in and out.

    `model` is an `entk.Model`, a PyTorch module, a Keras model or `tf.function`, a `(flax_module,
    variables)` pair, or a plain `f(params, x)` (then pass `params=`). For the others `params`
    defaults to the model's current weights (or give the pytree of `entk.adapters.to_model(model,
    x).params`, or the framework's own tensors under those names, e.g.
    `dict(module.named_parameters())`). Torch tensors in give a torch tensor out (TF and NumPy
    likewise). `ntk_kwargs` are those of `empirical_ntk_fn`, except that `vmap_axes` defaults to
    `"auto"` (per-example computation wherever the batch-independence analysis proves it right; pass
    `vmap_axes=None` for the whole batch at once). A model is converted once and its kernel compiled
    once per set of `ntk_kwargs` and input shapes, then reused across calls: the first call runs the
    program `"auto"` lowered to decide, compiled while the other candidates were lowered
    (`entk/kernel_programs.py`).

    Never stale: a torch module's weights are read at every call (without copying), and a change to
    anything its conversion baked in (dtypes, submodules, plain attributes, ...) converts it again;
    Keras / TF variables are read at every call too. Float64 in, float64 computed: a float64 model or
    float64 inputs are computed with JAX's 64-bit mode on for this call (`jax.enable_x64`), even in a
    process that runs JAX in 32 bits; float32 models and JAX arrays are left as they are.
    """
    ntk_kwargs.setdefault("vmap_axes", "auto")  # per-example wherever independence is proven
    with adapters.precision_scope(model, x1, x2, params):
        converted = adapters.to_model(model, x1, params=params, live=True)
        _, to_native = adapters.array_converters(x1)
        to_arg = adapters.call_converter(x1)
        jx1 = jax.tree_util.tree_map(to_arg, x1)
        jx2 = None if x2 is None else jax.tree_util.tree_map(to_arg, x2)
        fn = _compiled_kernel_fn(converted, "ntk", ntk_kwargs)
        # Done before returning: the model's arrays may alias the torch module's tensors.
        kernel = jax.block_until_ready(fn(jx1, jx2, converted.params))
        return jax.tree_util.tree_map(lambda k: to_native(k, x1), kernel)


# Compiled kernel functions, keyed by the model's apply function (not the Model object), so a Model
# rebuilt with new weights (training, a re-read torch module) reuses them: params and state are
# arguments of the compiled function, never constants baked into it.
_COMPILED: "collections.OrderedDict[Any, tuple[Callable, dict]]" = collections.OrderedDict()
_COMPILED_MAX = 64


def _compiled_kernel_fn(model: Model, kind: str, settings: dict) -> Callable[..., PyTree]:
    """`(x1, x2, params) -> kernel`, jitted once per apply function, capabilities and settings.

    `kind` is `"ntk"` (`empirical_ntk_fn(model, **settings)`) or `"nngp"`."""
    fn = model.apply_with_state
    entry = _COMPILED.get(id(fn))
    if entry is None or entry[0] is not fn:
        entry = (fn, {})  # holding fn keeps its id from being reused while cached
        _COMPILED[id(fn)] = entry
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    per_fn = entry[1]
    key = (kind, repr(sorted(settings.items())), tuple(sorted(model.capabilities)))
    if key not in per_fn:
        capabilities = model.capabilities
        make = empirical_ntk_fn if kind == "ntk" else empirical_nngp_fn

        def kernel(x1, x2, params, state):
            bound = Model(fn, params, state, capabilities=capabilities)
            return make(bound, **settings)(x1, x2, params)

        per_fn[key] = jax.jit(kernel)
        if kind == "ntk":  # the first call's path: see entk/kernel_programs.py
            full = inspect.signature(empirical_ntk_fn).bind(fn, **settings)
            full.apply_defaults()
            ntk_settings = dict(full.arguments)
            del ntk_settings["f"]
            _check_supported(Strategy.parse(ntk_settings["implementation"]), capabilities)
            per_fn[key] = NtkPrograms(fn, capabilities, ntk_settings, traced=per_fn[key])
    compiled = per_fn[key]
    return lambda x1, x2, params: compiled(x1, x2, params, model.state)


# ----------------------------------------------------------------------------------------------
# The model argument and its strategies (validation of a call: `entk.algorithms.call.prepare`)


def _unwrap_model(f: Any) -> tuple[Callable[..., PyTree], frozenset, PyTree]:
    """`(f(params, x, **kw), capabilities, own params or None)` of an `entk.Model`, a Flax pair or a
    plain function (framework models go through `_converting` instead)."""
    if adapters.is_flax_pair(f):
        f = adapters.to_model(f)
    if isinstance(f, Model):
        return f.apply, f.capabilities, f.params
    if not callable(f):
        raise TypeError(f"f must be a model: a function f(params, x, **kw), an entk.Model, a "
                        f"(flax_module, variables) pair, a torch.nn.Module or a Keras model; got "
                        f"{type(f).__module__}.{type(f).__name__}.")
    return f, ALL_STRATEGIES, None


def _params(params: PyTree, own: PyTree, call: str) -> PyTree:
    """The parameters to differentiate: `params`, else the model's own; refuses other frameworks'
    tensors (e.g. `dict(module.named_parameters())` for a JAX function) with the call to make."""
    if params is None:
        if own is None:
            raise TypeError(f"{call}: params is missing; f is a plain function f(params, x), which holds "
                            f"no weights of its own. Pass params, or pass the model object itself "
                            f"(an entk.Model, a torch.nn.Module, a Keras model, (flax_module, "
                            f"variables)) to use its weights.")
        return own
    adapters.check_params(params)
    return params


def _converting(model: Any, kind: str, settings: dict) -> KernelFn:
    """`kernel(x1, x2=None, params=None, **kw)` of a framework model, converted at call time.

    The model is converted (`entk.adapters.to_model`, cached by the adapter, weights read at every
    call) with `x1` as the example (zeros of its shape under `jax.jit`); inputs may be the
    framework's arrays; `params=None` means the model's current weights, otherwise the model's
    parameter pytree (JAX arrays, or the framework's tensors under the same names). The kernel is
    computed by the compiled function `entk.ntk` uses, shared across calls and weight updates.
    """
    def kernel(x1: PyTree, x2: PyTree | None = None, params: PyTree = None,
               **apply_fn_kwargs: Any) -> PyTree:
        if params is None and adapters.is_traced((x1, x2)):
            raise TypeError(f"The {kind} function of a {type(model).__name__} was called under "
                            f"jax.jit without params, which would bake the current weights into the "
                            f"compiled code; pass them: params = entk.adapters.to_model(model, "
                            f"x).params, then jax.jit(kernel_fn)(x1, x2, params).")
        with adapters.precision_scope(model, x1, x2, params):
            converted = adapters.to_model(model, adapters.concrete_example(x1), params=params)
            if apply_fn_kwargs:  # not cached: keyword arguments may be static or per call
                to_jax, _ = adapters.array_converters(x1)
                jx1, jx2 = jax.tree_util.tree_map(to_jax, (x1, x2))
                make = empirical_ntk_fn if kind == "ntk" else empirical_nngp_fn
                return make(converted, **settings)(jx1, jx2, converted.params, **apply_fn_kwargs)
            jx1, jx2 = jax.tree_util.tree_map(adapters.call_converter(x1), (x1, x2))
            return _compiled_kernel_fn(converted, kind, settings)(jx1, jx2, converted.params)

    kernel.__doc__ = (f"Empirical {kind.upper()} of a {type(model).__name__} (x1, x2=None, params=None, "
                      f"**kw); see entk.empirical_{kind}_fn.")
    return kernel


def _check_supported(strategy: Strategy, capabilities: frozenset) -> None:
    if strategy is not Strategy.AUTO and strategy.short_name not in capabilities:
        raise ValueError(f"implementation={strategy.short_name!r} is not supported by this model "
                         f"(it supports {sorted(capabilities)}); e.g. a model that calls back into "
                         f"PyTorch or TensorFlow cannot use structured derivatives.")
