"""Factorise a model's Linears by truncated SVD, plain or data-aware (docs/lowrank.md).

    model2, report = lowrank.factorize(model, rank=64)                       # every q k v o ffn site
    model2, report = lowrank.factorize(model, energy=0.9, roles=("ffn_in", "ffn_out"))
    f = lowrank.fisher(model, loss_fn, batches, steps=32)                   # FWSVD
    model2, report = lowrank.factorize(model, rank=64, method="fwsvd", fisher=f)
    s = lowrank.input_scales(model, calib)                                  # activation-aware
    model2, report = lowrank.factorize(model, rank=64, method="asvd", input_scales=s)
    spectra, shapes = lowrank.spectra(model, method="fwsvd", fisher=f)      # a global budget
    model2, report = lowrank.factorize(model, ranks=lowrank.choose_ranks(spectra, shapes, 0.5),
                                       method="fwsvd", fisher=f)
    model3, info = lowrank.factorize_embedding(model2, 128)                  # ALBERT embedding

Sites are found through the model's family (`efficient_nlp.models.family`): the Linear at a
site path is replaced, in a copy of the model, by a `LowRankLinear` (two plain Linears), so the
layer code, quantization and the other transforms need nothing new.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import train
from efficient_nlp import tree as tree_lib
from efficient_nlp.data import eval_batches
from efficient_nlp.lowrank import svd
from efficient_nlp.lowrank.modules import FactorizedEmbed, LowRankLinear
from efficient_nlp.models import family as F
from efficient_nlp.models.bert import BertForMaskedLM
from efficient_nlp.quant.ptq import token_arrays
from efficient_nlp.train.step import step_key

METHODS = ("svd", "fwsvd", "asvd")


# ----------------------------------------------------------------------------- site selection
def _select(model, roles, rules) -> list[F.Site]:
    if isinstance(roles, str):
        roles = (roles,)
    unknown = sorted(set(roles) - set(F.LAYER_ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; roles are {F.LAYER_ROLES}")
    sites = F.sites(model, tuple(roles), unique=True)
    if not sites:
        raise ValueError(f"family {F.family_of(model).name!r} has none of the roles {tuple(roles)}")
    if rules is None:
        return sites
    for rule in tree_lib.compile_rules(rules):
        if rule.payload is not True:
            raise tree_lib.RuleError(f"rule {rule.index} {rule.regex!r}: low-rank rules are plain regexes over "
                                     f"site paths (give per-site ranks with ranks=), got payload {rule.payload!r}")
    found = tree_lib.match({s.path: 0 for s in sites}, rules)
    return [s for s in sites if s.path in found]


def _linear(model, path: str) -> nnx.Linear:
    mod = F.get_module(model, path)
    if not isinstance(mod, nnx.Linear):
        raise ValueError(f"{path} is a {type(mod).__name__}, not an nnx.Linear: factorise the float model before "
                         "quantizing or other wrapping, and only once")
    return mod


def _decomposition(path: str, kernel, method: str, fisher, input_scales, alpha) -> svd.Decomposition:
    d_in, d_out = kernel.shape
    if method == "fwsvd":
        if path not in fisher:
            raise ValueError(f"method 'fwsvd' needs the Fisher information of {path}; fisher has no such entry "
                             "(compute it with lowrank.fisher over the same sites)")
        f = np.asarray(fisher[path])
        if f.shape != (d_in, d_out):
            raise ValueError(f"fisher[{path!r}] has shape {f.shape}, the kernel {(d_in, d_out)}")
        return svd.decompose(kernel, col_scale=svd.fisher_weights(f))
    if method == "asvd":
        if path not in input_scales:
            raise ValueError(f"method 'asvd' needs the input scales of {path}; input_scales has no such entry "
                             "(compute them with lowrank.input_scales over the same sites)")
        m = np.asarray(input_scales[path])
        if m.shape != (d_in,):
            raise ValueError(f"input_scales[{path!r}] has shape {m.shape}, the kernel has {d_in} inputs")
        return svd.decompose(kernel, row_scale=svd.activation_weights(m, alpha))
    return svd.decompose(kernel)


def _check_method(method, fisher, input_scales):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fwsvd" and fisher is None:
        raise ValueError("method 'fwsvd' needs fisher= (lowrank.fisher(model, loss_fn, batches, steps=...))")
    if method == "asvd" and input_scales is None:
        raise ValueError("method 'asvd' needs input_scales= (lowrank.input_scales(model, calib))")
    if fisher is not None and method != "fwsvd":
        raise ValueError(f"fisher= is read by method 'fwsvd' only, got method {method!r}")
    if input_scales is not None and method != "asvd":
        raise ValueError(f"input_scales= is read by method 'asvd' only, got method {method!r}")


def spectra(model, *, roles=F.LAYER_ROLES, rules=None, method: str = "svd", fisher=None, input_scales=None,
            alpha: float = 0.5) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """``({site: singular values}, {site: (d_in, d_out)})`` of the (weighted) kernels that
    `factorize` would decompose with the same arguments: the input of `choose_ranks`."""
    _check_method(method, fisher, input_scales)
    values, shapes = {}, {}
    for site in _select(model, roles, rules):
        kernel = np.asarray(jax.device_get(_linear(model, site.path).kernel.get_value()), np.float32)
        values[site.path] = _decomposition(site.path, kernel, method, fisher, input_scales, alpha).s
        shapes[site.path] = kernel.shape
    return values, shapes


# ----------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True)
class Row:
    """One site: its rank (``"dense"`` when kept), parameters (kernel + bias) before and after,
    the (weighted) energy kept (1.0 when dense) and why."""

    site: str
    layer: int
    role: str
    d_in: int
    d_out: int
    rank: int | str
    params_before: int
    params_after: int
    energy: float
    reason: str


@dataclasses.dataclass
class LowRankReport:
    """What `factorize` did: ``rows`` (one `Row` per selected site), the ``method`` and the
    ``target`` (``"rank 64"``, ``"energy 0.9"``, ``"ranks"``)."""

    method: str
    target: str
    rows: list[Row]

    @property
    def ranks(self) -> dict[str, int | None]:
        """``{site: rank}``, None for a site kept dense (what ``factorize(ranks=...)`` reads)."""
        return {r.site: None if r.rank == "dense" else r.rank for r in self.rows}

    @property
    def factorised(self) -> list[str]:
        return [r.site for r in self.rows if r.rank != "dense"]

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows)

    def __str__(self):
        done = [r for r in self.rows if r.rank != "dense"]
        energies = [r.energy for r in done]
        head = (f"low-rank {self.method} ({self.target}): {len(done)} of {len(self.rows)} sites factorised; "
                f"their parameters {_millions(self.params_before)} -> {_millions(self.params_after)} "
                f"({self.params_after / max(self.params_before, 1):.2f}x)")
        if energies:
            head += f"; energy kept {min(energies):.3f}-{max(energies):.3f} (mean {np.mean(energies):.3f})"
        lines = [head]
        for layer in sorted({r.layer for r in self.rows}):
            rows = [r for r in self.rows if r.layer == layer]
            kept = [r.energy for r in rows if r.rank != "dense"]
            span = f"   energy {min(kept):.3f}-{max(kept):.3f}" if kept else ""
            lines.append(f"  layer {layer}: " + "  ".join(f"{r.role} {r.rank}" for r in rows) + span)
        reasons = sorted({r.reason for r in self.rows if r.rank == "dense"})
        if reasons:
            lines.append(f"  dense: {len(self.rows) - len(done)} site(s): " + "; ".join(reasons[:4])
                         + (" ..." if len(reasons) > 4 else ""))
        return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


# ----------------------------------------------------------------------------- factorize
def factorize(model, *, roles=F.LAYER_ROLES, rules=None, rank: int | None = None, energy: float | None = None,
              ranks: Mapping[str, int | None] | None = None, method: str = "svd", fisher=None, input_scales=None,
              alpha: float = 0.5, dense_above_break_even: bool = True):
    """A copy of ``model`` with the Linears of the selected sites factorised, and a
    `LowRankReport`; ``model`` is not changed.

    Args:
      roles: family roles of the sites (`efficient_nlp.models.family.LAYER_ROLES`; roles the
        family lacks are skipped).
      rules: optional regexes over site paths (``efficient_nlp.tree`` rules) narrowing the
        sites; a rule matching none raises `efficient_nlp.tree.RuleError`.
      rank / energy / ranks: exactly one: one rank for every site; the smallest rank keeping
        ``energy`` of each (weighted) kernel's squared norm (`svd.rank_for_energy`); or
        ``{site path: rank or None}`` (e.g. from `svd.choose_ranks`; None and sites it does not
        name stay dense).
      method: ``"svd"``; ``"fwsvd"`` (Hsu et al. 2022: output columns weighted by
        ``sqrt(sum_i F_ij)``, needs ``fisher`` from `fisher`); ``"asvd"`` (Yuan et al. 2023:
        input rows weighted by ``mean|x|^alpha``, needs ``input_scales`` from `input_scales`).
      dense_above_break_even: keep a site dense when its rank saves nothing
        (``r > svd.break_even_rank(d_in, d_out)``); False factorises it anyway (studies, tests).

    Raises:
      ValueError: a rank above ``min(d_in, d_out)`` (naming the site and the limit), a
        ``ranks`` key that is not a selected site, a missing or mis-shaped Fisher / input scale.
    """
    given = [name for name, value in (("rank", rank), ("energy", energy), ("ranks", ranks)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank=, energy=, ranks= (got {given or 'none'})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    _check_method(method, fisher, input_scales)
    model = train.copy_model(model)
    sites = _select(model, roles, rules)
    if ranks is not None:
        stray = sorted(set(ranks) - {s.path for s in sites})
        if stray:
            raise ValueError(f"ranks names {stray[:5]}{' ...' if len(stray) > 5 else ''}, which are not selected "
                             f"sites; sites look like {sites[0].path}")
    target = f"rank {rank}" if rank is not None else f"energy {energy}" if energy is not None else "ranks"
    rows = []
    for site in sites:
        linear = _linear(model, site.path)
        kernel = np.asarray(jax.device_get(linear.kernel.get_value()), np.float32)
        d_in, d_out = kernel.shape
        bias = 0 if linear.bias is None else d_out
        before = d_in * d_out + bias
        if ranks is not None and ranks.get(site.path) is None:
            why = "not in ranks" if site.path not in ranks else "ranks gives None"
            rows.append(Row(site.path, site.layer, site.role, d_in, d_out, "dense", before, before, 1.0, why))
            continue
        dec = _decomposition(site.path, kernel, method, fisher, input_scales, alpha)
        if energy is not None:
            r, why = svd.rank_for_energy(dec.s, energy), f"energy {energy}"
        else:
            r = int(rank if rank is not None else ranks[site.path])
            why = f"rank {r}"
        limit, even = min(d_in, d_out), svd.break_even_rank(d_in, d_out)
        if not 1 <= r <= limit:
            raise ValueError(f"{site.path}: rank {r} is outside [1, {limit}] (min(d_in, d_out) of its "
                             f"{d_in} x {d_out} kernel)")
        if r > even and dense_above_break_even:
            rows.append(Row(site.path, site.layer, site.role, d_in, d_out, "dense", before, before, 1.0,
                            f"rank {r} > break-even {even} ({d_in} x {d_out})"))
            continue
        F.set_module(model, site.path, LowRankLinear.from_factors(linear, *dec.factors(r)))
        rows.append(Row(site.path, site.layer, site.role, d_in, d_out, r, before, r * (d_in + d_out) + bias,
                        dec.energy(r), why))
    return model, LowRankReport(method, target, rows)


def factorize_embedding(model, dim: int):
    """A copy of ``model`` whose word embedding ``[V, E]`` is a `FactorizedEmbed` of width
    ``dim`` initialised from the table's truncated SVD (ALBERT's V x r then r x E), and an info
    dict (site, vocab, features, dim, params_before, params_after, energy).  Tied LM heads of
    decoders read it through ``attend``."""
    if isinstance(model, BertForMaskedLM):
        raise ValueError("BertForMaskedLM's head reads the word-embedding table directly, so a factorised "
                         "embedding cannot feed it; factorise the embedding of a classifier or a decoder")
    path = F.word_embedding_path(model)
    model = train.copy_model(model)
    emb = F.get_module(model, path)
    if not isinstance(emb, nnx.Embed):
        raise ValueError(f"{path} is a {type(emb).__name__}, not an nnx.Embed: factorise the float model's "
                         "embedding once, before quantizing")
    table = np.asarray(jax.device_get(emb.embedding.get_value()), np.float32)
    vocab, features = table.shape
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 1 <= dim <= min(vocab, features):
        raise ValueError(f"{path}: dim must be an int in [1, {min(vocab, features)}] (min(vocab, features) of its "
                         f"{vocab} x {features} table), got {dim!r}")
    dec = svd.decompose(table)
    a, b = dec.factors(int(dim))
    new = nnx.eval_shape(lambda: FactorizedEmbed(vocab, features, int(dim), dtype=emb.dtype,
                                                 param_dtype=table.dtype, rngs=nnx.Rngs(0)))  # both values set below
    new.embedding.embedding.set_value(jnp.asarray(a, table.dtype))
    new.projection.kernel.set_value(jnp.asarray(b, table.dtype))
    F.set_module(model, path, new)
    info = dict(site=path, vocab=vocab, features=features, dim=int(dim), params_before=vocab * features,
                params_after=int(dim) * (vocab + features), energy=dec.energy(int(dim)))
    return model, info


# ----------------------------------------------------------------------------- data for the weights
def _site_paths(model, sites) -> list[str]:
    paths = [s.path for s in F.sites(model, unique=True)] if sites is None else list(sites)
    for path in paths:
        _linear(model, path)
    return paths


def fisher(model, loss_fn: Callable, batches: Iterable, *, steps: int, sites: Iterable[str] | None = None,
           seed: int = 0) -> dict[str, np.ndarray]:
    """FWSVD's Fisher information of the site kernels: ``{site path: sum_t g_t^2 [d_in, d_out]}``,
    ``g_t`` the gradient of the loss of batch ``t`` (t = 1 .. ``steps``) with respect to the
    kernel (the empirical Fisher of Hsu et al. 2022, one gradient per mini-batch).

    ``loss_fn(model, batch, rngs) -> (loss, aux)`` as for `efficient_nlp.train.run` (``rngs``
    has a ``dropout`` stream keyed by ``seed`` and the step); ``sites``: site paths (default
    every site of the family's roles).  ``model`` is not changed."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    paths = _site_paths(model, sites)
    kernels = {p + ".kernel" for p in paths}
    graphdef, wanted, rest = nnx.split(
        model, lambda path, x: isinstance(x, nnx.Param) and ".".join(map(str, path)) in kernels, ...)

    @jax.jit
    def squared_grads(wanted, rest, batch, key):
        def loss(w):
            return loss_fn(nnx.merge(graphdef, w, rest), batch, nnx.Rngs(dropout=key))[0]

        return jax.tree.map(lambda g: g * g, jax.grad(loss)(wanted))

    total, iterator = None, iter(batches)
    for t in range(1, steps + 1):
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out before step {t} of {steps}") from None
        sq = squared_grads(wanted, rest, batch, step_key(seed, t))
        total = sq if total is None else jax.tree.map(lambda a, b: a + b, total, sq)
    named = dict(tree_lib.named_leaves(jax.device_get(total)))
    return {p: np.asarray(named[p + ".kernel"], np.float32) for p in paths}


def input_scales(model, calib: Mapping[str, np.ndarray], *, sites: Iterable[str] | None = None,
                 batch_size: int = 32) -> dict[str, np.ndarray]:
    """Activation-aware SVD's input statistics: ``{site path: mean_t |x_t| [d_in]}`` over the
    real (non-padding) tokens of ``calib`` (token arrays: ``input_ids``, ``attention_mask``,
    optional ``token_type_ids``, e.g. from ``quant.calibration_set``), read from the model's
    captured intermediates (the input of each site: `efficient_nlp.models.family.site_input`),
    reduced inside one jitted forward per batch.  ``model`` is not changed."""
    paths = _site_paths(model, sites)
    found = [F.site_of(model, p) for p in paths]
    stray = [p for p, site in zip(paths, found) if site is None]
    if stray:
        raise ValueError(f"input_scales reads the inputs of layer sites only; {stray[:3]} are not sites of the "
                         f"layer stack (sites look like {F.sites(model)[0].path})")
    names = tuple(sorted({F.site_input(model, site.role) for site in found}))
    layers = F.num_layers(model)
    arrays = token_arrays(calib)
    count = len(arrays["input_ids"])
    if count == 0:
        raise ValueError("the calibration set is empty; pass at least one tokenised example")
    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state, batch):
        out = F.forward(nnx.merge(graphdef, state), batch, capture=names)
        mask = jnp.asarray(batch["attention_mask"], jnp.float32) * batch["weight"][:, None]
        # hidden_states holds the L + 1 layer boundaries, the input of layer i at i
        per_layer = {n: [jnp.einsum("bt,btd->d", mask, jnp.abs(x.astype(jnp.float32)))
                         for x in out.intermediates[n][:layers]] for n in names}
        return per_layer, jnp.sum(mask)

    total, tokens = None, 0.0
    for batch in eval_batches(arrays, min(int(batch_size), count)):
        part, n = sums(state, batch)
        total = part if total is None else jax.tree.map(lambda a, b: a + b, total, part)
        tokens += float(n)
    if tokens == 0:
        raise ValueError("the calibration set has no real token (its attention_mask is all zero)")
    total = jax.device_get(total)
    return {p: np.asarray(total[F.site_input(model, site.role)][site.layer], np.float32) / np.float32(tokens)
            for p, site in zip(paths, found)}


__all__ = ["LowRankReport", "METHODS", "Row", "factorize", "factorize_embedding", "fisher", "input_scales", "spectra"]
