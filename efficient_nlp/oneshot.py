"""One-shot post-training compression, layer after layer (docs/oneshot.md).

    calib, _ = quant.calibration_set(task.train, k=128)
    qmodel, _ = quant.quantize_model(teacher, quant.make_spec(4, 32, 32, weight_method="lsq"))
    result = oneshot.quantize(qmodel, calib, method="gptq")           # or "rtn"
    smoothed, report = oneshot.smooth(teacher, calib, method="awq", bits=4)   # then quantize + rtn / gptq
    result = oneshot.prune(teacher, calib, method="sparsegpt", sparsity=0.5, n_m=(2, 4))

The pass (`sequential`) walks the layer stack of any family (`efficient_nlp.models.family`):
for layer ``i`` and each group of its matmul sites that read one input (``q, k, v``; ``o``;
``ffn_in, ffn_gate``; ``ffn_out``, in that order) it runs layer ``i`` of the *already
compressed* model on the calibration hidden states, accumulates the input statistics of that
group batch by batch (the Gram matrix ``H = 2/n sum x x^T``, per-channel sums of squares and
maxima: `efficient_nlp.quant.rounding.hessian_update`), hands them to the method, then moves on;
after the last group the compressed layer's output becomes the next layer's input.  What it
keeps between steps is the hidden states of the calibration set at one layer boundary
(``[N, T, H]``) and one group's statistics (``[d_in, d_in]``): never a whole model's
activations, nor one site's inputs for every example (``Result.info["held"]`` lists the shapes).
The head's Linears (a pooler, an untied LM head) follow on the last layer's output.

Methods: ``rtn`` / ``gptq`` write their scales into LSQ weight quantizers and, for GPTQ, the
values on the grid into the kernels (RTN keeps the float latent weights, which round to its
values), so fake quantization, export, the integer path and a later MREM see them exactly;
``awq`` / ``smoothquant`` rescale input channels of the float model and fold the inverse scale
into the preceding norm or Linear, leaving the float function unchanged; ``sparsegpt`` (with
``bits`` also quantizing, in one pass), ``wanda`` and ``magnitude`` zero weights.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efficient_nlp import train
from efficient_nlp.data import eval_batches
from efficient_nlp.models import family as F
from efficient_nlp.prune import oneshot as P
from efficient_nlp.quant import rounding as G
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import smoothing as S
from efficient_nlp.quant.ptq import LAYER_INPUT, _HeadInput, _Probe, head_linears, token_arrays
from efficient_nlp.train import distributed
from efficient_nlp.train.evaluate import _predict_step, placed_state

QUANT_METHODS = ("rtn", "gptq")
SMOOTH_METHODS = ("awq", "smoothquant")
PRUNE_METHODS = ("sparsegpt", "wanda", "magnitude")


class Result(NamedTuple):
    """``model`` (a compressed copy; the input is not changed), ``report`` (one dict per Linear:
    site, layer, role, error = ``||X W' - X W||^2 / n`` on the calibration inputs, seconds, and
    what the method adds) and ``info`` (``seconds``, ``held``: shapes kept between steps)."""

    model: Any
    report: list
    info: dict


# ----------------------------------------------------------------------------- the pass
def site_groups(model, i: int) -> list[tuple[str, list[F.Site]]]:
    """Layer ``i``'s sites grouped by the input they read, in forward order:
    ``[(capture name, [Site, ...]), ...]``."""
    fam = F.family_of(model)
    groups: list[tuple[str, list[F.Site]]] = []
    for site in (s for s in F.sites(model) if s.layer == i):
        source = fam.site_inputs[site.role]
        if groups and groups[-1][0] == source:
            groups[-1][1].append(site)
        else:
            groups.append((source, [site]))
    return groups


@dataclasses.dataclass(frozen=True)
class _GroupInput:
    """Layer ``layer`` on ``batch["h"]``: the input of a site group (``source``)."""
    layer: int
    source: str

    def __call__(self, model, batch):
        if self.source == LAYER_INPUT:
            return batch["h"]
        _, inter = F.run_layers(model, batch["h"], batch["attention_mask"], start=self.layer,
                                stop=self.layer + 1, capture=(self.source,))
        return inter[self.source][0]


@jax.jit
def _update(stats, x, mask):
    return G.hessian_update(stats, x, mask)


class _Runner:
    """Runs probes of ``model`` over the calibration rows (``arrays`` plus the current hidden
    states ``h``) batch by batch: `hidden` keeps one output per row (`efficient_nlp.train.predict`),
    `stats` only reduces."""

    def __init__(self, model, arrays: Mapping[str, np.ndarray], batch_size: int):
        self.model, self.arrays = model, dict(arrays)
        self.mesh = distributed.make_mesh()
        devices = jax.device_count()
        self.batch_size = max(devices, min(int(batch_size), len(arrays["input_ids"])) // devices * devices)

    def _batches(self, h):
        feed = self.arrays if h is None else {**self.arrays, "h": h}
        graphdef, state = placed_state(self.model, self.mesh)
        for host_batch in eval_batches(feed, self.batch_size):
            yield graphdef, state, distributed.shard_batch(host_batch, self.mesh), host_batch["weight"]

    def hidden(self, probe, h=None):
        feed = self.arrays if h is None else {**self.arrays, "h": h}
        return train.predict(self.model, feed, self.batch_size, predict_fn=probe, mesh=self.mesh)

    def stats(self, probe, h):
        stats = None
        for graphdef, state, batch, weight in self._batches(h):
            x = _predict_step(graphdef, state, batch, probe)
            if x is None:
                return None
            w = jnp.asarray(weight, jnp.float32)
            mask = w if x.ndim == 2 else jnp.asarray(batch["attention_mask"], jnp.float32) * w[:, None]
            stats = G.init_stats(x.shape[-1]) if stats is None else stats
            stats = _update(stats, x, mask)
        return stats


Visit = Callable[[Any, list[str], Any, int], list[dict]]


def sequential(model, calib: Mapping[str, np.ndarray], visit: Visit, *, batch_size: int = 32,
               heads: bool = True, log: Callable[[str], Any] | None = print) -> Result:
    """Runs ``visit(model, paths, stats, layer) -> [row per path]`` for every site group of
    every layer in forward order (then for each head Linear when ``heads``), on a copy of
    ``model`` that ``visit`` changes in place; see the module docstring.  ``calib``: token
    arrays (``input_ids``, ``attention_mask``, optional ``token_type_ids``)."""
    start = time.perf_counter()
    arrays = token_arrays(calib)
    if len(arrays["input_ids"]) == 0:
        raise ValueError("the calibration set is empty; pass at least one tokenised example")
    model = train.copy_model(model)
    run = _Runner(model, arrays, batch_size)
    h = run.hidden(_Probe(-1))
    held = {"hidden": tuple(h.shape), "stats": []}
    report = []
    num_layers = F.num_layers(model)
    for i in range(num_layers):
        t0 = time.perf_counter()
        for source, sites in site_groups(model, i):
            stats = run.stats(_GroupInput(i, source), h)
            held["stats"].append(tuple(stats.H.shape))
            report += _rows(visit(model, [s.path for s in sites], stats, i), sites)
        h = run.hidden(_Probe(i), h)["out"]
        if log:
            log(f"layer {i + 1}/{num_layers} done ({time.perf_counter() - t0:.1f}s)")
    if heads:
        for path in head_linears(model):
            stats = run.stats(_HeadInput(path), h)
            if stats is not None:
                held["stats"].append(tuple(stats.H.shape))
                report += visit(model, [path], stats, num_layers)
    return Result(model, report, {"seconds": time.perf_counter() - start, "held": held})


def _rows(rows, sites):
    """``rows`` (one per Linear the method changed) with each site's role."""
    roles = {s.path: s.role for s in sites}
    return [{"role": roles[r["site"]], **r} for r in rows]


