"""TensorFlow graphs as pure JAX, with tf2jax: Keras models on the TF backend and `tf.function`s.

A TF model is traced to a graph for one input *signature* (structure, shapes and dtypes of `x` and
of the array keyword arguments) and that graph is translated op by op to JAX by tf2jax. Shapes are
fixed per signature (TF loops over an unknown batch size do not translate), so `TFTranslation` keeps
one translated function per signature and translates a new one on first use, also under `jax.jit` /
`jax.vmap` (where shapes are static).

Variables:
- Keras model: traced through `model.stateless_call(trainable, non_trainable, x, training=False)`
  with the variable values as graph *inputs*, so `params` are the trainable variables keyed by their
  Keras path (`"dense/kernel"`) and `state` the non-trainable ones (BatchNorm statistics, seed state).
- `tf.function`: its captured `tf.Variable`s, keyed by variable name; `trainable=False` ones go to
  `state`.

TF `While` loops (e.g. in `LSTM`) become `lax.scan` when their trip count does not depend on the
inputs or parameters, so reverse-mode differentiation (Jacobians, NTK-vector products) works through
them; tf2jax alone emits `lax.while_loop`, which JAX can only differentiate in forward mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import types
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class TranslationError(ValueError):
    """tf2jax could not translate the model (or its translation disagrees with TensorFlow).

    Attributes:
      op: the TF op type that failed (e.g. `"Dawsn"`), when known.
      node: the graph node's name, when known.
      layer: the Keras layer that contains it (`"name (Class)"`), when known.
    """

    def __init__(self, message: str, *, op: str | None = None, node: str | None = None,
                 layer: str | None = None):
        super().__init__(message)
        self.op, self.node, self.layer = op, node, layer

    @property
    def culprit(self) -> str:
        """A short description of what failed, for warnings: layer and op when known."""
        parts = []
        if self.layer:
            parts.append(f"layer {self.layer}")
        if self.op:
            parts.append(f"TF op {self.op!r}")
        return ", ".join(parts) or "the model"


# ----------------------------------------------------------------------------------------------
# Input signatures


@dataclasses.dataclass(frozen=True)
class Signature:
    """What one translation is specialised to: structure, shapes and dtypes of `x` and kwargs.

    Array leaves are graph inputs; other keyword-argument leaves (bools, strings, ...) are baked into
    the graph and must be hashable.
    """

    x_tree: Any
    x_specs: tuple[tuple[tuple[int, ...], str], ...]
    kw_tree: Any
    kw_layout: tuple[Any, ...]  # per kwargs leaf: ("array", shape, dtype) or ("static", value)

    @classmethod
    def of(cls, x: PyTree, kwargs: dict) -> "Signature":
        x_leaves, x_tree = jax.tree_util.tree_flatten(x)
        for leaf in x_leaves:
            if not _is_array(leaf):
                raise TypeError(f"Model input leaves must be arrays, got a {type(leaf).__name__} "
                                f"({leaf!r}); pass numbers as arrays.")
        kw_leaves, kw_tree = jax.tree_util.tree_flatten(kwargs)
        layout = []
        for leaf in kw_leaves:
            if _is_array(leaf):
                layout.append(("array", tuple(np.shape(leaf)), str(np.dtype(leaf.dtype))))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    raise TypeError(f"Keyword argument value {leaf!r} is neither an array nor "
                                    f"hashable; TF models take arrays or plain Python constants.") from None
                layout.append(("static", leaf))
        return cls(x_tree, tuple((tuple(np.shape(l)), str(np.dtype(l.dtype))) for l in x_leaves),
                   kw_tree, tuple(layout))

    def dynamic_kwargs(self, kwargs: dict) -> list:
        """The array leaves of `kwargs` (graph inputs), in order."""
        leaves = jax.tree_util.tree_leaves(kwargs)
        return [leaf for leaf, lay in zip(leaves, self.kw_layout) if lay[0] == "array"]

    def rebuild_kwargs(self, arrays: Sequence[Any]) -> dict:
        """kwargs with the given arrays (TF tensors inside the graph) at the array leaves."""
        it = iter(arrays)
        leaves = [next(it) if lay[0] == "array" else lay[1] for lay in self.kw_layout]
        return jax.tree_util.tree_unflatten(self.kw_tree, leaves)

    def tf_specs(self, tf: types.ModuleType) -> tuple[list, list]:
        """`(x_specs, kwarg_specs)` as lists of `tf.TensorSpec`."""
        x = [tf.TensorSpec(shape, tf.as_dtype(dtype)) for shape, dtype in self.x_specs]
        kw = [tf.TensorSpec(lay[1], tf.as_dtype(lay[2])) for lay in self.kw_layout if lay[0] == "array"]
        return x, kw

    def describe(self) -> str:
        return ", ".join(f"{dtype}{list(shape)}" for shape, dtype in self.x_specs)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type)


# ----------------------------------------------------------------------------------------------
# The translated model


class TFTranslation:
    """A TF callable translated to JAX, one tf2jax translation per input signature.

    `self(params, state, x, **kwargs)` is pure JAX (jit / vmap / jvp / vjp-able). `params` and `state`
    are flat dicts keyed by `param_keys` / `state_keys`.

    Subclasses provide `_translate(signature)` (trace the TF callable for that signature and
    translate it with tf2jax) and `_call` (run one translation on `params`, `state`, `x` and the
    array keyword arguments). Concrete calls run a compiled (`jax.jit`) translation; calls under a
    JAX transformation trace it inline.
    """

    param_keys: tuple[str, ...]
    state_keys: tuple[str, ...]

    def __init__(self, describe_node: Callable[[str], str | None]):
        self._describe_node = describe_node
        self._translations: dict[Hashable, Callable[..., Any]] = {}
        self._jitted: dict[Hashable, Callable[..., Any]] = {}
        # TF While nodes whose trip count depends on inputs or parameters: they become
        # `lax.while_loop`s, which JAX differentiates in forward mode only.
        self.dynamic_loops: set[str] = set()
        self._lock = threading.Lock()

    def translation_count(self) -> int:
        """How many signatures have been translated so far (each is traced and translated once)."""
        return len(self._translations)

    def __call__(self, params: dict, state: dict | None, x: PyTree, **kwargs: Any) -> PyTree:
        signature = Signature.of(x, kwargs)
        jax_fn = self._translation(signature)
        state = state or {}
        arrays = signature.dynamic_kwargs(kwargs)
        _loop_log.dynamic = self.dynamic_loops
        with _bounded_loops():
            try:
                if any(isinstance(leaf, jax.core.Tracer)
                       for leaf in jax.tree_util.tree_leaves((params, state, x, arrays))):
                    # Under a transformation: trace inline, so the caller's jaxpr stays flat.
                    return self._call(jax_fn, params, state, signature, x, arrays)
                # A concrete call: one compiled program instead of op-by-op dispatch.
                return self._compiled(signature, jax_fn)(params, state, x, arrays)
            except TranslationError:
                raise
            except Exception as e:  # a tf2jax op failing on these inputs: name it
                located = _locate_failure(e, self._describe_node)
                if located is None:
                    raise
                raise located from e

    def _compiled(self, signature: Signature, jax_fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = self._jitted.get(signature)
        if compiled is None:
            compiled = jax.jit(lambda p, s, x, a: self._call(jax_fn, p, s, signature, x, a))
            self._jitted[signature] = compiled
        return compiled

    def check_reverse_mode(self) -> None:
        """Raises `TranslationError` if a loop seen so far cannot be differentiated in reverse mode."""
        if self.dynamic_loops:
            node = sorted(self.dynamic_loops)[0]
            layer = self._describe_node(node)
            raise TranslationError(
                f"The TF while loop {node!r}" + (f" (in layer {layer})" if layer else "")
                + " runs a number of iterations that depends on the inputs or parameters; its JAX "
                "translation (lax.while_loop) can only be differentiated in forward mode, but "
                "Jacobians and NTK-vector products need reverse mode. Use entk.from_tf(..., "
                "mode='bridge').", op="While", node=node, layer=layer)

    def _translation(self, signature: Signature) -> Callable[..., Any]:
        with self._lock:
            fn = self._translations.get(signature)
            if fn is None:
                fn = self._translate(signature)
                self._translations[signature] = fn
            return fn

    def _translate(self, signature: Signature) -> Callable[..., Any]:
        raise NotImplementedError

    def _call(self, jax_fn, params, state, signature, x, arrays):
        """Runs one translation; `arrays` are the array leaves of the keyword arguments."""
        raise NotImplementedError

    def _check_ops(self, concrete_fn: Any) -> None:
        """Raises `TranslationError` naming the op and layer if the graph holds ops tf2jax lacks."""
        from tf2jax._src import ops as tf2jax_ops

        graph_def = concrete_fn.graph.as_graph_def()
        nodes = [(node.name, node.op, None) for node in graph_def.node]
        for function in _called_functions(graph_def):
            nodes += [(node.name, node.op, function.signature.name) for node in function.node_def]
        unsupported = tf2jax_ops.get_unsupported_operations([op for _, op, _ in nodes])
        if not unsupported:
            return
        name, op, function = next(n for n in nodes if n[1] in unsupported)
        where = f"{function}/{name}" if function else name
        layer = self._describe_node(where)
        others = sorted(unsupported - {op})
        raise TranslationError(
            f"tf2jax cannot translate TF op {op!r} (node {where!r}"
            + (f", in layer {layer}" if layer else "") + ")"
            + (f"; also unsupported: {others}" if others else "")
            + ". Use entk.from_tf(..., mode='bridge') (runs TF through call_tf; JC and NTVP only), "
            "or replace the layer with one built from supported ops.", op=op, node=where, layer=layer)


def _called_functions(graph_def: Any) -> list:
    """The library functions the graph calls (loop bodies, branches, nested calls), transitively.

    Functions the graph only carries along (e.g. gradient functions) are left out: tf2jax never
    translates those, so their ops do not matter.
    """
    library = {f.signature.name: f for f in graph_def.library.function}

    def callees(node_defs) -> set:
        names = set()
        for node in node_defs:
            for attr in node.attr.values():
                if attr.HasField("func"):
                    names.add(attr.func.name)
                names.update(f.name for f in attr.list.func)
        return names & set(library)

    seen: dict = {}
    pending = callees(graph_def.node)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen[name] = library[name]
            pending |= callees(library[name].node_def) - set(seen)
    return list(seen.values())


class KerasTranslation(TFTranslation):
    """A Keras 3 model (TensorFlow backend), traced through `stateless_call` in inference mode."""

    def __init__(self, model: Any, tf: types.ModuleType):
        self.model = model
        self._tf = tf
        self.param_keys = unique_keys([v.path for v in model.trainable_variables])
        self.state_keys = unique_keys([v.path for v in model.non_trainable_variables])
        super().__init__(layer_locator(model))

    def values(self) -> tuple[dict, dict]:
        """The model's current `(params, state)` as dicts of NumPy arrays."""
        params = {k: np.asarray(v.numpy()) for k, v in zip(self.param_keys, self.model.trainable_variables)}
        state = {k: np.asarray(v.numpy())
                 for k, v in zip(self.state_keys, self.model.non_trainable_variables)}
        return params, state

    def _translate(self, signature: Signature) -> Callable[..., Any]:
        tf, model = self._tf, self.model

        def call(trainable, non_trainable, x_leaves, kw_leaves):
            x = jax.tree_util.tree_unflatten(signature.x_tree, list(x_leaves))
            kwargs = signature.rebuild_kwargs(list(kw_leaves))
            kwargs.setdefault("training", False)  # inference mode: BatchNorm uses its statistics
            outputs, _ = model.stateless_call(list(trainable), list(non_trainable), x, **kwargs)
            return outputs

        tf_fn = tf.function(call)
        x_specs, kw_specs = signature.tf_specs(tf)
        var_specs = ([tf.TensorSpec(v.shape, v.dtype) for v in model.trainable_variables],
                     [tf.TensorSpec(v.shape, v.dtype) for v in model.non_trainable_variables])
        args = (*var_specs, x_specs, kw_specs)
        self._check_ops(tf_fn.get_concrete_function(*args))
        jax_fn, captured = _tf2jax_convert(tf_fn, self._describe_node, *args)
        trainable_captured = [k for k, v in captured.items() if v.trainable]
        if trainable_captured:
            raise TranslationError(
                f"The model reads trainable tf.Variable(s) {trainable_captured} that Keras does not "
                f"track (not in model.trainable_variables), so they cannot be parameters. Create them "
                f"with layer.add_weight(...) instead of tf.Variable(...).")
        constants = {k: np.asarray(v) for k, v in captured.items()}
        return lambda *a: jax_fn(constants, *a)[0]

    def _call(self, jax_fn, params, state, signature, x, arrays):
        trainable = [params[k] for k in self.param_keys]
        non_trainable = [state[k] for k in self.state_keys]
        return jax_fn(trainable, non_trainable, jax.tree_util.tree_leaves(x), list(arrays))


