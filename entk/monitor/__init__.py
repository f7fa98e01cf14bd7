"""Watching the empirical NTK of a probe set while a network trains.

    monitor = entk.monitor.NTKMonitor(module, probe_x, probe_y, every=50)   # records step 0
    for step in range(steps):
        ...; optimizer.step()
        monitor.step(module)                       # records at steps 50, 100, ...
    monitor.to_csv("ntk.csv"); monitor.plot("ntk.png")

Each record holds the probe-set kernel's distance to its initial value (how far the kernel moved),
its distance to the previous record and that distance per training step (the kernel velocity),
its alignment with `probe_y`, its trace, extreme eigenvalues, condition number and effective rank
(see `entk.metrics` for the definitions).

Cost: the model is converted to an `entk.Model` once and its kernel function compiled once, with
the parameters (and the model state, e.g. BatchNorm statistics) as arguments. A record then reads
the current parameters through the model's adapter (`entk.adapters.current_tensors`: a torch
module's tensors without a copy, Keras variables by value) and runs that one compiled function: one
kernel evaluation, no re-export, no recompilation.

`KerasNTKMonitor` (a `keras.callbacks.Callback`, in `entk.monitor.keras_callback`) is importable from here;
Keras is imported only when that name is first used.
"""

from __future__ import annotations

from typing import Any as _Any

from entk.monitor.ntk_monitor import FIELDS, NTKMonitor

__all__ = ["NTKMonitor", "FIELDS"]  # KerasNTKMonitor too, via __getattr__ (imports Keras)


def __getattr__(name: str) -> _Any:
    """`KerasNTKMonitor` imports Keras, so it is imported on first use of the name."""
    if name == "KerasNTKMonitor":
        from entk.monitor.keras_callback import KerasNTKMonitor

        return KerasNTKMonitor
    raise AttributeError(f"module 'entk.monitor' has no attribute {name!r}")
