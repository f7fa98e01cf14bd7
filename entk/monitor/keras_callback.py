"""`KerasNTKMonitor`: `entk.monitor.NTKMonitor` as a Keras callback for `model.fit`.

    cb = entk.monitor.KerasNTKMonitor(probe_x, probe_y, every=50)
    model.fit(x, y, epochs=5, callbacks=[cb])
    cb.history  # list of dicts; cb.to_csv(path); cb.plot(path)

Kept apart from `entk.monitor` because the class derives from `keras.callbacks.Callback`, so this
module imports Keras; `entk.monitor.KerasNTKMonitor` imports it on first use.
"""

from __future__ import annotations

import os
from typing import Any

import keras

from entk.monitor.ntk_monitor import NTKMonitor

__all__ = ["KerasNTKMonitor"]


class KerasNTKMonitor(keras.callbacks.Callback):
    """Records probe-set NTK diagnostics during `model.fit`, every `every` batches (or epochs).

    The model is converted (`entk.from_tf`) and its kernel function compiled when training begins,
    and the first record (step 0) is taken then; later records read the trained variables through
    the adapter and run the compiled kernel function once each. Steps count batches across epochs
    (`unit="batch"`) or epochs (`unit="epoch"`). A second `fit` continues the same history.

    Args:
      probe_x, probe_y, every, keep_kernels, **ntk_kwargs: as for `NTKMonitor`.
      unit: `"batch"` or `"epoch"`: what a step is.
    """

    def __init__(self, probe_x: Any, probe_y: Any = None, every: int = 1, *, unit: str = "batch",
                 keep_kernels: bool = False, **ntk_kwargs: Any):
        super().__init__()
        if unit not in ("batch", "epoch"):
            raise ValueError(f"unit={unit!r}; use 'batch' or 'epoch'.")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r}; give a positive number of {unit}es between records.")
        self.probe_x, self.probe_y, self.every, self.unit = probe_x, probe_y, every, unit
        self.keep_kernels, self.ntk_kwargs = keep_kernels, ntk_kwargs
        self.monitor: NTKMonitor | None = None

    # Keras hooks ------------------------------------------------------------------------------

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.monitor is None:
            self.monitor = NTKMonitor(self.model, self.probe_x, self.probe_y, every=self.every,
                                      keep_kernels=self.keep_kernels, **self.ntk_kwargs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.unit == "batch":
            self.monitor.step(self.model)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.unit == "epoch":
            self.monitor.step(self.model)

    # The monitor's results --------------------------------------------------------------------

    def _require(self) -> NTKMonitor:
        if self.monitor is None:
            raise ValueError("KerasNTKMonitor has recorded nothing yet: pass it to model.fit(..., "
                             "callbacks=[monitor]) first.")
        return self.monitor

    @property
    def history(self) -> list[dict]:
        """The records (see `NTKMonitor.history`); empty before training."""
        return [] if self.monitor is None else self.monitor.history

    @property
    def kernels(self) -> list:
        """The recorded kernels when `keep_kernels=True`."""
        return [] if self.monitor is None else self.monitor.kernels

    def to_csv(self, path: str | os.PathLike) -> None:
        """See `NTKMonitor.to_csv`."""
        self._require().to_csv(path)

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """See `NTKMonitor.plot`."""
        return self._require().plot(path)
