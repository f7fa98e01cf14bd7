"""entk.metrics against direct NumPy formulas, hand-made kernels, every array type; the spectrum CLI."""

import argparse
import math
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from entk import metrics

RNG = np.random.default_rng(0)


def random_psd(n, rank=None, rng=RNG):
    a = rng.standard_normal((n, rank or n + 3))
    return a @ a.T


def with_spectrum(values, rng=RNG):
    """A symmetric matrix with exactly these eigenvalues (random orthogonal eigenvectors)."""
    q, _ = np.linalg.qr(rng.standard_normal((len(values), len(values))))
    return (q * np.asarray(values)) @ q.T


def centering(n):
    return np.eye(n) - np.ones((n, n)) / n


def cosine(a, b):
    return np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))


def full_kernel(n=5, outs=(3,), params=7, rng=RNG):
    """A full kernel laid out (N, N, A, A, ...) from a random Jacobian, and its (N·O, N·O) matrix."""
    jac = rng.standard_normal((n, *outs, params))
    flat = jac.reshape(-1, params)
    matrix = flat @ flat.T
    kernel = matrix.reshape(n, *outs, n, *outs)
    k = len(outs) + 1
    interleaved = [ax for i in range(k) for ax in (i, i + k)]
    return kernel.transpose(interleaved), matrix


# ---------------------------------------------------------------- direct formulas, traced kernels


def test_spectrum_condition_trace_against_known_eigenvalues():
    values = np.array([9.0, 4.0, 2.5, 1.0, 0.25])
    k = with_spectrum(RNG.permutation(values))
    np.testing.assert_allclose(metrics.spectrum(k), values, rtol=1e-12)
    np.testing.assert_allclose(metrics.spectrum(k, top=2), values[:2], rtol=1e-12)
    assert metrics.condition_number(k) == pytest.approx(36.0, rel=1e-10)
    assert metrics.condition_number(k) == pytest.approx(np.linalg.cond(k), rel=1e-10)
    assert metrics.trace(k) == pytest.approx(values.sum(), rel=1e-12)


def test_effective_rank_formulas():
    k = random_psd(6)
    lam = np.linalg.eigvalsh(k)
    p = lam / lam.sum()
    assert metrics.effective_rank(k) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-10)
    assert metrics.effective_rank(k, method="participation") == pytest.approx(
        lam.sum() ** 2 / np.sum(lam ** 2), rel=1e-10)


def test_alignment_and_distance_formulas_random_psd():
    k1, k2 = random_psd(7), random_psd(7)
    y = RNG.standard_normal((7, 3))
    target = y @ y.T
    h = centering(7)
    assert metrics.kernel_alignment(k1, y) == pytest.approx(cosine(k1, target), rel=1e-12)
    assert metrics.kernel_alignment(k1, y, centered=True) == pytest.approx(
        cosine(h @ k1 @ h, h @ target @ h), rel=1e-12)
    y1 = y[:, 0]
    assert metrics.kernel_alignment(k1, y1) == pytest.approx(cosine(k1, np.outer(y1, y1)), rel=1e-12)
    assert metrics.kernel_distance(k1, k2) == pytest.approx(1 - cosine(k1, k2), rel=1e-12)
    assert metrics.kernel_distance(k1, k1) == pytest.approx(0.0, abs=1e-14)


# ---------------------------------------------------------------- hand-made kernels


def test_identity_kernel():
    n = 6
    k = np.eye(n)
    y = RNG.standard_normal(n)
    np.testing.assert_array_equal(metrics.spectrum(k), np.ones(n))
    assert metrics.condition_number(k) == 1.0
    assert metrics.trace(k) == n
    assert metrics.effective_rank(k) == pytest.approx(n)
    assert metrics.effective_rank(k, method="participation") == pytest.approx(n)
    # <I, yy^T> = |y|^2, |I| = sqrt(n), |yy^T| = |y|^2.
    assert metrics.kernel_alignment(k, y) == pytest.approx(1 / math.sqrt(n))
    assert metrics.kernel_distance(k, 3.0 * k) == pytest.approx(0.0, abs=1e-15)