def check_tokens(stats, path: str, method: str) -> None:
    """The Hessian-based methods (GPTQ, AWQ, SparseGPT, Wanda) need at least as many calibration
    tokens as the layer has inputs: with fewer, ``H`` is singular and only the damping decides."""
    d_in = int(stats.H.shape[0])
    if int(stats.n) < d_in:
        raise ValueError(f"{method} of {path}: the calibration set has {int(stats.n)} real tokens but the layer "
                         f"reads {d_in} input features; give at least {d_in} tokens (more calibration rows, "
                         "e.g. config.oneshot.calibration_size, or longer ones)")


# ----------------------------------------------------------------------------- quantization
def _lsq_weight(model, path):
    q = F.get_module(model, path)
    if not isinstance(q, M.QuantLinear) or q.weight_quant is None:
        return None
    wq = q.weight_quant
    if wq.quantizer.method != "lsq" or not wq.quantizer.signed:
        raise ValueError(
            f"{path}: one-shot quantization stores its scales in learned-step (LSQ) weight quantizers, "
            f"got {wq.quantizer.name}; build the model with quant.make_spec(..., weight_method='lsq')")
    return q, wq


def _group_size(wq) -> int:
    return int(getattr(wq.quantizer, "group_size", 0) or 0)


@dataclasses.dataclass(frozen=True)
class _Quantize:
    method: str
    act_order: bool
    damp: float
    block_size: int

    def __call__(self, model, paths, stats, layer):
        rows = []
        for path in paths:
            found = _lsq_weight(model, path)
            if found is None:
                continue
            q, wq = found
            t0 = time.perf_counter()
            w = jnp.asarray(q.kernel[...], jnp.float32)
            bits, g = wq.quantizer.bits, _group_size(wq) or None
            rtn_values, rtn_scales = G.rtn(w, bits, g)
            method = self.method
            if method == "gptq" and layer >= F.num_layers(model) and int(stats.n) < w.shape[0]:
                method = "rtn"   # a head Linear fed one row per example (a pooler): too few rows for H
            if method == "gptq":
                check_tokens(stats, path, "gptq")
                values, scales = G.gptq(w, stats, bits, g, act_order=self.act_order, damp=self.damp,
                                        block_size=self.block_size)
            else:
                values, scales = None, rtn_scales   # the latent weight rounds to RTN's values itself
            _write(q, wq, values, scales)
            values = rtn_values if values is None else values
            rows.append(dict(site=path, layer=layer, method=method, tokens=int(stats.n),
                             error=float(G.layer_error(w, values, stats)),
                             rtn_error=float(G.layer_error(w, rtn_values, stats)),
                             seconds=time.perf_counter() - t0))
        return rows


