"""Finite vs infinite width, side by side, with one network definition.

    python examples/infinite_width.py [output.png]

1. The empirical NTK of finite `entk.stax` MLPs at initialisation approaches the analytic
   infinite-width NTK as the width grows (relative error ~ 1/√width).
2. Finite networks trained by gradient descent on a small regression task, next to the infinite
   ensemble of infinitely wide networks trained for the same time
   (`entk.predict.gradient_descent_mse_ensemble`: mean ± 2 std).

The same `stax.serial(...)` gives the finite network (`init_fn`, `apply_fn`, fed to
`entk.empirical_ntk_fn`) and its infinite-width limit (`kernel_fn`).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import entk
from entk import predict, stax

jax.config.update("jax_enable_x64", True)


def mlp(width: int) -> stax.Layer:
    return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                       stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                       stax.Dense(1, W_std=1.5, b_std=0.1))


def ntk_convergence(widths=(32, 128, 512, 2048), seeds=3):
    """Mean relative Frobenius error of the empirical NTK at init against the analytic NTK."""
    x = np.random.RandomState(0).normal(size=(6, 2))
    analytic = mlp(1).kernel_fn(x, None, "ntk")  # the limit does not depend on the width
    errors = []
    for width in widths:
        init_fn, apply_fn, _ = mlp(width)
        ntk_fn = jax.jit(entk.empirical_ntk_fn(apply_fn))
        errs = []
        for seed in range(seeds):
            _, params = init_fn(jax.random.PRNGKey(seed), x.shape)
            errs.append(float(jnp.linalg.norm(ntk_fn(x, None, params) - analytic)
                              / jnp.linalg.norm(analytic)))
        errors.append(np.mean(errs))
        print(f"width {width:5d}: relative NTK error {errors[-1]:.4f}")
    return np.array(widths), np.array(errors)


def on_circle(theta: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(theta), np.sin(theta)], axis=1)


def regression(width=512, n_networks=4, steps=1000):
    """Finite networks trained by full-batch gradient descent, and the infinite ensemble, on a
    regression task on the unit circle (inputs `(cos θ, sin θ)`, plotted against θ)."""
    theta_train = np.linspace(0, 2 * np.pi, 8, endpoint=False) + 0.2
    theta_test = np.linspace(0, 2 * np.pi, 200)
    x_train, x_test = on_circle(theta_train), on_circle(theta_test)
    y_train = (np.sin(2 * theta_train) + 0.5 * np.cos(3 * theta_train))[:, None]
    init_fn, apply_fn, kernel_fn = mlp(width)
    # Half the largest stable step for the infinite-width NTK.
    lr = 0.5 * predict.max_learning_rate(kernel_fn(x_train, None, "ntk"), y_train.size)
    print(f"learning rate {lr:.3f}")

    def loss(params):
        return 0.5 * jnp.mean((apply_fn(params, x_train) - y_train) ** 2)

    @jax.jit
    def train(params):
        def step(_, p):
            return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.grad(loss)(p))
        return jax.lax.fori_loop(0, steps, step, params)

    finite = []
    for seed in range(n_networks):
        _, params = init_fn(jax.random.PRNGKey(100 + seed), x_train.shape)
        trained = train(params)
        finite.append(np.asarray(apply_fn(trained, x_test))[:, 0])
        print(f"finite network {seed}: train RMSE {float(jnp.sqrt(2 * loss(trained))):.4f}")

    ensemble = predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, lr)
    out = ensemble(steps, x_test, "ntk", compute_cov=True)
    mean = np.asarray(out.mean)[:, 0]
    std = np.sqrt(np.clip(np.diag(np.asarray(out.covariance)), 0, None))
    return theta_train, y_train, theta_test, finite, mean, std


def main(path: str = "infinite_width.png") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, errors = ntk_convergence()
    theta_train, y_train, theta_test, finite, mean, std = regression()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.loglog(widths, errors, "o-", label="empirical vs analytic NTK")
    ax1.loglog(widths, errors[0] * np.sqrt(widths[0] / widths), "k--",
               label=r"$\propto 1/\sqrt{width}$")
    ax1.set_xlabel("width")
    ax1.set_ylabel("relative error (Frobenius)")
    ax1.set_title("Finite-width NTK at initialisation")
    ax1.legend()

    xs = theta_test
    ax2.fill_between(xs, mean - 2 * std, mean + 2 * std, color="C0", alpha=0.2,
                     label="infinite ensemble ± 2 std")
    ax2.plot(xs, mean, color="C0", label="infinite ensemble mean")
    for i, f in enumerate(finite):
        ax2.plot(xs, f, color="C1", lw=0.8, alpha=0.8,
                 label="finite nets (width 512)" if i == 0 else None)
    ax2.plot(theta_train, y_train[:, 0], "kx", label="training data")
    ax2.set_xlabel(r"$\theta$ (input $(\cos\theta, \sin\theta)$)")
    ax2.set_title("Trained by gradient descent (same number of steps)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
