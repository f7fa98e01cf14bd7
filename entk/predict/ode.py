"""Function-space gradient descent on any loss, optionally with momentum, by ODE integration."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entk.predict import _common as c

Array = jax.Array


class ODEState(NamedTuple):
    """State of `gradient_descent`'s ODE: outputs and (with momentum) their velocities."""

    fx_train: Array | None = None
    fx_test: Array | None = None
    qx_train: Array | None = None
    qx_test: Array | None = None


def gradient_descent(loss: Callable[[Array, Array], Array], k_train_train: Any, y_train: Any,
                     learning_rate: float = 1.0, momentum: float | None = None,
                     trace_axes: c.Axes = (-1,)) -> Callable[..., Any]:
    """Outputs of function-space gradient flow on any `loss(fx_train, y_train)`, by ODE integration.

    `df/dt = −Θ ∇_f loss`, `t` in steps of `learning_rate`. With `momentum`, the continuous-time
    heavy-ball method is solved in units of `√learning_rate`: `df/dt = q`,
    `dq/dt = −Θ ∇_f loss + (momentum − 1)/√learning_rate · q`. For `loss = 0.5·mean((f − y)²)` this
    is what `gradient_descent_mse` computes in closed form.

    Returns `predict_fn(t, fx_train_0=0., fx_test_0=None, k_test_train=None)` like
    `gradient_descent_mse`'s; `t` (finite, non-negative, any shape and order) is required.
    """
    from jax.experimental import ode

    layout, y = c.make_layout(y_train, trace_axes)
    k = c.kernel_entry(k_train_train, "ntk", "k_train_train")
    c.check_train_kernel(k, layout, "k_train_train", y.shape)
    k2d = c.make_2d(k)
    y = y.astype(k2d.dtype)
    grad_loss = jax.grad(lambda fx: loss(fx, y))

    def predict_fn(t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: Any = None) -> Any:
        c.check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
        c.check_broadcast(fx_train_0, y.shape, "fx_train_0")
        if t is None:
            raise ValueError("gradient_descent integrates an ODE and needs finite times t; for MSE "
                             "at t=∞ use gradient_descent_mse(...)(None, ...).")
        t_np = np.asarray(t, dtype=np.float64)
        scale = learning_rate if momentum is None else learning_rate ** 0.5
        flat_t = t_np.reshape(-1) * scale
        if np.any(flat_t < 0) or not np.all(np.isfinite(flat_t)):
            raise ValueError(f"t={t!r}: times must be finite and non-negative.")
        # odeint needs strictly increasing times starting at 0: solve on the distinct times.
        distinct, inverse = np.unique(flat_t, return_inverse=True)
        offset = 0 if distinct[0] == 0 else 1
        times = jnp.asarray(np.concatenate([[0.0], distinct]) if offset else distinct, k2d.dtype)
        picks = jnp.asarray(inverse.reshape(-1) + offset)

        fx_train = jnp.broadcast_to(
            jnp.asarray(0.0 if fx_train_0 is None else fx_train_0, k2d.dtype), y.shape)
        k_td2 = test_shape = fx_test = None
        if fx_test_0 is not None:
            k_td = c.kernel_entry(k_test_train, "ntk", "k_test_train")
            test_shape = c.test_free_shape(k_td, layout)
            k_td2 = c.make_2d(k_td)
            c.check_broadcast(fx_test_0, layout.output_shape(test_shape), "fx_test_0")
            fx_test = jnp.broadcast_to(jnp.asarray(fx_test_0, k2d.dtype),
                                       layout.output_shape(test_shape))

        def apply_kernel(kernel2d: Array, g: Array, free_shape: tuple) -> Array:
            return layout.unflat(kernel2d @ layout.flat(g), free_shape)

        def dstate_dt(state: ODEState, _t) -> ODEState:
            g = grad_loss(state.fx_train)
            dtrain = -apply_kernel(k2d, g, layout.free_shape)
            dtest = None if k_td2 is None else -apply_kernel(k_td2, g, test_shape)
            if momentum is None:
                return ODEState(dtrain, dtest)
            friction = (momentum - 1.0) / learning_rate ** 0.5
            dtrain = dtrain + friction * state.qx_train
            if dtest is not None:
                dtest = dtest + friction * state.qx_test
            return ODEState(state.qx_train, state.qx_test, dtrain, dtest)

        state0 = ODEState(fx_train, fx_test)
        if momentum is not None:
            state0 = state0._replace(qx_train=jnp.zeros_like(fx_train),
                                     qx_test=None if fx_test is None else jnp.zeros_like(fx_test))
        states = ode.odeint(dstate_dt, state0, times)

        def at_requested(traj: Array | None) -> Array | None:
            if traj is None:
                return None
            return traj[picks].reshape(t_np.shape + traj.shape[1:])

        out_train = at_requested(states.fx_train) if fx_train_0 is not None else None
        out_test = at_requested(states.fx_test)
        if out_test is None:
            return out_train
        if out_train is None:
            return out_test
        return out_train, out_test

    return predict_fn