def _write(q, wq, values, scales):
    """Puts a method's ``scales`` into the LSQ step of ``wq`` and its grid ``values`` (None: keep
    the latent float weight, which the step rounds to the same values) into the kernel."""
    step = wq.step[...]
    if tuple(np.shape(scales)) != tuple(np.shape(step)):
        raise ValueError(f"{q.site}: the method's scales have shape {np.shape(scales)} but the weight "
                         f"quantizer's step has {np.shape(step)} (granularity {wq.quantizer.granularity})")
    if values is not None:
        q.kernel[...] = jnp.asarray(values, q.kernel[...].dtype)
    wq.step[...] = jnp.asarray(scales, step.dtype)
    wq.learn_scale = False   # a later REM / MREM trains the latent weights on these scales


def quantize(qmodel, calib: Mapping[str, np.ndarray], *, method: str = "gptq", act_order: bool = False,
             damp: float = 0.01, block_size: int = 128, batch_size: int = 32,
             log: Callable[[str], Any] | None = print) -> Result:
    """RTN or GPTQ (Frantar et al. 2022) for every quantized Linear of ``qmodel`` (a
    `efficient_nlp.quant.quantize_model` copy with LSQ weight quantizers, per channel or per
    group), each on the inputs produced by the already-quantized predecessors; the bits and the
    granularity come from each Linear's weight quantizer.  Rows report the GPTQ error next to
    the RTN error of the same weights on the same inputs.  A layer Linear with fewer calibration
    tokens than inputs is an error (`check_tokens`); a head Linear fed one row per example (a
    pooler) with fewer examples than inputs gets RTN, and its row says ``method: "rtn"``."""
    if method not in QUANT_METHODS:
        raise ValueError(f"unknown one-shot quantization method {method!r}; valid: {QUANT_METHODS}")
    return sequential(qmodel, calib, _Quantize(method, bool(act_order), float(damp), int(block_size)),
                      batch_size=batch_size, log=log)


