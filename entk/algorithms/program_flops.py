"""FLOPs of a lowered program per primitive class: matmuls, convolutions, convolution weight gradients.

The cost model prices each class at its own measured rate (`entk.algorithms.device`): XLA:CPU runs a
large matmul near the machine's peak, a convolution's forward pass somewhat below it and a weight
gradient (a convolution whose window is the whole feature map) far below it. XLA's cost analysis gives
one FLOP total; this module reads the lowered StableHLO text to split it:

    dot          every `stablehlo.dot_general` / `stablehlo.dot`:
                 2 · |output| · Π(contracted dimension sizes)
    conv         a `stablehlo.convolution` whose window (kernel spatial size) is at most its output's
                 spatial size (the forward pass, and the input gradient)
    conv_wgrad   a convolution whose window is larger than its output (the weight gradient, where the
                 "kernel" is the cotangent feature map and the output is the kernel's small shape)

A convolution counts 2 · batch · output features · input features per group · (output position,
window tap) pairs that land on an input element, per spatial dimension (padding and dilation
excluded, as XLA counts them). Functions called from several places (`call @f`) count once per call;
a loop body (`stablehlo.while`) counts once, as in XLA's own analysis of the unoptimised program.
"""

from __future__ import annotations

import math
import re
from typing import Any

