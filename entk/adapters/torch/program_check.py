"""Does an exported program compute what its module computes? PyTorch itself answers, on the example.

A program that comes from somewhere other than a fresh `torch.export` of the module — read back from
disk (`program_cache.py`), or exported over a wider batch range than torch.export can guard
(`export.py`: batch sizes from 1) — is used only if `reproduces` holds: the program, run op by op by
PyTorch with autograd (`run_in_torch`), gives the module's own outputs and the gradient of
⟨v, outputs⟩ for a random cotangent v with respect to every floating-point parameter, to within the
rounding of a reordered computation. `check_inputs` picks the examples a stored program is checked on.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils import _pytree as torch_pytree

from entk.adapters.torch.graph_translation import input_dims


def run_in_torch(program: Any, module: torch.nn.Module, params: dict, args: tuple,
                 kwargs: dict) -> list:
    """The program's user outputs, computed by PyTorch's own ATen ops (with autograd) from `params`
    (named_parameters() names), the module's buffers and the inputs."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    if kwargs:  # in the order the program's input spec lists them
        spec = program.call_spec.in_spec
        children = spec.children() if hasattr(spec, "children") else spec.children_specs
        kwargs = {key: kwargs[key] for key in children[1].context}
    leaves = torch_pytree.tree_leaves((args, kwargs))
    canonical = {}  # id(parameter) -> its named_parameters() name (tied weights: the first)
    for name, p in module.named_parameters():
        canonical.setdefault(id(p), name)
    values: dict[str, Any] = {}
    n_inputs = 0
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            values[spec.arg.name] = params[canonical[id(module.get_parameter(spec.target))]]
        elif spec.kind == InputKind.BUFFER:
            values[spec.arg.name] = module.get_buffer(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            values[spec.arg.name] = program.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            values[spec.arg.name] = leaves[n_inputs]
            n_inputs += 1
        else:
            raise ValueError(f"a {spec.kind.name} input, which this check cannot feed")

    def materialize(v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            return values[v.name]
        if isinstance(v, (list, tuple)):
            return type(v)(materialize(x) for x in v)
        if isinstance(v, dict):
            return {k: materialize(x) for k, x in v.items()}
        return v

    for node in program.graph.nodes:
        if node.op == "call_function":
            values[node.name] = node.target(*materialize(node.args), **materialize(node.kwargs))
    return [spec.arg.value if isinstance(spec.arg, ConstantArgument) else values[spec.arg.name]
            for spec in program.graph_signature.output_specs if spec.kind.name == "USER_OUTPUT"]


def reproduces(program: Any, module: torch.nn.Module, args: tuple, kwargs: dict,
               run_module: Callable[..., Any]) -> bool:
    """Whether `program` gives the module's output and parameter gradients on this input.

    `run_module(params, args, kwargs)` runs the module itself (in the export's train/eval mode) with
    the parameters `params`. The gradient is that of ⟨v, output⟩ for a random cotangent v per
    floating-point output, with respect to every floating-point parameter.
    """
    try:
        return _reproduces(program, module, args, kwargs, run_module)
    except Exception:  # noqa: BLE001 - the stored program does not run like the module: not usable
        return False


def _reproduces(program: Any, module: torch.nn.Module, args: tuple, kwargs: dict,
                run_module: Callable[..., Any]) -> bool:
    params = {name: p.detach().requires_grad_(p.is_floating_point())  # new leaves, same storage
              for name, p in module.named_parameters()}
    wanted = [name for name, p in params.items() if p.requires_grad]
    expected = torch_pytree.tree_leaves(run_module(params, args, kwargs))
    got = run_in_torch(program, module, params, args, kwargs)
    if len(expected) != len(got):
        return False
    generator = torch.Generator().manual_seed(0)
    loss_e: Any = 0.0
    loss_g: Any = 0.0
    for e, g in zip(expected, got):
        if not isinstance(e, torch.Tensor) or not isinstance(g, torch.Tensor):
            if isinstance(e, torch.Tensor) or isinstance(g, torch.Tensor) or e != g:
                return False
            continue
        if e.shape != g.shape or e.dtype != g.dtype or not _close(e.detach(), g.detach()):
            return False
        if e.is_floating_point():
            if e.requires_grad != g.requires_grad:
                return False  # one of them detaches this output
            if e.requires_grad and e.numel():
                v = torch.randn(e.shape, generator=generator, dtype=torch.float64).to(e.dtype)
                loss_e = loss_e + (v * e).sum()
                loss_g = loss_g + (v * g).sum()
    if not wanted or not isinstance(loss_e, torch.Tensor):
        return True
    inputs = [params[name] for name in wanted]
    grads_e = torch.autograd.grad(loss_e, inputs, allow_unused=True)
    grads_g = torch.autograd.grad(loss_g, inputs, allow_unused=True)
    for a, b in zip(grads_e, grads_g):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None and not _close(a, b):
            return False
    return True


def _close(expected: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal to within float rounding of a reordered computation (relative to the largest entry)."""
    if not expected.is_floating_point() and not expected.is_complex():
        return bool(torch.equal(expected, got))
    if not expected.numel():
        return True
    tolerance = 1e3 * torch.finfo(expected.dtype).eps
    error, scale = float((expected - got).abs().max()), float(expected.abs().max())
    if math.isfinite(error) and math.isfinite(scale):  # the common case, two passes
        return error <= tolerance * max(scale, 1e-30)
    finite = expected.isfinite()
    if not torch.equal(finite, got.isfinite()) or not torch.equal(expected[~finite], got[~finite]):
        return False
    if not finite.any():
        return True
    scale = float(expected[finite].abs().max())
    return float((expected[finite] - got[finite]).abs().max()) <= tolerance * max(scale, 1e-30)


CHECK_EXAMPLES = 2
"""Examples the check runs on where the program's batch axis is dynamic: it costs a forward and a
backward pass of the module and of the program on what it is given (two, so that examples meet;
and one more check on a single example where the program also serves batch 1)."""


def check_inputs(program: Any, args: tuple, kwargs: dict,
                 batch_axis: int | None) -> list[tuple[tuple, dict]]:
    """The inputs a program is checked on: its first `CHECK_EXAMPLES` examples, and its first one
    where the program's range includes batch 1, if every input's `batch_axis` is one dynamic size
    of the program (a `torch.export` program or a stored one); else the inputs as they are."""
    leaves = torch_pytree.tree_leaves((args, kwargs))
    if batch_axis is None or not leaves:
        return [(args, kwargs)]
    names = {spec.arg.name for spec in program.graph_signature.input_specs
             if spec.kind.name == "USER_INPUT"}
    shapes = [input_dims(n.meta["val"].shape, program.range_constraints)
              for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
    dims = {s[batch_axis] if len(s) > batch_axis else None for s in shapes}
    sizes = {t.shape[batch_axis] for t in leaves if isinstance(t, torch.Tensor) and t.ndim > batch_axis}
    if len(shapes) != len(leaves) or len(dims) != 1 or len(sizes) != 1:
        return [(args, kwargs)]
    (dim,), (size,) = dims, sizes
    if not isinstance(dim, tuple) or dim[0] != "sym":
        return [(args, kwargs)]
    _, _, lower, upper = dim
    lower = 0 if lower is None else lower
    n = min(size, CHECK_EXAMPLES)
    checks = [first_examples(args, kwargs, batch_axis, n) if lower <= n and (
        upper is None or n <= upper) else (args, kwargs)]
    if lower <= 1 < size:
        checks.append(first_examples(args, kwargs, batch_axis, 1))
    return checks


def first_examples(args: tuple, kwargs: dict, batch_axis: int, n: int) -> tuple[tuple, dict]:
    """`(args, kwargs)` cut to their first `n` examples along `batch_axis` (tensors without that
    axis as they are)."""
    def cut(t: Any) -> Any:
        return t.narrow(batch_axis, 0, n) if isinstance(t, torch.Tensor) and t.ndim > batch_axis else t

    return torch_pytree.tree_map(cut, (args, kwargs))
