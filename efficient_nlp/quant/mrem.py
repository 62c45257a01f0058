"""Module-wise reconstruction error minimisation, sequential (MREM-S, docs/quantization.md).

    parts = ptq.partition(num_layers, 4)                   # [(0, 2), (2, 4), (4, 5), (5, 6)]
    qmodel, report, info = mrem.mrem_s(qmodel, teacher, calib, num_modules=4, steps=2000)

The model is cut into N modules of consecutive Transformer layers (`ptq.partition`); the
embeddings join module 0, the head modules (`efficient_nlp.models.family.head_paths`) the last
module.  Module n minimises

    l_n = sum_{l in module n} || f_hat_l - f_l ||^2  (+ ||E_hat - E||^2 if n = 0)
                                                      (+ ||z_hat - z||^2 if n = N-1)

where ``f_l`` are FFN outputs (layer outputs, capture ``ffn_out``), ``E`` the embedding output
and ``z`` the logits (of a model with a head); hats are the quantized module fed by the
*already quantized* predecessors (the quantized stream), plain symbols the full-precision
module fed by the full-precision predecessors (the full-precision stream).  Squared errors
are means over real tokens and features per example (per example and label for sequence
logits, per real token and vocabulary entry for token logits), averaged over the batch.  Only
module n's latent weights and learned quantizer parameters train (`ptq.trainable_names`);
Adam, ``lr`` decaying linearly to 0 over ``steps`` (defaults 1e-4, 2,000), batches drawn from
the calibration set only.  Modules run one after another: after module n is trained, both
streams are pushed through it once over the whole calibration set and cached on the host
([K, T, H] each) as module n+1's inputs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp.models import family as F
from efficient_nlp.quant.ptq import (TOKEN_KEYS, Pair, Reconstruction, masked_mse, mean_over, name_filter, optimize,
                                     partition, run_probe, token_arrays, trainable_names)


@dataclasses.dataclass(frozen=True)
class Module:
    """Module ``index`` of a partition: layers ``start .. stop-1`` (``first`` holds the
    embeddings, ``last`` the head modules)."""
    index: int
    start: int
    stop: int
    first: bool
    last: bool

    def prefixes(self, model) -> tuple[str, ...]:
        """Path prefixes of ``model``'s submodules that belong to this module (its layers, then
        the embeddings for the first module, the head modules for the last)."""
        out = tuple(f"{F.layer_path(model, i)}." for i in range(self.start, self.stop))
        if self.first:
            out += (f"{F.embeddings_path(model)}.",)
        if self.last:
            out += tuple(f"{p}." for p in F.head_paths(model))
        return out


def modules(num_layers: int, num_modules: int = 4) -> list[Module]:
    """The `Module` s of ``ptq.partition(num_layers, num_modules)``."""
    parts = partition(num_layers, num_modules)
    return [Module(i, a, b, i == 0, i == len(parts) - 1) for i, (a, b) in enumerate(parts)]


def module_forward(model, mod: Module, batch, h=None) -> dict:
    """Runs module ``mod`` of ``model``: from the token ids (first module) or the hidden state
    ``h`` [B,T,H].  Returns ``{"out", "ffn_out"}`` plus ``"embedding"`` (first module) and
    ``"logits"`` (last module of a model with a head)."""
    out = {}
    if mod.first:
        h = out["embedding"] = F.embed(model, batch)
    h, inter = F.run_layers(model, h, batch["attention_mask"], start=mod.start, stop=mod.stop, capture=("ffn_out",))
    out["out"], out["ffn_out"] = h, inter["ffn_out"]
    logits = F.head(model, h) if mod.last else None
    if logits is not None:
        out["logits"] = logits
    return out


def compare(pair, mod: Module, batch):
    """``(l_n [B], quantized output, full-precision output)`` of module ``mod`` on one batch:
    the per-example module loss (see module docstring) and both streams' output hidden states
    (the next module's inputs).  The quantized module reads ``batch["q_in"]``, the
    full-precision one ``batch["fp_in"]`` (token ids for the first module)."""
    mask = batch["attention_mask"]
    q = module_forward(pair.q, mod, batch, batch.get("q_in"))
    f = jax.lax.stop_gradient(module_forward(pair.fp, mod, batch, batch.get("fp_in")))
    loss = sum(masked_mse(a, b, mask) for a, b in zip(q["ffn_out"], f["ffn_out"]))
    if "embedding" in q:
        loss = loss + masked_mse(q["embedding"], f["embedding"], mask)
    if "logits" in q:
        if q["logits"].ndim == 3:   # token logits (a masked-LM head): real tokens only
            loss = loss + masked_mse(q["logits"], f["logits"], mask)
        else:
            loss = loss + jnp.mean(jnp.square(q["logits"] - f["logits"]), axis=-1)
    return loss, q["out"], f["out"]


@dataclasses.dataclass(frozen=True)
class ModuleLoss:
    """``loss_fn(pair, batch, rngs) -> (l_n, aux)`` for `optimize` (hashable: jit-cache
    friendly); ``aux`` is ``{}``, or with ``outputs=True`` both streams' module outputs
    ``{"q_out", "fp_out"}`` (MREM-P pushes them to the next module's queue)."""
    mod: Module
    outputs: bool = False

    def __call__(self, pair, batch, rngs=None):
        loss, q_out, fp_out = compare(pair, self.mod, batch)
        return jnp.mean(loss), ({"q_out": jax.lax.stop_gradient(q_out), "fp_out": fp_out} if self.outputs else {})


@dataclasses.dataclass(frozen=True)
class _PerExample:
    mod: Module

    def __call__(self, pair, batch):
        return compare(pair, self.mod, batch)[0]


@dataclasses.dataclass(frozen=True)
class _Boundary:
    """The module's output hidden state on both streams: ``{"q_in": ..., "fp_in": ...}``
    (the next module's inputs)."""
    mod: Module

    def __call__(self, pair, batch):
        return {f"{s}_in": module_forward(getattr(pair, s), self.mod, batch, batch.get(f"{s}_in"))["out"]
                for s in ("q", "fp")}


def module_loss(qmodel, teacher, mod: Module, arrays, batch_size: int = 64) -> float:
    """l_n of module ``mod`` averaged over every row of ``arrays`` (ids plus ``q_in`` /
    ``fp_in`` for modules after the first)."""
    return mean_over(Pair(qmodel, teacher), _PerExample(mod), arrays, batch_size)


def next_inputs(qmodel, teacher, mod: Module, arrays, batch_size: int = 64) -> dict:
    """``arrays`` for the module after ``mod``: the token arrays plus ``q_in`` / ``fp_in``, both
    streams pushed through module ``mod`` of ``qmodel`` / ``teacher`` over every row (host)."""
    return {**{k: arrays[k] for k in TOKEN_KEYS if k in arrays},
            **run_probe(Pair(qmodel, teacher), _Boundary(mod), arrays, batch_size)}


def module_losses(qmodel, teacher, mods, arrays, batch_size: int = 64) -> list[float]:
    """l_n of every module of ``mods`` over every row of ``arrays``, each module fed end to end
    by its predecessors in ``qmodel`` (quantized stream) and ``teacher`` (full-precision)."""
    out = []
    for mod in mods:
        out.append(module_loss(qmodel, teacher, mod, arrays, batch_size))
        if not mod.last:
            arrays = next_inputs(qmodel, teacher, mod, arrays, batch_size)
    return out


def train_module(qmodel, teacher, mod: Module, arrays, *, steps: int, learning_rate: float = 1e-4,
                 batch_size: int = 32, seed: int = 0):
    """Trains module ``mod`` of ``qmodel`` (its latent weights and quantizer parameters only;
    everything else, and ``qmodel`` itself, untouched) on l_n over batches of ``arrays``.
    Returns ``(new qmodel, per-step losses, number of trained leaves)``."""
    names = trainable_names(qmodel, mod.prefixes(qmodel), root="q")
    if not names:
        raise ValueError(f"module {mod.index} (layers {mod.start}..{mod.stop - 1}) has nothing quantized to train")
    trained, losses = optimize(Pair(qmodel, teacher), ModuleLoss(mod), arrays, trainable=name_filter(names),
                               steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
    return trained.q, losses, len(names)


def mrem_s(qmodel, teacher, calib: Mapping[str, np.ndarray], *, num_modules: int = 4, steps: int = 2000,
           learning_rate: float = 1e-4, batch_size: int = 32, eval_batch_size: int = 64, seed: int = 0,
           log: Callable[[str], Any] | None = print) -> Reconstruction:
    """MREM-S (see module docstring) of a `quantize_model` copy ``qmodel`` of ``teacher``.

    Returns a `ptq.Reconstruction` ``(model, report, info)``: the new qmodel, one report dict per
    module: ``index, layers, trainable`` (number of trained leaves), ``loss_before`` /
    ``loss_after`` (l_n over the whole calibration set, same inputs), ``first_loss`` /
    ``last_loss`` (training batches), ``train_seconds`` (the optimisation alone), ``seconds``
    (with the evaluations); ``info``: ``seconds`` (the whole call) and ``seconds_train`` (the
    modules' optimisations).  ``qmodel`` itself is not modified.
    """
    start = time.perf_counter()
    mods = modules(F.num_layers(qmodel), num_modules)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    arrays = token_arrays(calib)
    if len(arrays["input_ids"]) == 0:
        raise ValueError("the calibration set is empty")
    report = []
    for mod in mods:
        t0 = time.perf_counter()
        before = module_loss(qmodel, teacher, mod, arrays, eval_batch_size)
        t1 = time.perf_counter()
        qmodel, losses, count = train_module(qmodel, teacher, mod, arrays, steps=steps, learning_rate=learning_rate,
                                             batch_size=batch_size, seed=seed + mod.index)
        train_seconds = time.perf_counter() - t1
        after = module_loss(qmodel, teacher, mod, arrays, eval_batch_size)
        if not mod.last:  # the next module's inputs: both streams through this module, cached
            arrays = next_inputs(qmodel, teacher, mod, arrays, eval_batch_size)
        row = dict(index=mod.index, layers=[mod.start, mod.stop], trainable=count, loss_before=before,
                   loss_after=after, first_loss=losses[0] if losses else None,
                   last_loss=losses[-1] if losses else None, train_seconds=train_seconds,
                   seconds=time.perf_counter() - t0)
        report.append(row)
        if log:
            log(f"MREM-S module {mod.index} (layers {mod.start}..{mod.stop - 1}): loss {before:.4g} -> "
                f"{after:.4g} in {row['seconds']:.1f}s")
    info = dict(seconds=time.perf_counter() - start, seconds_train=sum(r["train_seconds"] for r in report))
    return Reconstruction(qmodel, report, info)


__all__ = ["Module", "modules", "module_forward", "compare", "ModuleLoss", "module_loss", "module_losses",
           "next_inputs", "train_module", "mrem_s"]
