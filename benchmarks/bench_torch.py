"""entk versus the torch.func tutorial's two eNTK methods, on PyTorch models, in one process.

Tools (all float32, CPU, full kernel Θ of shape (N, N, O, O), trace_axes=()):
- entk: `entk.ntk(module, x, trace_axes=(), vmap_axes=0)` (implementation="auto"). The module is
  exported to JAX and the kernel function compiled on the warm-up call (timed apart, excluded);
  the timed calls are steady state and include the torch → JAX → torch tensor conversions.
- torch.func JC: Jacobian contraction, `vmap(jacrev(fnet_single), (None, 0))` for x1 and x2, then an
  einsum over each parameter's flattened Jacobians, summed over parameters.
- torch.func NTVP: NTK-vector products, per pair of examples `vjp` of f(·, x1) on each one-hot
  output basis vector (vmapped), pushed through `jvp` of f(·, x2); vmapped over both example axes.
Both torch.func methods are written here from the documented torch.func APIs (functional_call,
vmap, jacrev, vjp, jvp), following the structure of the "Neural Tangent Kernels" tutorial; like the
tutorial they are given x1 = x2 = x and compute both Jacobians / all N×N pairs.

Models: `mlp` 256-512-512-10 ReLU, N=32; `cnn` two 3×3 convs (32 channels, padding 1) + ReLU on
3×16×16 inputs, flatten, linear to O=10, N=16; `resnet18` torchvision ResNet-18 (random init, eval
mode, num_classes=10) on 3×32×32 inputs, N=4; `resnet18_n32` the same at N=32. There torch.func's
JC needs its two Jacobians (2·N·O·P floats, ~27 GiB) at once and is skipped where they would not
fit in MAX_JC_FRACTION of the available memory; its NTVP, vmapped over all N×N pairs at once, would
hold the activations of N·N·O examples, so over x1 it runs in chunks (`vmap(..., chunk_size=1)`,
torch.func's own memory option: N vmaps over N·O pairs each).

Protocol: one warm-up call per tool, then `--repeats` rounds alternating the tools (entk, JC, NTVP,
entk, JC, NTVP, ...); the median per tool is reported. A tool whose warm-up call takes more than
`--slow-s` seconds is not repeated: its warm-up time is reported as a single measurement (marked
"1 run"). The kernels are checked against each other (max |Θ_a − Θ_b| / max |Θ_b|).

Usage:
    nice -n 5 python benchmarks/bench_torch.py                     # mlp, cnn, resnet18
    python benchmarks/bench_torch.py --models resnet18_n32 --repeats 1   # long
    python benchmarks/bench_torch.py --models mlp cnn --repeats 5
Writes benchmarks/results/torch.md and benchmarks/results/torch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call, jacrev, jvp, vjp, vmap  # noqa: E402

import entk  # noqa: E402
import entk.adapters.torch  # noqa: E402,F401  (registers torch modules with entk.ntk)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGETS = {"mlp": 50.0, "cnn": 2.0, "resnet18": 10.0, "resnet18_n32": 10.0}  # issue 17's targets
MAX_JC_FRACTION = 0.6
"""torch.func JC is skipped where its two Jacobians exceed this fraction of the available memory."""
NTVP_X1_CHUNK = {"resnet18_n32": 1}  # torch.func NTVP's outer vmap in chunks (memory)


# ------------------------------------------------------------------------------------------ models


def mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    widths = (256, 512, 512, 10)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers), torch.randn(32, 256)


def cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 16 * 16, 10))
    return module, torch.randn(16, 3, 16, 16)


def resnet18() -> tuple[torch.nn.Module, torch.Tensor]:
    import torchvision

    return torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)


def resnet18_n32() -> tuple[torch.nn.Module, torch.Tensor]:
    module, _ = resnet18()
    return module, torch.randn(32, 3, 32, 32)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]] = {
    "mlp": mlp, "cnn": cnn, "resnet18": resnet18, "resnet18_n32": resnet18_n32}


# ------------------------------------------------------------------------------- torch.func methods


def single_example_fn(module: torch.nn.Module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """`f(params, x)` for ONE example x (no batch axis) → its output vector (O,)."""
    buffers = dict(module.named_buffers())

    def fnet_single(params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(module, (params, buffers), (x.unsqueeze(0),)).squeeze(0)

    return fnet_single


def func_jacobian_contraction(fnet_single: Callable, params: dict, x1: torch.Tensor,
                              x2: torch.Tensor) -> torch.Tensor:
    """Θ (N1, N2, O, O): per-example Jacobians by vmap(jacrev), contracted parameter by parameter."""
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jac1, jac2)]).sum(0)


def func_ntk_vector_products(fnet_single: Callable, params: dict, x1: torch.Tensor,
                             x2: torch.Tensor, x1_chunk: int | None = None) -> torch.Tensor:
    """Θ (N1, N2, O, O): for each pair, J(x2) J(x1)ᵀ e_k for every one-hot e_k via vjp then jvp.
    `x1_chunk`: the outer vmap (over x1) in chunks of this many examples (None: all at once)."""

    def pair_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        output, vjp_fn = vjp(lambda p: fnet_single(p, a), params)

        def column(vec: torch.Tensor) -> torch.Tensor:
            (cotangent,) = vjp_fn(vec)
            return jvp(lambda p: fnet_single(p, b), (params,), (cotangent,))[1]

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(column)(basis)  # (O of a, O of b)

    return vmap(vmap(pair_kernel, (None, 0)), (0, None), chunk_size=x1_chunk)(x1, x2)


# --------------------------------------------------------------------------------------- harness


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    float(out.sum())  # make sure the result is materialised
    return time.perf_counter() - start, out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).abs().max() / b64.abs().max())


def bench_model(name: str, repeats: int, slow_s: float) -> dict:
    torch.manual_seed(0)
    module, x = MODELS[name]()
    module = module.eval()
    params = {k: v.detach() for k, v in module.named_parameters()}
    fnet_single = single_example_fn(module)
    n_params = sum(p.numel() for p in params.values())
    print(f"\n== {name}: {n_params} parameters, x {tuple(x.shape)}", flush=True)

    tools: dict[str, Callable[[], torch.Tensor]] = {
        "entk": lambda: entk.ntk(module, x, trace_axes=(), vmap_axes=0),
        "func_jc": lambda: func_jacobian_contraction(fnet_single, params, x, x),
        "func_ntvp": lambda: func_ntk_vector_products(fnet_single, params, x, x,
                                                      NTVP_X1_CHUNK.get(name)),
    }
    skipped = {}
    jacobians = 2 * x.shape[0] * 10 * n_params * 4  # two (N, O=10, P) float32 Jacobians
    if jacobians > MAX_JC_FRACTION * available_bytes():
        skipped["func_jc"] = (f"needs ~{jacobians / 2**30:.1f} GiB for its Jacobians, over "
                              f"{MAX_JC_FRACTION:.0%} of the {available_bytes() / 2**30:.1f} GiB "
                              f"available")
        del tools["func_jc"]
        print(f"  func_jc skipped: {skipped['func_jc']}", flush=True)
    warmup, kernels, times = {}, {}, {}
    for tool, fn in tools.items():
        warmup[tool], kernels[tool] = timed(fn)
        print(f"  warm-up {tool:<10} {warmup[tool]:8.3f} s  kernel {tuple(kernels[tool].shape)}",
              flush=True)
        times[tool] = []
    single = {tool for tool, t in warmup.items() if tool != "entk" and t > slow_s}
    for tool in single:
        times[tool] = [warmup[tool]]
    for _ in range(repeats):
        for tool, fn in tools.items():
            if tool not in single:
                times[tool].append(timed(fn)[0])
    medians = {tool: statistics.median(ts) for tool, ts in times.items()}
    faster = min((t for t in ("func_jc", "func_ntvp") if t in medians), key=medians.get)
    speedup = medians[faster] / medians["entk"]
    pairs = {"entk_vs_func_jc": ("entk", "func_jc"), "entk_vs_func_ntvp": ("entk", "func_ntvp"),
             "func_ntvp_vs_func_jc": ("func_ntvp", "func_jc")}
    diffs = {k: rel_diff(kernels[a], kernels[b]) if b in kernels else None
             for k, (a, b) in pairs.items()}
    for tool in tools:
        print(f"  {tool:<10} median {medians[tool]:9.4f} s  runs {[round(t, 4) for t in times[tool]]}")
    print(f"  speed-up of entk over {faster}: {speedup:.1f}x (target {TARGETS[name]}x)")
    print("  max relative differences: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()
                                                      if v is not None), flush=True)
    return {"model": name, "n_params": n_params, "input_shape": list(x.shape),
            "entk_compile_s": warmup["entk"] - medians["entk"],
            "warmup_s": warmup, "times_s": times, "median_s": medians,
            "single_run": sorted(single), "skipped": skipped, "faster_func_method": faster,
            "speedup_entk_over_faster_func": speedup, "target": TARGETS[name],
            "target_met": speedup >= TARGETS[name], "max_rel_diff": diffs}


def markdown(results: list[dict], command: str, repeats: int) -> str:
    lines = [
        "# entk vs torch.func (tutorial methods), PyTorch models, CPU, float32, full kernel",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared, loaded), "
        f"torch {torch.__version__}, jax {jax.__version__}, torch threads {torch.get_num_threads()}.  ",
        f"Protocol: one warm-up call per tool (entk's export + compile happen there, excluded), then "
        f"{repeats} alternating rounds (entk, JC, NTVP, ...), median. entk: "
        f"`entk.ntk(module, x, trace_axes=(), vmap_axes=0)`, implementation='auto'.",
        "",
        "| model | params | N | entk (s) | entk compile (s) | torch.func JC (s) | torch.func NTVP (s) "
        "| faster torch.func / entk | target | met | max rel. diff entk vs JC / NTVP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median_s"]

        def cell(tool: str) -> str:
            if tool not in m:
                return "skipped (memory)"
            note = " (1 run)" if tool in r["single_run"] else ""
            chunk = " (x1 chunks)" if tool == "func_ntvp" and NTVP_X1_CHUNK.get(r["model"]) else ""
            return f"{m[tool]:.4g}{note}{chunk}"

        def diff(key: str) -> str:
            value = r["max_rel_diff"][key]
            return "—" if value is None else f"{value:.1e}"

        lines.append(
            f"| {r['model']} | {r['n_params']:,} | {r['input_shape'][0]} | {cell('entk')} | "
            f"{r['entk_compile_s']:.3g} | {cell('func_jc')} | {cell('func_ntvp')} | "
            f"{r['speedup_entk_over_faster_func']:.1f}x (vs {r['faster_func_method']}) | "
            f"{r['target']}x | {'yes' if r['target_met'] else 'no'} | "
            f"{diff('entk_vs_func_jc')} / {diff('entk_vs_func_ntvp')} |")
    lines += ["", "(1 run): the tool's warm-up call took longer than the --slow-s threshold, so it "
              "was measured once (its warm-up call) instead of repeated. skipped (memory): "
              "torch.func JC's two Jacobians would not fit in the available memory. (x1 chunks): "
              "torch.func NTVP's outer vmap run with `chunk_size=1` (memory).", ""]
    for r in results:
        for tool, why in r.get("skipped", {}).items():
            lines.append(f"- {r['model']} {tool}: {why}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "resnet18"], choices=list(MODELS),
                        help="resnet18_n32 is long (torch.func NTVP ~minutes): ask for it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-s", type=float, default=180.0,
                        help="torch.func methods slower than this on warm-up are measured once")
    parser.add_argument("--out", default=os.path.join(RESULTS, "torch"),
                        help="path prefix of the .md and .json results")
    args = parser.parse_args()
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])

    results = []
    for name in args.models:
        results.append(bench_model(name, args.repeats, args.slow_s))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        table = markdown(results, command, args.repeats)
        with open(args.out + ".md", "w") as f:
            f.write(table)
        with open(args.out + ".json", "w") as f:
            json.dump({"command": command, "repeats": args.repeats, "results": results}, f, indent=1)
    print("\n" + table)


if __name__ == "__main__":
    main()
