"""Mixed precision and stated matmul precision.

**Compute dtype** (``config.train.compute_dtype``): `set_compute_dtype` sets the computation dtype
of every module that has one (``nnx.Linear`` / ``Embed`` / ``LayerNorm`` / ``RMSNorm``, the quantized
and integer modules, the model families built from them).  Parameters keep their storage dtype
(float32 master weights), so gradients and the optimizer state (which follows the parameters) stay
float32 too; only the activations and the matmul operands are bfloat16.  Whatever the compute
dtype, these run in float32:

* attention softmax: the scores are cast to float32 before the mask bias and the softmax
  (`efficient_nlp.models.bert.BertAttention`, `efficient_nlp.models.decoder.DecoderAttention`);
* LayerNorm / RMSNorm statistics: flax computes mean and variance in at least float32;
* logits: every model head returns float32 logits, so the task losses (cross-entropy,
  log-softmax) and the distillation losses (`efficient_nlp.distill.losses`, which also upcast
  their inputs) are float32;
* quantizer math (`efficient_nlp.quant`): float32, the result cast back to the input dtype.

**Matmul precision.**  On TPU the default precision of a float32 matmul is one bfloat16 pass
(operands rounded to 8 significant bits) and on recent NVIDIA GPUs TF32 (11 bits); CPUs compute
in float32.  Code that claims exact equality between two float paths (a candidate kernel equal to
a slice, a fake-quantized model equal to its integer form up to float rounding) must run at
``"highest"``: `exact` (a context manager and a decorator) does that.  `emulated` rounds the
operands of every float32 matmul that is not at ``HIGHEST`` precision, as an accelerator's
default does, so those claims can be checked on CPU.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

#: The accepted compute dtypes, by name.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: Default matmul precisions `emulated` can reproduce on CPU: TPU's one bfloat16 pass, GPU's TF32.
EMULATED_PRECISIONS = ("bfloat16", "tensorfloat32")


def compute_dtype(dtype):
    """The jnp dtype for ``dtype``: ``"float32"`` / ``"bfloat16"`` or the same as a jnp / numpy dtype.

    Anything else is a ValueError: float16 needs loss scaling (not implemented) and integer or
    float64 compute dtypes are not mixed precision."""
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError:
        name = repr(dtype)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype!r} is not supported; use one of {sorted(COMPUTE_DTYPES)} "
                         "(float16 would need loss scaling: use bfloat16)")
    return COMPUTE_DTYPES[name]


def set_compute_dtype(model, dtype):
    """Set the computation dtype of every submodule of ``model`` that has a ``dtype`` attribute, in
    place; returns ``model``.  Parameters keep their dtype (``param_dtype``: float32 master weights).

    ``dtype``: ``"float32"``, ``"bfloat16"`` or the matching jnp dtype (`compute_dtype`)."""
    dt = compute_dtype(dtype)
    for _, module in nnx.iter_modules(model):
        if "dtype" in vars(module):
            module.dtype = dt
    return model


@contextlib.contextmanager
def exact():
    """Run the matmuls traced inside at ``jax.default_matmul_precision("highest")`` (float32
    operands, float32 accumulation on every backend).

        with precision.exact():
            y = model(ids).logits

        @precision.exact()
        def parity(model, ids): ...

    The precision is read when a function is traced: a jitted function called inside the block
    compiles a separate program at ``highest``."""
    with jax.default_matmul_precision("highest"):
        yield


def round_to(x, precision: str):
    """float32 ``x`` rounded (to nearest, ties to even) to the operand precision of a reduced
    matmul: 8 significant bits (``"bfloat16"``) or 11 (``"tensorfloat32"``); other dtypes pass."""
    if jnp.result_type(x) != jnp.float32:
        return x
    if precision == "bfloat16":
        return x.astype(jnp.bfloat16).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = bits + jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))   # 23 - 10 = 13 dropped bits
    return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFE000), jnp.float32)


def _stated_exact(params) -> bool:
    """Whether a ``dot_general`` runs at float32 whatever the backend (``HIGHEST`` or an
    algorithm with float32 operands)."""
    p = params.get("precision")
    if p is None:
        return False
    if isinstance(p, (tuple, list)):
        return any(q == jax.lax.Precision.HIGHEST for q in p)
    return str(getattr(p, "name", p)) in ("F32_F32_F32", "F64_F64_F64")


#: Primitives that call a sub-jaxpr with the same inputs, by the parameter holding it.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}


def _eval(jaxpr, consts, args, precision):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general" and not _stated_exact(eqn.params):
            params = dict(eqn.params, precision=(jax.lax.Precision.HIGHEST,) * 2)
            outvals = [eqn.primitive.bind(*(round_to(x, precision) for x in invals), **params)]
        elif name in _CALLS:
            sub = eqn.params[_CALLS[name]]
            closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
            outvals = _eval(closed.jaxpr, closed.consts, invals, precision)
        elif next(jcore.jaxprs_in_params(eqn.params), None) is not None:
            raise NotImplementedError(f"emulated() cannot look inside the {name!r} primitive (its matmuls would "
                                      "run unrounded); emulate a function without it")
        else:
            out = eqn.primitive.bind(*invals, **eqn.params)
            outvals = out if eqn.primitive.multiple_results else [out]
        for var, value in zip(eqn.outvars, outvals):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def emulated(fn, precision: str = "bfloat16"):
    """``fn`` with the operands of every float32 matmul not stated ``HIGHEST`` rounded as a
    reduced default precision does (``"bfloat16"``: a TPU's one-pass default; ``"tensorfloat32"``:
    an NVIDIA GPU's TF32), accumulation in float32.  Integer matmuls are unchanged (exact on
    every backend).  ``fn`` takes and returns pytrees of arrays (close over the model); it is
    traced on each call, so ``with exact(): emulated(fn)(x)`` states ``highest`` for every matmul
    of ``fn`` and rounds nothing.  Rounding ignores overflow near the float32 maximum."""
    if precision not in EMULATED_PRECISIONS:
        raise ValueError(f"unknown emulated precision {precision!r}; choose one of {EMULATED_PRECISIONS}")

    def run(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        flat = jax.tree.leaves(args)
        outs = jax.jit(lambda c, a: _eval(closed.jaxpr, c, a, precision))(list(closed.consts), flat)
        return jax.tree.unflatten(jax.tree.structure(shapes), outs)

    return run


__all__ = ["COMPUTE_DTYPES", "EMULATED_PRECISIONS", "compute_dtype", "emulated", "exact", "round_to",
           "set_compute_dtype"]
