"""The first eNTK a PyTorch user computes: time to the kernel in hand in a fresh process, entk vs torch.func.

Each measurement runs in its own fresh Python subprocess (one per tool, case and cache state), so
nothing is warm except the operating system's file cache:

- torch.func: the "Neural Tangent Kernels" tutorial's Jacobian contraction, with the tutorial's
  `compute='trace'` contraction: per-example Jacobians `vmap(jacrev(fnet_single), (None, 0))` over
  the parameters (`functional_call`) for x1 and x2 (the tutorial is called with x1 = x2 = x), then
  `einsum('Naf,Maf->NM')` per parameter, summed, divided by the number of outputs O, i.e. the kernel
  averaged over the logits like entk's default `trace_axes=(-1,)`. `fnet_single` and the models are
  those of `benchmarks/bench_torch.py`.
- entk: `entk.ntk(module, x)` with its defaults (trace_axes=(-1,), vmap_axes="auto",
  implementation="auto"). The first call includes recording the module (dispatch capture, or
  torch.export where capture refuses), translation to JAX, tracing, "auto"'s
  decision (including the cost model's one-off calibration when its cache is empty) and XLA
  compilation. entk's persistent caches (compiled programs in `$ENTK_CACHE_DIR/xla`, exported torch
  programs in `$ENTK_CACHE_DIR/torch-programs`, auto's decisions, the calibration) live in
  ENTK_CACHE_DIR: entk runs twice, in two processes sharing one fresh temporary ENTK_CACHE_DIR, first
  with those caches cold, then warm.

Per process: the wall time of the first call (model and inputs already built, imports done), of a
second call on new inputs of the same shape (steady state), and the process's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the imports: the torch.func process
imports JAX and entk too, through bench_torch; the RSS before the first call is in the JSON). Modules
are in eval mode; float32; CPU. The kernels of entk and torch.func are compared (max |Θ_entk − Θ_func|
/ max |Θ_func| in float64), for the first and the second inputs. Where torch.func's two whole Jacobians
would not fit comfortably in the available memory (MAX_FUNC_FRACTION), its kernel is made in tiles of
as many examples as do (`_func_trace_kernel`'s `block`, recorded in the JSON as `func_block`).

Usage:
    python -m benchmarks.bench_first_kernel --cases mlp,cnn,resnet18_n4 --repeats 1
    python -m benchmarks.bench_first_kernel --cases resnet50_n8,bert_n8   # long
Writes benchmarks/results/first_kernel.md and benchmarks/results/first_kernel.json (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

CASES = {
    "mlp": "MLP 256-512-512-10, N=32",
    "cnn": "CNN 2x conv3x3(32), 3x16x16, N=16",
    "resnet18_n4": "ResNet-18, 3x32x32, N=4",
    "resnet18_n32": "ResNet-18, 3x32x32, N=32",
    "resnet50_n8": "ResNet-50, 3x64x64, N=8",
    "bert_n8": "BERT-base + 2-class CLS head, N=8 x 32 tokens",
}
DEFAULT_CASES = "mlp,cnn,resnet18_n4,resnet18_n32"
OUTPUTS = {"bert_n8": 2}  # O, the number of logits (10 elsewhere): sizes torch.func's Jacobians
MAX_FUNC_FRACTION = 0.6
"""torch.func is skipped where its two Jacobians (2·N·O·P floats) exceed this fraction of the
machine's available memory: on a shared machine the kernel's OOM killer might pick someone else."""

# ------------------------------------------------------------------------ worker (fresh process)


def _build(case: str) -> tuple[Any, Any, Any]:
    """(module in eval mode, x, x_new) — same weights and inputs in every process (fixed seeds)."""
    import torch

    from benchmarks import bench_torch

    torch.manual_seed(0)
    if case == "mlp":
        module, x = bench_torch.mlp()
    elif case == "cnn":
        module, x = bench_torch.cnn()
    elif case.startswith("resnet18_n"):
        module, _ = bench_torch.resnet18()
        x = torch.randn(int(case.split("_n")[1]), 3, 32, 32)
    elif case == "resnet50_n8":
        import torchvision

        module, x = torchvision.models.resnet50(num_classes=10), torch.randn(8, 3, 64, 64)
    elif case == "bert_n8":
        module, x = _bert(), torch.randint(0, 30522, (8, 32))
    else:
        raise ValueError(f"unknown case {case!r}; known: {sorted(CASES)}")
    torch.manual_seed(1)
    x_new = (torch.randint_like(x, 0, 30522) if not x.is_floating_point() else torch.randn_like(x))
    return module.eval(), x, x_new


def _bert() -> Any:
    """A BERT-base-sized Hugging Face BertModel (random init) with a 2-class head on the CLS token."""
    import torch
    from transformers import BertConfig, BertModel

    class BertClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(BertConfig(), add_pooling_layer=False)
            self.head = torch.nn.Linear(self.bert.config.hidden_size, 2)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.bert(input_ids=input_ids).last_hidden_state[:, 0])

    return BertClassifier()


def _func_trace_kernel(fnet_single: Callable, params: dict, x1: Any, x2: Any,
                       block: int | None = None) -> Any:
    """The tutorial's Jacobian contraction with compute='trace', averaged over the O outputs.

    `block`: where both sides' whole Jacobians do not fit, the kernel in (x1 block, x2 block) tiles of
    this many examples, each tile's two Jacobians made and contracted in turn (the upper triangle when
    x2 is x1, the lower one its transpose)."""
    import torch
    from torch.func import jacrev, vmap

    def jacobians(x: Any) -> list:
        return [j.flatten(2) for j in vmap(jacrev(fnet_single), (None, 0))(params, x).values()]

    def contract(jac1: list, jac2: list) -> Any:
        out = torch.stack([torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(jac1, jac2)]).sum(0)
        return out / jac1[0].shape[1]

    if block is None:
        return contract(jacobians(x1), jacobians(x2))
    same = x2 is x1
    tiles: dict = {}
    for i in range(0, x1.shape[0], block):
        jac1 = jacobians(x1[i:i + block])
        for j in range(i if same else 0, x2.shape[0], block):
            jac2 = jac1 if same and j == i else jacobians(x2[j:j + block])
            tiles[i, j] = contract(jac1, jac2)
            if same and j != i:
                tiles[j, i] = tiles[i, j].T
            del jac2
    starts1, starts2 = range(0, x1.shape[0], block), range(0, x2.shape[0], block)
    return torch.cat([torch.cat([tiles[i, j] for j in starts2], 1) for i in starts1], 0)


def _install_entk_probes() -> tuple[dict, dict]:
    """Wall time in entk's conversion and "auto"'s selection, and JAX's compile-phase durations."""
    import jax

    import entk.adapters
    import entk.algorithms.cost as cost
    import entk.algorithms.device as device
    from entk.adapters.torch import export

    phases: dict[str, Any] = {"convert_s": 0.0, "auto_select_s": 0.0, "calibrate_s": 0.0,
                              "export_s": 0.0, "chosen": [], "program_cache": []}
    jax_events: dict[str, float] = {}

    def wrap(owner: Any, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                out = inner(*args, **kwargs)
            finally:
                phases[key] += time.perf_counter() - start
            if key == "auto_select_s":
                phases["chosen"].append(str(getattr(out, "short_name", out)))
            if key == "export_s":  # (program, what the disk cache did)
                phases["program_cache"].append(out[1])
            return out

        setattr(owner, name, timed)

    wrap(entk.adapters, "to_model", "convert_s")
    wrap(cost, "select", "auto_select_s")
    wrap(device, "_measure", "calibrate_s")  # the cost model's micro-benchmark (cold cache only)
    wrap(export, "_cached_export", "export_s")  # capture, torch.export, or a stored program read and checked

    def on_duration(event: str, secs: float, **_: Any) -> None:
        jax_events[event] = jax_events.get(event, 0.0) + secs

    def on_event(event: str, **_: Any) -> None:
        if event.startswith("/jax/compilation_cache/cache_"):
            jax_events[event] = jax_events.get(event, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return phases, jax_events


def _func_block(case: str, x: Any, params: dict) -> int | None:
    """None where torch.func's two whole Jacobians (2·N·O·P floats) fit in MAX_FUNC_FRACTION of the
    available memory, else the most examples per side a tile of `_func_trace_kernel` may take."""
    per_example = OUTPUTS.get(case, 10) * sum(p.numel() for p in params.values()) * 4
    from benchmarks import bench_torch

    allowed = MAX_FUNC_FRACTION * bench_torch.available_bytes()
    if 2 * x.shape[0] * per_example <= allowed:
        return None
    block = int(allowed // (2 * per_example))
    if block < 1:
        raise MemoryError(f"skipped: one example's Jacobian needs ~{per_example / 2**30:.1f} GiB")
    return block


def worker(tool: str, case: str, kernel_path: str) -> dict:
    import resource

    def rss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    t0 = time.perf_counter()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np
    import torch

    import entk  # noqa: F401
    import entk.adapters.torch  # noqa: F401  (registers torch modules with entk.ntk)
    from benchmarks import bench_torch

    module, x, x_new = _build(case)
    probes = _install_entk_probes() if tool == "entk" else None
    if tool == "entk":
        def compute(inputs: Any) -> Any:
            return entk.ntk(module, inputs)
    else:
        params = {k: v.detach() for k, v in module.named_parameters()}
        block = _func_block(case, x, params)
        fnet_single = bench_torch.single_example_fn(module)

        def compute(inputs: Any) -> Any:
            return _func_trace_kernel(fnet_single, params, inputs, inputs, block)

    setup_s = time.perf_counter() - t0
    rss_before = rss_mib()
    times, kernels = [], []
    for inputs in (x, x_new):
        start = time.perf_counter()
        k = compute(inputs)
        float(k.sum())  # materialised
        times.append(time.perf_counter() - start)
        kernels.append(k.detach().double().numpy())
    np.save(kernel_path, np.stack(kernels))
    peak_rss = rss_mib()  # before the steady-state comparison below compiles a second program
    out = {"tool": tool, "case": case, "first_s": times[0], "second_s": times[1],
           "setup_s": setup_s, "rss_before_mib": rss_before, "peak_rss_mib": peak_rss,
           "n_params": sum(p.numel() for p in module.parameters()),
           "input_shape": list(x.shape), "kernel_shape": list(kernels[0].shape),
           "torch_threads": torch.get_num_threads()}
    if tool == "func":
        out["func_block"] = block
    if probes is not None:  # copied now: the steady-state comparison below compiles again
        phases, jax_events = probes
        out["entk_phases"] = json.loads(json.dumps(phases))
        out["jax_events"] = {k: v for k, v in sorted(jax_events.items())}
    if tool == "entk":
        out["steady"] = _steady_state(module, x, x_new)
    return out


def _steady_state(module: Any, x: Any, x_new: Any) -> dict:
    """The one-liner against the JAX user's form on the same model and settings, steady state:
    `entk.ntk(module, x_new)` (torch tensors in and out, weights re-read, staleness checked) vs
    `jax.jit(entk.empirical_ntk_fn(entk.from_torch(module, x), vmap_axes="auto"))` on JAX arrays,
    after one warm-up call each; alternating rounds, median of each."""
    import jax

    import entk

    model = entk.from_torch(module, x)
    jitted = jax.jit(entk.empirical_ntk_fn(model, vmap_axes="auto"))
    jx = jax.numpy.asarray(x_new.numpy())
    calls = {"one_liner": lambda: entk.ntk(module, x_new),
             "jit_empirical_ntk_fn": lambda: jax.block_until_ready(jitted(jx, None, model.params))}
    for call in calls.values():
        call()  # warm-up (the jitted form compiles here)
    times: dict[str, list[float]] = {name: [] for name in calls}
    rounds = 3
    while len(times["one_liner"]) < rounds:
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        if len(times["one_liner"]) == 1:  # ms-scale medians are noisy: more rounds where cheap
            slowest = max(t[0] for t in times.values())
            rounds = 51 if slowest < 0.01 else 7 if slowest < 0.5 else 3
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    return {**medians, "rounds": rounds,
            "ratio": medians["one_liner"] / medians["jit_empirical_ntk_fn"]}


# ------------------------------------------------------------------------------ parent (driver)


def run_worker(tool: str, case: str, kernel_path: str, env_changes: dict, timeout: float) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    for var in ("JAX_COMPILATION_CACHE_DIR", "ENTK_COMPILATION_CACHE"):
        env.pop(var, None)
    env.update(env_changes)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.bench_first_kernel", "--worker", tool,
           "--cases", case, "--kernel-path", kernel_path]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "case": case, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"tool": tool, "case": case, "error": f"exit {proc.returncode}: {tail}"}
    out = json.loads(lines[-1])
    out["process_wall_s"] = wall
    return out


def rel_err(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.abs(a - b).max() / np.abs(b).max())


def bench_case(case: str, repeats: int, timeout: float, workdir: str) -> dict:
    import numpy as np

    runs: dict[str, list[dict]] = {"func": [], "entk_cold": [], "entk_warm": []}
    errors: dict[str, list[float]] = {"first": [], "second": []}
    for r in range(repeats):
        cache = tempfile.mkdtemp(prefix=f"entk-cache-{case}-", dir=workdir)
        paths = {k: os.path.join(workdir, f"{case}-{k}-{r}.npy") for k in runs}
        jobs = [("func", "func", {}), ("entk_cold", "entk", {"ENTK_CACHE_DIR": cache}),
                ("entk_warm", "entk", {"ENTK_CACHE_DIR": cache})]
        for key, tool, env in jobs:
            res = run_worker(tool, case, paths[key], env, timeout)
            runs[key].append(res)
            if "error" in res:
                print(f"  {case} {key}: ERROR {res['error'][-600:]}", flush=True)
            else:
                extra = ""
                if tool == "entk":
                    ph = res["entk_phases"]
                    ev = res["jax_events"]
                    extra = (f"  [convert {ph['convert_s']:.2f} s, auto select "
                             f"{ph['auto_select_s']:.2f} s -> {ph['chosen']} (calibration "
                             f"{ph['calibrate_s']:.2f} s), XLA backend compile "
                             f"{ev.get('/jax/core/compile/backend_compile_duration', 0.0):.2f} s, "
                             f"cache hits {ev.get('/jax/compilation_cache/cache_hits', 0)} "
                             f"misses {ev.get('/jax/compilation_cache/cache_misses', 0)}]")
                print(f"  {case} {key:<9} first {res['first_s']:8.3f} s  second "
                      f"{res['second_s']:8.4f} s  peak RSS {res['peak_rss_mib']:7.0f} MiB"
                      f"{extra}", flush=True)
        if all(os.path.exists(paths[k]) for k in ("func", "entk_cold")):
            kf, ke = np.load(paths["func"]), np.load(paths["entk_cold"])
            errors["first"].append(rel_err(ke[0], kf[0]))
            errors["second"].append(rel_err(ke[1], kf[1]))
            print(f"  {case} kernel agreement entk vs torch.func: first {errors['first'][-1]:.1e}, "
                  f"second {errors['second'][-1]:.1e}", flush=True)

    def med(key: str, field: str) -> float | None:
        vals = [r[field] for r in runs[key] if "error" not in r]
        return statistics.median(vals) if vals else None

    summary = {f"{k}_{f}": med(k, f) for k in runs
               for f in ("first_s", "second_s", "peak_rss_mib", "rss_before_mib")}
    ok = next((r for rs in runs.values() for r in rs if "error" not in r), {})
    return {"case": case, "description": CASES[case], "n_params": ok.get("n_params"),
            "input_shape": ok.get("input_shape"), "kernel_shape": ok.get("kernel_shape"),
            "summary": summary, "max_rel_err": {k: max(v) if v else None for k, v in errors.items()},
            "runs": runs}


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2g}x"