def test_rank_one_kernel_aligned_with_targets():
    y = RNG.standard_normal(8)
    k = 2.5 * np.outer(y, y)
    assert metrics.kernel_alignment(k, y) == pytest.approx(1.0)
    assert metrics.kernel_alignment(k, -y) == pytest.approx(1.0)  # yy^T does not see the sign
    assert metrics.kernel_alignment(k, y, centered=True) == pytest.approx(1.0)
    assert metrics.effective_rank(k) == pytest.approx(1.0, abs=1e-6)
    values = metrics.spectrum(k)
    assert values[0] == pytest.approx(2.5 * y @ y)
    np.testing.assert_allclose(values[1:], 0.0, atol=1e-12 * values[0])
    # A singular kernel: lambda_min is round-off, so the ratio is huge or infinite.
    assert metrics.condition_number(k) > 1e10
    # Orthogonal target: a rank-1 kernel along a vector orthogonal to y has zero alignment.
    z = RNG.standard_normal(8)
    z -= (z @ y) / (y @ y) * y
    assert metrics.kernel_alignment(np.outer(z, z), y) == pytest.approx(0.0, abs=1e-12)


def test_condition_number_of_singular_kernel_is_inf():
    assert metrics.condition_number(np.diag([3.0, 1.0, 0.0])) == math.inf


# ---------------------------------------------------------------- full kernels


@pytest.mark.parametrize("outs", [(3,), (2, 2)])
def test_full_kernel_flattening_matches_jacobian_rows(outs):
    kernel, matrix = full_kernel(outs=outs)
    np.testing.assert_allclose(metrics.as_matrix(kernel), matrix, rtol=1e-13)
    lam = np.sort(np.linalg.eigvalsh(matrix))[::-1]
    np.testing.assert_allclose(metrics.spectrum(kernel), lam, rtol=1e-10, atol=1e-12 * lam[0])
    assert metrics.trace(kernel) == pytest.approx(np.trace(matrix))
    assert metrics.effective_rank(kernel, method="participation") == pytest.approx(
        np.clip(lam, 0, None).sum() ** 2 / np.sum(np.clip(lam, 0, None) ** 2))
    other, other_matrix = full_kernel(outs=outs)
    assert metrics.kernel_distance(kernel, other) == pytest.approx(1 - cosine(matrix, other_matrix))


def test_full_kernel_alignment_flattens_targets_like_the_kernel():
    n, o = 5, 3
    kernel, matrix = full_kernel(n=n, outs=(o,))
    y = RNG.standard_normal((n, o))
    v = y.reshape(-1)  # row n*O + o, as the kernel
    assert metrics.kernel_alignment(kernel, y) == pytest.approx(cosine(matrix, np.outer(v, v)))
    hk = np.kron(centering(n), np.eye(o))
    assert metrics.kernel_alignment(kernel, y, centered=True) == pytest.approx(
        cosine(hk @ matrix @ hk, hk @ np.outer(v, v) @ hk))
    # Consistency: the output trace of the centered full kernel is the centered traced kernel.
    traced = np.einsum("nmoo->nm", kernel) / o
    centered_full = (hk @ matrix @ hk).reshape(n, o, n, o)
    h = centering(n)
    np.testing.assert_allclose(np.einsum("nomo->nm", centered_full) / o, h @ traced @ h, atol=1e-12)
    with pytest.raises(ValueError, match=r"must be \(5, 3\)"):
        metrics.kernel_alignment(kernel, y[:, 0])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("shape, message", [
    ((3, 4), "not square"),
    ((3, 3, 2, 4), "not square"),
    ((3, 3, 2), "diagonal_axes"),
    ((5,), "expected a traced kernel"),
])
def test_shape_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        metrics.spectrum(np.ones(shape))


def test_symmetry_tolerance():
    k = random_psd(5)
    bad = k.copy()
    bad[0, 1] += 1e-3 * np.abs(k).max()
    for fn in (metrics.spectrum, metrics.trace, metrics.condition_number, metrics.effective_rank):
        with pytest.raises(ValueError, match=r"not symmetric: entries \(0, 1\) and \(1, 0\)"):
            fn(bad)
    with pytest.raises(ValueError, match="k2 is not symmetric"):
        metrics.kernel_distance(k, bad)
    metrics.spectrum(bad, rtol=1e-2)  # a looser tolerance accepts it
    # float32 round-off asymmetry is accepted by default and does not leak into the eigenvalues.
    k32 = k.astype(np.float32)
    noisy = k32 + (1e-6 * np.abs(k).max() * np.triu(RNG.standard_normal((5, 5)), 1)).astype(np.float32)
    np.testing.assert_allclose(metrics.spectrum(noisy), metrics.spectrum(k), rtol=1e-4)


