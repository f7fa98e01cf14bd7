"""Finite width → infinite width for `stax.RNN` and `stax.BatchNorm` (issue 16, item 2).

For each width, `seeds` networks are initialised; for each the relative Frobenius error
`‖K_emp − K‖/‖K‖` is taken against the analytic kernel `K`, for

- NNGP: entk's empirical NNGP of the layer's hidden output (channel-averaged `h hᵀ / n`, i.e.
  `entk.empirical_nngp_fn` of the network without its readout) against the layer's analytic NNGP;
- NTK: `entk.empirical_ntk_fn` of the network with a `Dense(1)` readout against its analytic NTK;

printed as the mean over seeds (single-network error, expected ~ width^-1/2) and, for the NTK,
also the error of the seed-averaged kernel (`entk.monte_carlo_kernel_fn`). Run:

    python benchmarks/stax_convergence.py [--widths 64 256 1024] [--seeds 4]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import entk  # noqa: E402
from entk import stax  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def convergence(name, hidden_of_width, x, widths, seeds, parameterization="ntk"):
    """Prints one table for a network `serial(hidden, Dense(1))`. With the standard
    parameterization the analytic NTK grows with the width, so it is recomputed at each width."""
    readout = stax.Dense(1, parameterization=parameterization)
    k_hidden = hidden_of_width(1).kernel_fn(x, None, "nngp")
    k_ntk = stax.serial(hidden_of_width(1), readout).kernel_fn(x, None, "ntk")
    print(f"\n{name}: x {x.shape}, {seeds} seeds")
    print(f"{'width':>6} {'NNGP err':>10} {'NTK err':>10} {'NTK err of mean':>16}")
    for width in widths:
        hidden = hidden_of_width(width)
        init_fn, apply_fn, kernel_fn = stax.serial(hidden, readout)
        if parameterization == "standard":
            k_ntk = kernel_fn(x, None, "ntk")
        nngp_fn = jax.jit(entk.empirical_nngp_fn(hidden.apply_fn))
        ntk_fn = jax.jit(entk.empirical_ntk_fn(apply_fn, implementation="jc"))
        nngp_errs, ntk_errs = [], []
        for s in range(seeds):
            params = init_fn(jax.random.fold_in(jax.random.PRNGKey(0), s), x.shape)[1]
            nngp_errs.append(rel_err(nngp_fn(x, None, params[0]), k_hidden))
            ntk_errs.append(rel_err(ntk_fn(x, None, params), k_ntk))
        mean_ntk = entk.monte_carlo_kernel_fn(init_fn, apply_fn, jax.random.PRNGKey(0), seeds,
                                              implementation="jc")(x, None, "ntk")
        print(f"{width:>6} {np.mean(nngp_errs):>10.4f} {np.mean(ntk_errs):>10.4f} "
              f"{rel_err(mean_ntk, k_ntk):>16.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x_seq = rng.normal(size=(4, 5, 3))       # (N, T, D)
    x_batch = rng.normal(size=(6, 12))       # (B, D), D ≥ B: see stax.batch_norm
    for readout in ("last", "average"):
        convergence(f"RNN(erf, readout={readout}, W_std=1.3, b_std=0.3), T=5",
                    lambda w, r=readout: stax.RNN(w, "erf", r, W_std=1.3, b_std=0.3),
                    x_seq, args.widths, args.seeds)
    convergence("RNN(relu, readout=last, W_std=1.2, b_std=0.1), T=5",
                lambda w: stax.RNN(w, "relu", "last", W_std=1.2, b_std=0.1),
                x_seq, args.widths, args.seeds)
    convergence("Dense → Erf → RNN(relu, readout=last), T=5 (input with its own NTK)",
                lambda w: stax.serial(stax.Dense(w, W_std=1.2, b_std=0.1), stax.Erf(),
                                      stax.RNN(w, "relu", W_std=1.1, U_std=1.3, b_std=0.2)),
                x_seq, args.widths, args.seeds)
    convergence("RNN(erf, readout=average), standard parameterization, T=5",
                lambda w: stax.RNN(w, "erf", "average", W_std=1.3, b_std=0.3,
                                   parameterization="standard"),
                x_seq, args.widths, args.seeds, parameterization="standard")
    convergence("Dense → BatchNorm, B=6",
                lambda w: stax.serial(stax.Dense(w, W_std=1.2, b_std=0.2), stax.BatchNorm()),
                x_batch, args.widths, args.seeds)
    convergence("Dense → BatchNorm(nonlinearity=Relu), B=6",
                lambda w: stax.serial(stax.Dense(w, W_std=1.2, b_std=0.2),
                                      stax.BatchNorm(nonlinearity=stax.Relu())),
                x_batch, args.widths, args.seeds)


if __name__ == "__main__":
    main()
