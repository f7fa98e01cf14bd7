"""Cost model: FLOPs, bytes and memory of each strategy, a predicted time, and `"auto"`'s choice.

For a given model, shapes, dtypes and axes, each strategy's kernel function is *lowered* (traced to
StableHLO, no XLA compilation) and XLA's cost analysis gives its FLOPs and bytes accessed; the FLOPs
are split by primitive class (`entk.algorithms.program_flops`: matmuls, convolutions, convolution
weight gradients, the rest). A predicted time is `Σ_class flops_class / rate_class +
FUSED_BYTES_FRACTION · bytes / bandwidth + ops · op_overhead + call overhead` (`predict_seconds`),
with the per-class rates and the overheads measured on the machine and checked against its physical
peak (`entk.algorithms.device.calibration`).

Memory: the bytes accessed by the unoptimised program bound its peak memory from above (nothing can be
live that was never written), so a strategy whose bound fits the budget fits for sure without compiling.
Only a strategy whose bound exceeds the budget is compiled, and its real peak (arguments + outputs +
temporaries from XLA's memory analysis) decides. `"auto"` runs the predicted-fastest strategy among those
that fit, never one that does not; when the runner-up that fits is predicted within MEASURE_WITHIN of it
(a close call, where the model's 2-3x errors could flip the order) and both are cheap, the two are
compiled and timed and the measured faster wins. The decision is cached per (function, shapes, dtypes,
axes, budget).

Lowering is most of a decision's cost, so candidates are lowered in order, structured derivatives first,
and a candidate whose lower bound (`_lower_bound_s`: the bytes its program must write, from the call's
shapes alone) is already beyond a close call with one estimated is not lowered at all. A caller that
runs the winner itself (`entk.ntk`, via `select(..., programs=Programs())`) gets the lowered programs,
the first one already compiling on a worker thread (`entk.algorithms.background`), and, for its first
call, the candidate predicted to finish first once compile time is counted (`compile_time`: the
machine's seconds per lowered operation), which may differ from the per-call choice.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from entk import _compilation_cache, algorithms
from entk.algorithms import Strategy, concrete_strategies
from entk.algorithms import (background, compile_time, decision_cache, jacobian_contraction,
                             ntk_vector_products)
from entk.algorithms._apply import split_kwargs
from entk.algorithms.call import PreparedCall, kernel_settings, prepare
from entk.algorithms.device import (CALIBRATION_VERSION, Calibration, OutOfBudgetError,
                                    calibration, default_memory_budget, device_key,
                                    warm_up_in_background)
from entk.algorithms.program_flops import classify

PyTree = Any

# Share of the unoptimised program's bytes that still reach memory after XLA's fusion. Cost analysis of
# the lowered (unfused) program counts every intermediate of every elementwise op, so this over-counts
# traffic; 1.0 (count it all, no fitted constant) ranks the benchmark zoo of
# `benchmarks/auto_regret.py` as well as any fraction tried (0.03-3), once the calibration is a quiet
# one. The close calls the model gets wrong are settled by measuring (MEASURE_WITHIN).
FUSED_BYTES_FRACTION = 1.0

# When the two fastest strategies that fit are predicted within this factor of each other, the model
# cannot tell them apart reliably (its errors reach 2-3x: XLA's unoptimised FLOP counts include work the
# optimiser removes, and convolutions and small dots run below the matmul rate), so `"auto"` compiles
# both and times a call of each -- only when that is affordable: the faster is predicted under
# MEASURE_UNDER_S. That costs a second compilation and two to four calls; a wrong pick costs up to 2.4x
# on every call (a WideResNet block at N=32 in `benchmarks/run.py --suite full`).
MEASURE_WITHIN = 1.5
MEASURE_UNDER_S = 1.0


# ----------------------------------------------------------------------------------------------
# Per-strategy estimates


@dataclasses.dataclass
class Estimate:
    """What the cost model knows about one strategy on one problem.

    `peak_bytes` is XLA's compiled figure when the strategy was compiled (`peak_is_exact`), else the
    upper bound given by the bytes accessed.
    """

    strategy: Strategy
    flops: float
    bytes_accessed: float
    predicted_s: float
    peak_bytes: float
    peak_is_exact: bool = False
    compiled: Any = None
    compile_s: float | None = None
    n_ops: int = 0
    lowered: Any = None        # the traced program, so compiling later does not trace again
    pending: Any = None        # a `Future` of `lowered.compile()` started in the background ...
    pending_since: float = 0.0  # ... at this `time.perf_counter()`
    n_all_ops: int = 0         # every StableHLO operation of `lowered` (what compile time follows)
    compile_predicted_s: float | None = None  # `compile_time.predict_seconds`; None: no rate yet
    measured_s: float | None = None   # one timed call, when `select` had to break a near tie
    flops_by_class: dict = dataclasses.field(default_factory=dict)  # `program_flops.classify`


@dataclasses.dataclass
class Programs:
    """What `select` hands a caller that runs the candidates' programs itself (`entk.ntk`).

    Attributes:
      estimates: `{strategy: Estimate}` of the candidates lowered (their `lowered` programs take
        `(x1, x2, params, array kwargs)`, see `lower_strategy`; `compiled_program(estimate)` compiles
        or awaits one). The first one lowered is already compiling on a worker thread.
      first_call: the candidate predicted to finish first on a call made once, compilation included
        (`compile_time`), when that is not the per-call choice `select` returns; else None.
    """

    estimates: dict = dataclasses.field(default_factory=dict)
    first_call: Strategy | None = None


# Operations XLA fuses into their neighbours on every backend: they cost no launch of their own.
_FUSIBLE = {"add", "subtract", "multiply", "divide", "negate", "maximum", "minimum", "select",
            "compare", "convert", "broadcast_in_dim", "reshape", "constant", "exponential", "log",
            "tanh", "logistic", "sqrt", "rsqrt", "abs", "sign", "and", "or", "not", "power",
            "return", "func.return", "iota", "get_tuple_element", "tuple", "transpose"}


def count_operations(lowered: Any) -> int:
    """Non-fusible operations in a lowered program (dots, convolutions, gathers, reductions, ...)."""
    return _non_fusible(compile_time.operation_names(lowered))


def _non_fusible(names: list[str]) -> int:
    return sum(1 for name in names if name not in _FUSIBLE)


def _shape_struct(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _split_static(kwargs: dict) -> tuple[dict, dict]:
    """Array keyword arguments (traced) and the rest (closed over, e.g. `train=False`)."""
    arrays = {k: v for k, v in kwargs.items()
              if all(hasattr(leaf, "shape") for leaf in jax.tree_util.tree_leaves(v))}
    return arrays, {k: v for k, v in kwargs.items() if k not in arrays}


def _itemsize(params: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    return max((jnp.dtype(jnp.result_type(p)).itemsize for p in leaves), default=4)


def prepare_call(f: Callable, x1: PyTree, x2: PyTree | None, params: PyTree, kwargs: dict,
                 ntk_kwargs: dict) -> PreparedCall:
    """The validated call (`entk.algorithms.call.prepare`) the strategies are lowered from."""
    axes, vmap = kernel_settings(**ntk_kwargs)
    return prepare(f, x1, x2, params, kwargs, axes, vmap)


def lower_strategy(call: PreparedCall, strategy: Strategy, x1: PyTree, x2: PyTree | None,
                   params: PyTree, kwargs: dict) -> Any:
    """`jax.jit` of `strategy` on the prepared call, lowered on shapes only (nothing is computed or
    compiled). The program takes `(x1, x2, params, array kwargs)` as given (`x2` may be `None`); the
    call supplies `f`, the axes and the verified `vmap_axes`, so nothing is validated again."""
    _compilation_cache.enable()  # its compilations (compare, close calls) are cached per machine
    array_kwargs, static_kwargs = _split_static(kwargs)
    algorithm = algorithms.get(strategy)

    def run(a, b, p, kw):
        kwargs1, kwargs2 = split_kwargs({**kw, **static_kwargs}, a, b)
        return algorithm(call.f, a, b, p, kwargs1, kwargs1 if b is None else kwargs2, call.axes,
                         call.vmap)

    return jax.jit(run).lower(_shape_struct(x1), None if x2 is None else _shape_struct(x2),
                              _shape_struct(params), _shape_struct(array_kwargs))


def _analysis(result: Any) -> dict:
    if isinstance(result, (list, tuple)):  # older JAX returned one dict per computation
        result = result[0] if result else {}
    return dict(result or {})


def compiled_peak_bytes(compiled: Any) -> float | None:
    """Arguments + outputs + temporaries of a compiled kernel function (XLA memory analysis)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if stats is None:
        return None
    return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def predict_seconds(flops_by_class: dict, bytes_accessed: float, n_ops: int, itemsize: int,
                    cal: Calibration) -> float:
    """Predicted run time: each primitive class's FLOPs at its measured rate (`itemsize`-byte floats),
    plus the bytes at the measured bandwidth, one overhead per non-fusible operation and one per call."""
    compute = sum(flops / cal.flop_rate(itemsize, kind) for kind, flops in flops_by_class.items())
    return (compute + FUSED_BYTES_FRACTION * bytes_accessed / cal.bytes_per_s
            + n_ops * cal.op_overhead_s + cal.overhead_s)