def test_other_errors():
    k = random_psd(4)
    with pytest.raises(ValueError, match="k1 has shape"):
        metrics.kernel_distance(k, random_psd(5))
    with pytest.raises(ValueError, match=r"y has shape \(3,\)"):
        metrics.kernel_alignment(k, np.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.trace(np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="complex"):
        metrics.trace(k + 0j)
    with pytest.raises(ValueError, match="zero Frobenius norm"):
        metrics.kernel_alignment(k, np.ones(4), centered=True)
    with pytest.raises(ValueError, match="method="):
        metrics.effective_rank(k, method="nuclear")
    with pytest.raises(ValueError, match="top=0"):
        metrics.spectrum(k, top=0)


# ---------------------------------------------------------------- array types


def all_metrics(k, y):
    return np.array([*metrics.spectrum(k), metrics.condition_number(k), metrics.trace(k),
                     metrics.kernel_alignment(k, y), metrics.kernel_alignment(k, y, centered=True),
                     metrics.kernel_distance(k, k * 2 + 1), metrics.effective_rank(k)])


@pytest.fixture(scope="module")
def traced_and_full():
    traced = random_psd(6, rank=10).astype(np.float32)
    full, _ = full_kernel(n=4, outs=(2,), params=12)
    return (traced, RNG.standard_normal(6)), (full.astype(np.float32), RNG.standard_normal((4, 2)))


def test_jax_arrays(traced_and_full):
    for k, y in traced_and_full:
        expected = all_metrics(k, y)
        np.testing.assert_allclose(all_metrics(jnp.asarray(k), jnp.asarray(y)), expected, rtol=1e-12)
        np.testing.assert_allclose(all_metrics(jnp.asarray(k, dtype=jnp.float64), y),
                                   all_metrics(k.astype(np.float64), y), rtol=1e-12)


def test_torch_tensors(traced_and_full):
    torch = pytest.importorskip("torch")
    for k, y in traced_and_full:
        expected = all_metrics(k, y)
        tk = torch.from_numpy(k).requires_grad_()  # a kernel still attached to autograd
        np.testing.assert_allclose(all_metrics(tk, torch.from_numpy(y)), expected, rtol=1e-12)


def test_tensorflow_tensors(traced_and_full):
    tf = pytest.importorskip("tensorflow")
    for k, y in traced_and_full:
        np.testing.assert_allclose(all_metrics(tf.constant(k), tf.constant(y)), all_metrics(k, y),
                                   rtol=1e-12)


# ---------------------------------------------------------------- `entk spectrum` command


def test_spectrum_cli(tmp_path, capsys):
    import entk
    from entk import cli_spectrum

    (tmp_path / "spec_model.py").write_text(textwrap.dedent("""
        import jax.numpy as jnp
        import numpy as np

        def make():
            rng = np.random.default_rng(1)
            params = {"w1": jnp.asarray(rng.standard_normal((3, 16))),
                      "w2": jnp.asarray(rng.standard_normal((16, 2)))}
            return (lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]), params
    """))
    x = np.random.default_rng(2).standard_normal((6, 3))
    np.save(tmp_path / "x.npy", x)
    parser = argparse.ArgumentParser(prog="entk")
    cli_spectrum.add_parser(parser.add_subparsers())
    spec = f"{tmp_path / 'spec_model.py'}:make"
    args = parser.parse_args(["spectrum", spec, "--input", str(tmp_path / "x.npy"), "--top", "3",
                              "--plot", str(tmp_path / "spec.png")])
    assert args.func(args) == 0
    out = capsys.readouterr().out

    from entk.spec import load_object
    f, params = load_object(spec)
    reference = metrics.spectrum(entk.ntk(f, jnp.asarray(x), params=params))
    printed = [float(line.split()[1]) for line in out.splitlines() if line.strip()[:1].isdigit()]
    np.testing.assert_allclose(printed, reference[:3], rtol=1e-6)
    cond = float(out.split("condition number:")[1].split()[0])
    assert cond == pytest.approx(reference[0] / reference[-1], rel=1e-6)
    assert float(out.split("trace:")[1].split()[0]) == pytest.approx(reference.sum(), rel=1e-6)
    assert (tmp_path / "spec.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        cli_spectrum.run(parser.parse_args(["spectrum", spec[:-4] + "nope", "--input",
                                            str(tmp_path / "x.npy")]))
