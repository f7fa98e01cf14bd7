"""Bridge mode: a Keras model (TensorFlow backend) or a `tf.function` seen by JAX as a foreign function.

`jax.experimental.jax2tf.call_tf` gives JAX a TensorFlow function with reverse mode only: `jax.jvp`
and `jax.vmap` fail on it, so neither Jacobian contraction nor NTK-vector products run. Here the
function goes through `entk.adapters._foreign` instead: the forward pass runs in TF, the JVP with
`tf.autodiff.ForwardAccumulator`, the transpose (VJP) with `tf.GradientTape`, and batches with
`tf.vectorized_map`, each compiled once per input signature with `tf.function`. Structured
derivatives need the model's jaxpr and are unavailable; the tf2jax translation mode has them.

Parameters are the trainable variables, state the non-trainable ones (BatchNorm statistics, seed
generator states); the model runs in inference mode (`training=False`). `bridge_model` configures
the builder shared with the torch bridge, `entk.adapters._foreign.build_bridge`.

- Keras models are called through `stateless_call`, so parameter values are ordinary tensors (they
  can even be batched).
- A `tf.function` (or a `tf.Module` whose `__call__` is one) reads `tf.Variable`s it captured. Its
  variables are given the requested values for the duration of a call (under a lock) and restored
  afterwards; derivatives are taken with respect to the variables. Batching over the parameters
  themselves then loops.

Functions are traced without autograph: Python control flow in the model must not depend on tensor
values (use `tf.cond` / `tf.while_loop`, as for a SavedModel export).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import tensorflow as tf

from entk.adapters._foreign import BridgeConfig, ForeignBackend, build_bridge, treedef_of
from entk.model import Model

__all__ = ["bridge_model", "configure_tf_for_jax"]

PyTree = Any

SD_UNAVAILABLE = ("structured derivatives are unavailable in bridge mode: the model runs in TensorFlow "
                  "and is opaque to JAX (SD needs its jaxpr); use the tf2jax translation mode for SD")

_ZERO = tf.UnconnectedGradients.ZERO


def configure_tf_for_jax() -> None:
    """Lets TensorFlow and JAX share one process: TF allocates GPU memory on demand.

    Must run before TensorFlow first touches a GPU (it is called when this module is imported);
    later it is a no-op. JAX's own preallocation is set by `XLA_PYTHON_CLIENT_PREALLOCATE=false`
    in the environment before JAX starts.
    """
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # TF already initialized its GPUs
            pass


configure_tf_for_jax()


def _to_tf(a: Any) -> tf.Tensor:
    if isinstance(a, jax.Array):  # zero-copy through DLPack where TF accepts the buffer
        try:
            return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
        except Exception:  # noqa: BLE001 - any refusal (alignment, dtype, device) means: copy
            pass
    # TF cannot import read-only NumPy buffers (DLPack v0), so these are copied.
    return tf.convert_to_tensor(np.asarray(a))


def _to_numpy(t: Any) -> np.ndarray:
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def _compile(fn: Callable[..., Sequence[tf.Tensor]]) -> Callable[..., tuple]:
    # No autograph: the model's Python control flow must not depend on tensor values (as in a
    # SavedModel export); it is also markedly faster to trace.
    return tf.function(lambda *ops: tuple(fn(*ops)), reduce_retracing=True, autograph=False)


def _tf_vmap(fn: Callable[..., Sequence[tf.Tensor]], in_axes: tuple,
             prepare: Callable[[tuple], contextlib.AbstractContextManager] | None = None) -> Callable:
    """`fn` mapped over axis 0 of the operands with `in_axes[i] == 0`, by `tf.vectorized_map`."""
    batched_idx = [i for i, ax in enumerate(in_axes) if ax is not None]

    def mapped(*ops: tf.Tensor) -> tuple:
        def body(batched: tuple) -> tuple:
            full = list(ops)
            for i, b in zip(batched_idx, batched):
                full[i] = b
            return tuple(fn(*full))
        return tf.vectorized_map(body, tuple(ops[i] for i in batched_idx), fallback_to_while_loop=True,
                                 warn=False)

    compiled = tf.function(mapped, reduce_retracing=True, autograph=False)
    if prepare is None:
        return compiled

    def run(*ops):
        with prepare(ops):
            return compiled(*ops)
    return run


def _backend(vmap=_tf_vmap) -> ForeignBackend:
    return ForeignBackend(name="tensorflow", to_foreign=_to_tf, to_host=_to_numpy, vmap=vmap)


def _flatten_output(out: Any) -> tuple[list[tf.Tensor], Any]:
    leaves = tf.nest.flatten(out)
    for i, leaf in enumerate(leaves):
        if not tf.is_tensor(leaf):
            raise TypeError(f"bridge_model: output leaf {i} is a {type(leaf).__name__}; the model must "
                            f"return tensors or nests (tuple / list / dict) of tensors.")
    return leaves, tf.nest.map_structure(lambda _: None, out)


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        name = name[:-2] if name.endswith(":0") else name
        count = seen.get(name, 0)
        seen[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    if len(set(unique)) != len(unique):  # a suffixed name collided with a real one
        unique = [f"{i}:{n}" for i, n in enumerate(unique)]
    return unique


def _is_keras_model(obj: Any) -> bool:
    return hasattr(obj, "stateless_call") and hasattr(obj, "trainable_variables")


def _differentiable(ops: Sequence[tf.Tensor], argnums: Sequence[int], variables: Sequence[Any],
                    n_vars: int) -> list:
    """What to differentiate for each argnum: the variable for bound parameters, else the tensor."""
    return [variables[i] if i < n_vars else ops[i] for i in argnums]


class _Autodiff:
    """TF's JVP and VJP of a model's `primal(*ops) -> output leaves` (see `BridgeConfig.jvp`).

    `variables[i]` for `i < n_vars` are captured `tf.Variable`s bound to operand `i` for the call (a
    `tf.function`); derivatives in those operands are taken with respect to the variables.
    """

    def __init__(self, variables: Sequence[Any] = (), n_vars: int = 0):
        self.variables = list(variables)
        self.n_vars = n_vars
        self.forward_mode_works = True

    def jvp(self, primal, argnums, ops, tangents) -> list[tf.Tensor]:
        targets = _differentiable(ops, argnums, self.variables, self.n_vars)
        tangents = [tf.cast(t, p.dtype) for t, p in zip(tangents, targets)]
        if self.forward_mode_works and not any(i < self.n_vars for i in argnums):
            try:
                with tf.autodiff.ForwardAccumulator(targets, tangents) as acc:
                    outs = primal(*ops)
                return [acc.jvp(o, unconnected_gradients=_ZERO) for o in outs]
            except (TypeError, ValueError, NotImplementedError, LookupError):
                # TF's forward mode fails inside graphs on some ops (e.g. the while loop of a Keras
                # LSTM); reverse mode twice gives the same JVP. Decided once per model.
                self.forward_mode_works = False
        return self._jvp_by_double_vjp(primal, ops, targets, tangents)

    def _jvp_by_double_vjp(self, primal, ops, targets, tangents) -> list[tf.Tensor]:
        """`J t` as the gradient in `u` of `<Jᵀ u, t>` (`Jᵀ u` is linear in `u`).

        Used for captured variables (inside a graph, `ForwardAccumulator` does not see reads of a
        variable made within a nested `tf.function`: its JVP silently comes out zero, while
        `GradientTape` follows them), and where forward mode fails.
        """
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(targets)
                outs = primal(*ops)
            dummies = [tf.zeros_like(o) for o in outs]
            outer.watch(dummies)
            pulled = inner.gradient(outs, targets, output_gradients=dummies, unconnected_gradients=_ZERO)
            pulled = [tf.convert_to_tensor(g) for g in pulled]
            pairing = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(pulled, tangents)])
        return outer.gradient(pairing, dummies, unconnected_gradients=_ZERO)

    def vjp(self, primal, argnums, ops, cotangents) -> list[tf.Tensor]:
        targets = _differentiable(ops, argnums, self.variables, self.n_vars)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(targets)
            outs = primal(*ops)
        cotangents = [tf.cast(c, o.dtype) for c, o in zip(cotangents, outs)]
        grads = tape.gradient(outs, targets, output_gradients=cotangents, unconnected_gradients=_ZERO)
        return [tf.convert_to_tensor(g) for g in grads]  # embeddings give IndexedSlices


class _VariableBinding:
    """Gives a `tf.function`'s variables requested values for the duration of a call.

    The eager entry point assigns (under a lock) and afterwards restores the previous values;
    compiled and vectorized functions are traced and run inside that binding, so their graphs only
    read the variables.
    """

    def __init__(self, variables: Sequence[tf.Variable]):
        self.variables = list(variables)
        self.lock = threading.RLock()
        self.active = False

    @contextlib.contextmanager
    def bound(self, values: Sequence[tf.Tensor]) -> Iterator[None]:
        if self.active:
            yield
            return
        with self.lock:
            saved = [tf.identity(v) for v in self.variables]
            for v, x in zip(self.variables, values):
                v.assign(tf.cast(x, v.dtype))
            self.active = True
            try:
                yield
            finally:
                self.active = False
                for v, x in zip(self.variables, saved):
                    v.assign(x)


class _HostEntry:
    """The callables handed to `ForeignFunction` (`BridgeConfig.host_entry`).

    Called eagerly (the unbatched host path), each of `primal`, `jvp`, `vjp` is compiled with
    `tf.function` once per (kind, argnums) and input signature, and a `tf.function`'s variables are
    bound around the call. Called while tracing (inside the vectorized function `_tf_vmap` compiles),
    they run as is.
    """

    def __init__(self, primal: Callable, jvp: Callable, vjp: Callable,
                 binding: "_VariableBinding | None", n_bound: int):
        self._primal, self._jvp, self._vjp = primal, jvp, vjp
        self.binding = binding
        self.n_bound = n_bound
        self.compiled: dict[tuple, Callable] = {}

    def callables(self) -> tuple[Callable, Callable, Callable]:
        return self.primal, self.jvp, self.vjp

    def _run(self, key: tuple, raw: Callable, ops: tuple) -> Sequence[tf.Tensor]:
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = _compile(raw)
        if self.binding is None:
            return fn(*ops)
        with self.binding.bound(ops[:self.n_bound]):
            return fn(*ops)

    def primal(self, *ops: tf.Tensor) -> Sequence[tf.Tensor]:
        if not tf.executing_eagerly():
            return self._primal(*ops)
        return self._run(("primal",), self._primal, ops)

    def jvp(self, argnums: tuple, xs: tuple, ts: tuple) -> Sequence[tf.Tensor]:
        return self._linear("jvp", self._jvp, argnums, xs, ts)

    def vjp(self, argnums: tuple, xs: tuple, cts: tuple) -> Sequence[tf.Tensor]:
        return self._linear("vjp", self._vjp, argnums, xs, cts)

    def _linear(self, kind: str, fn: Any, argnums: tuple, xs: tuple,
                vectors: tuple) -> Sequence[tf.Tensor]:
        """`fn(argnums, xs, vectors)`, a JVP or VJP; run eagerly, through `_run` like the primal."""
        if not tf.executing_eagerly():
            return fn(argnums, xs, vectors)
        n = len(xs)
        return self._run((kind, argnums, n), lambda *ops: fn(argnums, ops[:n], ops[n:]),
                         (*xs, *vectors))


def _function_variables(fn: Any, example_args: tuple) -> tuple[list, list, list[str], list[str]]:
    """Trainable and non-trainable variables a `tf.function` / `tf.Module` reads, with names."""
    module = fn if isinstance(fn, tf.Module) else getattr(getattr(fn, "python_function", None),
                                                          "__self__", None)
    target = fn.__call__ if isinstance(fn, tf.Module) else fn
    if not hasattr(target, "get_concrete_function"):
        raise TypeError(f"bridge_model(model_or_fn=...): expected a Keras model (TensorFlow backend), a "
                        f"tf.function, or a tf.Module whose __call__ is a tf.function; got "
                        f"{type(fn).__name__}.")
    concrete = target.get_concrete_function(*example_args)
    variables = list(concrete.variables)
    trainable_ids = {id(v) for v in concrete.trainable_variables}
    paths: dict[int, str] = {}
    if isinstance(module, tf.Module):
        for path, v in module._flatten(predicate=lambda x: isinstance(x, tf.Variable), with_path=True):
            paths.setdefault(id(v), "/".join(str(p) for p in path))
    names = _unique_names([paths.get(id(v), v.name) for v in variables])
    trainable = [(v, n) for v, n in zip(variables, names) if id(v) in trainable_ids]
    frozen = [(v, n) for v, n in zip(variables, names) if id(v) not in trainable_ids]
    return ([v for v, _ in trainable], [v for v, _ in frozen], [n for _, n in trainable],
            [n for _, n in frozen])


def bridge_model(model_or_fn: Any, example_input: Any) -> Model:
    """Wraps a Keras model (TensorFlow backend) or a `tf.function` as an `entk.Model` calling into TF.

    Args:
      model_or_fn: a built Keras model on the TensorFlow backend, called as `model(x, training=False)`;
        or a `tf.function` / a `tf.Module` with a `tf.function` `__call__`, called as `fn(*x)` when `x`
        is a tuple and `fn(x)` otherwise, reading the `tf.Variable`s it captured.
      example_input: an input (tensor, array, or nest of them) of the kind the model takes; fixes the
        output structure and the variables the function reads.

    Returns:
      An `entk.Model` with `params` `{variable path: jax.Array}` over the trainable variables, `state`
      `{path: jax.Array}` over the non-trainable ones, `capabilities == {"jc", "ntvp"}`,
      `source == "keras"` or `"tf"`. `model.apply(params, x)` takes `x` structured like
      `example_input` (JAX / NumPy arrays or TF tensors) and returns the model's output structure.
    """
    example_leaves = tf.nest.flatten(example_input)
    example_leaves = [tf.convert_to_tensor(x) for x in example_leaves]
    example_structure = tf.nest.map_structure(lambda _: None, example_input)
    example_nest = tf.nest.pack_sequence_as(example_structure, example_leaves)
    input_treedef = treedef_of(example_structure)
    n_inputs = len(example_leaves)

    if _is_keras_model(model_or_fn):
        source, binding = "keras", None
        model = model_or_fn
        import keras
        if keras.backend.backend() != "tensorflow":
            raise ValueError(f"bridge_model: this Keras model runs on the {keras.backend.backend()!r} "
                             f"backend; the TF bridge needs the TensorFlow backend (a Keras model on "
                             f"the JAX backend is already JAX: use entk.from_tf's stateless_call "
                             f"path).")
        if not model.built:
            raise ValueError(f"bridge_model: the Keras model {model.name!r} has not been built, so it "
                             f"has no variables yet; call it once on an example (model(x)) or give it "
                             f"an Input layer, then bridge it.")
        trainable, frozen = list(model.trainable_variables), list(model.non_trainable_variables)
        names = _unique_names([v.path for v in trainable + frozen])
        param_names, state_names = names[:len(trainable)], names[len(trainable):]
        n_t, n_f = len(trainable), len(frozen)

        def call(ops: tuple) -> Any:
            x = tf.nest.pack_sequence_as(example_structure, list(ops[n_t + n_f:]))
            out, _ = model.stateless_call(list(ops[:n_t]), list(ops[n_t:n_t + n_f]), x, training=False)
            return out

        autodiff = _Autodiff()
        backend = _backend()
    else:
        source = "tf"
        args = tuple(example_nest) if isinstance(example_input, tuple) else (example_nest,)
        trainable, frozen, param_names, state_names = _function_variables(model_or_fn, args)
        n_t, n_f = len(trainable), len(frozen)
        binding = _VariableBinding(trainable + frozen)
        fn = model_or_fn

        def call(ops: tuple) -> Any:
            with binding.bound(ops[:n_t + n_f]):
                x = tf.nest.pack_sequence_as(example_structure, list(ops[n_t + n_f:]))
                return fn(*x) if isinstance(example_input, tuple) else fn(x)

        def vmap(f, in_axes):
            if any(ax is not None for ax in in_axes[:n_t + n_f]):
                raise NotImplementedError("the variables of a tf.function cannot be batched")
            return _tf_vmap(f, in_axes, prepare=lambda ops: binding.bound(ops[:n_t + n_f]))

        autodiff = _Autodiff(trainable + frozen, n_t + n_f)
        backend = _backend(vmap)

    tensors = [(n, tf.convert_to_tensor(v)) for n, v in zip(param_names + state_names, trainable + frozen)]

    def example_run() -> contextlib.AbstractContextManager:
        if binding is None:
            return contextlib.nullcontext()
        return binding.bound([t for _, t in tensors])

    def input_leaves(x: Any) -> list:
        leaves, treedef = jax.tree_util.tree_flatten(x, is_leaf=tf.is_tensor)
        if len(leaves) != n_inputs:
            raise ValueError(f"the model takes inputs structured like example_input ({input_treedef}); "
                             f"got {treedef}.")
        return leaves

    info = {
        "framework": "tensorflow",
        "param_names": tuple(param_names),
        "state_names": tuple(state_names),
        "sd": SD_UNAVAILABLE,
    }
    return build_bridge(BridgeConfig(
        backend=backend, name=f"tf bridge of {getattr(model_or_fn, 'name', type(model_or_fn).__name__)}",
        source=source, label="TF", tensors=tensors, n_params=n_t, state_groups=[(None, n_f)],
        example_inputs=example_leaves, input_leaves=input_leaves, call=call,
        flatten_output=_flatten_output, jvp=autodiff.jvp, vjp=autodiff.vjp, is_tensor=tf.is_tensor,
        example_run=example_run,
        host_entry=lambda primal, jvp, vjp: _HostEntry(primal, jvp, vjp, binding, n_t + n_f).callables(),
        param_word="trainable variable", nonfloat_hint="Mark it non-trainable.",
        missing_params="params lacks the variable(s) {missing}; pass a dict like model.params.",
        info=info))