def estimate(f: Callable, x1: PyTree, x2: PyTree | None, params: PyTree, kwargs: dict,
             strategy: Strategy, ntk_kwargs: dict, *, compile: bool = False,
             cal: Calibration | None = None, call: PreparedCall | None = None,
             lowered: Any = None) -> Estimate:
    """FLOPs, bytes, predicted time and a peak-memory bound for one strategy (compiled if asked).

    `call`: the call already prepared from these arguments (`prepare_call`), if any; `lowered`: the
    strategy's program already lowered from it (`lower_strategy`), if any."""
    cal = cal or calibration()
    call = call or prepare_call(f, x1, x2, params, kwargs, ntk_kwargs)
    if lowered is None:
        lowered = lower_strategy(call, strategy, x1, x2, params, kwargs)
    costs = _analysis(lowered.cost_analysis())
    flops = float(costs.get("flops", 0.0)) + float(costs.get("transcendentals", 0.0))
    bytes_accessed = float(costs.get("bytes accessed", 0.0))
    names = compile_time.operation_names(lowered)
    n_ops = _non_fusible(names)
    by_class = classify(lowered, flops)
    predicted = predict_seconds(by_class, bytes_accessed, n_ops, _itemsize(params), cal)
    est = Estimate(strategy, flops, bytes_accessed, predicted, peak_bytes=bytes_accessed,
                   n_ops=n_ops, lowered=lowered, flops_by_class=by_class, n_all_ops=len(names),
                   compile_predicted_s=compile_time.predict_seconds(len(names)))
    if compile:
        compiled_program(est)
    return est


