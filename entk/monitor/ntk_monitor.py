"""`NTKMonitor`: the probe-set NTK and its diagnostics, recorded while a network trains.

See `entk.monitor` for the usage and the cost of a record.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any, Callable

import jax
import numpy as np

from entk import adapters, metrics
from entk.model import Model

__all__ = ["NTKMonitor", "FIELDS"]

PyTree = Any

# Columns of a record, in CSV order; the alignment columns are present only with probe_y.
FIELDS = ("step", "distance_from_init", "distance_from_previous", "velocity", "alignment",
          "centered_alignment", "trace", "lambda_max", "lambda_min", "condition_number",
          "effective_rank")


# ----------------------------------------------------------------------------------------------
# Reading the current parameters of whatever the user trains


class _Source:
    """The model converted once, and how to read its current `(params, state)` from what the user holds."""

    def __init__(self, model: Any, probe_x: Any, params: PyTree):
        self.probe_x = probe_x
        self.plain_function = (not isinstance(model, Model) and not adapters.needs_example(model)
                               and not adapters.is_flax_pair(model) and callable(model))
        self.model: Model = adapters.to_model(model, probe_x, params=params)

    def read(self, obj: Any, params: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        """Current `(params, state)`: from `obj` (the trained model) unless given explicitly.

        A torch module's tensors are read without copying (`entk.adapters.current_tensors`), which
        is safe because `record` waits for the kernel before the optimizer can change them again.
        """
        if params is not None:
            return params, self.model.state if state is None else state
        if obj is None:
            raise TypeError("NTKMonitor.step/record needs the model being trained (monitor.step(model)) "
                            "or its current parameters (params=...).")
        if self.plain_function and not isinstance(obj, Model):
            raise TypeError("This monitor watches a plain function f(params, x): pass its current "
                            "parameters, monitor.step(params=new_params).")
        current = adapters.current_tensors(obj, self.probe_x)
        return current if state is None else (current[0], state)


def _signature(tree: PyTree) -> tuple:
    leaves, structure = jax.tree_util.tree_flatten(tree)
    return structure, tuple((tuple(np.shape(leaf)), str(getattr(leaf, "dtype", type(leaf))))
                            for leaf in leaves)


# ----------------------------------------------------------------------------------------------
# The monitor


class NTKMonitor:
    """Records probe-set NTK diagnostics every `every` steps of a training loop.

    Args:
      model: what is being trained: a `torch.nn.Module`, a Keras model, an `entk.Model`, a
        `(flax_module, variables)` pair, or a plain `f(params, x)` together with `params=`.
      probe_x: the probe inputs, `(N, ...)` in the model's own layout (NCHW for torch), as the
        model's kind of array or NumPy / JAX. Kept fixed for all records.
      probe_y: optional targets for the alignment columns: `(N,)` or `(N, C)` real targets or one-hot
        rows for a traced kernel, `(N, O)` for a full one (`trace_axes=()`). Integer class labels
        `(N,)` are one-hot encoded to the model's O outputs when O > 1.
      every: record when the step counter is a multiple of `every`.
      keep_kernels: also keep each recorded kernel (NumPy) in `self.kernels`.
      record_initial: record the kernel of `model` as it is now, as step 0 (default True).
      params: the parameters, when `model` is a plain function.
      **ntk_kwargs: `trace_axes`, `vmap_axes`, `implementation`, ... of `entk.empirical_ntk_fn`.

    Attributes:
      history: list of dicts, one per record, with keys `FIELDS` (`alignment` and
        `centered_alignment` only with `probe_y`). `distance_from_previous` and `velocity` (that
        distance divided by the steps since the previous record) are NaN in the first record.
      kernels: the recorded kernels when `keep_kernels=True` (else empty).
      initial_kernel: the first recorded kernel (NumPy), the reference of `distance_from_init`.
      steps: how many times `step` was called.
    """

    def __init__(self, model: Any, probe_x: Any, probe_y: Any = None, every: int = 1, *,
                 keep_kernels: bool = False, record_initial: bool = True, params: PyTree = None,
                 **ntk_kwargs: Any):
        from entk.empirical import empirical_ntk_fn

        if not isinstance(every, (int, np.integer)) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r}; give a positive number of steps between records.")
        self.every = int(every)
        self.keep_kernels = keep_kernels
        self.ntk_kwargs = dict(ntk_kwargs)
        self._source = _Source(model, probe_x, params)
        to_jax, _ = adapters.array_converters(probe_x)
        self._device = jax.devices()[0]
        self._x = jax.device_put(jax.tree_util.tree_map(to_jax, probe_x), self._device)
        base = self._source.model
        self._params_signature = _signature(base.params)

        def kernel(x: PyTree, params: PyTree, state: PyTree) -> PyTree:
            return empirical_ntk_fn(base.replace(state=state), **ntk_kwargs)(x, None, params)

        self._kernel_fn: Callable[..., PyTree] = jax.jit(kernel)
        self._y = None if probe_y is None else self._targets(probe_y)
        self.history: list[dict] = []
        self.kernels: list[np.ndarray] = []
        self.initial_kernel: np.ndarray | None = None
        self._previous: tuple[int, np.ndarray] | None = None
        self.steps = 0
        self._warned_non_finite = False
        if record_initial:
            self.record(model if params is None else None,
                        params=None if params is None else self.model.params)

    @property
    def model(self) -> Model:
        """The `entk.Model` the monitor converted once (its `params` are those at construction)."""
        return self._source.model

    def _targets(self, probe_y: Any) -> np.ndarray:
        y = adapters.to_numpy(probe_y)
        dtype = y.dtype
        out = jax.eval_shape(self._source.model.apply, self._source.model.params, self._x)
        leaves = jax.tree_util.tree_leaves(out)
        n_out = math.prod(leaves[0].shape[1:]) if len(leaves) == 1 else 0
        if y.ndim == 1 and np.issubdtype(dtype, np.integer) and n_out > 1:
            if y.min() < 0 or y.max() >= n_out:
                raise ValueError(f"probe_y holds integer labels in [{int(y.min())}, {int(y.max())}], "
                                 f"but the model has {n_out} outputs; pass labels in [0, {n_out}) "
                                 f"or real targets of shape (N, {n_out}).")
            y = np.eye(n_out)[y.astype(int)]
        return y

    # ------------------------------------------------------------------------------------------

    def kernel(self, model: Any = None, *, params: PyTree = None, state: PyTree = None) -> np.ndarray:
        """The probe-set kernel at the model's current parameters (one compiled evaluation)."""
        params, state = self._source.read(model, params, state)
        if _signature(params) != self._params_signature:
            raise ValueError("The parameters changed structure, shapes or dtypes since the monitor was "
                             "built (a different model, or a dtype cast such as .double()); build a new "
                             "NTKMonitor for it.")
        # Arrays read from torch (DLPack) are committed to a device, the adapter's initial ones are
        # not; jit caches the two separately, so everything is committed to one device up front.
        params, state = jax.device_put((params, state), self._device)
        out = self._kernel_fn(self._x, params, state)
        leaves = jax.tree_util.tree_leaves(out)
        if len(leaves) != 1:
            raise ValueError(f"The model has {len(leaves)} outputs, so its kernel is a pytree of "
                             f"{len(leaves)} kernels; NTKMonitor follows one kernel matrix. Monitor a "
                             f"wrapper that returns the one output you care about.")
        return np.asarray(leaves[0])

    def step(self, model: Any = None, *, params: PyTree = None, state: PyTree = None) -> dict | None:
        """Counts one training step; records (and returns the record) when the count is a multiple of
        `every`, else returns None. Call it after each optimizer step with the model being trained."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.record(model, params=params, state=state)

    def record(self, model: Any = None, *, params: PyTree = None, state: PyTree = None) -> dict:
        """Records the current kernel's diagnostics now, at step `self.steps`, and returns the record."""
        k = self.kernel(model, params=params, state=state)
        row: dict[str, Any] = {"step": self.steps}
        if not np.all(np.isfinite(k)):
            return self._append(self._non_finite(row), k)
        values = metrics.spectrum(k)
        if self.initial_kernel is None:
            self.initial_kernel = k
        row["distance_from_init"] = metrics.kernel_distance(self.initial_kernel, k)
        no_previous = self._previous is None or self._previous[0] == self.steps
        if no_previous:
            row["distance_from_previous"] = row["velocity"] = math.nan
        else:
            previous_step, previous = self._previous
            row["distance_from_previous"] = metrics.kernel_distance(previous, k)
            row["velocity"] = row["distance_from_previous"] / (self.steps - previous_step)
        if self._y is not None:
            row["alignment"] = metrics.kernel_alignment(k, self._y)
            row["centered_alignment"] = metrics.kernel_alignment(k, self._y, centered=True)
        row["trace"] = metrics.trace(k)
        row["lambda_max"], row["lambda_min"] = float(values[0]), float(values[-1])
        row["condition_number"] = (float(values[0] / values[-1]) if values[-1] > 0 else math.inf)
        row["effective_rank"] = metrics._entropy_rank(values)
        self._previous = (self.steps, k)
        self._check_finite(row, k, no_previous)
        return self._append(row, k)

    def _append(self, row: dict, k: np.ndarray) -> dict:
        if self.keep_kernels:
            self.kernels.append(k)
        self.history.append(row)
        return row

    def _non_finite(self, row: dict) -> dict:
        """A record of NaNs for a kernel with NaN/inf entries (training diverged); warns once."""
        self._warn_once(f"NTKMonitor: the probe kernel at step {self.steps} (record "
                        f"{len(self.history)}) has NaN or inf entries (the training diverged or "
                        f"overflowed); its record holds NaNs.")
        fields = [f for f in FIELDS if f != "step" and (self._y is not None or "alignment" not in f)]
        return {**row, **{f: math.nan for f in fields}}

    def _check_finite(self, row: dict, k: np.ndarray, no_previous: bool) -> None:
        """Warns once when a finite kernel still gives non-finite diagnostics (entries so large, as
        training diverges, that the metrics overflow). NaN `distance_from_previous` / `velocity`
        without a previous record and an infinite condition number (λmin ≤ 0) are expected."""
        expected = {"step", "condition_number"}
        if no_previous:
            expected |= {"distance_from_previous", "velocity"}
        bad = [name for name, value in row.items()
               if name not in expected and not math.isfinite(value)]
        if bad:
            self._warn_once(f"NTKMonitor: the record at step {self.steps} (record "
                            f"{len(self.history)}) has non-finite {', '.join(bad)}: the probe kernel's "
                            f"entries reach {float(np.max(np.abs(k))):.3g} (the training is "
                            f"diverging?).")

    def _warn_once(self, message: str) -> None:
        """The first non-finite record of a run is reported (a RuntimeWarning); later ones are not."""
        if not self._warned_non_finite:
            warnings.warn(message, RuntimeWarning, stacklevel=5)
            self._warned_non_finite = True

    # ------------------------------------------------------------------------------------------

    def column(self, name: str) -> np.ndarray:
        """One field over all records, as a float array (e.g. `monitor.column("distance_from_init")`)."""
        if self.history and name not in self.history[0]:
            raise KeyError(f"No column {name!r}; the records have {list(self.history[0])}.")
        return np.array([row[name] for row in self.history], dtype=float)

    def to_csv(self, path: str | os.PathLike) -> None:
        """Writes `history` as CSV, one row per record, columns in `FIELDS` order."""
        fields = [f for f in FIELDS if any(f in row for row in self.history)]
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Plots the diagnostics against the training step; saves to `path` if given; returns the figure.

        Panels: kernel distance from init and from the previous record; alignment (with probe_y);
        condition number (log scale); trace. Uses matplotlib's object API, so no pyplot backend or
        global state is touched.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("NTKMonitor.plot needs matplotlib (pip install matplotlib).") from e
        if not self.history:
            raise ValueError("Nothing recorded yet: call monitor.step(model) in the training loop first.")
        steps = self.column("step")
        panels = [("kernel distance", [("from init", "distance_from_init"),
                                        ("from previous record", "distance_from_previous")], False)]
        if "alignment" in self.history[0]:
            panels.append(("kernel-target alignment", [("uncentered", "alignment"),
                                                       ("centered", "centered_alignment")], False))
        panels.append(("condition number", [("λmax / λmin", "condition_number")], True))
        panels.append(("trace", [("trace", "trace")], False))
        rows = 1 if len(panels) <= 3 else 2
        cols = math.ceil(len(panels) / rows)
        fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
        for ax, (title, series, log) in zip(fig.subplots(rows, cols, squeeze=False).flat, panels):
            for label, name in series:
                ax.plot(steps, self.column(name), marker="o", markersize=3, label=label)
            ax.set_title(title)
            ax.set_xlabel("training step")
            if log:
                ax.set_yscale("log")
            if len(series) > 1:
                ax.legend(fontsize="small")
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig
