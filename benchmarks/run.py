"""entk against its peers, side by side in one run: neural-tangents 0.6.5 (JAX) and the torch.func tutorial.

    python -m benchmarks.run --suite quick          # ≤ 5 minutes on 2 CPU cores
    python -m benchmarks.run --suite full
    python -m benchmarks.run --suite quick --no-nt --no-torch    # entk alone

JAX part: each network of `benchmarks/networks.py` is built with `entk.stax` here and with
`neural_tangents.stax` in a worker process (`benchmarks/peer_nt.py`) running in neural-tangents' own
virtualenv (JAX 0.4.24; made on first use, see `ensure_nt_python`). Both get the same inputs and
parameters (through a shared .npz) and compute the same kernel (trace_axes=() "full" or (-1,) "traced",
vmap_axes=0, float32) with each strategy: jc, ntvp, sd and auto. Per strategy and tool: compile time,
XLA FLOPs, XLA peak memory, peak RSS rise of the first call, and the median of `--repeats` steady-state
calls after that warm-up call. Timed calls alternate between the tools (entk, nt, then nt, entk, ...),
so a noisy machine biases neither; the kernels are checked against each other.

A strategy entk's cost model predicts to take longer than the suite's `max_predicted_s` per call, or
whose compiled peak memory exceeds `--memory-gib`, is skipped for both tools (and the table says so).

PyTorch part: `entk.ntk(module, x, trace_axes=(), vmap_axes=0)` (auto; export to JAX) against the
torch.func tutorial's Jacobian contraction and NTK-vector products (`benchmarks/bench_torch.py`) on the
same modules, alternating; a torch.func method slower than `slow_s` on its warm-up call is timed once.

Results: `benchmarks/results/<suite>.json`, `<suite>.md` (tables, see `benchmarks/report.py`) and
`<suite>.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import zlib
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import entk  # noqa: E402,F401  (before JAX makes its backend, as a user imports it: entk/_xla_cpu.py)

from benchmarks import networks  # noqa: E402
from benchmarks.jax_tool import JaxTool, peak_rss_during  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NT_VENV = ROOT / ".venv-nt"
NT_REQUIREMENTS = ["jax==0.4.24", "jaxlib==0.4.24", "neural-tangents==0.6.5", "tensorflow-cpu==2.15.1",
                   "tf2jax==0.3.5", "numpy<2", "ml_dtypes<0.4"]
STRATEGIES = ("jc", "ntvp", "sd", "auto")
FAST_CALL_S = 0.02
FAST_REPEATS = 15
"""Cases whose every timed call takes under FAST_CALL_S get FAST_REPEATS rounds (at least): a few ms
per call is where this shared machine's noise moves a median most (a 3.6 against 2.0 ms swing)."""


@dataclasses.dataclass(frozen=True)
class JaxCase:
    model: str
    n: int
    outputs: int
    traced: bool

    @property
    def name(self) -> str:
        return f"{self.model} N={self.n} O={self.outputs} {'traced' if self.traced else 'full'}"


@dataclasses.dataclass(frozen=True)
class Suite:
    jax_cases: tuple[JaxCase, ...]
    torch_cases: tuple[tuple[str, int], ...]   # (model of bench_torch.MODELS, N)
    max_predicted_s: float                     # skip a strategy predicted slower than this per call
    slow_s: float                              # torch.func methods slower than this are timed once
    repeats: int                               # timed calls per tool and strategy


def _grid(models, ns) -> tuple[JaxCase, ...]:
    return tuple(JaxCase(m, n, o, traced) for m in models for n in ns
                 for o, traced in ((1, True), (10, False), (10, True)))


SUITES = {
    "quick": Suite(jax_cases=(JaxCase("mlp", 8, 10, False), JaxCase("cnn", 8, 1, True),
                              JaxCase("wrn_block", 8, 10, True), JaxCase("transformer", 8, 10, False)),
                   torch_cases=(("mlp", 8), ("cnn", 8)), max_predicted_s=2.0, slow_s=20.0, repeats=5),
    # ResNet-18 (11M parameters) at two corners of the grid only: its compilations (neural-tangents'
    # auto compiles all three strategies) take minutes each on 2 cores.
    "full": Suite(jax_cases=_grid(("mlp", "cnn", "wrn_block", "transformer"), (8, 32))
                  + (JaxCase("resnet18", 8, 10, False), JaxCase("resnet18", 32, 1, True)),
                  torch_cases=(("mlp", 32), ("cnn", 16), ("resnet18", 4)),
                  max_predicted_s=20.0, slow_s=60.0, repeats=3),
}


