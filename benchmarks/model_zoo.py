"""Model-zoo sweep: which real models export to JAX, and do outputs and eNTKs match PyTorch?

Covers every torchvision classification, segmentation and video model, ~45 timm architectures and
~30 Hugging Face configs (random init, tiny sizes: nothing is downloaded; which models and how each
is built: `benchmarks/model_zoo_models.py`). For each model:

- export: does `entk.from_torch(mode="export")` succeed? If not, why (the untranslated ATen ops
  and the module paths they sit in, or the `torch.export` failure): that model falls back to the
  bridge in `mode="auto"`;
- out_err: max |output(JAX) - output(torch)| / max |output(torch)| (float32);
- ntk_err: the eNTK of the exported model vs the bridge (`mode="bridge"`, torch.func), float32,
  max |Θ_export - Θ_bridge| / max |Θ_bridge|; where that exceeds the tolerance, both float32 kernels
  are also compared with PyTorch's float64 eNTK (ntk_err_f64, ntk_bridge_err_f64), which then decides;
- times: conversion, first call (trace + compile + run), first eNTK call of each mode (compiled at
  XLA's lowest backend optimization level, as compile time dominates on a shared CPU: these are
  not the times of a default `jax.jit`).

Every model is wrapped so its traced output is small: `y[:, :4] + y.mean(1)` of the flattened
output `y` (N, -1), so the eNTK is `(N, N)` after tracing the 4 outputs, with N = 2. Models with more
than `--max-trainable` parameters are differentiated w.r.t. a spread of parameter tensors (first,
last and every k-th) within that budget, the rest frozen, to keep Jacobians in memory.

Resumable: results go to a JSON file (one entry per model, rewritten after each model). Models run
in a worker subprocess, one after the other; the parent restarts the worker after a crash or a
timeout (that model is recorded as failed) and skips models already done, so the sweep can be
interrupted and rerun.

    python -m benchmarks.model_zoo --stage export          # quick pass: export + outputs
    python -m benchmarks.model_zoo --stage ntk             # eNTK export vs bridge
    python -m benchmarks.model_zoo --report                # benchmarks/results/zoo.md from zoo.json
    python -m benchmarks.model_zoo --only 'convnext|swin' --redo   # re-run some models
    python -m benchmarks.model_zoo --only '^tv' --out /tmp/tv.json &      # parallel sweeps ...
    python -m benchmarks.model_zoo --merge /tmp/tv.json /tmp/other.json    # ... merged into zoo.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import selectors
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

from benchmarks.model_zoo_models import K, N, all_specs, build, limit_trainable

RESULTS = os.path.join(os.path.dirname(__file__), "results")
TOL = 1e-4


# ---------------------------------------------------------------- measuring one model


def _rel(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compiled(fn: Callable, *args: Any) -> Any:
    """`jit(fn)(*args)` compiled at XLA's lowest backend optimization level: on a CPU shared by
    many jobs, compiling the larger graphs (not running them) is what takes the time."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return jax.block_until_ready(compiled(*args))


