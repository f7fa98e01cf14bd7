"""Kernels back out to TensorFlow: `to_tf(kernel_fn, params)` → a `tf.function` of TF tensors.

The kernel function (any `kernel_fn(x1, x2, params)`, e.g. from `entk.empirical_ntk_fn`) is converted
with `jax.experimental.jax2tf.convert` (native serialization: the compiled JAX computation runs inside
TF as one `XlaCallModule` op), so TF users get the kernel without touching JAX. The parameters live in
non-trainable `tf.Variable`s (kept on the returned function as `.params`), not as graph constants.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

PyTree = Any


def to_tf(kernel_fn: Callable[..., PyTree], params: PyTree, *,
          polymorphic_shapes: Sequence[str | None] | None = None, **convert_kwargs: Any) -> Any:
    """`kernel_fn(x1, x2, params)` as a `tf.function` `tf_kernel(x1, x2=None)` on TF tensors.

    Args:
      kernel_fn: `kernel_fn(x1, x2, params) -> kernel pytree`, pure JAX (e.g. an `ntk_fn` from
        `entk.empirical_ntk_fn`); `x2=None` means `x1`.
      params: the parameters the kernel is evaluated at (a pytree of arrays).
      polymorphic_shapes: optional jax2tf shape polymorphism for `(x1, x2)`, e.g.
        `["(b1, ...)", "(b2, ...)"]` to serialize once for every batch size. By default each new
        input shape is converted on first call (the `tf.function` retraces).
      **convert_kwargs: passed to `jax2tf.convert` (e.g. `native_serialization_platforms`).

    Returns:
      A `tf.function`; `tf_kernel(x1, x2)` returns the kernel as TF tensors (the same pytree
      structure as `kernel_fn`'s output), `tf_kernel(x1)` the kernel of `x1` with itself. Its
      parameters are in `tf_kernel.params` (non-trainable `tf.Variable`s, one per parameter leaf).
    """
    from jax.experimental import jax2tf

    from entk.adapters.tf._tensorflow import import_tensorflow

    tf = import_tensorflow()
    leaves, treedef = jax.tree_util.tree_flatten(params)
    variables = [tf.Variable(np.asarray(leaf), trainable=False, name=f"param_{i}")
                 for i, leaf in enumerate(leaves)]
    shapes = list(polymorphic_shapes) if polymorphic_shapes is not None else None

    def two_inputs(x1, x2, *param_leaves):
        return kernel_fn(x1, x2, jax.tree_util.tree_unflatten(treedef, param_leaves))

    def one_input(x1, *param_leaves):
        return kernel_fn(x1, None, jax.tree_util.tree_unflatten(treedef, param_leaves))

    def convert(fn, n_inputs):
        poly = None if shapes is None else shapes[:n_inputs] + [None] * len(leaves)
        return jax2tf.convert(fn, with_gradient=False, polymorphic_shapes=poly, **convert_kwargs)

    converted_two, converted_one = convert(two_inputs, 2), convert(one_input, 1)

    @tf.function(autograph=False)
    def tf_kernel(x1, x2=None):
        if x2 is None:
            return converted_one(x1, *variables)
        return converted_two(x1, x2, *variables)

    tf_kernel.params = variables
    return tf_kernel
