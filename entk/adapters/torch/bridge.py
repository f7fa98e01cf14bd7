"""Bridge mode: a PyTorch module seen by JAX as a foreign function ("via torch.func").

The module never leaves PyTorch. JAX calls it through `entk.adapters._foreign`: the forward pass is
`torch.func.functional_call`, the JVP is `torch.func.jvp`, the transpose (VJP) is `torch.func.vjp`,
and batches go through `torch.func.vmap`, so Jacobian contraction (`vmap` of VJPs) and NTK-vector
products (`vmap` of VJP-then-JVP) both run, under `jax.jit` too. Structured derivatives do not: they
walk the model's jaxpr, and here the model is opaque to JAX.

Use this mode when `torch.export` cannot capture a model (data-dependent control flow, an op with no
JAX translation); otherwise export mode is faster, because XLA then sees and fuses the whole model.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from entk.adapters._foreign import ForeignBackend, ForeignFunction, infer_out_specs_by_running
from entk.model import Model

__all__ = ["bridge_model", "TORCH_BACKEND"]

PyTree = Any

SD_UNAVAILABLE = ("structured derivatives are unavailable in bridge mode: the model runs in PyTorch "
                  "and is opaque to JAX (SD needs its jaxpr); use export mode for SD")


def _to_torch(a: Any) -> torch.Tensor:
    # DLPack: zero-copy from CPU jax.Arrays and NumPy arrays (read-only ones included).
    if isinstance(a, jax.Array):
        try:
            return torch.from_dlpack(a)
        except (BufferError, RuntimeError, TypeError):
            pass
    a = np.asarray(a)
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = np.ascontiguousarray(a)
    return torch.from_dlpack(a)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().resolve_conj().resolve_neg().cpu().numpy()


def _torch_vmap(fn, in_axes: tuple):
    return torch.func.vmap(fn, in_dims=in_axes, out_dims=0)


TORCH_BACKEND = ForeignBackend(name="torch", to_foreign=_to_torch, to_host=_to_numpy, vmap=_torch_vmap)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Runs `module` in eval mode (dropout off, BatchNorm on running statistics), then restores it."""
    modes = [(m, m.training) for m in module.modules()]
    if not any(training for _, training in modes):
        yield
        return
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _flatten_output(out: Any, path: str = "output") -> tuple[list[torch.Tensor], Any]:
    """Torch output -> (tensor leaves, the same structure with `None` leaves, as plain containers)."""
    if isinstance(out, torch.Tensor):
        return [out], None
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
        out = tuple(out)
    if isinstance(out, (tuple, list)):
        leaves, skel = [], []
        for i, o in enumerate(out):
            sub_leaves, sub = _flatten_output(o, f"{path}[{i}]")
            leaves += sub_leaves
            skel.append(sub)
        return leaves, type(out)(skel) if isinstance(out, list) else tuple(skel)
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):  # dicts, Hugging Face ModelOutput
        leaves, skel = [], {}
        for k in sorted(out.keys()):  # JAX orders dict leaves by sorted key
            sub_leaves, sub = _flatten_output(out[k], f"{path}[{k!r}]")
            leaves += sub_leaves
            skel[k] = sub
        return leaves, skel
    raise TypeError(f"bridge_model: {path} is a {type(out).__name__}; the module must return tensors, "
                    f"or tuples / lists / dicts of tensors.")


def _treedef_of(skeleton: Any) -> jax.tree_util.PyTreeDef:
    return jax.tree_util.tree_structure(skeleton, is_leaf=lambda x: x is None)


def _as_jax(x: Any) -> jax.Array:
    if isinstance(x, torch.Tensor):
        return jnp.asarray(_to_numpy(x))
    return jnp.asarray(x)