def compiled_program(est: Estimate) -> Any:
    """`est`'s compiled program: compiled now if it was not, or awaited if a background compilation
    was started (`compile_in_background`); XLA's peak memory then replaces the bound."""
    if est.pending is not None:
        pending, est.pending = est.pending, None
        est.compiled, est.compile_s = pending.result()
    elif not callable(est.compiled):  # not compiled yet (or holds the error of a failed trace)
        start = time.perf_counter()
        est.compiled = compile_time.compile_program(est.lowered, est.n_all_ops or None)
        est.compile_s = time.perf_counter() - start
    if not est.peak_is_exact:
        peak = compiled_peak_bytes(est.compiled)
        if peak is not None:
            est.peak_bytes, est.peak_is_exact = peak, True
    return est.compiled


def compile_finished(est: Estimate) -> bool:
    """Whether `est`'s program is compiled, or its background compilation over: `compiled_program`
    would not wait."""
    return est.pending.done() if est.pending is not None else callable(est.compiled)


def compile_in_background(est: Estimate) -> None:
    """Starts compiling `est.lowered` on entk's background worker, unless it is compiled or compiling
    already; `compiled_program(est)` awaits it."""
    if est.pending is not None or callable(est.compiled):
        return
    lowered, n_ops = est.lowered, est.n_all_ops or None

    def work() -> tuple[Any, float]:
        start = time.perf_counter()
        compiled = compile_time.compile_program(lowered, n_ops)
        return compiled, time.perf_counter() - start

    est.pending, est.pending_since = background.submit(work), time.perf_counter()