# ----------------------------------------------------------------------------- smoothing
def _fold_target(model, layer: int, roles: tuple[str, ...]):
    """Where the inverse smoothing scale of the input of ``roles`` (one site group) can go so
    that the float function is unchanged: ``("norm", module)`` for a pre-norm layer's norm that
    feeds only this group, ``("linear", module, repeat)`` for the Linear whose output columns
    are this input (``v`` before ``o`` when every query head has its own value head; the up
    projection before the down projection of a gated FFN), or None (post-norm layers, where the
    norm also feeds the residual; the activation before a plain FFN's output)."""
    fam = F.family_of(model)
    if roles == ("o",):
        hl = F.head_layout(model, layer)
        if hl.num_heads == hl.num_kv_heads:
            return ("linear", F.get_module(model, F.site_path(model, layer, "v")))
        return None
    if roles == ("ffn_out",) and "ffn_gate" in fam.layer_sites:
        return ("linear", F.get_module(model, F.site_path(model, layer, "ffn_in")))
    norm = fam.site_norms.get(roles[0]) if fam.site_norms else None
    if norm is not None:
        return ("norm", F.get_module(model, f"{F.layer_path(model, layer)}.{norm}"))
    return None


def _fold(target, s):
    """Divides the output channels of ``target`` by ``s``."""
    inv = 1.0 / s
    if target[0] == "norm":
        norm = target[1]
        for name in ("scale", "bias"):
            p = getattr(norm, name, None)
            if p is not None:
                p[...] = (p[...] * inv).astype(p[...].dtype)
        return
    lin = target[1]
    lin.kernel[...] = (lin.kernel[...] * inv[None, :]).astype(lin.kernel[...].dtype)
    if lin.bias is not None:
        lin.bias[...] = (lin.bias[...] * inv).astype(lin.bias[...].dtype)


@dataclasses.dataclass(frozen=True)
class _Smooth:
    method: str
    alpha: float
    bits: int
    group_size: int
    grid: int

    def __call__(self, model, paths, stats, layer):
        roles = tuple(F.site_of(model, p).role for p in paths) if layer < F.num_layers(model) else ()
        target = _fold_target(model, layer, roles) if roles else None
        linears = [F.get_module(model, p) for p in paths]
        if target is None:
            return [dict(site=p, layer=layer, smoothed=False, alpha=None) for p in paths]
        kernels = [jnp.asarray(lin.kernel[...], jnp.float32) for lin in linears]
        if self.method == "awq":
            check_tokens(stats, paths[0], "awq")
            s, alpha, _ = S.awq_scales(kernels, stats, self.bits, self.group_size or None, grid=self.grid)
        else:
            s, alpha = S.smoothquant_scales(stats, kernels, self.alpha), self.alpha
        s = jnp.asarray(s, jnp.float32)
        _fold(target, s)
        for lin in linears:
            lin.kernel[...] = S.scale_kernel(lin.kernel[...], s).astype(lin.kernel[...].dtype)
        return [dict(site=p, layer=layer, smoothed=True, alpha=float(alpha),
                     max_input=float(jnp.max(stats.absmax)), max_input_after=float(jnp.max(stats.absmax / s)))
                for p in paths]


