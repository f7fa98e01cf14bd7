"""Reference kernels of neural-tangents 0.6.5 for the stax layers of tests/test_stax_layers.py.

Run with the neural-tangents virtualenv (made as in benchmarks/run.py's `ensure_nt_python`):

    .venv-nt/bin/python tests/data/stax_layers_generate.py

It writes `stax_layers_nt065.json` (the networks) and `stax_layers_nt065.npz` (inputs and kernels)
next to itself. The JSON format extends /work/shared/reference/README.md's:

- a case is `{"input": "vec" | "img" | "unit", "net": [[layer_name, kwargs], ...]}`; the network is
  `serial(*net)` in neural-tangents' `stax` naming;
- `["parallel", [branch, ...]]` holds branches (each a layer list), `["repeat", {"net": [...],
  "n": n}]` repeats a sub-network, `["Index", {"idx": [...]}]` encodes the index per axis as
  `"..."`, an int, `{"slice": [start, stop, step]}` or `{"take": [i, ...]}` (not used below:
  neural-tangents 0.6.5 pairs such tuples up across the two batch axes of a kernel, NumPy's
  advanced indexing, which is not the kernel of `x[idx]`), and
  `["Elementwise", {"fn": name, "nngp_fn": name}]` and `GlobalSelfAttention`'s
  `"pos_emb_decay_fn": name` name functions of `stax_spec.ELEMENTWISE_FUNCTIONS` (shared with the
  test);
- a case with `"pattern"` (graph networks with `Aggregate`) stores `C/pattern1`, `C/pattern2`,
  passed as `kernel_fn(x1, x2, pattern=(pattern1, pattern2))` and `kernel_fn(x1, None,
  pattern=(pattern1, pattern1))`;
- arrays per case `C`: `C/x1`, `C/x2`, `C/nngp`, `C/ntk` (`kernel_fn(x1, x2)`) and `C/nngp_self`,
  `C/ntk_self` (`kernel_fn(x1, None)`; not meaningful for a case marked `"pair_only"`), float64.
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


D = ("Dense", {"out_dim": 3, "W_std": 1.2, "b_std": 0.3})
D1 = ("Dense", {"out_dim": 1, "W_std": 0.9, "b_std": 0.1})
DU = ("Dense", {"out_dim": 3, "W_std": 0.8, "b_std": 0.6})  # unit-variance inputs -> q = 1
C = ("Conv", {"out_chan": 3, "filter_shape": [2, 2], "padding": "SAME", "W_std": 1.1, "b_std": 0.2})

# (N=3, P=2, H=5): mixes the 5 rows of each example into 2, example by example.
LHS_BATCH = np.round(np.random.RandomState(7).normal(size=(3, 2, 5)), 3).tolist()

CASES = {
    "exp_gaussian": {"input": "vec", "net": [
        D, ("Exp", {"a": 0.7, "b": 0.4}), D, ("Gaussian", {"a": 1.3, "b": -0.5}), D1]},
    "cos_rbf_sigmoid": {"input": "vec", "net": [
        D, ("Cos", {"a": 0.8, "b": 1.1, "c": 0.3}), D, ("Rbf", {"gamma": 0.6}), D,
        ("Sigmoid_like", {}), D1]},
    "sign_gabor": {"input": "vec", "net": [D, ("Sign", {}), D, ("Gabor", {}), D1]},
    "exp_normalized": {"input": "vec", "net": [
        D, ("Relu", {}), D, ("ExpNormalized", {"gamma": 1.5, "shift": -0.8}), D,
        ("ExpNormalized", {"do_clip": True}), D1]},
    "monomials": {"input": "vec", "net": [
        D, ("Monomial", {"degree": 3}), D, ("Monomial", {"degree": 2}), D,
        ("Monomial", {"degree": 0}), D1]},
    # neural-tangents' RectifiedMonomial is NaN on equal inputs (θ = 0), so its own variances and
    # the x2=None kernel are unusable: one such layer, last, and only the x1-x2 kernel is compared.
    "rectified_monomial_2": {"input": "vec", "pair_only": True, "net": [
        D, ("Relu", {}), D, ("RectifiedMonomial", {"degree": 2}), D1]},
    "rectified_monomial_3": {"input": "vec", "pair_only": True, "net": [
        D, ("RectifiedMonomial", {"degree": 3}), D1]},
    "rectified_monomial_0": {"input": "vec", "pair_only": True, "net": [
        D, ("Erf", {}), D, ("RectifiedMonomial", {"degree": 0}), D1]},
    "polynomial": {"input": "vec", "net": [
        D, ("Polynomial", {"coef": [0.3, -0.5, 0.2, 0.1]}), D,
        ("Polynomial", {"coef": [0.0, 1.0, 0.0, 0.0, -0.2]}), D1]},
    "hermite": {"input": "unit", "net": [
        DU, ("FanOut", {"num": 3}),
        ("parallel", [[("Hermite", {"degree": 1}), DU], [("Hermite", {"degree": 3}), DU],
                      [("Hermite", {"degree": 4}), DU]]),
        ("FanInSum", {}), D1]},
    "elementwise_autodiff": {"input": "vec", "net": [
        D, ("Elementwise", {"fn": "erf", "nngp_fn": "erf_nngp"}), D,
        ("Elementwise", {"fn": "erf", "nngp_fn": "erf_nngp", "d_nngp_fn": "erf_d_nngp"}), D1]},
    "conv_exp_gabor_pool": {"input": "img", "net": [
        C, ("Exp", {"a": 0.9, "b": 0.3}), C, ("Gabor", {}), C, ("Monomial", {"degree": 2}),
        ("GlobalAvgPool", {}), D1]},
    "fan_in_prod": {"input": "vec", "net": [
        ("FanOut", {"num": 3}),
        ("parallel", [[D, ("Relu", {})], [D], [("Dense", {"out_dim": 3, "W_std": 0.7}),
                                               ("Erf", {})]]),
        ("FanInProd", {}), D, ("Relu", {}), D1]},
    "fan_in_prod_conv": {"input": "img", "net": [
        C, ("FanOut", {"num": 2}), ("parallel", [[("Relu", {}), C], [C]]), ("FanInProd", {}),
        ("AvgPool", {"window_shape": [2, 2]}), ("Flatten", {}), D1]},
    "repeat": {"input": "vec", "net": [
        D, ("repeat", {"net": [("Relu", {}), D], "n": 3}), ("Erf", {}), D1]},
    "repeat_conv": {"input": "img", "net": [
        C, ("repeat", {"net": [("Relu", {}), C, ("Relu", {}), C], "n": 2}), ("GlobalAvgPool", {}),
        D1]},
    "index_spatial": {"input": "img", "net": [
        C, ("Relu", {}), ("Index", {"idx": [{"slice": [None, None, None]},
                                            {"slice": [1, 4, None]}, {"slice": [None, None, -2]}]}),
        C, ("Relu", {}), ("Index", {"idx": [{"slice": [None, None, None]}, 2, "..."]}),
        ("Conv", {"out_chan": 3, "filter_shape": [2], "padding": "VALID"}), ("Relu", {}),
        ("GlobalAvgPool", {}), D1]},
    "index_batch": {"input": "img", "net": [
        C, ("Relu", {}), ("Index", {"idx": [{"slice": [None, None, 2]}, "..."]}), C,
        ("Index", {"idx": [{"slice": [None, None, -1]}, 1, "..."]}), ("Flatten", {}), D1]},
    "conv_local": {"input": "img", "net": [
        ("ConvLocal", {"out_chan": 3, "filter_shape": [2, 2], "padding": "SAME", "W_std": 1.3,
                       "b_std": 0.4}), ("Relu", {}),
        ("ConvLocal", {"out_chan": 4, "filter_shape": [2, 1], "strides": [2, 1], "W_std": 0.9,
                       "b_std": 0.2, "parameterization": "standard"}), ("Erf", {}),
        ("ConvLocal", {"out_chan": 3, "filter_shape": [1, 2], "padding": "CIRCULAR"}),
        ("GlobalAvgPool", {}), D1]},
    "conv_transpose": {"input": "img", "net": [
        ("ConvTranspose", {"out_chan": 3, "filter_shape": [2, 3], "strides": [2, 1], "W_std": 1.2,
                           "b_std": 0.3}), ("Relu", {}),
        ("ConvTranspose", {"out_chan": 3, "filter_shape": [3, 2], "strides": [1, 2],
                           "padding": "SAME", "W_std": 0.8, "b_std": 0.1,
                           "parameterization": "standard"}), ("Relu", {}),
        ("ConvTranspose", {"out_chan": 2, "filter_shape": [2, 2], "strides": [2, 2],
                           "padding": "SAME"}),
        ("GlobalAvgPool", {}), D1]},
    # neural-tangents 0.6.5 resizes a kernel whose spatial axes a Conv left in reversed order with
    # the sizes in forward order (wrong after an odd number of Convs): an even number before each.
    "image_resize": {"input": "img", "net": [
        C, ("Relu", {}), C, ("ImageResize", {"shape": [-1, 8, 3, -1], "method": "linear"}), C,
        ("Relu", {}), C, ("ImageResize", {"shape": [-1, 3, 6, -1], "method": "nearest"}), C, C,
        ("ImageResize", {"shape": [-1, 2, 2, -1], "method": "linear", "antialias": False}),
        ("Relu", {}), ("GlobalAvgPool", {}), D1]},
    # Attention over the positions of sequences (N, 5, 2) and images (N, 5, 4, 2).
    "attention_softmax": {"input": "seq", "net": [
        ("Conv", {"out_chan": 3, "filter_shape": [2], "padding": "SAME", "b_std": 0.2}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 4, "n_chan_val": 5, "n_heads": 2,
                                 "W_key_std": 1.3, "W_value_std": 0.9, "W_out_std": 1.1,
                                 "b_std": 0.3}), ("Relu", {}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 4, "n_chan_val": 5, "n_heads": 2,
                                 "attention_mechanism": "RELU"}),
        ("GlobalAvgPool", {}), D1]},
    "attention_abs_identity_img": {"input": "img", "net": [
        C, ("Erf", {}), C,
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 3,
                                 "attention_mechanism": "ABS", "W_query_std": 0.7,
                                 "b_std": 0.1}), C,
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 1,
                                 "attention_mechanism": "IDENTITY"}),
        ("Flatten", {}), D1]},
    "attention_pos_emb": {"input": "seq", "net": [
        ("Conv", {"out_chan": 3, "filter_shape": [2], "padding": "SAME", "b_std": 0.2}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 2,
                                 "pos_emb_type": "SUM", "W_pos_emb_std": 0.8, "b_std": 0.2}),
        ("Relu", {}), ("Conv", {"out_chan": 3, "filter_shape": [2], "padding": "SAME"}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 2,
                                 "pos_emb_type": "CONCAT", "n_chan_pos_emb": 5,
                                 "val_pos_emb": True}),
        ("GlobalAvgPool", {}), D1]},
    "attention_pos_emb_decay": {"input": "img", "net": [
        C, C, ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2,
                                       "n_heads": 2, "pos_emb_type": "SUM",
                                       "pos_emb_decay_fn": "exp_decay", "pos_emb_p_norm": 1,
                                       "b_std": 0.2}), ("Relu", {}),
        ("GlobalAvgPool", {}), D1]},
    "attention_square_root_identity": {"input": "seq", "net": [
        ("Conv", {"out_chan": 3, "filter_shape": [2], "padding": "SAME", "b_std": 0.2}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 2,
                                 "linear_scaling": False, "attention_mechanism": "IDENTITY",
                                 "W_value_std": 1.2, "b_std": 0.3}),
        ("Dense", {"out_dim": 3}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 2,
                                 "linear_scaling": False, "attention_mechanism": "IDENTITY",
                                 "pos_emb_type": "SUM"}),
        ("Dense", {"out_dim": 3}),
        ("GlobalSelfAttention", {"n_chan_out": 3, "n_chan_key": 2, "n_chan_val": 2, "n_heads": 2,
                                 "linear_scaling": False, "attention_mechanism": "IDENTITY",
                                 "pos_emb_type": "CONCAT", "val_pos_emb": True}),
        ("GlobalAvgPool", {}), D1]},
    # DotGeneral after Dense (neural-tangents 0.6.5 ignores a Conv's reversed kernel axes here too).
    "dot_general": {"input": "img", "net": [
        D, ("Relu", {}), ("DotGeneral", {"rhs": [1.691, -0.466, 0.033, 0.408],
                                         "dimension_numbers": [[[2], [0]], [[], []]]}),
        D, ("Relu", {}), ("DotGeneral", {"lhs": [-0.789, 0.002, -0.001, -1.755, 1.018],
                                         "dimension_numbers": [[[0], [1]], [[], []]]}), D1]},
    "dot_general_batch": {"input": "img3", "net": [
        D, ("Relu", {}), ("DotGeneral", {"lhs": LHS_BATCH,
                                         "dimension_numbers": [[[2], [1]], [[0], [0]]]}),
        D, ("Erf", {}), ("GlobalAvgPool", {}), D1]},
    # Graphs: vertices on the spatial axes; patterns are passed at call time (npz C/pattern1, 2).
    "aggregate_dense": {"input": "graph", "pattern": "dense", "net": [
        D, ("Relu", {}), ("Aggregate", {}), D, ("Erf", {}), ("Aggregate", {}),
        ("GlobalAvgPool", {}), D1]},
    "aggregate_sparse": {"input": "graph", "pattern": "sparse", "net": [
        D, ("Aggregate", {"implementation": "SPARSE"}), ("Relu", {}), D,
        ("Aggregate", {"implementation": "SPARSE"}), ("Flatten", {}), D1]},
    "aggregate_axis": {"input": "graph2d", "pattern": "dense_axis1", "net": [
        C, ("Relu", {}), ("Aggregate", {"aggregate_axis": 1}), C, ("Relu", {}),
        ("GlobalAvgPool", {}), D1]},
    # U-Net-like: a skip branch beside a down (ImageResize) / up (ImageResize) path, concatenated,
    # then a ConvTranspose (an even number of Convs before each ImageResize, see image_resize).
    "unet": {"input": "img", "net": [
        C, ("Relu", {}), C, ("FanOut", {"num": 2}),
        ("parallel", [[("Relu", {})],
                      [("ImageResize", {"shape": [-1, 3, 2, -1], "method": "linear"}), C,
                       ("Relu", {}), C,
                       ("ImageResize", {"shape": [-1, 5, 4, -1], "method": "nearest"})]]),
        ("FanInConcat", {}),
        ("ConvTranspose", {"out_chan": 3, "filter_shape": [2, 2], "strides": [1, 1],
                           "padding": "SAME"}), ("Relu", {}), ("GlobalAvgPool", {}), D1]},
}


def make_patterns(kind: str, n1: int, n2: int, vertices: int,
                  rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    if kind == "sparse":  # (N, n_edges, 2) integer edges; -1 marks padding
        def edges(n):
            e = rng.randint(0, vertices, size=(n, 7, 2))
            e[:, -1] = -1
            return e
        return edges(n1), edges(n2)
    return rng.uniform(size=(n1, vertices, vertices)), rng.uniform(size=(n2, vertices, vertices))


def make_inputs(kind: str, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    if kind == "img":
        return rng.normal(size=(3, 5, 4, 2)), rng.normal(size=(2, 5, 4, 2))
    if kind == "img3":  # equal batch sizes, for a constant with a batch dimension
        return rng.normal(size=(3, 5, 4, 2)), rng.normal(size=(3, 5, 4, 2))
    if kind == "seq":
        return rng.normal(size=(3, 5, 2)), rng.normal(size=(2, 5, 2))
    if kind == "graph":  # 5 vertices, 2 features
        return rng.normal(size=(3, 5, 2)), rng.normal(size=(2, 5, 2))
    if kind == "graph2d":  # vertices along axis 1 (4 of them), a second spatial axis of 3
        return rng.normal(size=(3, 4, 3, 2)), rng.normal(size=(2, 4, 3, 2))
    x1, x2 = rng.normal(size=(4, 7)), rng.normal(size=(3, 7))
    if kind == "unit":  # examples of mean square 1: Dense(W_std² + b_std² = 1) gives q = 1
        x1 = x1 / np.sqrt(np.mean(x1 ** 2, -1, keepdims=True))
        x2 = x2 / np.sqrt(np.mean(x2 ** 2, -1, keepdims=True))
    return x1, x2


def main() -> None:
    rng = np.random.RandomState(16)
    arrays, spec = {}, {}
    for case, entry in CASES.items():
        x1, x2 = make_inputs(entry["input"], rng)
        _, _, kernel_fn = stax_spec.build(stax, entry["net"])
        kw_pair, kw_self = {}, {}
        if "pattern" in entry:
            p1, p2 = make_patterns(entry["pattern"], len(x1), len(x2), x1.shape[1], rng)
            arrays.update({f"{case}/pattern1": p1, f"{case}/pattern2": p2})
            kw_pair, kw_self = {"pattern": (p1, p2)}, {"pattern": (p1, p1)}
        pair = kernel_fn(x1, x2, ("nngp", "ntk"), **kw_pair)
        self_ = kernel_fn(x1, None, ("nngp", "ntk"), **kw_self)
        arrays.update({f"{case}/x1": x1, f"{case}/x2": x2,
                       f"{case}/nngp": np.asarray(pair.nngp), f"{case}/ntk": np.asarray(pair.ntk),
                       f"{case}/nngp_self": np.asarray(self_.nngp),
                       f"{case}/ntk_self": np.asarray(self_.ntk)})
        keys = ["nngp", "ntk"] + ([] if entry.get("pair_only") else ["nngp_self", "ntk_self"])
        for key in keys:
            assert np.all(np.isfinite(arrays[f"{case}/{key}"])), (case, key)
            assert arrays[f"{case}/{key}"].dtype == np.float64
        spec[case] = entry
    (HERE / "stax_layers_nt065.json").write_text(json.dumps(spec, indent=1) + "\n")
    np.savez_compressed(HERE / "stax_layers_nt065.npz", **arrays)
    print(f"wrote {len(spec)} cases to {HERE}")


if __name__ == "__main__":
    main()