def asymptotic_flops(strategy: Strategy, *, n1: int, n2: int, out_per_example: int,
                     kept_per_pair: int, n_params: int, forward_flops: float) -> float:
    """Novak et al. (2022)'s FLOP count, from the strategy's own module (`asymptotic_flops` there):
    JC ≈ N·O·[FP] + N1·N2·O²·P, NTVP ≈ N2·O·[FP of the x1 batch]; SD ≤ JC."""
    return algorithms.asymptotic_flops(strategy, n1=n1, n2=n2, out_per_example=out_per_example,
                                       kept_per_pair=kept_per_pair, n_params=n_params,
                                       forward_flops=forward_flops)


# ----------------------------------------------------------------------------------------------
# Selection


_DECISIONS: dict[Any, Strategy] = {}


def _decision_key(f, x1, x2, params, kwargs, ntk_kwargs, budget, candidates) -> Any:
    shapes = jax.tree_util.tree_map(lambda a: (jnp.shape(a), str(jnp.result_type(a))),
                                    (x1, x2, params, _split_static(kwargs)[0]))
    return (id(f), str(shapes), repr(sorted(ntk_kwargs.items())), budget, tuple(candidates))


def select(f: Callable, x1: PyTree, x2: PyTree | None, params: PyTree, kwargs: dict,
           ntk_kwargs: dict, *, capabilities: Iterable[str], memory_budget: int | None = None,
           estimates_out: list | None = None, call: PreparedCall | None = None,
           programs: Programs | None = None) -> Strategy:
    """The predicted-fastest strategy whose peak memory fits `memory_budget` (see module docstring).

    `call`: these arguments already prepared (`entk.algorithms.call.prepare`, as `empirical_ntk_fn`
    does before selecting); otherwise they are prepared here, once, when candidates must be lowered.
    `programs`: a `Programs` record to fill, for a caller that runs the programs itself. Given it,
    the first candidate lowered (structured derivatives where supported: the usual winner) is
    compiled on a worker thread while the others are lowered (on a first call, compiling the winner
    is the longest step, and lowering is Python work that leaves the second core idle), and
    `programs.first_call` says which candidate finishes first on a single call. Nothing is lowered
    when the decision is cached.
    """
    candidates = [s for s in concrete_strategies() if s.short_name in set(capabilities)]
    if not candidates:
        raise ValueError(f"No available strategy is supported by this model "
                         f"(capabilities={sorted(capabilities)}).")
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    key = _decision_key(f, x1, x2, params, kwargs, ntk_kwargs, budget, candidates)
    if key in _DECISIONS and estimates_out is None:
        return _DECISIONS[key]
    decisions_dir = decision_cache.directory()
    disk_key = None
    if estimates_out is None:  # a report wants every estimate: decide afresh
        disk_key = _disk_key(f, x1, x2, params, kwargs, ntk_kwargs, candidates)
        stored = decision_cache.load(decisions_dir, disk_key, budget)
        if stored is not None:
            _DECISIONS[key] = stored
            return stored

    warm_up_in_background()  # the calibration's programs compile while the first candidate lowers
    check_model_traces(f, x1, x2, params, kwargs)
    call = call or prepare_call(f, x1, x2, params, kwargs, ntk_kwargs)
    cal = None
    estimates = []
    # SD first (see `programs`); NTVP last. A candidate whose lower bound leaves it no chance
    # against one already estimated is not lowered (`_lower_bound_s`).
    for strategy in sorted(candidates, key=lambda s: (s is Strategy.NTK_VECTOR_PRODUCTS,
                                                      s is not Strategy.STRUCTURED_DERIVATIVES)):
        if estimates_out is None and any(math.isfinite(e.predicted_s) for e in estimates):
            cal = calibration() if cal is None else cal
            if _cannot_win(_lower_bound_s(strategy, call, cal), estimates, budget):
                estimates.append(Estimate(strategy, math.inf, math.inf, math.inf, math.inf))
                continue
        try:
            lowered = lower_strategy(call, strategy, x1, x2, params, kwargs)
            # Measured quietly: before any compilation runs beside it.
            cal = calibration() if cal is None else cal
            est = estimate(f, x1, x2, params, kwargs, strategy, ntk_kwargs, cal=cal, call=call,
                           lowered=lowered)
        except Exception as error:  # noqa: BLE001 - a strategy that cannot trace is not a candidate
            estimates.append(Estimate(strategy, math.inf, math.inf, math.inf, math.inf))
            estimates[-1].compiled = error
            continue
        estimates.append(est)
        if programs is not None:
            if not programs.estimates:
                compile_in_background(est)
            programs.estimates[strategy] = est
    failed = [e for e in estimates if isinstance(e.compiled, Exception)]
    if len(failed) == len(estimates):
        _raise_first_failure(failed)
    by_prediction = sorted(estimates, key=lambda e: e.predicted_s)
    choice = _first_fitting(by_prediction, budget)
    if estimates_out is not None:
        estimates_out.extend(estimates)
    if choice is None:
        smallest = min((e for e in estimates if e not in failed), key=lambda e: e.peak_bytes)
        untraced = "".join(f" {e.strategy.short_name} could not be traced "
                           f"({error_summary(e.compiled)})." for e in failed)
        raise OutOfBudgetError(
            f"No strategy fits memory_budget={budget / 2**20:.1f} MiB (smallest need: "
            f"{smallest.strategy.short_name} ≈ {smallest.peak_bytes / 2**20:.1f} MiB).{untraced} "
            f"Compute the kernel in tiles with entk.batch / entk.compute_kernel, or raise "
            f"memory_budget.")
    if choice.predicted_s <= MEASURE_UNDER_S:
        close = [est for est in by_prediction[by_prediction.index(choice) + 1:]
                 if est.predicted_s <= MEASURE_WITHIN * choice.predicted_s]
        rival = _first_fitting(close, budget)
        if rival is not None:
            for est in estimates:  # a compilation running beside the timed calls would slow them
                if est.pending is not None:
                    compiled_program(est)
            args = _timing_arguments(x1, x2, params, _split_static(kwargs)[0])
            try:
                best_s = _time_call(choice, args, give_up_after=math.inf)
                if _time_call(rival, args, give_up_after=best_s) < best_s:
                    choice = rival
            except Exception:  # noqa: BLE001 - e.g. `f` closes over tracers of an enclosing jit,
                pass           # which the lowered program takes as extra inputs: keep the prediction
    if programs is not None:
        first = _finishing_first(choice, estimates, budget)
        programs.first_call = None if first is choice else first.strategy
    _DECISIONS[key] = choice.strategy
    memory_limited = any(e.predicted_s < choice.predicted_s for e in estimates if e not in failed)
    decision_cache.store(decisions_dir, disk_key, decision_cache.Decision(
        choice.strategy.short_name, float(choice.peak_bytes), budget, memory_limited))
    return choice.strategy