class FunctionTranslation(TFTranslation):
    """A `tf.function` (or a TF callable, wrapped in one); its captured `tf.Variable`s are the params."""

    def __init__(self, fn: Any, tf: types.ModuleType, example_signature: Signature):
        self._tf = tf
        self.fn = fn if hasattr(fn, "get_concrete_function") else tf.function(fn)
        super().__init__(lambda node: None)
        # The example's translation fixes the variable keys (tf2jax names them by variable name).
        jax_fn, variables = self._convert(example_signature)
        self._translations[example_signature] = jax_fn
        self.param_keys = tuple(k for k, v in variables.items() if v.trainable)
        self.state_keys = tuple(k for k, v in variables.items() if not v.trainable)
        self._variable_shapes = {k: tuple(v.shape) for k, v in variables.items()}
        self._initial = {k: np.asarray(v) for k, v in variables.items()}
        self._tf_variables = self._match_variables(example_signature)

    def values(self) -> tuple[dict, dict]:
        """The current `(params, state)` (read from the captured `tf.Variable`s)."""
        current = {k: np.asarray(v.numpy()) for k, v in self._tf_variables.items()}
        return ({k: current[k] for k in self.param_keys}, {k: current[k] for k in self.state_keys})

    def _match_variables(self, signature: Signature) -> dict:
        """key -> tf.Variable, in tf2jax's naming (variable name, repeats suffixed `_1`, `_2`, ...).

        tf2jax names the captured variables of the concrete function in capture order; the same order
        is rebuilt here and checked against tf2jax's names, shapes and values.
        """
        tf = self._tf
        x_specs, kw_specs = signature.tf_specs(tf)
        x_spec = jax.tree_util.tree_unflatten(signature.x_tree, x_specs)
        concrete = self.fn.get_concrete_function(x_spec, **signature.rebuild_kwargs(kw_specs))
        by_handle = {v.handle.ref(): v for v in concrete.variables}
        captured = [by_handle[t.ref()] for t in concrete.captured_inputs
                    if t.dtype == tf.resource and t.ref() in by_handle]
        keys = unique_keys([v.name.split(":")[0] for v in captured])
        by_key = dict(zip(keys, captured))
        for key, value in self._initial.items():
            var = by_key.get(key)
            if var is None or tuple(var.shape) != value.shape or not np.array_equal(var.numpy(), value):
                raise TranslationError(f"Could not match tf2jax's variable {key!r} to a tf.Variable "
                                       f"captured by the function (tf2jax version mismatch?).")
        return {k: by_key[k] for k in self._initial}

    def _convert(self, signature: Signature):
        x_specs, kw_specs = signature.tf_specs(self._tf)
        x_spec = jax.tree_util.tree_unflatten(signature.x_tree, x_specs)
        kw = signature.rebuild_kwargs(kw_specs)
        self._check_ops(self.fn.get_concrete_function(x_spec, **kw))
        return _tf2jax_convert(self.fn, self._describe_node, x_spec, **kw)

    def _translate(self, signature: Signature) -> Callable[..., Any]:
        jax_fn, variables = self._convert(signature)
        shapes = {k: tuple(v.shape) for k, v in variables.items()}
        if shapes != self._variable_shapes:
            raise TranslationError(
                f"The function reads different variables for inputs {signature.describe()} "
                f"({sorted(shapes)}) than for the example input ({sorted(self._variable_shapes)}); "
                f"entk needs the same variables for every input shape.")
        return jax_fn

    def _call(self, jax_fn, params, state, signature, x, arrays):
        return jax_fn({**state, **params}, x, **signature.rebuild_kwargs(list(arrays)))[0]


