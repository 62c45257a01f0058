"""Physical shrink: a head/neuron/layer-pruned model -> a smaller model of the same family
(docs/pruning.md: structured pruning only speeds up inference if the pruned units are
physically removed).

Units are read from the model's family description (`efficient_nlp.models.family`): head ``h``
of layer ``i`` is the ``head_dim`` columns of the ``q`` / ``k`` / ``v`` kernels and biases and the
same rows of the ``o`` kernel; FFN neuron ``j`` is column ``j`` of the ``ffn_in`` (and
``ffn_gate``) kernel and bias and row ``j`` of the ``ffn_out`` kernel.  `structure_of` reads what
survives from the (masked) weights: a head survives iff some weight in its rows of the ``o``
kernel is non-zero, a neuron iff its row of the ``ffn_out`` kernel is; a layer is dropped iff
every site kernel of it is zero (the `layers` pattern).  Removing a head (neuron) whose output
rows are zero changes nothing, so the shrunk model gives the same outputs as the masked one;
dropping a zeroed post-LayerNorm layer is not the identity, so with dropped layers outputs
differ (that is what layer pruning means).

`shrink` builds the smaller model (`efficient_nlp.models.family.resized`) with per-layer head
counts / FFN widths in its config (``layer_num_attention_heads``, ``layer_intermediate_sizes``),
so it saves with `models.save_hf_checkpoint` and loads with `models.from_pretrained` on its own.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from efficient_nlp import models, train
from efficient_nlp.models import family as F
from efficient_nlp.models.flops import forward_flops

_UNIT_ROLES = {"heads": F.HEAD_ROLES, "neurons": F.NEURON_ROLES}


def _arrays(model, masks=None):
    params = {k: np.asarray(jax.device_get(v.get_value())) for k, v in models.named_params(model).items()}
    if masks is not None:
        from efficient_nlp import tree as tree_lib
        named = masks if isinstance(masks, dict) else dict(tree_lib.named_leaves(masks))
        for k, m in named.items():
            if k in params and np.ndim(m) > 0:
                params[k] = np.where(np.asarray(m), params[k], 0).astype(params[k].dtype)
    return params


def unit_params(model, i: int) -> dict:
    """``{"heads": [(param path, unit axis)], "neurons": [...]}``: the parameters of layer ``i``
    that hold its heads / FFN neurons and the axis their units lie along (the kernels of the
    output-unit roles, then their biases, then the other kernels; see the module docstring)."""
    fam = F.family_of(model)
    fam.require("q", "k", "v", "o", "ffn_in", "ffn_out", what="structured pruning of heads and FFN neurons")
    out = {}
    for kind, roles in _UNIT_ROLES.items():
        paths = [(r, F.site_path(model, i, r)) for r in roles if r in fam.layer_sites]
        out[kind] = ([(p + ".kernel", 1) for r, p in paths if r in F.OUTPUT_UNIT_ROLES]
                     + [(p + ".bias", 0) for r, p in paths
                        if r in F.OUTPUT_UNIT_ROLES and getattr(F.get_module(model, p), "bias", None) is not None]
                     + [(p + ".kernel", 0) for r, p in paths if r not in F.OUTPUT_UNIT_ROLES])
    return out


def structure_of(model, masks=None) -> dict:
    """``{"layers": kept layer indices, "heads": [kept heads per kept layer], "neurons": [kept
    FFN neurons per kept layer]}`` from the weights of ``model`` (times ``masks`` if given)."""
    F.family_of(model).require("o", "ffn_out", what="structure_of")
    params = _arrays(model, masks)
    sites = F.sites(model)
    out = {"layers": [], "heads": [], "neurons": []}
    for i in range(F.num_layers(model)):
        if all(not np.any(params[s.path + ".kernel"]) for s in sites if s.layer == i):
            continue
        d = F.head_layout(model, i).head_dim
        o = params[F.site_path(model, i, "o") + ".kernel"]
        out["layers"].append(i)
        out["heads"].append([h for h in range(o.shape[0] // d) if np.any(o[h * d:(h + 1) * d])])
        ffn_out = params[F.site_path(model, i, "ffn_out") + ".kernel"]
        out["neurons"].append([int(j) for j in np.flatnonzero(np.any(ffn_out, axis=1))])
    return out


def full_structure(model) -> dict:
    """The structure of ``model`` with nothing removed (every layer, head and FFN neuron)."""
    n = F.num_layers(model)
    return {"layers": list(range(n)),
            "heads": [list(range(F.head_layout(model, i).num_heads)) for i in range(n)],
            "neurons": [list(range(F.num_neurons(model, i))) for i in range(n)]}


def structure_masks(model, structure) -> dict:
    """``{parameter name: bool keep mask}`` that zeroes what ``structure`` removes: a head's
    q/k/v columns and biases and its o rows, a neuron's ffn_in (ffn_gate) column and bias and its
    ffn_out row, every unit parameter of a removed layer.  ``apply`` them (`apply_masks`) and
    `structure_of` reads ``structure`` back; `shrink(model, structure=...)` removes the same
    units for real (the inverse pair: simulation vs removal)."""
    full = full_structure(model)
    where = dict(zip(structure["layers"], zip(structure["heads"], structure["neurons"])))
    shapes = {k: np.shape(v.get_value()) for k, v in models.named_params(model).items()}
    out = {}
    for i in full["layers"]:
        heads, neurons = where.get(i, ([], []))
        keep = {"heads": np.zeros(len(full["heads"][i]), bool), "neurons": np.zeros(len(full["neurons"][i]), bool)}
        keep["heads"][list(heads)] = True
        keep["neurons"][list(neurons)] = True
        layout = F.head_layout(model, i)
        group = layout.num_heads // max(layout.num_kv_heads, 1)
        kv_keep = np.repeat(keep["heads"].reshape(-1, group).any(axis=1), layout.head_dim)
        keep["heads"] = np.repeat(keep["heads"], layout.head_dim)
        for kind, members in unit_params(model, i).items():
            for name, axis in members:
                view = [1] * len(shapes[name])
                view[axis] = -1
                unit_keep = kv_keep if kind == "heads" and shapes[name][axis] != len(keep["heads"]) else keep[kind]
                m = np.broadcast_to(unit_keep.reshape(view), shapes[name])
                out[name] = m if i in where else np.zeros(shapes[name], bool)
    return {k: np.array(v) for k, v in out.items()}


def shrunk_config(config, structure):
    """The config of the model `shrink` builds for ``structure`` (per-layer head counts and FFN
    widths); ``flops(shrunk_config(config, st))`` is the exact FLOPs count after removal."""
    return F.resized_config(config, structure["layers"], structure["heads"], structure["neurons"])


def shrink(model, masks=None, structure=None):
    """Returns ``(smaller_model, structure)``; ``structure`` (see `structure_of`) is read from the
    weights (times ``masks``) unless given.  ``model`` is left unchanged."""
    st = structure if structure is not None else structure_of(model, masks)
    if not st["layers"]:
        raise ValueError("shrink: every layer is pruned; a model needs at least one layer")
    params = _arrays(model, masks) if masks is not None else None
    small = F.resized(model, layers=st["layers"], heads=st["heads"], neurons=st["neurons"], params=params)
    return small, st


# ----------------------------------------------------------------------------- accounting
def count_params(model) -> int:
    """Number of parameters (elements of every ``nnx.Param``): `efficient_nlp.train.count_params`."""
    return train.count_params(model)


def gated_ffn(config) -> bool:
    """Whether the family of ``config.model_type`` has a gated FFN (an ``ffn_gate`` site); False
    when no registered family describes it."""
    try:
        return "ffn_gate" in F.family_for_config({"model_type": getattr(config, "model_type", None)}).layer_sites
    except F.FamilyError:
        return False


def flops(config, seq_len: int = 128, gated: bool | None = None) -> int:
    """Forward FLOPs of ONE sequence of ``seq_len`` tokens through the layer stack and the
    hidden-size dense after it (`efficient_nlp.models.flops.forward_flops` without the
    classifier), from the config's per-layer head counts and FFN widths.  ``gated``: count the
    FFN with (True) or without (False) a gate matmul (``ffn_gate``) instead of as the config's
    family has it (`gated_ffn`)."""
    total = forward_flops(config, seq_len, classifier=False)
    if gated is not None and bool(gated) != gated_ffn(config):
        gate = sum(2 * seq_len * config.hidden_size * config.layer_intermediate_size(i)
                   for i in range(config.num_hidden_layers))
        total += gate if gated else -gate
    return int(total)


def measure_latency(model, batch_size: int = 8, seq_len: int = 128, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one jitted forward pass on random tokens (current backend;
    `efficient_nlp.train.measure_latency` on `efficient_nlp.train.token_batch`)."""
    from efficient_nlp import train

    return train.measure_latency(model, train.token_batch(model.config.vocab_size, batch_size, seq_len),
                                 repeats, warmup)