# ---------------------------------------------------------------------------------------------
# The neural-tangents worker


def ensure_nt_python(venv: pathlib.Path) -> pathlib.Path:
    """The Python of neural-tangents' virtualenv, created (pip, a few minutes) when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} for neural-tangents 0.6.5 (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *NT_REQUIREMENTS], check=True)
    return python


class NtWorker:
    """neural-tangents in its own process, driven one request at a time (see benchmarks/peer_nt.py)."""

    def __init__(self, python: pathlib.Path, log_path: pathlib.Path):
        self.log = open(log_path, "w")
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        # entk's XLA:CPU flag (entk/_xla_cpu.py) is jaxlib 0.10's; XLA 0.4.24 aborts on it.
        flags = [f for f in env.get("XLA_FLAGS", "").split() if f != entk._xla_cpu.FLAG]
        env["XLA_FLAGS"] = " ".join(flags)
        self.process = subprocess.Popen([str(python), str(ROOT / "benchmarks" / "peer_nt.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env, cwd=ROOT)

    def ask(self, op: str, **request: Any) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the neural-tangents worker died; see {self.log.name}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.log.close()


class NtTool:
    """The worker behind the same interface as the in-process `JaxTool`."""

    def __init__(self, worker: NtWorker, scratch: pathlib.Path):
        self.worker, self.scratch = worker, scratch

    def setup(self, model, n, outputs, traced, data_path):
        return self.worker.ask("setup", model=model, n=n, outputs=outputs, traced=traced,
                               data=str(data_path))

    def compile(self, strategy):
        return self.worker.ask("compile", strategy=strategy)

    def kernel(self, strategy):
        path = self.scratch / f"nt-{strategy}.npy"
        reply = self.worker.ask("kernel", strategy=strategy, path=str(path))
        return np.load(path), reply["peak_rss_bytes"]

    def run(self, strategy):
        return self.worker.ask("run", strategy=strategy)["run_s"]

    def drop(self, strategy):
        self.worker.ask("drop", strategy=strategy)


# ---------------------------------------------------------------------------------------------
# JAX cases


def entk_tool() -> JaxTool:
    import entk
    import entk.stax

    def make_ntk_fn(apply_fn, strategy, trace_axes):
        return entk.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, vmap_axes=0,
                                     implementation=strategy)

    return JaxTool(entk.stax, make_ntk_fn)


def write_case_data(case: JaxCase, path: pathlib.Path) -> None:
    """Inputs (standard normal, seeded by the case) and entk.stax's initial parameters, as .npz."""
    import entk.stax

    _, params, input_shape = networks.build(entk.stax, case.model, case.n, case.outputs)
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    leaves = {f"leaf_{i}": np.asarray(leaf) for i, leaf in
              enumerate(jax.tree_util.tree_leaves(params))}
    np.savez(path, x=rng.standard_normal(input_shape).astype(np.float32), **leaves)


