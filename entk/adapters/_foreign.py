"""A JAX function whose body runs in another framework (PyTorch, TensorFlow), with every transform.

`jax.pure_callback` alone gives JAX a primal and nothing else: no `jvp`, no transpose, and batching
only by looping. Empirical NTKs need all of them — Jacobian contraction is `vmap(vjp)`, NTK-vector
products are `vmap(jvp ∘ vjp)`, both optionally under a `vmap` over examples and under `jit`. This
module gives a foreign function the full set by binding one JAX primitive, `foreign_call`, in three
flavours (the primitive's `kind`):

    primal:  (x_0 … x_{n-1})                 -> outputs            foreign forward pass
    jvp:     (x_0 … x_{n-1}, t_a for a in A) -> output tangents     foreign forward mode
    vjp:     (x_0 … x_{n-1}, ct per output)  -> cotangent of x_a    foreign reverse mode

`A` (the primitive's `argnums`) lists the operands that carry a non-zero tangent, so a kernel that
differentiates only the parameters never asks the foreign framework for input derivatives. The rules:

- JVP of `primal` is `jvp`; `jvp` and `vjp` are linear in their tangent / cotangent operands and each
  is the other's transpose, so `jax.vjp`, `jax.linearize`, `jax.jacrev`, `jax.linear_transpose` and
  forward-over-transpose all work. Second derivatives (a non-zero tangent on a residual operand `x`)
  raise, because the bridges only expose first-order foreign derivatives.
- Batching never loops in Python when the framework has a vmap: each `jax.vmap` level moves its axis
  to the front and records, per operand, whether it is batched at that level (`in_batched`). At run
  time all levels are collapsed into one leading axis (operands batched at only some levels are
  broadcast) and the foreign function is called once through the framework's own vmap
  (`torch.func.vmap`, `tf.vectorized_map`). If that vmap rejects a VJP or JVP, it is retried with
  the differentiated operands batched too; after that, a loop, with one warning.
- Outputs are batched at every level, except the outputs of a *transposed* call made at levels
  where the matching primal operand was not batched (`jax.grad` of a loss computed under `vmap`):
  `out_batched` records this per output and level, and those levels are summed over on the host.
- Lowering (`jit`) and eager evaluation run the foreign code on the host through `jax.pure_callback`.
  Unbatched operands (the parameters, usually the largest) reach the framework through DLPack
  without a copy where it accepts the buffer; batched ones are reshaped NumPy views.

A framework plugs in with a `ForeignBackend` (array conversion and vmap) and a `ForeignFunction`
(primal, jvp and vjp callables working on that framework's tensors). A framework *model* becomes an
`entk.Model` through `build_bridge`, configured by a `BridgeConfig` (how to call the model on its
operands, its native JVP / VJP, its named tensors and input structure). Nothing here imports a
framework.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import warnings
from typing import Any, Callable, ContextManager, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from entk.algorithms import capabilities
from entk.model import Model

__all__ = ["ForeignBackend", "ForeignFunction", "foreign_call_p", "infer_out_specs_by_running",
           "treedef_of", "BridgeConfig", "build_bridge"]

Tensor = Any  # a tensor of the foreign framework
Spec = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True, eq=False)
class ForeignBackend:
    """How to move arrays into and out of a framework, and how to vectorize a function in it.

    Attributes:
      name: the framework's name, used in messages (`"torch"`, `"tensorflow"`).
      to_foreign: host array (NumPy array, possibly read-only, or a CPU `jax.Array`) -> framework
        tensor. Should not copy where the framework allows (DLPack).
      to_host: framework tensor -> NumPy array (a view where possible).
      vmap: `vmap(fn, in_axes) -> batched_fn` where `fn(*tensors) -> tuple of tensors`, `in_axes[i]`
        is `0` (operand `i` has a leading batch axis) or `None` (shared by every batch element), and
        `batched_fn` returns every output with a leading batch axis. `None` when the framework has no
        vectorizing map: batches then loop in Python.
    """

    name: str
    to_foreign: Callable[[Any], Tensor]
    to_host: Callable[[Tensor], np.ndarray]
    vmap: Callable[[Callable[..., Sequence[Tensor]], tuple],
                   Callable[..., Sequence[Tensor]]] | None = None


class ForeignFunction:
    """A function of `n` arrays returning a tuple of floating-point arrays, implemented in a framework.

    Callables (all on the framework's tensors, all returning sequences of tensors):
      primal(*xs) -> outputs
      jvp(argnums, xs, tangents) -> one tangent per output; `tangents[k]` belongs to `xs[argnums[k]]`.
      vjp(argnums, xs, cotangents) -> one cotangent per `argnums` entry; `cotangents` has one entry per
        output.
      out_specs(in_specs) -> the output `jax.ShapeDtypeStruct`s for inputs of the given shapes and
        dtypes (no batch axes). Called once per new input signature; see
        `infer_out_specs_by_running`.

    Calling the object with JAX arrays (or tracers) binds `foreign_call` and returns a tuple of JAX
    arrays; it then supports `jit`, `vmap`, `jvp`, `vjp`, `linearize`, `jacrev`, `jacfwd`.
    Instances hash by identity, so they can be primitive parameters and `jit` cache keys.
    """

    def __init__(self, backend: ForeignBackend, primal: Callable[..., Sequence[Tensor]],
                 jvp: Callable[[tuple, tuple, tuple], Sequence[Tensor]],
                 vjp: Callable[[tuple, tuple, tuple], Sequence[Tensor]],
                 out_specs: Callable[[tuple[Spec, ...]], tuple[Spec, ...]], *, name: str = "foreign"):
        self.backend = backend
        self.primal = primal
        self.jvp = jvp
        self.vjp = vjp
        self.name = name
        self._out_specs_fn = out_specs
        self._out_specs_cache: dict[tuple, tuple[Spec, ...]] = {}
        self._batched_cache: dict[tuple, Callable] = {}
        self._vmap_choice: dict[tuple, int] = {}  # index into _vmap_variants; len() = loop
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"ForeignFunction({self.name!r}, backend={self.backend.name!r})"

    def out_specs(self, in_specs: Sequence[Spec]) -> tuple[Spec, ...]:
        """Output shapes/dtypes for unbatched inputs of `in_specs` (cached per signature)."""
        key = tuple((tuple(s.shape), np.dtype(s.dtype)) for s in in_specs)
        with self._lock:
            specs = self._out_specs_cache.get(key)
            if specs is None:
                specs = tuple(self._out_specs_fn(tuple(Spec(s, d) for s, d in key)))
                for i, spec in enumerate(specs):
                    if not jnp.issubdtype(spec.dtype, jnp.inexact):
                        raise TypeError(
                            f"{self.name}: output {i} has dtype {np.dtype(spec.dtype).name}; a foreign "
                            f"function seen by JAX must return floating-point arrays only (the kernel "
                            f"differentiates them). Return integer results from a separate function.")
                self._out_specs_cache[key] = specs
            return specs

    def __call__(self, *args: Any) -> tuple[jax.Array, ...]:
        args = tuple(jnp.asarray(a) for a in args)
        n_out = len(self.out_specs([Spec(a.shape, a.dtype) for a in args]))
        return tuple(foreign_call_p.bind(
            *args, fn=self, kind="primal", argnums=(), n_in=len(args), batch_sizes=(),
            in_batched=((),) * len(args), out_batched=((),) * n_out))

    # -- host-side execution -----------------------------------------------------------------------

    def _positional(self, kind: str, argnums: tuple[int, ...], n_in: int) -> Callable[..., Sequence]:
        """The foreign callable for `kind` as a function of all operands, positionally."""
        if kind == "primal":
            return lambda *ops: tuple(self.primal(*ops))
        if kind == "jvp":
            return lambda *ops: tuple(self.jvp(argnums, ops[:n_in], ops[n_in:]))
        return lambda *ops: tuple(self.vjp(argnums, ops[:n_in], ops[n_in:]))

    def _batched(self, kind: str, argnums: tuple[int, ...], n_in: int,
                 in_axes: tuple) -> Callable[..., Sequence] | None:
        """The framework-vmapped callable (cached so frameworks can reuse compiled traces)."""
        if self.backend.vmap is None:
            return None
        key = (kind, argnums, n_in, in_axes)
        with self._lock:
            fn = self._batched_cache.get(key)
            if fn is None:
                fn = self.backend.vmap(self._positional(kind, argnums, n_in), in_axes)
                self._batched_cache[key] = fn
            return fn

    def run_host(self, operands: Sequence[Any], *, kind: str, argnums: tuple[int, ...], n_in: int,
                 batch_sizes: tuple[int, ...], in_batched: tuple, out_specs: Sequence[Spec],
                 out_batched: tuple) -> list[np.ndarray]:
        """Evaluates one `foreign_call` on host arrays; returns NumPy arrays matching `out_specs`.

        `out_specs` are the full (batched) output avals; `out_batched[j][l]` False means output `j`
        is summed over batch level `l` (a transposed operand that was not batched at that level).
        """
        sizes = tuple(batch_sizes)
        levels = len(sizes)
        total = math.prod(sizes)
        host_ops, in_axes = [], []
        for op, flags in zip(operands, in_batched):
            if not any(flags):  # passed on as is (a CPU jax.Array from the callback: DLPack-able)
                host_ops.append(op)
                in_axes.append(None)
                continue
            a = np.asarray(op)
            if not all(flags):  # batched at some levels only: broadcast to every level
                base = a.shape[sum(flags):]
                expanded = a.reshape(tuple(s if f else 1 for s, f in zip(sizes, flags)) + base)
                a = np.broadcast_to(expanded, sizes + base)
            host_ops.append(np.ascontiguousarray(a).reshape((total,) + a.shape[levels:]))
            in_axes.append(0)
        in_axes = tuple(in_axes)

        if levels == 0:
            fn = self._positional(kind, argnums, n_in)
            outs = [self.backend.to_host(o) for o in fn(*map(self.backend.to_foreign, host_ops))]
        else:
            outs = self._run_batched(kind, argnums, n_in, in_axes, host_ops, total)
        if len(outs) != len(out_specs):
            raise ValueError(f"{self.name}: the {self.backend.name} {kind} returned {len(outs)} "
                             f"outputs, expected {len(out_specs)}.")

        results = []
        for j, (out, spec, flags) in enumerate(zip(outs, out_specs, out_batched)):
            out = np.asarray(out)
            if levels:
                out = out.reshape(sizes + out.shape[1:])
                summed = tuple(l for l, f in enumerate(flags) if not f)
                if summed:
                    out = out.sum(axis=summed)
            if out.shape != tuple(spec.shape):
                raise ValueError(f"{self.name}: the {self.backend.name} {kind} returned output {j} "
                                 f"of shape {out.shape}, expected {tuple(spec.shape)}.")
            results.append(out.astype(spec.dtype, copy=False))
        return results

    def _vmap_variants(self, kind: str, argnums: tuple[int, ...], in_axes: tuple) -> list[tuple]:
        """The `in_axes` to try, in order, before looping.

        Some framework kernels accumulate into an unbatched buffer when a batched operand meets an
        unbatched one: torch's LSTM does, in a backward pass whose cotangent is batched but not the
        weights, and in a forward-mode pass whose tangents are batched over more levels than the
        weights (NTK-vector products per pair of examples). Batching the differentiated operands as
        well avoids that; they are broadcast views, which a backend can pass on without a copy
        (torch's does, as an expanded tensor), so this is the one retry worth making.
        """
        variants = [in_axes]
        if kind in ("vjp", "jvp"):
            forced = tuple(0 if i in argnums else ax for i, ax in enumerate(in_axes))
            if forced != in_axes:
                variants.append(forced)
        return variants

    def _run_batched(self, kind, argnums, n_in, in_axes, host_ops, total) -> list[np.ndarray]:
        to_foreign, to_host = self.backend.to_foreign, self.backend.to_host
        key = (kind, argnums, n_in, in_axes)
        variants = self._vmap_variants(kind, argnums, in_axes)
        errors = []
        for index in range(self._vmap_choice.get(key, 0), len(variants)):
            axes = variants[index]
            batched = self._batched(kind, argnums, n_in, axes)
            if batched is None:
                break
            ops = [op if old == new else np.broadcast_to(op, (total,) + op.shape)
                   for op, old, new in zip(host_ops, in_axes, axes)]
            try:
                outs = [to_host(o) for o in batched(*map(to_foreign, ops))]
            except Exception as err:  # the framework's vmap could not vectorize this function
                errors.append(err)
                continue
            with self._lock:
                self._vmap_choice[key] = index
            return outs
        with self._lock:
            first_failure = self._vmap_choice.get(key) != len(variants)
            self._vmap_choice[key] = len(variants)
        if errors and first_failure:
            err = errors[0]
            message = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(
                f"{self.name}: {self.backend.name}'s vmap failed on the {kind} ({type(err).__name__}: "
                f"{message}); looping over the batch of {total} in Python instead (correct but slower).",
                RuntimeWarning, stacklevel=2)
        fn = self._positional(kind, argnums, n_in)
        per_item = []
        for b in range(total):
            ops = [to_foreign(op[b] if ax == 0 else op) for op, ax in zip(host_ops, in_axes)]
            per_item.append([to_host(o) for o in fn(*ops)])
        return [np.stack([item[j] for item in per_item]) for j in range(len(per_item[0]))]


def infer_out_specs_by_running(backend: ForeignBackend, primal: Callable[..., Sequence[Tensor]],
                               in_specs: Sequence[Spec]) -> tuple[Spec, ...]:
    """Output specs found by running `primal` once on zeros of the given shapes.

    Zeros are valid for integer inputs (token ids, indices) as well; a model whose output *shape*
    depends on input values cannot be bridged anyway.
    """
    outs = primal(*(backend.to_foreign(np.zeros(s.shape, s.dtype)) for s in in_specs))
    specs = []
    for o in outs:
        h = backend.to_host(o)
        specs.append(Spec(h.shape, h.dtype))
    return tuple(specs)


def treedef_of(skeleton: Any) -> jax.tree_util.PyTreeDef:
    """The JAX tree structure of a framework output's skeleton: its nesting (tuples / lists / dicts)
    with `None` where each tensor was, so the foreign function's flat outputs unflatten into it."""
    return jax.tree_util.tree_structure(skeleton, is_leaf=lambda x: x is None)


# --- a framework model as an entk.Model: the one builder both bridges configure ---------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BridgeConfig:
    """What `build_bridge` needs to know about one framework model; everything framework-specific.

    The foreign function takes every operand flat: the named tensors (`tensors`: the `n_params`
    parameters, then the state tensors), then the input leaves.

    Attributes:
      backend: array conversion and vmap in the framework.
      name: the foreign function's name, for messages (`"torch bridge of MLP"`).
      source: `Model.source` (`"torch"`, `"keras"`, `"tf"`); `label` names the framework in errors.
      tensors: `(name, native tensor)` per named operand, in operand order; the values the model's
        `params` and `state` start from.
      n_params: how many leading `tensors` are differentiated (`Model.params`, a flat dict).
      state_groups: how the other tensors form `Model.state`: `(group, count)` pairs in operand
        order; group `None` puts the names at the top level of the state dict.
      example_inputs: the example input's leaves (native tensors).
      input_leaves: `x -> its leaves`, in operand order; raises on a structure the model does not take.
      call: `call(operands) -> native output` (a nest of tensors): the model on every operand.
      flatten_output: native output -> (tensor leaves, the nest with `None` per tensor).
      jvp: `jvp(primal, argnums, xs, tangents) -> one tangent per output`: the framework's forward
        mode for `primal(*xs) -> output leaves` in `xs[i] for i in argnums`.
      vjp: `vjp(primal, argnums, xs, cotangents) -> one cotangent per argnums entry`.
      is_tensor: whether an input leaf is a framework tensor (then read with `backend.to_host`).
      inference: a context for runs that only want output shapes (`torch.no_grad`).
      example_run: a context around the first run, on the example (binds captured variables).
      host_entry: `(primal, jvp, vjp) -> (primal, jvp, vjp)` as the `ForeignFunction` calls them
        (TF compiles each per signature); `None` keeps them.
      probe_jvp: `probe_jvp(primal, example_operands) -> bool`, asked after the example run: whether
        JVPs work (else the model offers only `"jc"`); `None`: they do.
      param_word: what a parameter is called in errors (`"parameter"`, `"trainable variable"`);
        `nonfloat_hint` says how to keep a non-floating one out of the parameters.
      missing_params: the error for a `params` dict lacking names (formatted with `{missing}`).
      info: `Model.info`; `mode="bridge"` and `foreign_function` are added.
    """

    backend: ForeignBackend
    name: str
    source: str
    label: str
    tensors: Sequence[tuple[str, Tensor]]
    n_params: int
    state_groups: Sequence[tuple[str | None, int]]
    example_inputs: Sequence[Tensor]
    input_leaves: Callable[[Any], list]
    call: Callable[[tuple], Any]
    flatten_output: Callable[[Any], tuple[list, Any]]
    jvp: Callable[[Callable, tuple, tuple, tuple], Sequence[Tensor]]
    vjp: Callable[[Callable, tuple, tuple, tuple], Sequence[Tensor]]
    is_tensor: Callable[[Any], bool]
    param_word: str
    nonfloat_hint: str
    missing_params: str
    info: dict
    inference: Callable[[], ContextManager] = contextlib.nullcontext
    example_run: Callable[[], ContextManager] = contextlib.nullcontext
    host_entry: Callable[[Callable, Callable, Callable], tuple[Callable, Callable, Callable]] | None = None
    probe_jvp: Callable[[Callable, list], bool] | None = None


def build_bridge(config: BridgeConfig) -> Model:
    """An `entk.Model` calling a framework model through a `ForeignFunction` (torch and TF bridges).

    Builds the primal (recording the output structure on its first run), the JVP and VJP from
    `config`, the `ForeignFunction`, and `params` / `state` from `config.tensors`; runs the model once
    on the example, which validates it; then `apply_with_state(params, state, x)` passes the params,
    the state tensors and `x`'s leaves, and unflattens the outputs into the recorded structure.
    """
    c = config
    names = [n for n, _ in c.tensors]
    with c.inference():
        values = [c.backend.to_host(t) for _, t in c.tensors]
    for name, value in zip(names[:c.n_params], values):
        if not np.issubdtype(value.dtype, np.floating):
            raise TypeError(f"bridge_model: {c.param_word} {name!r} has dtype {value.dtype}; only "
                            f"floating-point {c.param_word}s can be differentiated. {c.nonfloat_hint}")
    skeleton: list[Any] = []

    def primal(*ops: Tensor) -> tuple[Tensor, ...]:
        leaves, skel = c.flatten_output(c.call(ops))
        if not skeleton:
            skeleton.append(skel)
        return tuple(leaves)

    def jvp(argnums: tuple, xs: tuple, tangents: tuple) -> Sequence[Tensor]:
        return c.jvp(primal, argnums, xs, tangents)

    def vjp(argnums: tuple, xs: tuple, cotangents: tuple) -> Sequence[Tensor]:
        return c.vjp(primal, argnums, xs, cotangents)

    def out_specs(specs: tuple[Spec, ...]) -> tuple[Spec, ...]:
        with c.inference():
            return infer_out_specs_by_running(c.backend, primal, specs)

    entry = (primal, jvp, vjp) if c.host_entry is None else c.host_entry(primal, jvp, vjp)
    foreign = ForeignFunction(c.backend, *entry, out_specs, name=c.name)

    params = {n: jnp.asarray(v) for n, v in zip(names[:c.n_params], values)}
    state: dict = {}
    groups, start = [], c.n_params
    for group, count in c.state_groups:
        group_names = names[start:start + count]
        group_values = {n: jnp.asarray(v) for n, v in zip(group_names, values[start:start + count])}
        (state if group is None else state.setdefault(group, {})).update(group_values)
        groups.append((group, group_names))
        start += count
    if start != len(names):
        raise ValueError(f"{c.name}: state_groups cover {start - c.n_params} of "
                         f"{len(names) - c.n_params} state tensors.")
    inputs = [c.backend.to_host(x) for x in c.example_inputs]
    example_specs = [Spec(v.shape, v.dtype) for v in values + inputs]

    with c.example_run(), c.inference():
        foreign.out_specs(example_specs)  # runs the model once: validates it, records outputs
    out_treedef = treedef_of(skeleton[0])
    has_jvp = True
    if c.probe_jvp is not None:
        has_jvp = c.probe_jvp(primal, [t for _, t in c.tensors] + list(c.example_inputs))

    def to_jax(x: Any) -> jax.Array:
        return jnp.asarray(c.backend.to_host(x) if c.is_tensor(x) else x)

    def apply_with_state(params: dict, state: Any, x: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"a {c.label} bridge model takes no keyword arguments, got {sorted(kwargs)}.")
        leaves = c.input_leaves(x)
        missing = [n for n in names[:c.n_params] if n not in params]
        if missing:
            raise KeyError(c.missing_params.format(missing=missing[:5]))
        flat = [params[n] for n in names[:c.n_params]]
        for group, group_names in groups:
            held = state if group is None else state[group]
            flat += [held[n] for n in group_names]
        flat += [to_jax(a) for a in leaves]
        return jax.tree_util.tree_unflatten(out_treedef, foreign(*flat))

    info = {"mode": "bridge", **c.info, "foreign_function": foreign}
    return Model(apply_with_state, params, state, source=c.source, info=info,
                 capabilities=capabilities(jvp=has_jvp, jaxpr=False))


# --- the primitive ---------------------------------------------------------------------------------

foreign_call_p = Primitive("foreign_call")
foreign_call_p.multiple_results = True

_KINDS = ("primal", "jvp", "vjp")


def _batch_shape(sizes: tuple[int, ...], flags: tuple[bool, ...]) -> tuple[int, ...]:
    return tuple(s for s, f in zip(sizes, flags) if f)


def _base_specs(avals, in_batched) -> list[Spec]:
    return [Spec(a.shape[sum(flags):], a.dtype) for a, flags in zip(avals, in_batched)]


def _out_avals(avals, *, fn: ForeignFunction, kind, argnums, n_in, batch_sizes, in_batched,
               out_batched) -> list[jax.core.ShapedArray]:
    base = _base_specs(avals, in_batched)
    if kind in ("primal", "jvp"):
        out_base = fn.out_specs(base[:n_in])
    elif kind == "vjp":
        out_base = [base[i] for i in argnums]
    else:
        raise ValueError(f"foreign_call: unknown kind {kind!r}; expected one of {_KINDS}.")
    if len(out_base) != len(out_batched):
        raise ValueError(f"{fn.name}: {len(out_base)} outputs but {len(out_batched)} batch specs.")
    return [jax.core.ShapedArray(_batch_shape(batch_sizes, flags) + tuple(s.shape), s.dtype)
            for s, flags in zip(out_base, out_batched)]


foreign_call_p.def_abstract_eval(lambda *avals, **params: _out_avals(avals, **params))


def _host_call(*operands, **params):
    out_specs = [Spec(a.shape, a.dtype) for a in _out_avals([jax.typeof(x) for x in operands], **params)]
    return out_specs, functools.partial(_host_entry, params=params, out_specs=out_specs)


def _host_entry(*operands, params, out_specs):
    params = dict(params)
    fn = params.pop("fn")
    return tuple(fn.run_host(operands, out_specs=out_specs, **params))


def _impl(*operands, **params):
    # Eager evaluation: call the framework directly instead of compiling a one-op program.
    _, host = _host_call(*operands, **params)
    return [jnp.asarray(o) for o in host(*(np.asarray(x) for x in operands))]


def _lowering_body(*operands, **params):
    out_specs, host = _host_call(*operands, **params)
    return list(jax.pure_callback(host, tuple(out_specs), *operands, vmap_method="sequential"))


foreign_call_p.def_impl(_impl)
mlir.register_lowering(foreign_call_p, mlir.lower_fun(_lowering_body, multiple_results=True),
                       cacheable=False)


def _bind(operands, **params):
    return foreign_call_p.bind(*operands, **params)


def _zero_like(x) -> ad.Zero:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _jvp_rule(primals, tangents, *, fn, kind, argnums, n_in, batch_sizes, in_batched, out_batched):
    params = dict(fn=fn, kind=kind, argnums=argnums, n_in=n_in, batch_sizes=batch_sizes,
                  in_batched=in_batched, out_batched=out_batched)
    outs = _bind(primals, **params)
    if kind == "primal":
        nonzero = tuple(i for i, t in enumerate(tangents) if type(t) is not ad.Zero)
        if not nonzero:
            return outs, [_zero_like(o) for o in outs]
        tan_outs = _bind(
            [*primals, *(tangents[i] for i in nonzero)], fn=fn, kind="jvp", argnums=nonzero, n_in=n_in,
            batch_sizes=batch_sizes, in_batched=in_batched + tuple(in_batched[i] for i in nonzero),
            out_batched=out_batched)
        return outs, tan_outs
    # `jvp` and `vjp` are linear in the operands after the first `n_in`.
    if any(type(t) is not ad.Zero for t in tangents[:n_in]):
        raise NotImplementedError(
            f"{fn.name}: a second derivative through a {fn.backend.name} function was requested "
            f"(differentiating its {kind} with respect to the point it is taken at). The bridge "
            f"exposes first-order derivatives only; Jacobian contraction and NTK-vector products need "
            f"no more. Use the export / translation mode for higher-order derivatives.")
    linear = tangents[n_in:]
    if all(type(t) is ad.Zero for t in linear):
        return outs, [_zero_like(o) for o in outs]
    tan_outs = _bind([*primals[:n_in], *map(ad.instantiate_zeros, linear)], **params)
    return outs, tan_outs


def _transpose_rule(cts, *operands, fn, kind, argnums, n_in, batch_sizes, in_batched, out_batched):
    if kind == "primal":
        raise NotImplementedError(f"{fn.name}: the primal of a foreign function is not linear; it "
                                  f"cannot be transposed.")
    residuals, linear = operands[:n_in], operands[n_in:]
    if any(ad.is_undefined_primal(x) for x in residuals) or not all(
            ad.is_undefined_primal(x) for x in linear):
        raise NotImplementedError(f"{fn.name}: the foreign {kind} is linear only in its "
                                  f"{'tangent' if kind == 'jvp' else 'cotangent'} operands.")
    if all(type(ct) is ad.Zero for ct in cts):
        return [None] * n_in + [ad.Zero(x.aval) for x in linear]
    cts = list(map(ad.instantiate_zeros, cts))
    linear_flags = in_batched[n_in:]
    # Transposing swaps roles: the new linear operands are the cotangents (batched like this call's
    # outputs) and the new outputs are cotangents of this call's linear operands (batched like them).
    results = _bind([*residuals, *cts], fn=fn, kind="vjp" if kind == "jvp" else "jvp", argnums=argnums,
                    n_in=n_in, batch_sizes=batch_sizes, in_batched=in_batched[:n_in] + out_batched,
                    out_batched=linear_flags)
    return [None] * n_in + list(results)


def _batch_rule(args, dims, *, fn, kind, argnums, n_in, batch_sizes, in_batched, out_batched):
    size = None
    moved, flags = [], []
    for x, d, old in zip(args, dims, in_batched):
        if d is None:
            moved.append(x)
            flags.append((False,) + old)
        else:
            size = x.shape[d]
            moved.append(jnp.moveaxis(x, d, 0))
            flags.append((True,) + old)
    outs = _bind(moved, fn=fn, kind=kind, argnums=argnums, n_in=n_in, batch_sizes=(size,) + batch_sizes,
                 in_batched=tuple(flags), out_batched=tuple((True,) + f for f in out_batched))
    return outs, [0] * len(outs)


ad.primitive_jvps[foreign_call_p] = _jvp_rule
ad.primitive_transposes[foreign_call_p] = _transpose_rule
batching.primitive_batchers[foreign_call_p] = _batch_rule
