"""neural-tangents 0.6.5 as a benchmark worker: JSON requests on stdin, JSON replies on stdout.

Runs in the neural-tangents virtualenv (JAX 0.4.24), started by `benchmarks/run.py`, which alternates
timed calls between this process and entk's. Requests, one JSON object per line:

    {"op": "setup", "model": "mlp", "n": 8, "outputs": 10, "traced": false, "data": "case.npz"}
    {"op": "compile", "strategy": "sd"}            -> {"compile_s", "flops", "peak_bytes"}
    {"op": "kernel", "strategy": "sd", "path": "k.npy"}  -> {"peak_rss_bytes"}  (warm-up call;
                                                            the kernel is saved for checking)
    {"op": "run", "strategy": "sd"}                -> {"run_s"}
    {"op": "drop", "strategy": "sd"}  /  {"op": "versions"}  /  {"op": "quit"}

Every reply is `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. Anything the libraries print
goes to stderr; stdout carries replies only.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt replies

    import jax
    import neural_tangents as nt
    import numpy as np
    from neural_tangents import stax

    from benchmarks.jax_tool import JaxTool

    implementations = {"auto": nt.NtkImplementation.AUTO,
                       "jc": nt.NtkImplementation.JACOBIAN_CONTRACTION,
                       "ntvp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
                       "sd": nt.NtkImplementation.STRUCTURED_DERIVATIVES}

    def make_ntk_fn(apply_fn, strategy, trace_axes):
        return nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, vmap_axes=0,
                                   implementation=implementations[strategy])

    tool = JaxTool(stax, make_ntk_fn)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "quit":
                break
            if op == "versions":
                reply = {"jax": jax.__version__, "neural_tangents": "0.6.5"}
            elif op == "setup":
                reply = tool.setup(request["model"], request["n"], request["outputs"],
                                   request["traced"], request["data"])
            elif op == "compile":
                reply = tool.compile(request["strategy"])
            elif op == "kernel":
                kernel, peak_rss = tool.kernel(request["strategy"])
                np.save(request["path"], kernel)
                reply = {"peak_rss_bytes": peak_rss}
            elif op == "run":
                reply = {"run_s": tool.run(request["strategy"])}
            elif op == "drop":
                tool.drop(request["strategy"])
                reply = {}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported to the runner, which records it
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