@dataclasses.dataclass
class ShrinkReport:
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    latency_before_s: float | None = None
    latency_after_s: float | None = None

    @property
    def speedup(self):
        if not self.latency_before_s or not self.latency_after_s:
            return None
        return self.latency_before_s / self.latency_after_s

    def format(self) -> str:
        lines = [f"{'':<16}{'before':>14}{'after':>14}{'ratio':>8}",
                 f"{'parameters':<16}{self.params_before:>14,}{self.params_after:>14,}"
                 f"{self.params_after / self.params_before:>8.3f}",
                 f"{'GFLOPs/seq':<16}{self.flops_before / 1e9:>14.3f}{self.flops_after / 1e9:>14.3f}"
                 f"{self.flops_after / self.flops_before:>8.3f}"]
        if self.speedup is not None:
            lines.append(f"{'latency ms':<16}{self.latency_before_s * 1e3:>14.2f}"
                         f"{self.latency_after_s * 1e3:>14.2f}{1 / self.speedup:>8.3f}")
            lines.append(f"speed-up: {self.speedup:.2f}x")
        return "\n".join(lines)


def shrink_report(before, after, *, seq_len: int = 128, batch_size: int = 8, measure: bool = True,
                  repeats: int = 20) -> ShrinkReport:
    """Parameters, FLOPs and (``measure``) latency of two models; latencies are measured
    alternately in rounds to share the machine's noise fairly."""
    rep = ShrinkReport(count_params(before), count_params(after),
                       flops(before.config, seq_len), flops(after.config, seq_len))
    if measure:
        from efficient_nlp import train

        batch = train.token_batch(before.config.vocab_size, batch_size, seq_len)
        rep.latency_before_s, rep.latency_after_s = train.compare_latency(
            [before, after], batch, repeats=max(repeats // 3, 1), rounds=3)
    return rep
