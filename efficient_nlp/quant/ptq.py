"""Post-training quantization by reconstruction (docs/quantization.md): calibration set, partition, REM.

    calib, rows = ptq.calibration_set(task.train, k=4096, seed=0)    # the only training rows read
    qmodel, report = quant.quantize_model(teacher, spec); quant.calibrate(qmodel, first_batch)
    result = ptq.rem(qmodel, teacher, calib, steps=200)   # greedy, matmul by matmul
    result.model, result.report, result.info              # a `Reconstruction`, as MREM-S / MREM-P
    ptq.layer_errors(result.model, teacher, dev, 128)     # FFN-output MSE per layer

The model's layout comes from its family (`efficient_nlp.models.family`): the matmul sites of
each layer with their roles, the capture that feeds each site, and the pieces of the forward
pass (embeddings, a range of layers, the head).

REM (reconstruction error minimisation): for every quantized ``Linear`` in forward order
(per layer the sites in role order ``q, k, v, o, ffn_in, ffn_gate, ffn_out``; then the
quantized Linears of the head modules, e.g. BERT's pooler, a RoBERTa / DistilBERT
``pre_classifier``) minimise ``|| Q(a) Q(w) - a w ||^2`` (mean over real tokens and output features) over that
Linear's latent weight and its quantizer state (LSQ / PACT step sizes of the weight and of
its input), with Adam and a linearly decaying learning rate.  ``a`` is the Linear's input
computed by the partly quantized model (every earlier matmul already reconstructed), read
from the calibration set only; ``w`` is the full-precision weight.  Biases, LayerNorm and
the quantized word embedding (no matmul) are left as they are; the attention's
activation-activation matmuls are not reconstructed (their quantizers keep the calibration).

MREM-S (module-wise reconstruction) is in `efficient_nlp.quant.mrem`; this file holds what both
share: the calibration sample, the partition into modules, the per-layer error and the inner
optimisation (`optimize`: Adam with linear decay run by `efficient_nlp.train.run`, short
loops without checkpoints) and the probes (`run_probe`: `efficient_nlp.train.predict`).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_nlp import train
from efficient_nlp.models import family as F
from efficient_nlp.quant import modules as M

#: The token arrays a reconstruction reads (``token_type_ids`` optional: not every family has token types).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class Reconstruction(NamedTuple):
    """What `rem`, `efficient_nlp.quant.mrem.mrem_s` and `efficient_nlp.quant.mrem_parallel.mrem_p`
    return: the reconstructed copy ``model``, the ``report`` (one dict per matmul for REM, per
    module for MREM) and run-level ``info`` (``seconds`` of the whole call, plus what the method
    adds: MREM-P's devices and phases)."""

    model: Any
    report: list
    info: dict


def token_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `TOKEN_KEYS` of ``arrays`` as numpy (``token_type_ids`` only when present)."""
    return {k: np.asarray(arrays[k]) for k in TOKEN_KEYS if k in arrays or k != "token_type_ids"}


# ----------------------------------------------------------------------------- calibration
def calibration_set(train_arrays: Mapping[str, np.ndarray], k: int = 4096, seed: int = 0):
    """``(calib, indices)``: ``k`` rows of ``train_arrays`` drawn without replacement with
    ``np.random.default_rng(seed)`` (every row, in a seeded order, when the split has fewer).

    ``indices`` (sorted, int64) are the only training rows PTQ reads; recipes record them and
    drop the rest of the split, so that "the training data beyond the calibration set is never
    touched" can be checked.  An empty split or ``k < 1`` raises ``ValueError``.
    """
    arrays = {name: np.asarray(v) for name, v in train_arrays.items()}
    sizes = {len(v) for v in arrays.values()}
    if not arrays or sizes == {0}:
        raise ValueError("the calibration set is empty: the training split has no rows")
    if len(sizes) != 1:
        raise ValueError(f"training arrays differ in length: { {n: len(v) for n, v in arrays.items()} }")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"calibration size k must be a positive int, got {k!r}")
    n = sizes.pop()
    rows = np.sort(np.random.default_rng(seed).permutation(n)[: min(int(k), n)]).astype(np.int64)
    return {name: v[rows] for name, v in arrays.items()}, rows


# ----------------------------------------------------------------------------- partition
def partition(num_layers: int, num_modules: int = 4) -> list[tuple[int, int]]:
    """Consecutive layer ranges ``[(start, stop), ...]`` covering ``0 .. num_layers-1`` once.

    Uneven ``L / N``: the first ``L mod N`` modules get one layer more (6 layers, 4 modules ->
    2, 2, 1, 1).  By convention the embeddings join module 0 and the head modules
    (`efficient_nlp.models.family.head_paths`) the last module (`efficient_nlp.quant.mrem`).
    """
    if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(num_modules, (int, np.integer)) or num_modules < 1:
        raise ValueError(f"num_modules must be a positive int, got {num_modules!r}")
    if num_modules > num_layers:
        raise ValueError(f"cannot partition {num_layers} layers into {num_modules} modules "
                         f"(each module needs at least one layer); use num_modules <= {num_layers}")
    base, extra = divmod(int(num_layers), int(num_modules))
    out, start = [], 0
    for i in range(int(num_modules)):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


# ----------------------------------------------------------------------------- helpers
def dotted(path) -> str:
    return ".".join(str(p) for p in path)


def trainable_names(model, prefixes: tuple[str, ...] = ("",), root: str = "") -> set[str]:
    """Dotted paths (under ``root``) of what reconstruction trains inside modules whose path
    starts with one of ``prefixes``: the latent weight of every quantized Linear / Embed
    (``kernel`` / ``embedding`` with a weight quantizer) and every learned quantizer
    parameter (LSQ step / offset, PACT lo / hi) unless its quantizer has ``learn_scale`` False
    (scales a one-shot method chose, `efficient_nlp.oneshot`).  Biases, LayerNorm and float
    sites: none."""
    out = set()
    for path, mod in nnx.iter_modules(model):
        name = dotted(path)
        if not any(f"{name}.".startswith(p) for p in prefixes):
            continue
        leaves = []
        if isinstance(mod, M.QuantLinear) and mod.weight_quant is not None:
            leaves = ["kernel"]
        elif isinstance(mod, M.QuantEmbed):
            leaves = ["embedding"]
        elif isinstance(mod, M.QuantizerModule) and mod.learn_scale:
            leaves = [a for a in ("step", "offset", "lo", "hi") if isinstance(getattr(mod, a, None), nnx.Param)]
        out.update(".".join(p for p in (root, name, leaf) if p) for leaf in leaves)
    return out


@dataclasses.dataclass(frozen=True)
class _Names:
    names: frozenset

    def __call__(self, path, value):
        return isinstance(value, nnx.Param) and dotted(path) in self.names


def name_filter(names: set[str]):
    """An NNX filter selecting the ``nnx.Param`` leaves at the dotted paths ``names`` (hashable,
    equal for equal ``names``: a compiled step is reused across calls)."""
    return _Names(frozenset(names))


def masked_mse(x, y, mask):
    """Per-example mean squared error over real tokens and features: [B,T,H] -> [B]."""
    m = jnp.asarray(mask, jnp.float32)[..., None]
    sq = jnp.square(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) * m
    return jnp.sum(sq, axis=(1, 2)) / jnp.maximum(jnp.sum(m, axis=(1, 2)) * x.shape[-1], 1.0)


def usable_batch_size(batch_size: int, rows: int) -> int:
    """``batch_size`` clipped to the data and rounded down to a multiple of the device count."""
    devices = jax.device_count()
    b = min(int(batch_size), int(rows)) // devices * devices
    if b < 1:
        raise ValueError(f"{rows} calibration rows cannot fill a batch on {devices} devices")
    return b


@functools.lru_cache(maxsize=None)
def adam_linear_decay(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """Adam with the learning rate decaying linearly from ``learning_rate`` to 0 over ``steps``
    updates (update ``t = 0, 1, ...`` is scaled by ``learning_rate * (1 - t / steps)``).  One
    object per ``(learning_rate, steps)``: every `optimize` call with the same settings reuses
    one compiled step (`efficient_nlp.train.compiled_step`)."""
    schedule = optax.linear_schedule(float(learning_rate), 0.0, int(steps))
    return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(schedule))


def optimize(model, loss_fn: Callable, arrays: Mapping[str, np.ndarray], *, trainable, steps: int,
             learning_rate: float, batch_size: int, seed: int = 0):
    """`adam_linear_decay` for ``steps`` updates of the ``trainable`` leaves of ``model``
    (everything else frozen) on batches of ``arrays`` drawn with
    `efficient_nlp.data.train_batches` (seeded), data-parallel over all devices:
    `efficient_nlp.train.run` (no checkpoints; the step is compiled once per loss, optimizer,
    filter and model structure, so matmuls of one shape compile once).  ``loss_fn(model,
    batch, rngs) -> (loss, aux)`` as for ``train.run``; pass hashable ``loss_fn`` and
    ``trainable`` (e.g. `name_filter`) to reuse the compilation.

    Returns ``(trained copy of model, per-step losses)``; ``model`` is not modified.
    """
    from efficient_nlp import data as data_lib

    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return train.copy_model(model), []
    b = usable_batch_size(batch_size, len(next(iter(arrays.values()))))
    try:
        trained, history = train.run(model, loss_fn, adam_linear_decay(float(learning_rate), steps),
                                     data_lib.train_batches(arrays, b, seed=seed), steps=steps,
                                     trainable=trainable, seed=seed, mesh=train.make_mesh())
    except train.NonFiniteLossError as e:
        raise FloatingPointError(f"reconstruction diverged (non-finite loss at step {e.step}); "
                                 "lower the learning rate") from e
    return trained, [h["loss"] for h in history]


def run_probe(model, probe: Callable, arrays: Mapping[str, np.ndarray], batch_size: int = 64):
    """``probe(model, batch)`` (a hashable callable returning an array or a dict of arrays
    with a leading batch axis) over every row of ``arrays`` once: `efficient_nlp.train.predict`
    with the batch size rounded down to a multiple of the device count."""
    return train.predict(model, arrays, usable_batch_size(batch_size, 10**9), predict_fn=probe)


def mean_over(model, probe, arrays, batch_size=64) -> float:
    """Mean over rows of ``probe(model, batch) -> [B]`` (see `run_probe`)."""
    return float(np.mean(run_probe(model, probe, arrays, batch_size)))


# ----------------------------------------------------------------------------- layer errors
class Pair(nnx.Module):
    """The quantized model ``q`` next to the full-precision one ``fp`` (one pytree for jit)."""

    def __init__(self, q, fp):
        self.q = q
        self.fp = fp


def _layer_outputs(model, batch):
    """Every layer's output (capture ``ffn_out``) of ``model`` on a token batch."""
    h = F.embed(model, batch)
    return F.run_layers(model, h, batch["attention_mask"], capture=("ffn_out",))[1]["ffn_out"]


@dataclasses.dataclass(frozen=True)
class _LayerErrors:
    def __call__(self, pair, batch):
        mask = batch["attention_mask"]
        q, f = _layer_outputs(pair.q, batch), _layer_outputs(pair.fp, batch)
        return jnp.stack([masked_mse(a, b, mask) for a, b in zip(q, f)], axis=1)


def layer_errors(qmodel, teacher, arrays, batch_size: int = 128) -> list[float]:
    """Per layer: MSE of the quantized model's layer output vs the full-precision one's, both fed
    end to end from the same inputs (mean over examples of the per-example masked MSE)."""
    per = run_probe(Pair(qmodel, teacher), _LayerErrors(), token_arrays(arrays), batch_size)
    return [float(v) for v in per.mean(axis=0)]


# ----------------------------------------------------------------------------- REM
#: `Family.site_inputs` value meaning "the layer's input".
LAYER_INPUT = "hidden_states"


@dataclasses.dataclass(frozen=True)
class _Probe:
    """Runs one piece of a model on a batch: ``layer == -1`` the embeddings (returns their
    output), else layer ``layer`` on ``batch["h"]`` (returns its output ``out`` and the
    per-layer ``capture`` entries: the inputs of its Linears)."""
    layer: int
    capture: tuple[str, ...] = ()

    def __call__(self, model, batch):
        if self.layer < 0:
            return F.embed(model, batch)
        h, inter = F.run_layers(model, batch["h"], batch["attention_mask"], start=self.layer,
                                stop=self.layer + 1, capture=self.capture)
        return {"out": h, **{k: v[0] for k, v in inter.items()}}


class _Tap(nnx.Module):
    """Runs ``inner`` and keeps its input in ``seen`` (the input of a head Linear)."""

    def __init__(self, inner):
        self.inner = inner
        self.seen = nnx.data(None)

    def __call__(self, x):
        self.seen = x
        return self.inner(x)


@dataclasses.dataclass(frozen=True)
class _HeadInput:
    """The input of the head's Linear at ``path`` when the head runs on ``batch["h"]`` (None if
    the head does not run it: a bare encoder computes no logits)."""
    path: str

    def __call__(self, model, batch):
        tap = _Tap(F.get_module(model, self.path))
        F.set_module(model, self.path, tap)
        F.head(model, batch["h"])
        return tap.seen


def head_linears(model) -> list[str]:
    """Paths of the quantized Linears inside the model's head modules (`F.head_paths`), in order."""
    out = []
    for head in F.head_paths(model):
        for path, mod in nnx.iter_modules(F.get_module(model, head)):
            if isinstance(mod, M.QuantLinear):
                out.append(".".join([head, *map(str, path)]))
    return out


class _RemTarget(nnx.Module):
    """A copy of one quantized Linear (``q``, its site name blanked so that every matmul of one
    shape and quantizer has the same graph: one compile) and its frozen float weight ``w``."""

    def __init__(self, q: M.QuantLinear, w):
        wq = None if q.weight_quant is None else q.weight_quant.quantizer
        aq = None if q.input_quant is None else q.input_quant.quantizer
        self.q = M.QuantLinear(train.copy_model(q), "", wq, aq)
        nnx.update(self.q, nnx.clone(nnx.state(q)))
        if self.q.input_quant is not None:
            self.q.input_quant.calibrated = q.input_quant.calibrated
        self.w = nnx.Variable(jnp.asarray(w))


def _rem_err(target, a):
    fp = jnp.dot(a, target.w[...])
    if target.q.bias is not None:
        fp = fp + target.q.bias[...]
    return jnp.mean(jnp.square(target.q(a) - fp), axis=-1)


def rem_loss(target, batch, rngs=None):
    """``mean || Q(a) Q(w) + b - (a w + b) ||^2`` over the batch's token rows."""
    return jnp.mean(_rem_err(target, batch["a"])), {}


@dataclasses.dataclass(frozen=True)
class _RemRowError:
    def __call__(self, target, batch):
        return _rem_err(target, batch["a"])


def _tokens(x, mask, max_tokens, rng):
    rows = np.asarray(x)[np.asarray(mask) > 0]
    if max_tokens and len(rows) > max_tokens:
        rows = rows[np.sort(rng.choice(len(rows), int(max_tokens), replace=False))]
    return rows


def rem(qmodel, teacher, calib: Mapping[str, np.ndarray], *, steps: int = 200, learning_rate: float = 1e-4,
        token_batch_size: int = 2048, max_tokens: int = 0, eval_batch_size: int = 64, seed: int = 0,
        log: Callable[[str], Any] | None = print) -> Reconstruction:
    """REM (see module docstring) on a `quantize_model` copy of ``teacher``; returns a
    `Reconstruction`: the reconstructed copy of ``qmodel`` (not modified), the report
    ``[{site, layer, tokens, before, after, seconds}]`` (MSE of the matmul output on the
    calibration tokens before / after; ``layer`` is the number of layers for head Linears) and
    ``info`` ``{"seconds"}``.

    ``steps`` Adam updates per matmul on batches of ``token_batch_size`` real-token rows;
    ``max_tokens`` > 0 caps the token rows per matmul (seeded subset).  Head Linears fed one
    row per example (e.g. on the first token) train on every example's row.
    """
    start = time.perf_counter()
    arrays = token_arrays(calib)
    if len(arrays["input_ids"]) == 0:
        raise ValueError("the calibration set is empty")
    qmodel = train.copy_model(qmodel)
    sites = F.sites(qmodel)
    inputs = {site.role: F.site_input(qmodel, site.role) for site in sites}
    capture = tuple(sorted(set(inputs.values()) - {LAYER_INPUT}))
    mask = arrays["attention_mask"]
    rng = np.random.default_rng(seed)

    def run(probe, h=None):
        feed = dict(arrays) if h is None else {**arrays, "h": h}
        return run_probe(qmodel, probe, feed, eval_batch_size)

    def fit_linear(site, a, layer):
        q = F.get_module(qmodel, site)
        if not isinstance(q, M.QuantLinear):
            return None
        target = _RemTarget(q, F.get_module(teacher, site).kernel[...])
        rows = {"a": a}
        t0 = time.perf_counter()
        before = mean_over(target, _RemRowError(), rows, 4096)
        names = trainable_names(q, root="q")
        trained, _ = optimize(target, rem_loss, rows, trainable=name_filter(names), steps=steps,
                              learning_rate=learning_rate, batch_size=token_batch_size, seed=seed)
        nnx.update(q, nnx.state(trained.q))
        after = mean_over(trained, _RemRowError(), rows, 4096)
        row = dict(site=site, layer=layer, tokens=int(len(a)), before=before, after=after,
                   seconds=time.perf_counter() - t0)
        if log:
            log(f"REM {site}: mse {before:.3g} -> {after:.3g} ({row['seconds']:.1f}s)")
        return row

    report = []
    h = run(_Probe(-1))
    num_layers = F.num_layers(qmodel)
    for i in range(num_layers):
        for site in (s for s in sites if s.layer == i):
            # the layer is re-run before each of its later Linears: the ones before changed
            source = inputs[site.role]
            a = h if source == LAYER_INPUT else run(_Probe(i, capture), h)[source]
            row = fit_linear(site.path, _tokens(a, mask, max_tokens, rng), i)
            if row is not None:
                report.append(row)
        h = run(_Probe(i, capture), h)["out"]
    for path in head_linears(qmodel):
        a = run(_HeadInput(path), h)
        if a is None:
            continue
        row = fit_linear(path, a if np.ndim(a) == 2 else _tokens(a, mask, max_tokens, rng), num_layers)
        if row is not None:
            report.append(row)
    return Reconstruction(qmodel, report, {"seconds": time.perf_counter() - start})


__all__ = ["calibration_set", "partition", "rem", "rem_loss", "layer_errors", "masked_mse", "optimize",
           "adam_linear_decay", "run_probe", "trainable_names", "name_filter", "Pair", "Reconstruction", "TOKEN_KEYS",
           "token_arrays", "head_linears"]