def markdown(results: list[dict], command: str, repeats: int) -> str:
    import torch

    lines = [
        "# First kernel in a fresh process: entk vs torch.func (tutorial Jacobian contraction)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch "
        f"{torch.__version__}, CPU, float32, eval mode. Median of {repeats} run(s) per cell; each "
        "run is a fresh process per tool.  ",
        "first: wall time of the first call, model and inputs built, imports done (entk: "
        "`entk.ntk(module, x)` with its defaults = capture (or torch.export) + translation + tracing + auto's "
        "decision + XLA compile + run; torch.func: vmap(jacrev) per-example Jacobians for x1 and "
        "x2 = x, einsum 'Naf,Maf->NM', / O; in tiles of examples where the whole Jacobians do not fit, "
        "see the notes). second: a second call on new inputs of the same shape. "
        "entk cold: fresh empty ENTK_CACHE_DIR (no compilation cache, no stored torch program, no "
        "cost-model calibration); "
        "entk warm: a second process on the same ENTK_CACHE_DIR. Ratios: entk time / torch.func "
        "time (< 1: entk faster). Peak RSS: ru_maxrss of the process, imports included (both "
        "processes import torch, JAX and entk). Agreement: max |Θ_entk − Θ_func| / max |Θ_func|, "
        "first / second inputs.",
        "",
        "| case | params | torch.func first (s) | torch.func second (s) | entk cold first (s) "
        "| entk cold second (s) | entk warm-cache first (s) | entk/func first: cold / warm "
        "| entk/func second | peak RSS MiB func / entk cold / entk warm | RSS before first call MiB "
        "| agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        e = r["max_rel_err"]
        lines.append(
            f"| {r['description']} | {_fmt(r['n_params'], ',') if r['n_params'] else '—'} | "
            f"{_fmt(s['func_first_s'])} | {_fmt(s['func_second_s'])} | "
            f"{_fmt(s['entk_cold_first_s'])} | {_fmt(s['entk_cold_second_s'])} | "
            f"{_fmt(s['entk_warm_first_s'])} | "
            f"{_ratio(s['entk_cold_first_s'], s['func_first_s'])} / "
            f"{_ratio(s['entk_warm_first_s'], s['func_first_s'])} | "
            f"{_ratio(s['entk_cold_second_s'], s['func_second_s'])} | "
            f"{_fmt(s['func_peak_rss_mib'], '.0f')} / {_fmt(s['entk_cold_peak_rss_mib'], '.0f')} / "
            f"{_fmt(s['entk_warm_peak_rss_mib'], '.0f')} | {_fmt(s['func_rss_before_mib'], '.0f')} | "
            f"{_fmt(e['first'], '.1e')} / {_fmt(e['second'], '.1e')} |")
    lines += ["", "## Where entk's first call goes (first run of each case)", "",
              "| case | cache | first (s) | convert (torch → JAX) (s) "
              "| of which capture, export or stored program (s) | program | auto select (s) "
              "| of which calibration (s) "
              "| XLA backend compile (s) | JAX trace (s) | XLA cache hits / misses | strategy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for key in ("entk_cold", "entk_warm"):
            run = r["runs"][key][0] if r["runs"][key] else {"error": "not run"}
            if "error" in run:
                lines.append(f"| {r['case']} | {key[5:]} | error: "
                             f"{run['error'].splitlines()[-1][:120] if run['error'] else ''} "
                             "| | | | | | | | | |")
                continue
            ph, ev = run["entk_phases"], run["jax_events"]
            lines.append(
                f"| {r['case']} | {key[5:]} | {run['first_s']:.3g} | {ph['convert_s']:.3g} | "
                f"{ph.get('export_s', 0.0):.3g} | {', '.join(ph.get('program_cache', [])) or '—'} | "
                f"{ph['auto_select_s']:.3g} | {ph['calibrate_s']:.3g} | "
                f"{ev.get('/jax/core/compile/backend_compile_duration', 0.0):.3g} | "
                f"{ev.get('/jax/core/compile/jaxpr_trace_duration', 0.0):.3g} | "
                f"{ev.get('/jax/compilation_cache/cache_hits', 0)} / "
                f"{ev.get('/jax/compilation_cache/cache_misses', 0)} | "
                f"{', '.join(sorted(set(ph['chosen'])))} |")
    lines += ["", "convert and auto select are wall times of `entk.adapters.to_model` and "
              "`entk.algorithms.cost.select`; export or stored program: wall time of "
              "`entk.adapters.torch.export._cached_export` (dispatch capture, torch.export, or reading a "
              "program a previous process stored and checking it against PyTorch; program says which, "
              "per conversion: captured / stored / hit, see docs/guide/caches.md); select includes lowering the candidates, the cost "
              "model's calibration when its cache is cold, and any close-call timing); XLA backend "
              "compile and JAX trace are JAX's own monitoring durations summed over the process (they "
              "overlap select's). Both are measured over both calls.", ""]
    lines += ["## Steady state: the one-liner vs the jitted kernel function", "",
              "In the cold entk process, after its two calls: `entk.ntk(module, x_new)` (torch "
              "tensors in and out, weights re-read, staleness checked at every call) against "
              "`jax.jit(entk.empirical_ntk_fn(entk.from_torch(module, x), vmap_axes=\"auto\"))` on "
              "JAX arrays; one warm-up call each, then alternating rounds, median (target: ratio "
              "≤ 1.2).", "",
              "| case | one-liner (s) | jit(empirical_ntk_fn) (s) | ratio | rounds |",
              "|---|---|---|---|---|"]
    for r in results:
        run = r["runs"]["entk_cold"][0] if r["runs"]["entk_cold"] else {}
        st = run.get("steady")
        if st:
            lines.append(f"| {r['case']} | {st['one_liner']:.3g} | {st['jit_empirical_ntk_fn']:.3g} "
                         f"| {st['ratio']:.2f} | {st['rounds']} |")
    lines.append("")
    for r in results:
        for key, rs in r["runs"].items():
            for run in rs:
                if "error" in run:
                    lines.append(f"- {r['case']} {key}: error `{run['error'].splitlines()[-1][:200]}`")
        blocks = {run.get("func_block") for run in r["runs"].get("func", []) if "error" not in run}
        if blocks - {None}:
            lines.append(f"- {r['case']} func: both whole Jacobians do not fit in "
                         f"{MAX_FUNC_FRACTION:.0%} of the available memory; the kernel is made in "
                         f"tiles of {', '.join(str(b) for b in sorted(blocks - {None}))} examples per "
                         f"side (each tile's two Jacobians made and contracted, the upper triangle "
                         f"only).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES,
                        help=f"comma-separated, from {','.join(CASES)} (default {DEFAULT_CASES})")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per cell")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--out", default=os.path.join(RESULTS, "first_kernel"),
                        help="path prefix of the .md and .json results")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the results of other cases already in --out's JSON (e.g. "
                             "the long resnet50_n8,bert_n8 measured in a separate run)")
    parser.add_argument("--worker", choices=("entk", "func"), help=argparse.SUPPRESS)
    parser.add_argument("--kernel-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.cases, args.kernel_path)), flush=True)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {list(CASES)}")
    command = "python -m benchmarks.bench_first_kernel " + " ".join(sys.argv[1:])
    commands, kept = [command], {}
    if args.keep_others and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            earlier = json.load(f)
        kept = {r["case"]: r for r in earlier["results"] if r["case"] not in cases}
        commands = [c for c in earlier.get("commands", [earlier["command"]]) if c != command] + commands
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="entk-first-kernel-") as workdir:
        for case in cases:
            print(f"== {case}: {CASES[case]}", flush=True)
            results.append(bench_case(case, args.repeats, args.timeout, workdir))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            done = {r["case"]: r for r in results} | kept
            ordered = [done[c] for c in CASES if c in done]
            table = markdown(ordered, "` and `".join(commands), args.repeats)
            with open(args.out + ".md", "w") as f:
                f.write(table)
            with open(args.out + ".json", "w") as f:
                json.dump({"command": command, "commands": commands, "repeats": args.repeats,
                           "results": ordered}, f, indent=1)
    print("\n" + table)


if __name__ == "__main__":
    main()