# ----------------------------------------------------------------------------------------------
# Naming: unique keys, and the Keras layer a graph node belongs to


def unique_keys(names: Sequence[str]) -> tuple[str, ...]:
    """`names` made unique by suffixing repeats with `_1`, `_2`, ... (first occurrence unchanged)."""
    seen: set = set()
    out = []
    for name in names:
        key, i = name, 0
        while key in seen:
            i += 1
            key = f"{name}_{i}"
        seen.add(key)
        out.append(key)
    return tuple(out)


def keras_layers(model: Any) -> list:
    """Every layer inside `model` (recursively), innermost ones included."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def layer_locator(model: Any) -> Callable[[str], str | None]:
    """`node_name -> "layer_name (LayerClass)"` for the innermost Keras layer whose name scope holds it.

    TF graph nodes are named after the name scopes they were created in (`"model/conv2d/Conv2D"`), and
    ops in a loop body live in a function named after the layer (`"lstm_while_body_12/..."`).
    """
    layers = {layer.name: layer for layer in keras_layers(model)}

    def locate(node: str) -> str | None:
        parts = node.split("/")
        for part in reversed(parts):
            if part in layers:
                return f"{part!r} ({type(layers[part]).__name__})"
        for name in sorted(layers, key=len, reverse=True):  # function names: "<layer>_while_body_7"
            if parts[0].startswith(name + "_"):
                return f"{name!r} ({type(layers[name]).__name__})"
        return None

    return locate


def _locate_failure(error: BaseException, describe_node: Callable[[str], str | None]
                    ) -> TranslationError | None:
    """A `TranslationError` naming the TF node whose tf2jax translation raised `error`.

    The node is found in the traceback: the innermost frame running a tf2jax op node (`self`), or
    parsing a node definition (`proto`).
    """
    from tf2jax._src import tf2jax as tf2jax_impl

    found = None
    tb = error.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        candidate = local.get("self")
        if isinstance(candidate, tf2jax_impl._OpNode) and hasattr(candidate, "name"):
            found = (candidate.op, candidate.name)
        proto = local.get("proto")
        if hasattr(proto, "op") and hasattr(proto, "name") and isinstance(proto.op, str):
            found = (proto.op, proto.name)
        tb = tb.tb_next
    if found is None:
        return None
    op, name = found
    layer = describe_node(name)
    return TranslationError(
        f"tf2jax's translation of TF op {op!r} (node {name!r}"
        + (f", in layer {layer}" if layer else "") + f") failed: {type(error).__name__}: {error}. "
        "Use entk.from_tf(..., mode='bridge') for this model.", op=op, node=name, layer=layer)


def _tf2jax_convert(tf_fn: Any, describe_node: Callable[[str], str | None], *args: Any,
                    **kwargs: Any) -> tuple[Callable[..., Any], dict]:
    """`tf2jax.convert`, with loops made differentiable and failures named as `TranslationError`."""
    import tf2jax

    with _bounded_loops():
        try:
            return tf2jax.convert(tf_fn, *args, **kwargs)
        except Exception as e:  # tf2jax raises ValueError / NotImplementedError / KeyError ...
            located = _locate_failure(e, describe_node)
            if located is not None:
                raise located from e
            raise TranslationError(f"tf2jax could not translate the graph: {type(e).__name__}: {e}. "
                                   f"Use entk.from_tf(..., mode='bridge') for this model.") from e


# ----------------------------------------------------------------------------------------------
# While loops with a static trip count -> lax.scan (reverse-mode differentiable)


_override_depth = 0
_override_lock = threading.RLock()
_loop_log = threading.local()  # .dynamic: set of While node names whose trip count was not static


@contextlib.contextmanager
def _bounded_loops():
    """Temporarily registers `_BoundedWhile` as tf2jax's translation of `While` / `StatelessWhile`.

    Scoped (not a global patch of tf2jax): applies while entk translates or runs a translated graph
    (tf2jax builds loop bodies lazily, on first run).
    """
    global _override_depth
    from tf2jax._src import ops as tf2jax_ops

    with _override_lock:
        saved = {name: tf2jax_ops._jax_ops.get(name) for name in ("While", "StatelessWhile")}
        if _override_depth == 0:
            for name in saved:
                tf2jax_ops._jax_ops[name] = _parse_bounded_while
        _override_depth += 1
        try:
            yield
        finally:
            _override_depth -= 1
            if _override_depth == 0:
                tf2jax_ops._jax_ops.update(saved)


def _parse_bounded_while(proto: Any) -> Any:
    from tf2jax._src import ops as tf2jax_ops

    op = _bounded_while_class(tf2jax_ops)(dict(cond_fun=proto.attr["cond"].func.name,
                                               body_fun=proto.attr["body"].func.name))
    op.node_name = proto.name
    return op


_BOUNDED_WHILE = None
_MAX_UNKNOWN_TRIPS = 100_000


def _bounded_while_class(tf2jax_ops: types.ModuleType) -> type:
    """`_BoundedWhile`, a tf2jax higher-order op (defined lazily: it subclasses a tf2jax class)."""
    global _BOUNDED_WHILE
    if _BOUNDED_WHILE is not None:
        return _BOUNDED_WHILE

    class _BoundedWhile(tf2jax_ops._HigherOrderFunction):
        """TF `While`: `lax.scan` when the trip count is static, else `lax.while_loop`."""

        def __call__(self, *args, cond_fun, body_fun, rng=None):
            passthrough = body_fun.output_is_input  # loop-invariant inputs, returned unchanged
            carried = [i for i, same in enumerate(passthrough) if not same]

            def full_args(values):
                merged = list(args)
                for i, v in zip(carried, values):
                    merged[i] = v
                return merged

            def split_key(key):
                return (None, None, None) if key is None else tuple(jax.random.split(key, 3))

            def cond(state):
                values, key = state
                _, cond_key, _ = split_key(key)
                return cond_fun(*full_args(values), rng=cond_key)[0]

            def body(state):
                values, key = state
                next_key, _, body_key = split_key(key)
                out = body_fun(*full_args(values), rng=body_key)
                return [out[i] for i in carried], next_key

            init = ([args[i] for i in carried], rng)
            init = _match_carry(init, jax.eval_shape(body, init))
            trips = _static_trip_count(cond, body, init)
            if trips is None:
                getattr(_loop_log, "dynamic", set()).add(getattr(self, "node_name", "?"))
                final = jax.lax.while_loop(cond, body, init)
            else:
                final, _ = jax.lax.scan(lambda s, _: (body(s), None), init, None, length=trips)
            return tuple(full_args(final[0]))

    _BOUNDED_WHILE = _BoundedWhile
    return _BoundedWhile


def _match_carry(init: PyTree, spec: PyTree) -> PyTree:
    """Initial loop values with the body's output shapes and dtypes (empty TensorLists filled).

    Concrete values stay NumPy arrays: under `jax.jit` a `jnp` operation would turn them into tracers
    and hide that the trip count is static.
    """
    def fix(value, s):
        xp = jnp if isinstance(value, jax.core.Tracer) else np
        if np.size(value) == 0 and np.shape(value) != s.shape:  # an uninitialised TensorList
            return np.zeros(s.shape, s.dtype)
        value = xp.asarray(value)
        return value.astype(s.dtype) if value.dtype != s.dtype else value
    return jax.tree_util.tree_map(fix, init, spec)


def _static_trip_count(cond: Callable, body: Callable, init: PyTree) -> int | None:
    """The loop's trip count if the condition never depends on traced values, else `None`.

    Which loop values the condition depends on is found by a dependency pass over the jaxprs of
    `cond` and `body` (values that are traced, i.e. depend on inputs or parameters, taint what they
    feed); if the condition stays untainted the loop is run concretely, with zeros in place of
    traced values, to count the trips.
    """
    leaves, tree = jax.tree_util.tree_flatten(init)
    tainted = [isinstance(leaf, jax.core.Tracer) for leaf in leaves]

    def flat(fn):
        return lambda *xs: jax.tree_util.tree_leaves(fn(jax.tree_util.tree_unflatten(tree, xs)))

    abstract = [jax.ShapeDtypeStruct(np.shape(l), l.dtype) for l in leaves]
    body_jaxpr = jax.make_jaxpr(flat(body))(*abstract).jaxpr
    cond_jaxpr = jax.make_jaxpr(flat(cond))(*abstract).jaxpr
    while True:
        updated = [a or b for a, b in zip(tainted, _taint(body_jaxpr, tainted))]
        if updated == tainted:
            break
        tainted = updated
    if _taint(cond_jaxpr, tainted)[0]:
        return None
    with jax.ensure_compile_time_eval():
        state = jax.tree_util.tree_unflatten(
            tree, [jnp.zeros(a.shape, a.dtype) if isinstance(l, jax.core.Tracer) else jnp.asarray(l)
                   for l, a in zip(leaves, abstract)])
        trips = 0
        while bool(cond(state)):
            state = body(state)
            trips += 1
            if trips > _MAX_UNKNOWN_TRIPS:
                return None
    return trips


def _taint(jaxpr: Any, tainted_inputs: Sequence[bool]) -> list[bool]:
    """Which outputs of `jaxpr` depend on the tainted inputs (any tainted operand taints an equation)."""
    from jax.extend.core import Literal

    tainted = {v for v, t in zip(jaxpr.invars, tainted_inputs) if t}
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return [not isinstance(v, Literal) and v in tainted for v in jaxpr.outvars]


def keras_backend_of(model: Any) -> str | None:
    """The Keras backend a Keras 3 object belongs to (`"tensorflow"`, `"jax"`, ...), else None."""
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.layers.Layer):
        return None
    return keras.backend.backend()