def _finishing_first(choice: Estimate, estimates: list[Estimate], budget: int) -> Estimate:
    """The candidate whose kernel is in hand first on a single call: predicted compile time (what is
    left of it for one compiling already) plus predicted run time; `choice` unless another one,
    surely within the budget, is predicted to finish first. Compile times are known once this
    machine has compiled a kernel program (`compile_time`); without them, `choice`."""
    now = time.perf_counter()

    def finish(est: Estimate) -> float:
        if callable(est.compiled):
            return est.predicted_s
        if est.compile_predicted_s is None:
            return math.inf
        started = now - est.pending_since if est.pending is not None else 0.0
        return max(est.compile_predicted_s - started, 0.0) + est.predicted_s

    rivals = [e for e in estimates if e is not choice and math.isfinite(e.predicted_s)
              and e.peak_bytes <= budget and not isinstance(e.compiled, Exception)]
    best = min(rivals, key=finish, default=choice)
    return best if finish(best) < finish(choice) else choice


def _lower_bound_s(strategy: Strategy, call: PreparedCall, cal: Calibration) -> float:
    """A lower bound on the time the cost model would predict for `strategy` (`predict_seconds`), from
    the call's shapes and the forward pass alone, or 0 where none is known (structured derivatives).
    Lowering the forward pass is cheaper than lowering a strategy's program (a ResNet-18 on a 2-core
    CPU: ~0.1 s against 0.3 s for JC, 0.9 s for NTVP).

    Bytes: what the strategy's program writes at least, from its own module (`written_bytes_lower_bound`:
    JC's Jacobians, NTVP's parameter-shaped cotangents), at the calibrated bandwidth. FLOPs (NTVP): every
    output entry of f(x2) is pushed through a JVP of f(x1) (Novak et al. 2022), at least f(x1)'s
    forward FLOPs each, at the fastest calibrated rate (the prediction prices each primitive class at
    its own rate, none faster).
    """
    flops = 0.0
    if strategy is Strategy.JACOBIAN_CONTRACTION:
        written = jacobian_contraction.written_bytes_lower_bound(
            call.f, call.x1, call.x2, call.params, call.kwargs1, call.axes, call.vmap, call.out1,
            call.out2)
    elif strategy is Strategy.NTK_VECTOR_PRODUCTS:
        written = ntk_vector_products.written_bytes_lower_bound(call.params, call.vmap, call.out1,
                                                                call.out2)
        array_kwargs, static_kwargs = _split_static(call.kwargs1)
        forward = jax.jit(lambda p, a, kw: call.f(p, a, **kw, **static_kwargs)).lower(
            _shape_struct(call.params), _shape_struct(call.x1), _shape_struct(array_kwargs))
        entries = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(call.out2))
        flops = entries * float(_analysis(forward.cost_analysis()).get("flops", 0.0))
    else:
        return 0.0
    fastest = max(cal.flop_rate(_itemsize(call.params), kind) for kind in cal.flops_per_s)
    return flops / fastest + FUSED_BYTES_FRACTION * written / cal.bytes_per_s + cal.overhead_s


