"""The NTK programs of `entk.ntk`: one compiled executable per input signature, made for a first call.

`entk.ntk(model, x)` and a framework model's `empirical_ntk_fn` compute through `NtkPrograms`, one per
model function and kernel settings (`entk.empirical._compiled_kernel_fn` keeps them). Its first call on
new shapes does, once:

1. prepare the call and resolve `vmap_axes="auto"` (`entk.algorithms.call.prepare`) on abstract values,
   as under `jax.jit` (nothing runs);
2. with `implementation="auto"`, let the cost model choose (`entk.algorithms.cost.select`), which
   lowers the candidates and compiles the first of them (structured derivatives, the usual winner) on a
   worker thread while it lowers the others;
3. run *that* program: the winner's lowered program is compiled (or its background compilation
   awaited), not traced again inside an enclosing `jit`. "Winner" for this one call: when compile
   time is counted (`entk.algorithms.compile_time`), another candidate may finish first than the
   per-call choice; then that one runs, and the per-call choice compiles in the background and
   takes over at the first call after it is ready.

Later calls with the same shapes and dtypes call the executable directly. The program is
`cost.lower_strategy`'s for the chosen strategy, with the model's state (buffers, frozen weights) passed
as an argument, never baked in: a process that finds the decision cached lowers the very same program,
so JAX's persistent compilation cache serves it across processes.

Calls under a JAX transformation (tracers in, e.g. `jax.jit(kernel_fn)(x, x, params)`) go through
`jax.jit` of the whole computation instead, inlined into the caller's program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from entk.algorithms import Strategy, compile_time, cost
from entk.algorithms.call import kernel_settings, prepare

PyTree = Any

STATE_KWARG = "__entk_model_state__"
"""The keyword argument carrying the model's state into the kernel programs (inside a 1-element list,
so a state that is a 2-tuple is not split between x1 and x2 like a per-side keyword argument)."""


class NtkPrograms:
    """`(x1, x2, params, state) -> NTK` of `apply_with_state(params, state, x)`, compiled per signature.

    `settings` are `empirical_ntk_fn`'s keyword arguments (`trace_axes`, `diagonal_axes`, `vmap_axes`,
    `implementation`, `memory_budget`); `traced` is `(x1, x2, params, state) -> NTK` as a `jax.jit`
    function, for calls with tracers.
    """

    def __init__(self, apply_with_state: Callable[..., PyTree], capabilities: frozenset,
                 settings: dict, traced: Callable[..., PyTree]):
        self.capabilities = capabilities
        self.settings = settings
        self.traced = traced
        self.executables: dict[Any, Any] = {}
        self.upgrades: dict[Any, Any] = {}  # signature -> the per-call choice's compiling Estimate

        def f(params: PyTree, x: PyTree, **kwargs: Any) -> PyTree:
            (state,) = kwargs.pop(STATE_KWARG)
            return apply_with_state(params, state, x, **kwargs)

        self.f = f  # one function object: the cost model's decisions and SD's programs key on it

    def __call__(self, x1: PyTree, x2: PyTree | None, params: PyTree, state: PyTree) -> PyTree:
        if x2 is x1:
            x2 = None
        args = (x1, x2, params, {STATE_KWARG: [state]})
        leaves, treedef = jax.tree_util.tree_flatten(args)
        if not all(isinstance(leaf, (jax.Array, np.ndarray)) and not isinstance(leaf, jax.core.Tracer)
                   for leaf in leaves):
            return self.traced(x1, x2, params, state)  # tracers, or leaves that are not arrays
        signature = (treedef, tuple(jax.typeof(leaf) for leaf in leaves), jax.config.x64_enabled)
        executable = self.executables.get(signature)
        if executable is None:
            executable = self.executables[signature] = self._compile(signature, *args)
        elif signature in self.upgrades and cost.compile_finished(self.upgrades[signature]):
            executable = self.executables[signature] = cost.compiled_program(
                self.upgrades.pop(signature))
        return executable(*args)

    def _compile(self, signature: Any, x1: PyTree, x2: PyTree | None, params: PyTree,
                 kwargs: dict) -> Any:
        """The executable `(x1, x2, params, kwargs) -> NTK` for these arguments' shapes and dtypes:
        the one `"auto"` predicts to finish first, compilation included; when that is not its
        per-call choice, the per-call choice is compiled in the background and replaces it at the
        first call after it is ready (`self.upgrades`)."""
        settings = self.settings
        found: dict[str, Any] = {}

        def plan(x1, x2, params, kwargs):  # traced: prepares and lowers on shapes, computes nothing
            axes, vmap = kernel_settings(settings["trace_axes"], settings["diagonal_axes"],
                                         settings["vmap_axes"])
            call = prepare(self.f, x1, x2, params, kwargs, axes, vmap)
            strategy = Strategy.parse(settings["implementation"])
            programs = cost.Programs()
            if strategy is Strategy.AUTO:
                strategy = cost.select(
                    self.f, x1, x2, params, kwargs,
                    {"trace_axes": settings["trace_axes"], "diagonal_axes": settings["diagonal_axes"],
                     "vmap_axes": call.vmap},
                    capabilities=self.capabilities, memory_budget=settings["memory_budget"],
                    call=call, programs=programs)
            if strategy not in programs.estimates:  # given, or decided before: lower that one alone
                found["lowered"] = cost.lower_strategy(call, strategy, x1, x2, params, kwargs)
            elif programs.first_call is None:
                found["estimate"] = programs.estimates[strategy]
            else:
                found["estimate"] = programs.estimates[programs.first_call]
                found["upgrade"] = programs.estimates[strategy]

        jax.eval_shape(plan, x1, x2, params, kwargs)
        if "lowered" in found:
            return compile_time.compile_program(found["lowered"])
        executable = cost.compiled_program(found["estimate"])
        if "upgrade" in found:
            cost.compile_in_background(found["upgrade"])
            self.upgrades[signature] = found["upgrade"]
        return executable