def measure(name: str, spec: dict, stage: str, max_trainable: int, implementation: str) -> dict:
    import jax
    import numpy as np
    import torch

    import entk
    from entk.adapters.torch import export

    entry: dict = {"family": spec["family"], "source": name.split("/")[0]}
    t = time.perf_counter()
    module, x = build(name, spec)
    entry["build_s"] = round(time.perf_counter() - t, 2)
    entry["params"] = sum(p.numel() for p in module.parameters())
    entry["input"] = list(x.shape)
    with torch.no_grad():
        reference = module(x).numpy()
    xj = jax.numpy.asarray(x.numpy())
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = entk.from_torch(module, x, mode="export")
        entry["mode"] = "export"
    except export.UnsupportedOpsError as e:
        entry.update(mode="bridge", reason="untranslated ops", where={k: list(v) for k, v in e.where.items()})
    except (export.ExportError, export.TranslationError) as e:
        entry.update(mode="bridge", reason=f"{type(e).__name__}: {str(e).split(chr(10) + 'To use')[0][:600]}")
    entry["convert_s"] = round(time.perf_counter() - t, 2)
    if entry["mode"] != "export":
        return entry
    t = time.perf_counter()
    out = _compiled(model.apply_with_state, model.params, model.state, xj)
    entry["first_call_s"] = round(time.perf_counter() - t, 2)
    entry["out_err"] = _rel(out, reference)
    entry["out_max"] = float(np.max(np.abs(reference)))  # an all-zero output would prove nothing
    if stage == "export":
        return entry
    entry["trainable"] = limit_trainable(module, max_trainable)
    kernels = _kernels(module, x, xj, implementation, entry)
    entry["ntk_impl"] = implementation
    entry["ntk_err"] = _rel(kernels["export"], kernels["bridge"])
    if entry["ntk_err"] > TOL:  # which of the two float32 kernels is off? PyTorch's float64 decides
        reference = (_autograd_kernel(module.double(), x.double()) if entry.get("ntk_reference")
                     else _kernel_float64(module, x, "bridge"))
        entry["ntk_err_f64"] = _rel(kernels["export"], reference)
        entry["ntk_bridge_err_f64"] = _rel(kernels["bridge"], reference)
        if entry["ntk_err_f64"] > TOL:  # float32 itself may be the limit: the export in float64
            entry["ntk_export64_err_f64"] = _rel(_kernel_float64(module, x, "export"), reference)
    elif entry["ntk_err"] == 0.0:
        # Bit-for-bit agreement usually means the kernel is dominated by the head's bias (whose
        # Jacobian both paths compute exactly) over a body with tiny outputs at random init: check
        # again without the trainable vectors (biases, norm scales) of the last layers.
        entry["ntk_err_body"] = _rel(*_kernels(_freeze_tail_vectors(module), x, xj, implementation,
                                               {}).values())
    return entry


def _kernels(module: Any, x: Any, xj: Any, implementation: str, entry: dict) -> dict:
    """`{"export": Θ, "bridge": Θ}` (float32, traced, `(N, N)`), timing each into `entry`."""
    import numpy as np

    import entk
    from entk.adapters.torch import autograd_semantics

    kernels = {}
    for mode in ("export", "bridge"):
        t = time.perf_counter()
        try:
            converted = entk.from_torch(module, x, mode=mode)
        except autograd_semantics.OldStyleAutogradFunctionError:  # torch.func cannot run it
            kernels[mode] = _autograd_kernel(module, x)
            entry["ntk_reference"] = "torch.autograd"
            entry[f"ntk_{mode}_s"] = round(time.perf_counter() - t, 2)
            continue
        impl = implementation if mode == "export" else "jc"
        t = time.perf_counter()

        def kernel(p: Any, state: Any, a: Any, converted: Any = converted, impl: str = impl) -> Any:
            # the state (frozen weights, buffers) as an argument, not constants baked into the
            # program: XLA's compile of a VGG's ~500 MB of constants needs many GB
            fn = entk.empirical_ntk_fn(converted.replace(state=state), implementation=impl,
                                       vmap_axes=None)
            return fn(a, None, p)

        kernels[mode] = np.asarray(_compiled(kernel, converted.params, converted.state, xj))
        entry[f"ntk_{mode}_s"] = round(time.perf_counter() - t, 2)
    return kernels


def _freeze_tail_vectors(module: Any) -> Any:
    """Freezes the trainable 1-D parameters after the last trainable matrix / kernel (the head's
    bias, a final norm's scale and shift); returns the module."""
    params = [p for p in module.parameters() if p.requires_grad]
    last = max((i for i, p in enumerate(params) if p.ndim >= 2), default=-1)
    for p in params[last + 1:]:
        p.requires_grad_(False)
    return module