def bridge_model(module: torch.nn.Module, example_input: Any, *, include_frozen: bool = False) -> Model:
    """Wraps a PyTorch module as an `entk.Model` that calls back into PyTorch.

    Args:
      module: any `torch.nn.Module`; it is run in eval mode (its own train/eval flags are restored
        after every call) on CPU.
      example_input: a tensor, or a tuple/list of tensors passed as positional arguments; it fixes the
        number of inputs and the output structure. `model.apply(params, x)` takes `x` of the same
        structure (JAX / NumPy arrays, or torch tensors), in torch's layout (NCHW).
      include_frozen: also differentiate floating-point parameters with `requires_grad=False` (by
        default they are held in `state`, like buffers). Tied parameters appear once, under their
        first name in `named_parameters()`.

    Returns:
      An `entk.Model` with `params` a dict `{named_parameters() name: jax.Array}`, `state`
      `{"buffers": {...}, "frozen": {...}}`, `capabilities == {"jc", "ntvp"}` and `source == "torch"`.
      `apply` returns an array when the module returns a tensor, else the same tuple / list / dict
      structure of arrays.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"bridge_model(module=...): expected a torch.nn.Module, got "
                        f"{type(module).__name__}.")
    multi_input = isinstance(example_input, (tuple, list))
    example_args = tuple(example_input) if multi_input else (example_input,)
    for i, x in enumerate(example_args):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"bridge_model(example_input=...): input {i} is a {type(x).__name__}; pass "
                            f"torch tensors (a tuple of them for several positional inputs).")

    param_names, frozen_names = [], []
    for name, p in module.named_parameters():
        differentiate = p.requires_grad or (include_frozen and p.is_floating_point())
        (param_names if differentiate else frozen_names).append(name)
    for name in param_names:
        p = module.get_parameter(name)
        if not p.is_floating_point():
            raise TypeError(f"bridge_model: parameter {name!r} has dtype {p.dtype}; only floating-point "
                            f"parameters can be differentiated. Set requires_grad=False to hold it in "
                            f"state.")
    buffer_names = [name for name, _ in module.named_buffers()]
    tensor_names = param_names + frozen_names + buffer_names
    n_named, n_params, n_inputs = len(tensor_names), len(param_names), len(example_args)

    skeleton_box: list[Any] = []

    def primal(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors = dict(zip(tensor_names, xs[:n_named]))
        with _eval_mode(module):
            out = torch.func.functional_call(module, tensors, tuple(xs[n_named:]))
        leaves, skeleton = _flatten_output(out)
        if not skeleton_box:
            skeleton_box.append(skeleton)
        return tuple(leaves)

    def _with(xs: Sequence[torch.Tensor], argnums: tuple[int, ...]):
        def g(*diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
            full = list(xs)
            for i, v in zip(argnums, diff):
                full[i] = v
            return primal(*full)
        return g

    def jvp(argnums, xs, tangents):
        primals = tuple(xs[i] for i in argnums)
        tangents = tuple(t.to(p.dtype) for t, p in zip(tangents, primals))
        _, out_tangents = torch.func.jvp(_with(xs, argnums), primals, tangents)
        return out_tangents

    def vjp(argnums, xs, cotangents):
        _, pullback = torch.func.vjp(_with(xs, argnums), *(xs[i] for i in argnums))
        return pullback(tuple(cotangents))

    foreign = ForeignFunction(
        TORCH_BACKEND, primal, jvp, vjp,
        lambda specs: infer_out_specs_by_running(TORCH_BACKEND, torch.no_grad()(primal), specs),
        name=f"torch bridge of {type(module).__name__}")

    with torch.no_grad():
        named = {n: _to_numpy(t) for n, t in
                 list(module.named_parameters()) + list(module.named_buffers())}
    params = {n: jnp.asarray(named[n]) for n in param_names}
    state = {"buffers": {n: jnp.asarray(named[n]) for n in buffer_names},
             "frozen": {n: jnp.asarray(named[n]) for n in frozen_names}}

    example_specs = [jax.ShapeDtypeStruct(tuple(named[n].shape), named[n].dtype) for n in tensor_names]
    example_specs += [jax.ShapeDtypeStruct(tuple(x.shape), _to_numpy(x).dtype) for x in example_args]
    with torch.no_grad():
        foreign.out_specs(example_specs)  # runs the module once: validates it, records the structure
    out_treedef = _treedef_of(skeleton_box[0])

    def apply_with_state(params: PyTree, state: PyTree, x: Any, **kwargs: Any) -> PyTree:
        if kwargs:
            raise TypeError(f"a torch bridge model takes no keyword arguments, got {sorted(kwargs)}.")
        args = tuple(x) if multi_input else (x,)
        if len(args) != n_inputs:
            raise ValueError(f"the torch module takes {n_inputs} input(s) (as in example_input), got "
                             f"{len(args)}.")
        missing = [n for n in param_names if n not in params]
        if missing:
            raise KeyError(f"params lacks the torch parameter(s) {missing[:5]}; pass the dict of "
                           f"model.params (keyed by named_parameters() names).")
        operands = ([params[n] for n in param_names] + [state["frozen"][n] for n in frozen_names]
                    + [state["buffers"][n] for n in buffer_names] + [_as_jax(a) for a in args])
        outs = foreign(*operands)
        return jax.tree_util.tree_unflatten(out_treedef, outs)

    info = {
        "mode": "bridge",
        "framework": "torch",
        "module": type(module).__name__,
        "param_names": tuple(param_names),
        "frozen_param_names": tuple(frozen_names),
        "buffer_names": tuple(buffer_names),
        "input_layout": "torch (NCHW for images)",
        "sd": SD_UNAVAILABLE,
        "foreign_function": foreign,
    }
    return Model(apply_with_state, params, state, source="torch",
                 capabilities=frozenset({"jc", "ntvp"}), info=info)
