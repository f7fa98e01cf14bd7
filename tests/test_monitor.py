"""entk.monitor: records against fresh kernels, kernel movement vs learning rate, CSV/plot, Keras."""

import csv
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import entk
from entk import metrics
from entk.monitor import FIELDS, NTKMonitor

torch = pytest.importorskip("torch")

STEPS, EVERY = 300, 50
LARGE_LR = 0.1  # about 3/4 of this net's stability limit (it diverges at 0.2)
TINY_LR = 1e-4


@pytest.fixture(scope="module")
def one_torch_thread():
    # Two threads on a shared 2-core machine spin against each other: 10x slower SGD steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp(one_torch_thread):
    """A wide float64 MLP, its training data, a probe set and its initial weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.Tanh(), torch.nn.Linear(256, 2)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.sin(2 * x[:, :2])
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    return net, x, y, x[:8], y[:8], initial


def train(mlp, lr, fresh_kernels=False, convert_first=False):
    """SGD on MSE from the initial weights with an NTKMonitor; optionally a fresh entk.ntk per record.

    `convert_first`: build the monitor on `entk.from_torch(net, probe_x)` (then `step(net)` reads the
    module's tensors into that model's params) instead of on the module itself."""
    net, x, y, probe_x, probe_y, initial = mlp
    net.load_state_dict(initial)
    watched = entk.from_torch(net, probe_x) if convert_first else net
    monitor = NTKMonitor(watched, probe_x, probe_y, every=EVERY, keep_kernels=True)
    fresh = [entk.ntk(net, probe_x).numpy()] if fresh_kernels else []
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.mean((net(x) - y) ** 2).backward()
        optimizer.step()
        if monitor.step(net) is not None and fresh_kernels:
            fresh.append(entk.ntk(net, probe_x).numpy())
    return monitor, fresh


@pytest.fixture(scope="module")
def large_lr_run(mlp):
    return train(mlp, LARGE_LR, fresh_kernels=True)


@pytest.fixture(scope="module")
def tiny_lr_run(mlp):
    monitor, _ = train(mlp, TINY_LR, convert_first=True)
    return monitor, entk.ntk(mlp[0], mlp[3]).numpy()


def test_each_record_equals_a_fresh_kernel(large_lr_run):
    monitor, fresh = large_lr_run
    assert [row["step"] for row in monitor.history] == list(range(0, STEPS + 1, EVERY))
    assert len(monitor.kernels) == len(fresh) == STEPS // EVERY + 1
    for recorded, reference in zip(monitor.kernels, fresh):
        np.testing.assert_allclose(recorded, reference, rtol=1e-10, atol=1e-12 * np.abs(reference).max())
    # The parameters moved, so the fresh kernels differ from record to record.
    assert metrics.kernel_distance(fresh[0], fresh[-1]) > 1e-5


def test_records_are_the_metrics_of_the_kernels(large_lr_run, mlp):
    monitor, fresh = large_lr_run
    probe_y = mlp[4].numpy()
    for i, (row, k) in enumerate(zip(monitor.history, fresh)):
        assert set(row) == set(FIELDS)
        assert row["distance_from_init"] == pytest.approx(metrics.kernel_distance(fresh[0], k), abs=1e-12)
        if i == 0:
            assert math.isnan(row["distance_from_previous"]) and math.isnan(row["velocity"])
        else:
            step = metrics.kernel_distance(fresh[i - 1], k)
            assert row["distance_from_previous"] == pytest.approx(step, abs=1e-12)
            assert row["velocity"] == pytest.approx(step / EVERY, abs=1e-13)
        assert row["alignment"] == pytest.approx(metrics.kernel_alignment(k, probe_y), rel=1e-9)
        assert row["centered_alignment"] == pytest.approx(
            metrics.kernel_alignment(k, probe_y, centered=True), rel=1e-9)
        lam = np.linalg.eigvalsh(k)
        assert row["trace"] == pytest.approx(np.trace(k), rel=1e-10)
        assert row["condition_number"] == pytest.approx(lam[-1] / lam[0], rel=1e-6)
        assert row["effective_rank"] == pytest.approx(metrics.effective_rank(k), rel=1e-10)


def test_compiled_once(large_lr_run, tiny_lr_run):
    # One trace/compilation of the kernel function served every record (also when the first record
    # read the converted model's arrays and the later ones the module's tensors).
    assert large_lr_run[0]._kernel_fn._cache_size() == 1
    assert tiny_lr_run[0]._kernel_fn._cache_size() == 1


def test_kernel_moves_at_large_lr_and_not_at_tiny_lr(large_lr_run, tiny_lr_run):
    large = large_lr_run[0].column("distance_from_init")
    tiny_monitor, tiny_final = tiny_lr_run
    tiny = tiny_monitor.column("distance_from_init")
    assert large[0] == pytest.approx(0.0, abs=1e-14)
    assert np.all(np.diff(large) > 0), large  # grows as training proceeds
    assert large[-1] > 1e-4
    assert np.all(tiny < 1e-8), tiny  # lazy: a wide net at a tiny step size keeps its kernel
    assert tiny[-1] < 1e-4 * large[-1]
    # ... though it did move, and the monitor followed it.
    np.testing.assert_allclose(tiny_monitor.kernels[-1], tiny_final, rtol=1e-10)
    assert metrics.kernel_distance(tiny_monitor.kernels[0], tiny_final) > 0


def test_csv_and_plot(tiny_lr_run, tmp_path):
    tiny_lr_run = tiny_lr_run[0]
    tiny_lr_run.to_csv(tmp_path / "ntk.csv")
    with open(tmp_path / "ntk.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(FIELDS)
    assert [int(r["step"]) for r in rows] == [row["step"] for row in tiny_lr_run.history]
    np.testing.assert_allclose([float(r["trace"]) for r in rows], tiny_lr_run.column("trace"), rtol=1e-12)
    fig = tiny_lr_run.plot(tmp_path / "ntk.png")
    assert [ax.get_title() for ax in fig.axes] == ["kernel distance", "kernel-target alignment",
                                                   "condition number", "trace"]
    assert (tmp_path / "ntk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- plain JAX models, errors


def linear(params, x):
    return x @ params["w"]


def test_plain_function_with_params_and_integer_labels():
    # f(x) = x W: the traced NTK is x x^T whatever W is, so the kernel never moves.
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 3)))
    labels = np.array([0, 2, 1, 2, 0])
    params = {"w": jnp.ones((3, 3))}
    monitor = NTKMonitor(linear, x, labels, every=2, params=params, keep_kernels=True)
    for i in range(4):
        monitor.step(params={"w": params["w"] * (i + 2)})
    assert [row["step"] for row in monitor.history] == [0, 2, 4]
    for k in monitor.kernels:
        np.testing.assert_allclose(k, x @ x.T, rtol=1e-12)
    np.testing.assert_allclose(monitor.column("distance_from_init"), 0.0, atol=1e-14)
    one_hot = np.eye(3)[labels]
    assert monitor.history[-1]["alignment"] == pytest.approx(metrics.kernel_alignment(x @ x.T, one_hot))
    with pytest.raises(ValueError, match="changed structure, shapes or dtypes"):
        monitor.record(params={"w": jnp.ones((3, 4))})
    with pytest.raises(TypeError, match="step\\(params=new_params\\)"):
        monitor.record(object())


def test_argument_errors():
    x = jnp.ones((4, 3))
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="every=0"):
        NTKMonitor(linear, x, every=0, params=params)
    with pytest.raises(ValueError, match="labels in \\[0, 2\\)"):
        NTKMonitor(linear, x, np.array([0, 1, 2, 1]), params=params)
    with pytest.raises(ValueError, match="2 outputs"):
        NTKMonitor(lambda p, x: (linear(p, x), linear(p, x)), x, params=params)
    monitor = NTKMonitor(lambda p, x: jnp.tanh(linear(p, x)), x, params=params)
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        row = monitor.record(params={"w": jnp.full((3, 2), jnp.nan)})
    assert math.isnan(row["distance_from_init"]) and "alignment" not in row


# ---------------------------------------------------------------- Keras callback


def test_keras_callback():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the Keras test model is built for the TensorFlow backend")
    from entk.monitor import KerasNTKMonitor

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(32, activation="tanh"),
                              keras.layers.Dense(2)])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 3)).astype("float32"), rng.standard_normal((32, 2)).astype("float32")
    probe = x[:6]
    before = np.asarray(entk.ntk(model, probe))
    callback = KerasNTKMonitor(probe, y[:6], every=2, keep_kernels=True)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])  # 8 batches
    assert [row["step"] for row in callback.history] == [0, 2, 4, 6, 8]
    after = np.asarray(entk.ntk(model, probe))
    np.testing.assert_allclose(callback.kernels[0], before, rtol=1e-5, atol=1e-6 * np.abs(before).max())
    np.testing.assert_allclose(callback.kernels[-1], after, rtol=1e-5, atol=1e-6 * np.abs(after).max())
    assert callback.history[-1]["distance_from_init"] == pytest.approx(
        metrics.kernel_distance(before, after), abs=1e-6)
    assert callback.history[-1]["distance_from_init"] > 0
    assert callback.monitor._kernel_fn._cache_size() == 1


# ---------------------------------------------------------------- diverging training


def test_diverging_training_warns_once_and_keeps_records_correct(mlp):
    """SGD far past the stability limit: the kernel's entries grow past 1e154 (where squaring them
    overflows float64, so the metrics must not square them), then to inf and NaN. Finite kernels get
    correct records; the first non-finite one is reported once, naming its step."""
    net, x, y, probe_x, probe_y, initial = mlp
    net.load_state_dict(initial)
    optimizer = torch.optim.SGD(net.parameters(), lr=20.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = NTKMonitor(net, probe_x, probe_y, every=5, keep_kernels=True)
        for _ in range(70):
            optimizer.zero_grad()
            torch.mean((net(x) - y) ** 2).backward()
            optimizer.step()
            monitor.step(net)
    ours = [w for w in caught if "NTKMonitor" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning, [str(w.message) for w in caught]
    finite = [np.isfinite(k).all() for k in monitor.kernels]
    first_bad = finite.index(False)
    assert f"at step {monitor.history[first_bad]['step']} " in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the user's monitor.step call
    huge = [i for i, ok in enumerate(finite) if ok and np.abs(monitor.kernels[i]).max() > 1e160]
    assert huge, "the run passes through finite kernels whose squares overflow"
    for i in huge:  # records of huge finite kernels: the metrics of the rescaled kernel (exact)
        k, row = monitor.kernels[i], monitor.history[i]
        scaled = k / np.abs(k).max()
        assert row["distance_from_init"] == pytest.approx(
            metrics.kernel_distance(monitor.kernels[0], scaled), abs=1e-12)
        assert row["alignment"] == pytest.approx(metrics.kernel_alignment(scaled, probe_y.numpy()),
                                                 rel=1e-9)
    assert all(math.isnan(row["distance_from_init"]) for row in monitor.history[first_bad:])