def _cannot_win(lower_bound_s: float, estimates: list[Estimate], budget: int) -> bool:
    """Whether a strategy needing at least `lower_bound_s` is beyond a close call with one already
    estimated that surely fits the budget (its bound on memory does), so it need not be lowered."""
    sure = [e.predicted_s for e in estimates
            if math.isfinite(e.predicted_s) and e.peak_bytes <= budget]
    return bool(sure) and lower_bound_s > MEASURE_WITHIN * min(sure)


def _disk_key(f, x1, x2, params, kwargs, ntk_kwargs, candidates) -> str | None:
    """The on-disk decision key: the jaxpr of `f` on x1 (and x2) at these shapes, and the settings."""
    kw1, kw2 = split_kwargs(kwargs, x1, x2)
    (a1, s1), (a2, s2) = _split_static(kw1), _split_static(kw2)

    def program(p, a, b, k1, k2):
        out = f(p, a, **k1, **s1)
        return out if b is None else (out, f(p, b, **k2, **s2))

    settings = repr((sorted(ntk_kwargs.items()), [c.short_name for c in candidates], sorted(s1),
                     repr(s1), repr(s2), device_key(jax.devices()[0]), CALIBRATION_VERSION))
    args = (params, x1, x2, a1, a2)
    return decision_cache.fingerprint(program, _shape_struct(args), settings)


