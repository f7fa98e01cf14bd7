"""Reference kernels and outputs of neural-tangents 0.6.5 for masked inputs
(tests/test_stax_masking.py).

Run with the neural-tangents virtualenv:

    .venv-nt/bin/python tests/data/stax_masking_generate.py

It writes `stax_masking_nt065.json` (the cases) and `stax_masking_nt065.npz` (inputs, kernels,
parameters and outputs) next to itself.

- a case is `{"net": [[layer_name, kwargs], ...], "mask_constant": c, "apply": bool}`; the
  network is `serial(*net)` in neural-tangents' `stax` naming, `["parallel", [branch, ...]]`
  holds branches (each a layer list); `c` is a number or the string `"nan"`;
- arrays per case `C`: `C/x1`, `C/x2` (entries equal to `c` are masked), `C/nngp`, `C/ntk`
  (`kernel_fn(x1, x2, mask_constant=c)`), `C/nngp_self`, `C/ntk_self` (`kernel_fn(x1, None,
  mask_constant=c)`);
- for `"apply": true`, `C/param_{i}` are the leaves of `init_fn(PRNGKey(1), x1.shape)`'s params
  in tree order and `C/out`, `C/out_mask` the `MaskedArray` of `apply_fn(params, x1,
  mask_constant=c)`.
"""

from __future__ import annotations

import json
import pathlib

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

import stax_spec  # noqa: E402  (beside this file: the spec -> network builder the tests share)

HERE = pathlib.Path(__file__).resolve().parent
MC = -1000.0


def sequences(lengths, t=6, d=2, seed=0, mask_constant=MC):
    """`(N, t, d)` Gaussian sequences whose positions after `lengths[n]` equal `mask_constant`."""
    x = np.random.RandomState(seed).normal(size=(len(lengths), t, d))
    for n, length in enumerate(lengths):
        x[n, length:] = mask_constant
    return x


def images(seed, n=2, mask_constant=MC):
    """`(n, 4, 4, 2)` images with a few masked pixels (and one pixel with one masked channel)."""
    x = np.random.RandomState(seed).normal(size=(n, 4, 4, 2))
    x[0, 3, :] = mask_constant
    x[0, 0, 0] = mask_constant
    x[-1, 1:3, 2] = mask_constant
    x[-1, 0, 1, 0] = mask_constant  # one channel only: not masked after the first Dense/Conv
    return x


CONV1 = ["Conv", {"out_chan": 3, "filter_shape": [3], "padding": "SAME", "W_std": 1.3,
                  "b_std": 0.2}]
CONV1B = ["Conv", {"out_chan": 3, "filter_shape": [2], "padding": "SAME", "W_std": 1.1,
                   "b_std": 0.1}]
ATT = {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 2, "linear_scaling": True,
       "W_key_std": 1.1, "W_value_std": 1.2, "W_query_std": 0.9, "W_out_std": 1.0, "b_std": 0.1}
CONV2 = ["Conv", {"out_chan": 3, "filter_shape": [2, 2], "padding": "SAME", "W_std": 1.2,
                  "b_std": 0.1}]
DENSE = ["Dense", {"out_dim": 3, "W_std": 1.2, "b_std": 0.3}]
OUT = ["Dense", {"out_dim": 1, "W_std": 0.9, "b_std": 0.1}]

CASES = {
    "seq_conv": {"net": [CONV1, ["Relu", {}], CONV1B, ["Erf", {}], ["GlobalAvgPool", {}], OUT],
                 "x": ([6, 4, 3], [5, 2]), "apply": True},
    "seq_attention_softmax": {
        "net": [DENSE, ["Relu", {}], ["GlobalSelfAttention", ATT], ["Relu", {}],
                ["GlobalAvgPool", {}], OUT], "x": ([6, 4, 3], [5, 2]), "apply": False},
    "seq_attention_relu": {
        "net": [CONV1, ["GlobalSelfAttention", {**ATT, "attention_mechanism": "RELU"}],
                ["Erf", {}], ["GlobalAvgPool", {}], OUT], "x": ([6, 1, 4], [3, 6]),
        "apply": False},
    "seq_branches": {
        "net": [CONV1, ["FanOut", {"num": 2}],
                ["parallel", [[["Relu", {}], CONV1B], [CONV1B]]], ["FanInSum", {}],
                ["Relu", {}], ["FanOut", {"num": 2}],
                ["parallel", [[CONV1], [CONV1B, ["Relu", {}], CONV1B]]], ["FanInConcat", {}],
                CONV1B, ["Relu", {}], ["GlobalAvgPool", {}], OUT], "x": ([6, 4, 3], [5, 2]),
        "apply": True},
    "seq_sumpool_nan": {
        "net": [CONV1, ["Relu", {}], ["SumPool", {"window_shape": [2], "strides": [2]}],
                CONV1B, ["Relu", {}], ["GlobalAvgPool", {}], OUT], "x": ([6, 3, 5], [4, 2]),
        "mask_constant": "nan", "apply": True},
    "img_pool_flatten": {
        "net": [CONV2, ["Relu", {}], ["AvgPool", {"window_shape": [2, 2], "strides": [1, 1],
                                                   "padding": "SAME"}],
                CONV2, ["Relu", {}], ["Flatten", {}], OUT], "x": "img", "apply": True},
    "img_dense_global": {
        "net": [DENSE, ["Erf", {}], CONV2, ["Relu", {}], ["GlobalAvgPool", {}], OUT],
        "x": "img", "apply": True},
}


def main():
    arrays, spec = {}, {}
    for i, (case, c) in enumerate(CASES.items()):
        mc = c.get("mask_constant", MC)
        mc_val = np.nan if mc == "nan" else mc
        if c["x"] == "img":
            x1, x2 = images(10 + i, 2, mc_val), images(20 + i, 3, mc_val)
        else:
            x1 = sequences(c["x"][0], seed=10 + i, mask_constant=mc_val)
            x2 = sequences(c["x"][1], seed=20 + i, mask_constant=mc_val)
        init_fn, apply_fn, kernel_fn = stax_spec.build(stax, c["net"])
        k12 = kernel_fn(x1, x2, ("nngp", "ntk"), mask_constant=mc_val)
        k11 = kernel_fn(x1, None, ("nngp", "ntk"), mask_constant=mc_val)
        arrays.update({f"{case}/x1": x1, f"{case}/x2": x2, f"{case}/nngp": k12.nngp,
                       f"{case}/ntk": k12.ntk, f"{case}/nngp_self": k11.nngp,
                       f"{case}/ntk_self": k11.ntk})
        if c["apply"]:
            _, params = init_fn(jax.random.PRNGKey(1), x1.shape)
            for j, leaf in enumerate(jax.tree_util.tree_leaves(params)):
                arrays[f"{case}/param_{j}"] = np.asarray(leaf)
            out = apply_fn(params, x1, mask_constant=mc_val)
            arrays[f"{case}/out"] = np.asarray(out.masked_value)
            arrays[f"{case}/out_mask"] = np.asarray(out.mask)
        spec[case] = {"net": c["net"], "mask_constant": mc, "apply": c["apply"]}
        print(case, np.asarray(k12.nngp).ravel()[:3])
    arrays = {k: np.asarray(v, np.float64) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
              for k, v in arrays.items()}
    np.savez_compressed(HERE / "stax_masking_nt065.npz", **arrays)
    (HERE / "stax_masking_nt065.json").write_text(json.dumps(spec, indent=1) + "\n")


if __name__ == "__main__":
    main()