_NAME = r'("[^"]*"|[\w.$-]+)'  # a symbol: `@main`, or quoted, `@"<lambda>"`
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?@" + _NAME + r"\(")
_CALL = re.compile(r"\bcall\s+@" + _NAME + r"\(")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_CONTRACT = re.compile(r"contracting_dims\s*=\s*\[([\d,\s]*)\]\s*x\s*\[([\d,\s]*)\]")
_DIMS = re.compile(r"dim_numbers\s*=\s*\[([^\]]*)\]x\[([^\]]*)\]->\[([^\]]*)\]")


def _shape(tensor: str) -> tuple[int, ...] | None:
    """`2x3xf32` -> (2, 3); None for a dynamic shape."""
    parts = tensor.split("x")[:-1]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        return None


def _signature(line: str) -> list[tuple[int, ...] | None]:
    """Operand and result shapes from the type signature that ends an op line: `: (A, B) -> C`."""
    _, _, types = line.rpartition(" : ")
    return [_shape(t) for t in _TENSOR.findall(types)]


def _ints(text: str) -> list[int]:
    return [int(t) for t in re.findall(r"-?\d+", text)]


def dot_flops(line: str) -> float:
    """2 · |output| · Π(contracted sizes) of one `dot_general` / `dot` line."""
    shapes = _signature(line)
    if len(shapes) < 3 or any(s is None for s in shapes[:3]):
        return 0.0
    lhs, out = shapes[0], shapes[-1]
    match = _CONTRACT.search(line)
    if match:
        contracted = [lhs[d] for d in _ints(match.group(1))]
    elif "dot_general" in line:
        contracted = []  # an outer product
    else:  # `stablehlo.dot`: the last dimension of lhs
        contracted = list(lhs[-1:])
    return 2.0 * math.prod(out) * math.prod(contracted)


def _window_attr(line: str, name: str, rank: int, default: int) -> list[int]:
    match = re.search(rf"\b{name}\s*=\s*\[([^\]]*)\]", line)
    return _ints(match.group(1)) if match else [default] * rank


def _padding(line: str, rank: int) -> list[tuple[int, int]]:
    match = re.search(r"\bpad\s*=\s*\[((?:\[[^\]]*\][,\s]*)*)\]", line)
    if not match:
        return [(0, 0)] * rank
    values = _ints(match.group(1))
    return [(values[2 * i], values[2 * i + 1]) for i in range(rank)]


def _valid_pairs(n_in: int, n_window: int, n_out: int, stride: int, pad_lo: int,
                 lhs_dilation: int, rhs_dilation: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read an input element."""
    last = (n_in - 1) * lhs_dilation  # the dilated input spans positions 0..last
    period = lhs_dilation // math.gcd(stride, lhs_dilation)  # of o where position % dilation == 0
    count = 0
    for k in range(n_window):  # per tap, the outputs o with 0 <= o·stride + offset <= last
        offset = k * rhs_dilation - pad_lo
        lo = max(0, -(offset // stride))
        hi = min(n_out - 1, (last - offset) // stride)
        first = next((o for o in range(lo, min(lo + period, hi + 1))
                      if (o * stride + offset) % lhs_dilation == 0), None)
        if first is not None:
            count += (hi - first) // period + 1
    return count


def conv_flops(line: str) -> tuple[str, float]:
    """(`"conv"` or `"conv_wgrad"`, FLOPs) of one `stablehlo.convolution` line (see module docstring)."""
    shapes, dims = _signature(line), _DIMS.search(line)
    if len(shapes) < 3 or any(s is None for s in shapes[:3]) or not dims:
        return "conv", 0.0
    lhs, rhs, out = shapes[0], shapes[1], shapes[-1]
    lhs_spec, rhs_spec, out_spec = ([p.strip() for p in d.split(",")] for d in dims.groups())
    spatial = [str(i) for i in range(len(rhs_spec) - 2)]
    rank = len(spatial)
    strides = _window_attr(line, "stride", rank, 1)
    lhs_dilate = _window_attr(line, "lhs_dilate", rank, 1)
    rhs_dilate = _window_attr(line, "rhs_dilate", rank, 1)
    pads = _padding(line, rank)
    pairs = 1
    for i, s in enumerate(spatial):
        pairs *= _valid_pairs(lhs[lhs_spec.index(s)], rhs[rhs_spec.index(s)],
                              out[out_spec.index(s)], strides[i], pads[i][0], lhs_dilate[i],
                              rhs_dilate[i])
    flops = (2.0 * out[out_spec.index("b")] * out[out_spec.index("f")] * rhs[rhs_spec.index("i")]
             * pairs)
    window = math.prod(rhs[rhs_spec.index(s)] for s in spatial)
    out_spatial = math.prod(out[out_spec.index(s)] for s in spatial)
    return ("conv_wgrad" if window > out_spatial else "conv"), flops


def _own_flops(body: str) -> dict[str, float]:
    counts = {"dot": 0.0, "conv": 0.0, "conv_wgrad": 0.0}
    for line in body.splitlines():
        if "stablehlo.dot" in line:
            counts["dot"] += dot_flops(line)
        elif "stablehlo.convolution" in line:
            kind, flops = conv_flops(line)
            counts[kind] += flops
    return counts


def flops_by_primitive(text: str) -> dict[str, float]:
    """{"dot", "conv", "conv_wgrad"} FLOPs of a lowered module's text (`lowered.as_text()`),
    each function counted once per call from the public entry point."""
    headers = list(_FUNC.finditer(text))
    if not headers:
        return _own_flops(text)
    bodies = {h.group(1): text[h.start():(headers[i + 1].start() if i + 1 < len(headers)
                                            else len(text))] for i, h in enumerate(headers)}
    memo: dict[str, dict[str, float]] = {}

    def total(name: str, depth: int = 0) -> dict[str, float]:
        if name in memo or name not in bodies or depth > 64:
            return memo.get(name, {"dot": 0.0, "conv": 0.0, "conv_wgrad": 0.0})
        counts = _own_flops(bodies[name])
        for callee in _CALL.findall(bodies[name]):
            for kind, value in total(callee, depth + 1).items():
                counts[kind] += value
        memo[name] = counts
        return counts

    public = re.search(r"func\.func\s+public\s+@" + _NAME + r"\(", text)
    return total(public.group(1) if public else headers[0].group(1))


def classify(lowered: Any, total_flops: float) -> dict[str, float]:
    """FLOPs per rate class of a lowered program: dot, conv, conv_wgrad, and `elementwise` (the rest
    of XLA's `total_flops`: elementwise arithmetic, reductions, transcendentals)."""
    counts = flops_by_primitive(lowered.as_text())
    counts["elementwise"] = max(float(total_flops) - sum(counts.values()), 0.0)
    return counts