def error_summary(error: BaseException) -> str:
    """`TypeName: first line of the message`, for one-line reports of an exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _describe(tree: PyTree) -> str:
    """Shapes and dtypes of a pytree of arrays, e.g. `float32[4,7]`, for error messages."""
    parts = [f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}".replace(" ", "")
             for leaf in jax.tree_util.tree_leaves(tree)]
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def check_model_traces(f: Callable, x1: PyTree, x2: PyTree | None, params: PyTree,
                       kwargs: dict) -> None:
    """Traces the forward pass `f(params, x, **kwargs)` on x1 and x2 (shapes only, nothing is run).

    A shape or dtype mistake in the model or its inputs (a hard-coded reshape, inputs of the wrong
    width) makes every strategy fail to trace; it is reported here as the model's own error, before
    memory is considered, rather than as "no strategy fits the memory budget".
    """
    for name, x, side_kwargs in zip(("x1", "x2"), (x1, x2), split_kwargs(kwargs, x1, x2)):
        if x is None:
            continue
        array_kwargs, static_kwargs = _split_static(side_kwargs)
        try:
            jax.eval_shape(lambda p, a, kw: f(p, a, **kw, **static_kwargs),
                           _shape_struct(params), _shape_struct(x), _shape_struct(array_kwargs))
        except Exception as error:  # noqa: BLE001 - re-raised as is, with a note on where
            error.add_note(f"entk: the model itself fails on {name} ({_describe(x)}), before any "
                           f"eNTK strategy runs: check the input shape and dtype the model expects.")
            raise


def _raise_first_failure(failed: list[Estimate]) -> None:
    """Every strategy failed to trace although the forward pass traces: re-raises the first error,
    with a note listing each strategy's error."""
    error = failed[0].compiled
    error.add_note("entk: no eNTK strategy could be traced on this model and input: "
                   + "; ".join(f"{e.strategy.short_name}: {error_summary(e.compiled)}"
                               for e in failed))
    raise error


def _first_fitting(by_prediction: list[Estimate], budget: int) -> Estimate | None:
    """The first estimate in the list whose peak memory fits `budget`, or None. A strategy whose
    bytes-accessed bound exceeds the budget is compiled to learn its real peak."""
    for est in by_prediction:
        if not math.isfinite(est.predicted_s):
            continue
        if est.peak_bytes > budget and not est.peak_is_exact:  # a loose bound: compile to know
            compiled_program(est)
        if est.peak_bytes <= budget:
            return est
    return None


def _timing_arguments(*trees: PyTree) -> tuple:
    """Concrete arrays to time a compiled kernel function with: the given ones, or (under `jit`, where
    they are tracers) stand-ins of the same shapes and dtypes (small normal floats, zero integers)."""
    rng = np.random.default_rng(0)

    def concrete(leaf: Any) -> Any:
        if not isinstance(leaf, jax.core.Tracer):
            return leaf
        dtype = np.dtype(jnp.result_type(leaf))  # NumPy: jnp would make tracers inside a trace
        if jnp.issubdtype(dtype, jnp.floating):
            return (0.1 * rng.standard_normal(jnp.shape(leaf))).astype(dtype)
        return np.zeros(jnp.shape(leaf), dtype)

    return tuple(jax.tree_util.tree_map(concrete, tree) for tree in trees)


def _time_call(est: Estimate, args: tuple, give_up_after: float) -> float:
    """Compiles `est`'s program if needed and times it: the faster of two calls (the first warms up)
    for a short program, one call for a long one. When the first call already takes over twice
    `give_up_after`, that call is the answer: it has lost."""
    compiled_program(est)
    times = []
    # Out of any enclosing trace (entk.ntk jits the whole call): a bridged model's host callback must
    # see concrete arrays, not the tracers of the jit being traced.
    with jax.core.eval_context():
        for _ in range(2 if est.predicted_s < 0.05 else 1):  # a long call needs no warm-up call
            start = time.perf_counter()
            jax.block_until_ready(est.compiled(*args))
            times.append(time.perf_counter() - start)
            if times[0] > 2 * give_up_after:
                break
    est.measured_s = min(times)
    return est.measured_s