def predicted_seconds(tool: JaxTool, strategy: str) -> float:
    """entk's cost-model prediction of one call of `strategy` (lowering only, nothing compiled)."""
    from entk.algorithms import Strategy, cost

    ntk_kwargs = {"trace_axes": tool.trace_axes, "diagonal_axes": (), "vmap_axes": 0}
    return cost.estimate(tool.apply_fn, tool.x, None, tool.params, {}, Strategy.parse(strategy),
                         ntk_kwargs).predicted_s


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def bench_jax_case(case: JaxCase, tools: dict[str, Any], suite: Suite, repeats: int,
                   memory_bytes: float, scratch: pathlib.Path) -> dict:
    data = scratch / "case.npz"
    write_case_data(case, data)
    info = {name: tool.setup(case.model, case.n, case.outputs, case.traced, data)
            for name, tool in tools.items()}
    result: dict[str, Any] = {"case": case.name, **dataclasses.asdict(case),
                              "n_params": info["entk"]["n_params"], "strategies": {}}
    print(f"\n== {case.name}: {result['n_params']:,} parameters", flush=True)
    active = []
    kernels: dict[tuple[str, str], np.ndarray] = {}
    for strategy in STRATEGIES:
        row: dict[str, Any] = {"skipped": None}
        result["strategies"][strategy] = row
        if strategy != "auto":
            row["entk_predicted_s"] = predicted_seconds(tools["entk"], strategy)
            if row["entk_predicted_s"] > suite.max_predicted_s:
                row["skipped"] = (f"entk's cost model predicts {row['entk_predicted_s']:.3g} s per "
                                  f"call > {suite.max_predicted_s} s (suite limit)")
                print(f"  {strategy:<5} skipped: {row['skipped']}", flush=True)
                continue
        for name, tool in tools.items():
            try:
                row[name] = tool.compile(strategy)
                if name == "entk" and (row[name]["peak_bytes"] or 0) > memory_bytes:
                    row["skipped"] = (f"compiled peak {row[name]['peak_bytes'] / 2**30:.1f} GiB > "
                                      f"--memory-gib {memory_bytes / 2**30:.1f}")
                    tool.drop(strategy)
                    break
                kernels[name, strategy], row[name]["peak_rss_bytes"] = tool.kernel(strategy)
                tool.run(strategy)  # a second untimed call: the first calls after compiling run slow
                row[name]["times_s"] = []
            except Exception as error:  # noqa: BLE001 - recorded, the others go on
                row[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print(f"  {strategy:<5} {name} failed: {row[name]['error']}", flush=True)
        if row["skipped"]:
            print(f"  {strategy:<5} skipped: {row['skipped']}", flush=True)
            continue
        active.append(strategy)
    names = list(tools)
    r = 0
    while r < repeats or (r < FAST_REPEATS and _all_fast(result, active, names)):
        for strategy in (active if r % 2 == 0 else active[::-1]):
            for name in (names if r % 2 == 0 else names[::-1]):
                row = result["strategies"][strategy]
                if "times_s" in row.get(name, {}):
                    row[name]["times_s"].append(tools[name].run(strategy))
        r += 1
    reference = kernels.get(("entk", "jc"), kernels.get(("entk", "sd")))
    for strategy in active:
        row = result["strategies"][strategy]
        for name in names:
            if "times_s" in row.get(name, {}):
                row[name]["median_s"] = statistics.median(row[name]["times_s"])
                if reference is not None:
                    row[name]["rel_diff_to_entk_jc"] = rel_diff(kernels[name, strategy], reference)
            tools[name].drop(strategy)
        if "median_s" in row.get("entk", {}) and "median_s" in row.get("nt", {}):
            row["entk_over_nt"] = row["entk"]["median_s"] / row["nt"]["median_s"]
        if strategy == "auto":  # which strategy each tool's auto ran: the one with the same FLOPs
            for name in names:
                flops = {s: result["strategies"][s].get(name, {}).get("flops") for s in active}
                same = [s for s in active if s != "auto" and flops[s] == flops["auto"]]
                if same and name in row:
                    row[name]["picked"] = same[0]
        cells = "  ".join(f"{name} {row[name]['median_s'] * 1e3:9.2f} ms" for name in names
                          if "median_s" in row.get(name, {}))
        ratio = f"  entk/nt {row['entk_over_nt']:.2f}" if "entk_over_nt" in row else ""
        print(f"  {strategy:<5} {cells}{ratio}", flush=True)
    return result


def _all_fast(result: dict, active: list[str], names: list[str]) -> bool:
    """Every timed call of this case so far took under FAST_CALL_S (so more rounds are cheap)."""
    times = [t for s in active for n in names
             for t in result["strategies"][s].get(n, {}).get("times_s", [])]
    return bool(times) and max(times) < FAST_CALL_S


# ---------------------------------------------------------------------------------------------
# PyTorch cases


def bench_torch_case(model: str, n: int, repeats: int, slow_s: float) -> dict:
    import torch

    import entk
    import entk.adapters.torch  # noqa: F401  (registers torch modules with entk.ntk)
    from benchmarks import bench_torch

    torch.manual_seed(0)
    module, example = bench_torch.MODELS[model]()
    module = module.eval()
    x = torch.randn(n, *example.shape[1:])
    params = {k: v.detach() for k, v in module.named_parameters()}
    single = bench_torch.single_example_fn(module)
    tools: dict[str, Callable[[], Any]] = {
        "entk": lambda: entk.ntk(module, x, trace_axes=(), vmap_axes=0),
        "func_jc": lambda: bench_torch.func_jacobian_contraction(single, params, x, x),
        "func_ntvp": lambda: bench_torch.func_ntk_vector_products(single, params, x, x),
    }
    print(f"\n== torch {model} N={n}: {sum(p.numel() for p in params.values()):,} parameters",
          flush=True)
    row: dict[str, Any] = {"model": model, "n": n, "n_params": sum(p.numel() for p in params.values()),
                           "tools": {}}
    kernels = {}
    for name, fn in tools.items():
        (seconds, kernels[name]), peak = peak_rss_during(lambda: bench_torch.timed(fn))
        row["tools"][name] = {"warmup_s": seconds, "peak_rss_bytes": peak, "times_s": []}
    once = [name for name in tools if name != "entk" and row["tools"][name]["warmup_s"] > slow_s]
    for name in once:
        row["tools"][name]["times_s"] = [row["tools"][name]["warmup_s"]]
        row["tools"][name]["single_run"] = True
    names = list(tools)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name not in once:
                row["tools"][name]["times_s"].append(bench_torch.timed(tools[name])[0])
    for name, tool in row["tools"].items():
        tool["median_s"] = statistics.median(tool["times_s"])
        tool["rel_diff_to_func_jc"] = bench_torch.rel_diff(kernels[name], kernels["func_jc"])
    entk_row = row["tools"]["entk"]
    entk_row["compile_s"] = entk_row["warmup_s"] - entk_row["median_s"]
    faster = min(("func_jc", "func_ntvp"), key=lambda k: row["tools"][k]["median_s"])
    row["faster_func"] = faster
    row["speedup"] = row["tools"][faster]["median_s"] / entk_row["median_s"]
    row["target"] = bench_torch.TARGETS.get(model)
    print("  " + "  ".join(f"{k} {v['median_s']:.4g} s" for k, v in row["tools"].items())
          + f"  speed-up {row['speedup']:.1f}x over {faster}", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# Main


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "device": jax.devices()[0].device_kind}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--repeats", type=int, help="timed calls per tool and strategy "
                        "(default: the suite's, 5 quick / 3 full)")
    parser.add_argument("--models", nargs="+", choices=sorted(networks.MODELS),
                        help="only these networks (JAX part)")
    parser.add_argument("--no-nt", action="store_true", help="skip neural-tangents")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch part")
    parser.add_argument("--nt-venv", type=pathlib.Path, default=NT_VENV,
                        help="neural-tangents' virtualenv (made when missing)")
    parser.add_argument("--memory-gib", type=float, default=8.0,
                        help="skip strategies whose compiled peak memory exceeds this")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    args.repeats = args.repeats or suite.repeats
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    cases = [c for c in suite.jax_cases if not args.models or c.model in args.models]
    started = datetime.datetime.now()
    report: dict[str, Any] = {"suite": args.suite, "command": command.strip(),
                              "date": started.isoformat(timespec="seconds"), "machine": machine(),
                              "repeats": args.repeats, "fast_repeats": FAST_REPEATS,
                              "fast_call_s": FAST_CALL_S, "max_predicted_s": suite.max_predicted_s,
                              "jax": [], "torch": []}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / args.suite

    def save() -> None:
        from benchmarks import report as report_module

        report["wall_s"] = (datetime.datetime.now() - started).total_seconds()
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(report_module.markdown(report))

    with tempfile.TemporaryDirectory() as tmp:
        scratch = pathlib.Path(tmp)
        tools: dict[str, Any] = {"entk": entk_tool()}
        worker = None
        if not args.no_nt:
            worker = NtWorker(ensure_nt_python(args.nt_venv), scratch / "nt.log")
            tools["nt"] = NtTool(worker, scratch)
            report["machine"]["nt_jax"] = worker.ask("versions")["jax"]
        try:
            for case in cases:
                report["jax"].append(bench_jax_case(case, tools, suite, args.repeats,
                                                    args.memory_gib * 2 ** 30, scratch))
                save()
        finally:
            if worker is not None:
                worker.close()
    if not args.no_torch:
        import torch

        report["machine"]["torch"] = torch.__version__
        for model, n in suite.torch_cases:
            report["torch"].append(bench_torch_case(model, n, args.repeats, suite.slow_s))
            save()
    save()
    from benchmarks import report as report_module

    report_module.plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out}.json, .md, .png in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
