"""Bridge mode: a PyTorch module seen by JAX as a foreign function ("via torch.func").

The module never leaves PyTorch. JAX calls it through `entk.adapters._foreign`: the forward pass is
`torch.func.functional_call`, the JVP is `torch.func.jvp`, the transpose (VJP) is `torch.func.vjp`,
and batches go through `torch.func.vmap`, so Jacobian contraction (`vmap` of VJPs) and NTK-vector
products (`vmap` of VJP-then-JVP) both run, under `jax.jit` too. Structured derivatives do not: they
walk the model's jaxpr, and here the model is opaque to JAX.

Use this mode when `torch.export` cannot capture a model (data-dependent control flow, an op with no
JAX translation); otherwise export mode is faster, because XLA then sees and fuses the whole model.
The framework-independent part (operand layout, `params` / `state`, output structure, the
`entk.Model`) is `entk.adapters._foreign.build_bridge`; `bridge_model` configures it for torch.

Forward mode has a fallback. Some torch kernels have a backward formula but no forward-mode one: the
fused attention of `nn.MultiheadAttention` / `nn.TransformerEncoderLayer` (`_native_multi_head_attention`,
`_transformer_encoder_layer_fwd`) and the CPU flash kernel behind `scaled_dot_product_attention` (used by
Hugging Face BERT / GPT-2), so `torch.func.jvp` raises on attention models. A VJP `u -> Jᵀ u` is
linear in the cotangent `u`, so its own VJP, taken at any `u` (zeros), is `t -> J t`: the JVP, from
reverse mode alone. `torch.func.jvp` stays the fast path (one forward pass with dual numbers); when a
model is built, one JVP of its parameters at the example input probes it, and on "forward AD not
supported" the model switches for good to the double VJP (forward pass, backward pass, and the
backward of the backward: about three times the work), after checking it against the plain VJP. The
double VJP runs `scaled_dot_product_attention` on its math backend, because the fused kernels'
backward passes are not differentiable.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
import torch

from entk.adapters._foreign import BridgeConfig, ForeignBackend, build_bridge
from entk.model import Model

__all__ = ["bridge_model", "jvp_by_double_vjp", "ForwardModeChoice", "TORCH_BACKEND",
           "forward_mode_ready"]

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
    repeated = [d for d, (size, stride) in enumerate(zip(a.shape, a.strides))
                if stride == 0 and size > 1]
    if repeated:  # a broadcast view (an operand batched for vmap): expanded, not copied
        base = a[tuple(slice(0, 1) if d in repeated else slice(None) for d in range(a.ndim))]
        return _to_torch(base).expand(a.shape)
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


_FORWARD_MODE_LOADED = False


@contextlib.contextmanager
def forward_mode_ready() -> Iterator[None]:
    """Silences, on the first forward-mode pass of the process only, the `torch.jit.script is
    deprecated` FutureWarning that PyTorch raises from inside itself while it loads its own
    forward-mode decompositions (`torch/_decomp/decompositions_for_jvp.py`, run by the first
    `torch.func.jvp`). entk calls no deprecated torch API; any other warning passes through."""
    global _FORWARD_MODE_LOADED
    if _FORWARD_MODE_LOADED:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=FutureWarning)
        yield
    _FORWARD_MODE_LOADED = True


class ForwardModeChoice:
    """How a bridged model computes JVPs: probed once when the model is built, then kept.

    Attributes:
      method: `"torch.func.jvp"` (forward-mode AD: the default and the fast path), `"double vjp"`
        (torch reported forward AD unsupported by an op of the model, and the double VJP passed a
        check against the plain VJP), or `"unavailable"` (neither works: JVPs raise, so NTK-vector
        products cannot run; Jacobian contraction still does).
      reason: why forward mode was left, from torch's error ("" while on forward mode).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.method = "torch.func.jvp"
        self.reason = ""
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ForwardModeChoice({self.method!r}{', ' + repr(self.reason) if self.reason else ''})"

    def _set(self, method: str, reason: str) -> None:
        with self._lock:
            if self.method == "torch.func.jvp" or method == "unavailable":
                self.method, self.reason = method, reason

    def probe(self, fn: Callable[..., tuple[torch.Tensor, ...]], primals: Sequence[torch.Tensor]) -> None:
        """Tries `torch.func.jvp` on `fn` at `primals`, checks it against reverse mode, and switches to
        the double VJP where forward mode is missing or disagrees.

        The check matters: forward-mode AD ignores grad mode, so a `torch.no_grad()` block inside
        `forward` is differentiated through by `torch.func.jvp` (reverse mode honours it); and a
        backward pass that is not itself differentiable does not always raise under `torch.func` — a
        custom `autograd.Function` whose backward is `@once_differentiable` makes the double VJP
        silently zero. With `c` random and `t = Jᵀ c` from the plain VJP, `<J t, c>` must equal `‖t‖²`
        (a sum of squares, so no cancellation hides an error).
        """
        try:
            outs, pullback = torch.func.vjp(fn, *primals)
        except RuntimeError:
            return  # reverse mode fails too: the first use reports it, with its real arguments
        generator = torch.Generator().manual_seed(0)
        cotangents = tuple(torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outs)
        tangents = tuple(t.detach() for t in pullback(cotangents))
        expected = sum(float((t.double() ** 2).sum()) for t in tangents)
        eps = max(float(torch.finfo(o.dtype).eps) for o in outs)

        def disagreement(jt: Sequence[torch.Tensor]) -> str:
            got = sum(float((a.double() * c.double()).sum()) for a, c in zip(jt, cotangents))
            if abs(got - expected) <= min(0.1, 10 * eps ** 0.5) * expected:
                return ""
            return f"<J Jᵀc, c> = {got:.6g}, ‖Jᵀc‖² = {expected:.6g}"

        try:
            wrong = disagreement(_forward_mode_jvp(fn, tuple(primals), tangents))
            if not wrong:
                return
            reason = (f"forward-mode AD disagrees with reverse mode ({wrong}): an op's forward "
                      f"derivative differs from its backward one (e.g. a torch.no_grad() block, which "
                      f"forward-mode AD does not honour)")
        except RuntimeError as err:
            if not _forward_ad_unsupported(err):
                return  # not a forward-AD gap; the first JVP raises it again where it is used
            reason = _first_line(err)
        try:
            jt = jvp_by_double_vjp(fn, primals, tangents)
        except RuntimeError as err:
            self._set("unavailable", f"{reason}; the double VJP failed: {_first_line(err)}")
            return
        wrong = disagreement(jt)
        if wrong:
            self._set("unavailable", f"{reason}; the double VJP disagrees with the VJP ({wrong}): the "
                                     f"backward pass of an op is not differentiable (e.g. "
                                     f"@once_differentiable)")
            return
        self._set("double vjp", reason)

    def jvp(self, fn: Callable[..., tuple[torch.Tensor, ...]], primals: tuple[torch.Tensor, ...],
            tangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`J t` by the chosen method. A forward-AD gap met only now (the probe differentiates the
        parameters at the example input; this call may differ) switches to the double VJP."""
        if self.method == "torch.func.jvp":
            try:
                return _forward_mode_jvp(fn, primals, tangents)
            except RuntimeError as err:  # NotImplementedError is a RuntimeError
                if not _forward_ad_unsupported(err):
                    raise
                self._set("double vjp", _first_line(err))
        if self.method == "unavailable":
            raise NotImplementedError(
                f"{self.name}: no JVP is available. Torch has no forward-mode AD for an op of this "
                f"module, and the fallback (a double VJP) cannot replace it: {self.reason}. "
                f"NTK-vector products need JVPs; use implementation='jc', or mode='export'.")
        try:
            return jvp_by_double_vjp(fn, primals, tangents)
        except RuntimeError as err:  # keeps its type: torch.func.vmap failures still fall back to a loop
            err.add_note(f"{self.name}: this JVP was a double VJP, because torch has no forward-mode AD "
                         f"for the module ({self.reason}).")
            raise


def _forward_mode_jvp(fn: Callable[..., tuple[torch.Tensor, ...]], primals: tuple[torch.Tensor, ...],
                      tangents: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """`torch.func.jvp(fn, primals, tangents)`'s tangents, without the `torch.jit.script is
    deprecated` FutureWarning torch raises from inside itself on its first forward-mode pass."""
    with forward_mode_ready():
        return torch.func.jvp(fn, primals, tangents)[1]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _forward_ad_unsupported(err: BaseException) -> bool:
    """Whether torch raised `err` because an op (or custom autograd.Function) has no forward-mode AD.

    Torch reports it as `NotImplementedError` ("Trying to use forward AD with aten::... that does not
    support it", "the derivative for ... is not implemented", an autograd.Function without `jvp`) or
    as a `RuntimeError` naming forward AD.
    """
    if isinstance(err, NotImplementedError):
        return True
    message = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        marker in message for marker in ("forward ad", "forward mode ad", "forward-mode ad"))


@contextlib.contextmanager
def _differentiable_attention() -> Iterator[None]:
    """`scaled_dot_product_attention` on its math backend: plain differentiable ops, whose backward
    pass can itself be differentiated (the fused CPU flash kernel's backward cannot)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def jvp_by_double_vjp(fn: Callable[..., tuple[torch.Tensor, ...]], primals: Sequence[torch.Tensor],
                      tangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """`J t` for `fn` at `primals` using reverse mode only: the VJP in `u` of `u -> Jᵀ u`.

    Args:
      fn: `fn(*primals) -> tuple of floating-point tensors`.
      primals: the point of linearization.
      tangents: one tangent per primal, of its shape and dtype.

    Returns:
      One tangent per output of `fn`, of that output's shape. Works under `torch.func.vmap`.
    """
    with _differentiable_attention():
        outs, pullback = torch.func.vjp(fn, *primals)
        zeros = tuple(torch.zeros_like(o) for o in outs)
        _, pull_pullback = torch.func.vjp(lambda *u: tuple(pullback(u)), *zeros)
        return tuple(pull_pullback(tuple(tangents)))


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


def _with(primal: Callable[..., tuple[torch.Tensor, ...]], xs: Sequence[torch.Tensor],
          argnums: tuple[int, ...]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """`primal` as a function of `xs[i] for i in argnums` only, the other operands fixed."""
    def g(*diff: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = list(xs)
        for i, v in zip(argnums, diff):
            full[i] = v
        return primal(*full)
    return g


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
      `{"buffers": {...}, "frozen": {...}}`, `capabilities == {"jc", "ntvp"}` (`{"jc"}` when no JVP
      is available, see below) and `source == "torch"`.
      `apply` returns an array when the module returns a tensor, else the same tuple / list / dict
      structure of arrays. `info["forward_mode"]` (a `ForwardModeChoice`) says whether JVPs use
      `torch.func.jvp` or, for models with ops lacking forward-mode AD (fused attention), the double
      VJP; `"unavailable"` when that fails its check too.
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
    named = dict(list(module.named_parameters()) + list(module.named_buffers()))
    buffer_names = [name for name, _ in module.named_buffers()]
    tensor_names = param_names + frozen_names + buffer_names
    n_named, n_inputs = len(tensor_names), len(example_args)
    name = f"torch bridge of {type(module).__name__}"
    forward_mode = ForwardModeChoice(name)

    def call(ops: tuple) -> Any:
        with _eval_mode(module):
            return torch.func.functional_call(module, dict(zip(tensor_names, ops[:n_named])),
                                              tuple(ops[n_named:]))

    def jvp(primal, argnums, xs, tangents):
        primals = tuple(xs[i] for i in argnums)
        tangents = tuple(t.to(p.dtype) for t, p in zip(tangents, primals))
        return forward_mode.jvp(_with(primal, xs, argnums), primals, tangents)

    def vjp(primal, argnums, xs, cotangents):
        _, pullback = torch.func.vjp(_with(primal, xs, argnums), *(xs[i] for i in argnums))
        return pullback(tuple(cotangents))

    def probe_jvp(primal, example_ops: list) -> bool:  # forward mode, on the example's parameters
        if param_names:
            argnums = tuple(range(len(param_names)))
            forward_mode.probe(_with(primal, example_ops, argnums), example_ops[:len(param_names)])
        return forward_mode.method != "unavailable"

    def input_leaves(x: Any) -> list:
        args = tuple(x) if multi_input else (x,)
        if len(args) != n_inputs:
            raise ValueError(f"the torch module takes {n_inputs} input(s) (as in example_input), got "
                             f"{len(args)}.")
        return list(args)

    info = {
        "framework": "torch",
        "module": type(module).__name__,
        "param_names": tuple(param_names),
        "frozen_param_names": tuple(frozen_names),
        "buffer_names": tuple(buffer_names),
        "input_layout": "torch (NCHW for images)",
        "sd": SD_UNAVAILABLE,
        "forward_mode": forward_mode,
    }
    return build_bridge(BridgeConfig(
        backend=TORCH_BACKEND, name=name, source="torch", label="torch",
        tensors=[(n, named[n].detach()) for n in tensor_names], n_params=len(param_names),
        state_groups=[("frozen", len(frozen_names)), ("buffers", len(buffer_names))],
        example_inputs=example_args, input_leaves=input_leaves, call=call,
        flatten_output=_flatten_output, jvp=jvp, vjp=vjp, is_tensor=torch.is_tensor,
        inference=torch.no_grad, probe_jvp=probe_jvp, param_word="parameter",
        nonfloat_hint="Set requires_grad=False to hold it in state.",
        missing_params="params lacks the torch parameter(s) {missing}; pass the dict of model.params "
                       "(keyed by named_parameters() names).",
        info=info))
