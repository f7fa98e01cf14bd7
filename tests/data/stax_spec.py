"""Networks from the JSON specs of the neural-tangents reference files, for either library.

The generators (`stax_layers_generate.py`, `stax_masking_generate.py`, run with neural-tangents 0.6.5)
and the tests (`tests/test_stax_layers.py`, `tests/test_stax_masking.py`, run with entk) build the same
network from the same spec with this one function, passing their own `stax` module.

A spec is a list of `[layer_name, kwargs]` applied with `serial`: `"parallel"` holds a list of
branches; `"repeat"` holds `{"net": spec, "n": count}`; `"Index"` holds `{"idx": [...]}` with
`"..."`, ints, `{"slice": [start, stop, step]}` and `{"take": [...]}`; functions (`Elementwise`,
`pos_emb_decay_fn`) are named by keys of `ELEMENTWISE_FUNCTIONS`; lists become tuples (but `coef`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _erf_nngp(cov12, var1, var2):
    return jnp.arcsin(2 * cov12 / jnp.sqrt((1 + 2 * var1) * (1 + 2 * var2))) * 2 / np.pi


def _erf_d_nngp(cov12, var1, var2):
    return 4 / np.pi / jnp.sqrt((1 + 2 * var1) * (1 + 2 * var2) - 4 * cov12 ** 2)


ELEMENTWISE_FUNCTIONS = {"erf": jax.scipy.special.erf, "erf_nngp": _erf_nngp,
                         "erf_d_nngp": _erf_d_nngp, "exp_decay": lambda d: jnp.exp(-d / 2)}


def decode_index(items: list) -> tuple:
    out = []
    for item in items:
        if item == "...":
            out.append(Ellipsis)
        elif isinstance(item, int):
            out.append(item)
        elif "slice" in item:
            out.append(slice(*item["slice"]))
        else:
            out.append(tuple(item["take"]))
    return tuple(out)


def build(stax: Any, net: list) -> Any:
    """`stax.serial(...)` of the spec `net`, with `stax` either library's module."""
    layers = []
    for name, arg in net:
        if name == "parallel":
            layers.append(stax.parallel(*[build(stax, branch) for branch in arg]))
        elif name == "repeat":
            layers.append(stax.repeat(build(stax, arg["net"]), arg["n"]))
        elif name == "Index":
            layers.append(stax.Index(decode_index(arg["idx"])))
        elif name == "Elementwise":
            layers.append(stax.Elementwise(**{k: ELEMENTWISE_FUNCTIONS[v] for k, v in arg.items()}))
        elif name == "DotGeneral":  # constants as nested lists, dimension numbers as lists
            (lc, rc), (lb, rb) = arg["dimension_numbers"]
            dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
            consts = {k: np.asarray(v) for k, v in arg.items() if k in ("lhs", "rhs")}
            layers.append(stax.DotGeneral(**consts, dimension_numbers=dn))
        elif name == "GlobalSelfAttention" and "pos_emb_decay_fn" in arg:
            decay = ELEMENTWISE_FUNCTIONS[arg["pos_emb_decay_fn"]]
            layers.append(stax.GlobalSelfAttention(**{**arg, "pos_emb_decay_fn": decay}))
        else:
            kwargs = {k: tuple(v) if isinstance(v, list) and k != "coef" else v
                      for k, v in arg.items()}
            layers.append(getattr(stax, name)(**kwargs))
    return stax.serial(*layers)