def smooth(model, calib: Mapping[str, np.ndarray], *, method: str = "smoothquant", alpha: float = 0.5,
           bits: int = 4, group_size: int = 0, grid: int = 20, batch_size: int = 32,
           log: Callable[[str], Any] | None = print) -> Result:
    """SmoothQuant (Xiao et al. 2022: ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, for W8A8) or
    AWQ (Lin et al. 2023: ``s = mean|X_j|^alpha`` with alpha searched for the ``bits`` /
    ``group_size`` weight grid) on a float ``model``: every site group whose input can be
    rescaled exactly (`_fold_target`) gets ``W' = diag(s) W`` and ``1/s`` folded into the norm
    or Linear before it, so the float model computes the same function; other groups are left
    as they are and reported with ``smoothed: False``."""
    if method not in SMOOTH_METHODS:
        raise ValueError(f"unknown smoothing method {method!r}; valid: {SMOOTH_METHODS}")
    if isinstance(F.get_module(model, F.site_path(model, 0, "q")), M.QuantLinear):
        raise ValueError("smooth the float model, then quantize it (the scales change the weights)")
    return sequential(model, calib, _Smooth(method, float(alpha), int(bits), int(group_size), int(grid)),
                      batch_size=batch_size, heads=False, log=log)


# ----------------------------------------------------------------------------- pruning
@dataclasses.dataclass(frozen=True)
class _Prune:
    method: str
    sparsity: float
    n_m: tuple | None
    damp: float
    block_size: int

    def __call__(self, model, paths, stats, layer):
        rows = []
        for path in paths:
            lin = F.get_module(model, path)
            t0 = time.perf_counter()
            w = jnp.asarray(lin.kernel[...], jnp.float32)
            wq = lin.weight_quant if isinstance(lin, M.QuantLinear) else None
            extra = {}
            if self.method in ("sparsegpt", "wanda"):
                check_tokens(stats, path, self.method)
            if self.method == "sparsegpt":
                bits = None if wq is None else _lsq_weight(model, path)[1].quantizer.bits
                out = P.sparsegpt(w, stats, None if self.n_m else self.sparsity, self.n_m, bits=bits,
                                  group_size=None if wq is None else (_group_size(wq) or None),
                                  damp=self.damp, block_size=self.block_size)
                new, mask = out.kernel, out.mask
                if wq is not None:
                    _write(lin, wq, new, out.scales)
                    extra["bits"] = bits
            elif wq is not None:
                raise ValueError(f"{self.method} prunes a float model; quantize after pruning "
                                 "(or use sparsegpt with a quantized model: pruning and GPTQ in one pass)")
            elif self.method == "wanda":
                new, mask = P.wanda(w, stats, None if self.n_m else self.sparsity, self.n_m)
            else:
                new, mask = P.magnitude(w, None if self.n_m else self.sparsity, self.n_m)
            if wq is None:
                lin.kernel[...] = jnp.asarray(new, lin.kernel[...].dtype)
            rows.append(dict(site=path, layer=layer, density=float(jnp.mean(jnp.asarray(mask, jnp.float32))),
                             error=float(G.layer_error(w, new, stats)), seconds=time.perf_counter() - t0, **extra))
        return rows


def prune(model, calib: Mapping[str, np.ndarray], *, method: str = "sparsegpt", sparsity: float = 0.5,
          n_m: tuple[int, int] | None = None, damp: float = 0.01, block_size: int = 128, batch_size: int = 32,
          log: Callable[[str], Any] | None = print) -> Result:
    """SparseGPT (Frantar & Alistarh 2023), Wanda (Sun et al. 2023) or magnitude pruning of every
    layer Linear at ``sparsity`` (or the ``n_m`` pattern, e.g. ``(2, 4)``), each on the inputs of
    the already-pruned predecessors (magnitude needs none; it runs through the same pass so its
    rows carry the same error).  With a quantized ``model`` (LSQ weights) ``sparsegpt`` also
    quantizes the kept weights in the same pass (e.g. 2:4 + 4-bit).  The head stays dense."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown one-shot pruning method {method!r}; valid: {PRUNE_METHODS}")
    return sequential(model, calib, _Prune(method, float(sparsity), None if not n_m else tuple(n_m),
                                           float(damp), int(block_size)),
                      batch_size=batch_size, heads=False, log=log)


__all__ = ["Result", "sequential", "site_groups", "quantize", "smooth", "prune",
           "QUANT_METHODS", "SMOOTH_METHODS", "PRUNE_METHODS"]