def _autograd_kernel(module: Any, x: Any) -> Any:
    """The traced eNTK `(N, N)` from eager `torch.autograd` (one backward pass per output entry):
    the reference for models torch.func cannot transform (old-style autograd Functions)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    out = module(x)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[i, k], params, retain_graph=True)])
            for i in range(out.shape[0]) for k in range(out.shape[1])]
    jac = torch.stack(rows).reshape(out.shape[0], out.shape[1], -1).double()
    return (torch.einsum("ikp,jkp->ij", jac, jac) / out.shape[1]).detach().numpy()


def _kernel_float64(module: Any, x: Any, mode: str) -> Any:
    """The eNTK in float64 (`mode="bridge"`: PyTorch's own, the reference when the float32 export
    and bridge disagree; `"export"`: the translation's), the same trainable subset. The module is
    left in float64."""
    import jax
    import numpy as np

    import entk

    jax.config.update("jax_enable_x64", True)
    try:
        module.double()
        x64 = x.double()
        converted = entk.from_torch(module, x64, mode=mode)
        kernel_fn = entk.empirical_ntk_fn(converted, implementation="jc", vmap_axes=None)
        return np.asarray(kernel_fn(jax.numpy.asarray(x64.numpy()), None, converted.params))
    finally:
        jax.config.update("jax_enable_x64", False)


# ---------------------------------------------------------------- results file, worker, parent


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _done(entry: dict | None, stage: str) -> bool:
    if not entry:
        return False
    if "error" in entry or entry.get("mode") in ("bridge", "refused"):
        return True
    return "out_err" in entry if stage == "export" else "ntk_err" in entry


def worker(args: argparse.Namespace) -> None:
    specs = all_specs()
    for name in args.names:
        print(f"START {name}", flush=True)
        try:
            entry = measure(name, specs[name], args.stage, args.max_trainable, args.implementation)
        except Exception as e:  # noqa: BLE001 - one model's failure is a result, not the sweep's end
            entry = {"family": specs[name]["family"], "source": name.split("/")[0],
                     "error": f"{type(e).__name__}: {str(e)[:400]}"}
        results = load(args.out)
        results[name] = entry  # each stage measures everything it reports
        save(args.out, results)
        print(f"DONE {name} {json.dumps(entry, default=str)[:300]}", flush=True)


def parent(args: argparse.Namespace) -> None:
    specs = all_specs()
    names = [n for n in specs if re.search(args.only, n)] if args.only else list(specs)
    results = load(args.out)
    # --redo runs the selected models again; their earlier results stay until each is replaced, so
    # an interrupted redo loses nothing
    todo = [n for n in names if args.redo or not _done(results.get(n), args.stage)]
    print(f"{len(todo)} of {len(names)} models to run (stage {args.stage})", flush=True)
    while todo:
        cmd = [sys.executable, "-m", "benchmarks.model_zoo", "--worker", "--stage", args.stage,
               "--out", args.out, "--max-trainable", str(args.max_trainable),
               "--implementation", args.implementation, "--names", *todo]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        current, started = None, time.time()
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        timed_out = False
        while True:
            if not selector.select(timeout=5):
                if current and time.time() - started > args.timeout:
                    os.killpg(proc.pid, 9)
                    timed_out = True
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            print(line.rstrip(), flush=True)
            if line.startswith("START "):
                current, started = line.split()[1], time.time()
            elif line.startswith("DONE "):
                todo.remove(line.split()[1])
                current = None
        proc.wait()
        if current is not None:  # died or hung on `current`
            results = load(args.out)
            why = f"timeout after {args.timeout} s" if timed_out else f"worker died (exit {proc.returncode})"
            results[current] = {**results.get(current, {}), "family": specs[current]["family"],
                                "source": current.split("/")[0], "error": why}
            save(args.out, results)
            print(f"FAILED {current}: {why}", flush=True)
            todo.remove(current)
        elif proc.returncode != 0:
            break
    report(args.out)


# ---------------------------------------------------------------- report


# What the sweep found out about a model's failure, shown next to it in zoo.md.
NOTES = {
}


def _ntk_error(e: dict) -> float:
    """The export's eNTK error against the reference: the float32 bridge; where the two float32
    kernels disagree, PyTorch's float64 eNTK (the more accurate reference); and where float32 itself
    is the limit (the export's float32 kernel off from it, PyTorch's as well), the export computed in
    float64 against it, which checks the translation rather than float32 arithmetic."""
    return min(e.get("ntk_err_f64", e["ntk_err"]), e.get("ntk_export64_err_f64", math.inf))


def report(path: str) -> None:
    results = load(path)
    rows, fallbacks, failures, mismatches = {}, [], [], []
    for name, e in sorted(results.items()):
        fam = rows.setdefault(e["source"], {})
        counts = fam.setdefault(e["family"], [0, 0, 0, 0])  # models, exported, outputs ok, ntk ok
        counts[0] += 1
        if "error" in e:
            failures.append(f"- `{name}`: {e['error']}")
            continue
        if e.get("mode") != "export":
            why = e.get("reason", "")
            if e.get("where"):
                why += ": " + "; ".join(f"`{op}` at {', '.join(w[:2])}" for op, w in e["where"].items())
            fallbacks.append(f"- `{name}` ({e.get('mode')}): {NOTES.get(name, why)}")
            continue
        counts[1] += 1
        out_ok = e.get("out_err", 1.0) <= TOL
        counts[2] += out_ok
        ntk_ok = out_ok and "ntk_err" in e and _ntk_error(e) <= TOL and e.get("ntk_err_body", 0) <= TOL
        counts[3] += ntk_ok
        if not out_ok or ("ntk_err" in e and not ntk_ok):
            note = f": {NOTES[name]}" if name in NOTES else ""
            mismatches.append(f"- `{name}`: out_err {e.get('out_err'):.2e}, "
                              f"ntk_err {e.get('ntk_err', float('nan')):.2e}{note}")
    total = sum(c[0] for fams in rows.values() for c in fams.values())
    tot = [sum(c[i] for fams in rows.values() for c in fams.values()) for i in range(4)]
    has_ntk = sum("ntk_err" in e for e in results.values())
    lines = ["# Model-zoo sweep: export to JAX, outputs and eNTK vs PyTorch", "",
             "`python -m benchmarks.model_zoo --stage export && python -m benchmarks.model_zoo --stage ntk`",
             f"(random init, float32, N = {N}, traced output `y[:, :{K}] + mean(y)`; eNTK of the export vs the "
             f"bridge, tolerance {TOL:g}, relative to the largest entry). Float32 eNTKs are compiled with "
             "`import entk`'s XLA:CPU work-around (`entk/_xla_cpu.py`: jaxlib 0.10's YNNPACK reduce fusion "
             "miscompiles normalization derivatives; it made `timm/nf_resnet26` 5.8e-3 and "
             "`timm/swinv2_tiny_window8_256` 8.2e-4 off). Inputs are the smallest each model accepts; "
             "torchvision's MViT builders fix a 16 x 224 x 224 clip, so the sweep builds the same "
             "architecture for 4 x 64 x 64 (`_mvit_size`). Models over 5M parameters are differentiated "
             "w.r.t. a spread of parameter tensors within 5M (`--max-trainable`).", "",
             f"**{tot[0]} models: {tot[1]} exported ({100 * tot[1] / max(total, 1):.1f}%), "
             f"{tot[2]} with outputs within {TOL:g}, {tot[3]} with outputs and eNTK within {TOL:g} "
             f"({100 * tot[3] / max(total, 1):.1f}% of all) "
             f"(eNTK measured on {has_ntk} of the exported models: {tot[3]} of {has_ntk} within, "
             f"{100 * tot[3] / max(has_ntk, 1):.1f}%).**", "",
             "| source | family | models | exported | outputs ok | outputs + eNTK ok (where measured) |", "|---|---|---|---|---|---|"]
    for source, fams in rows.items():
        for family, c in sorted(fams.items()):
            lines.append(f"| {source} | {family} | {c[0]} | {c[1]} | {c[2]} | {c[3]} |")
    lines += ["", "## Not exported (bridge: falls back to the bridge; refused: neither mode can run "
              "it faithfully)", ""] + (fallbacks or ["none"])
    lines += ["", "## Failures (the model or the sweep, not the export)", ""] + (failures or ["none"])
    lines += ["", "## Exported but outside tolerance", ""] + (mismatches or ["none"])
    judged = [f"- `{n}`: export vs float32 bridge {e['ntk_err']:.1e}; against PyTorch's float64 eNTK the "
              f"export's float32 eNTK is {e['ntk_err_f64']:.1e} off and the bridge's {e['ntk_bridge_err_f64']:.1e}"
              + (f"; the export computed in float64 is {e['ntk_export64_err_f64']:.1e} off"
                 if "ntk_export64_err_f64" in e else "")
              for n, e in sorted(results.items()) if "ntk_err_f64" in e]
    lines += ["", "## Float32 kernels that disagree: PyTorch's float64 eNTK decides", ""] + (judged or ["none"])
    exact = sorted(n for n, e in results.items() if e.get("ntk_err") == 0.0)
    checked = [n for n in exact if "ntk_err_body" in results[n]]
    lines += ["", "## Kernels that agree bit for bit", "",
              f"{len(exact)} models have ntk_err exactly 0: their float32 kernels are dominated by the "
              "head's bias (whose Jacobian both paths compute exactly) over a body with tiny outputs at "
              "random init. The sweep checks these again with the trainable vectors after the last "
              "weight matrix frozen (the head's bias, a final norm's scale and shift), so the kernel "
              "comes from the body: "
              + (", ".join(f"`{n}` {results[n]['ntk_err_body']:.1e}" for n in checked) or "none checked")
              + (f". Not re-checked yet: {', '.join(f'`{n}`' for n in exact if n not in checked)}"
                 if len(checked) < len(exact) else "") + "."
              + (f" {sum(results[n]['ntk_err_body'] == 0.0 for n in checked)} of them agree bit for bit "
                 "even then; why was not investigated further (their outputs agree to out_err, and the "
                 "same families' other sizes differ by ~1e-7 as expected)." if checked else "")]
    unmeasured = [n for n, e in sorted(results.items())
                  if e.get("mode") == "export" and "error" not in e and "ntk_err" not in e]
    lines += ["", "## Exported, eNTK not measured (export stage only: outputs checked)", "",
              ", ".join(f"`{n}`" + (f" (eNTK stage: {results[n]['ntk_error']})" if "ntk_error" in
                                    results[n] else "") for n in unmeasured) or "none"]
    lines += ["", "## Per model", "", "| model | params | input | mode | out_err | ntk_err | convert s | "
              "first call s | eNTK s (export / bridge) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(results.items()):
        def f(key, fmt="{:.1e}"):
            text = fmt.format(e[key]) if key in e else "-"
            return text + (f" (float64 reference: {e['ntk_err_f64']:.1e})"
                           if key == "ntk_err" and "ntk_err_f64" in e else "")
        lines.append(f"| {name} | {e.get('params', '-')} | {'×'.join(map(str, e.get('input', [])))} | "
                     f"{e.get('mode', 'error')} | {f('out_err')} | {f('ntk_err')} | {f('convert_s', '{}')} | "
                     f"{f('first_call_s', '{}')} | {f('ntk_export_s', '{}')} / {f('ntk_bridge_s', '{}')} |")
    with open(os.path.join(os.path.dirname(path), "zoo.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("export", "ntk"), default="export")
    p.add_argument("--only", default="", help="regex on model names (tv/..., timm/..., hf/...)")
    p.add_argument("--redo", action="store_true",
                   help="run the selected models again (each earlier result is kept until replaced)")
    p.add_argument("--out", default=os.path.join(RESULTS, "zoo.json"))
    p.add_argument("--timeout", type=float, default=300, help="seconds per model")
    p.add_argument("--max-trainable", type=int, default=5_000_000)
    p.add_argument("--implementation", default="jc", help="eNTK strategy for the exported model")
    p.add_argument("--report", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge these results files (sweeps run in parallel) into --out, then report")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--names", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.merge:
        results = load(args.out)
        for path in args.merge:
            for name, entry in load(path).items():
                old = results.get(name, {})
                if "error" in entry and "out_err" in old:  # an eNTK-stage failure keeps the export's
                    entry = {**old, "ntk_error": entry["error"]}
                results[name] = entry
        save(args.out, results)
        report(args.out)
    elif args.report:
        report(args.out)
    elif args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
