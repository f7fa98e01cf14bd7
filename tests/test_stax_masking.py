"""Masked inputs (`mask_constant`) in entk.stax against neural-tangents 0.6.5.

References: tests/data/stax_masking_nt065.{json,npz}, made by tests/data/stax_masking_generate.py
(float64 NNGP/NTK of masked sequences and images, with `x2` given and `None`, and finite-network
outputs for fixed parameters).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entk import stax
from entk.stax import masking
from tests.data import stax_spec

DATA = pathlib.Path(__file__).resolve().parent / "data"
SPEC = json.loads((DATA / "stax_masking_nt065.json").read_text())
REF = np.load(DATA / "stax_masking_nt065.npz")
RTOL = 1e-6


def mask_constant(case):
    mc = SPEC[case]["mask_constant"]
    return np.nan if mc == "nan" else mc


def close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("case", sorted(SPEC))
def test_kernels_match_neural_tangents(case):
    _, _, kernel_fn = stax_spec.build(stax, SPEC[case]["net"])
    x1, x2, mc = REF[f"{case}/x1"], REF[f"{case}/x2"], mask_constant(case)
    k12 = kernel_fn(x1, x2, ("nngp", "ntk"), mask_constant=mc)
    k11 = kernel_fn(x1, None, ("nngp", "ntk"), mask_constant=mc)
    close(k12.nngp, REF[f"{case}/nngp"])
    close(k12.ntk, REF[f"{case}/ntk"])
    close(k11.nngp, REF[f"{case}/nngp_self"])
    close(k11.ntk, REF[f"{case}/ntk_self"])


@pytest.mark.parametrize("case", sorted(c for c in SPEC if SPEC[c]["apply"]))
def test_apply_matches_neural_tangents(case):
    init_fn, apply_fn, _ = stax_spec.build(stax, SPEC[case]["net"])
    x1, mc = REF[f"{case}/x1"], mask_constant(case)
    _, params = init_fn(jax.random.PRNGKey(0), x1.shape)
    leaves, tree = jax.tree_util.tree_flatten(params)
    nt = [REF[f"{case}/param_{i}"] for i in range(len(leaves))]
    params = tree.unflatten([jnp.asarray(n).reshape(l.shape) for n, l in zip(nt, leaves)])
    out = jax.jit(apply_fn)(params, x1, mask_constant=mc)
    assert isinstance(out, masking.MaskedArray)
    close(out.masked_value, REF[f"{case}/out"])
    np.testing.assert_array_equal(np.broadcast_to(out.mask, REF[f"{case}/out_mask"].shape),
                                  REF[f"{case}/out_mask"])
    plain = jax.jit(masking.unmask_fn(apply_fn))(params, x1, mask_constant=mc)
    np.testing.assert_allclose(plain, np.where(out.mask, 0, out.masked_value))


LENGTHS = (6, 2)


def _sequences(t=6, d=3):
    x = np.random.RandomState(3).normal(size=(len(LENGTHS), t, d))
    for n, length in enumerate(LENGTHS):
        x[n, length:] = -1.0
    return x


@pytest.mark.parametrize("mechanism", ["SOFTMAX", "IDENTITY"])
def test_masked_positions_are_excluded(mechanism):
    """A masked sequence gives what its unpadded prefix gives: pooling and attention ignore the
    padding (Conv's SAME padding sees zeros either way)."""
    net = stax.serial(stax.Conv(4, (3,), padding="SAME", b_std=0.1), stax.Relu(),
                      stax.GlobalSelfAttention(4, 3, 3, 2, b_std=0.1,
                                               attention_mechanism=mechanism),
                      stax.Relu(), stax.GlobalAvgPool(), stax.Dense(2))
    init_fn, apply_fn, kernel_fn = net
    x = _sequences()
    _, params = init_fn(jax.random.PRNGKey(0), x.shape)
    apply_jit = jax.jit(apply_fn)
    out = apply_jit(params, x, mask_constant=-1.0)
    for n, length in enumerate(LENGTHS):
        alone = apply_jit(params, x[n:n + 1, :length])
        np.testing.assert_allclose(out.masked_value[n], alone[0], rtol=1e-10)
    # Kernel: the diagonal entry of the padded example equals the kernel of its prefix alone.
    k = kernel_fn(x, None, "nngp", mask_constant=-1.0)
    alone = kernel_fn(x[1:2, :LENGTHS[1]], None, "nngp")
    np.testing.assert_allclose(k[1, 1], alone[0, 0], rtol=1e-10)


def test_unsupported_layer_names_itself():
    _, apply_fn, kernel_fn = stax.serial(stax.Dense(3), stax.LayerNorm())
    x = _sequences()
    with pytest.raises(NotImplementedError, match="LayerNorm"):
        kernel_fn(x, None, "nngp", mask_constant=-1.0)
    with pytest.raises(NotImplementedError, match="masked inputs need linear_scaling"):
        stax.GlobalSelfAttention(3, 3, 3, 1, linear_scaling=False,
                                 attention_mechanism="IDENTITY").kernel_fn(
            x, None, "nngp", mask_constant=-1.0)


def test_no_mask_constant_is_unchanged():
    """Without `mask_constant` (or with one that matches nothing) results are plain arrays."""
    init_fn, apply_fn, kernel_fn = stax.serial(stax.Conv(3, (2,)), stax.Relu(),
                                               stax.GlobalAvgPool())
    x = _sequences()
    _, params = init_fn(jax.random.PRNGKey(0), x.shape)
    assert isinstance(apply_fn(params, x), jax.Array)
    np.testing.assert_allclose(kernel_fn(x, None, "ntk", mask_constant=123.0),
                               kernel_fn(x, None, "ntk"), rtol=1e-12)
