"""Physical shrink: a head/neuron/layer-pruned BERT -> a smaller BERT (METHODS.md 2.1: "structured
pruning only speeds up inference if the pruned units are physically removed").

`structure_of` reads what survives from the (masked) weights: head ``h`` of layer ``i`` survives
iff some weight in its rows of ``attention.output.kernel`` is non-zero; FFN neuron ``j`` iff row
``j`` of ``ffn.output.kernel`` is; a layer is dropped iff all six of its kernels are zero (the
`layers` pattern).  Removing a head (neuron) whose output rows are zero changes nothing, so the
shrunk model gives the same outputs as the masked one; dropping a zeroed post-LayerNorm layer is
not the identity, so with dropped layers outputs differ (that is what layer pruning means).

`shrink` builds the smaller model with per-layer head counts / FFN widths in its `BertConfig`
(``layer_num_attention_heads``, ``layer_intermediate_sizes``), so it saves with
`models.save_hf_checkpoint` and loads with `models.from_pretrained` on its own.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import models

_KERNELS = ("attention.query", "attention.key", "attention.value", "attention.output",
            "ffn.intermediate", "ffn.output")


def _arrays(model, masks=None):
    params = {k: np.asarray(jax.device_get(v.get_value())) for k, v in models.named_params(model).items()}
    if masks is not None:
        from efficient_nlp import tree as tree_lib
        named = masks if isinstance(masks, dict) else dict(tree_lib.named_leaves(masks))
        for k, m in named.items():
            if k in params and np.ndim(m) > 0:
                params[k] = np.where(np.asarray(m), params[k], 0).astype(params[k].dtype)
    return params


def structure_of(model, masks=None) -> dict:
    """``{"layers": kept layer indices, "heads": [kept heads per kept layer], "neurons": [kept
    FFN neurons per kept layer]}`` from the weights of ``model`` (times ``masks`` if given)."""
    params = _arrays(model, masks)
    d = model.config.attention_head_dim
    out = {"layers": [], "heads": [], "neurons": []}
    for i in range(len(model.bert.encoder.layers)):
        p = f"bert.encoder.layers.{i}."
        if all(not np.any(params[p + k + ".kernel"]) for k in _KERNELS):
            continue
        o = params[p + "attention.output.kernel"]
        n_heads = o.shape[0] // d
        out["layers"].append(i)
        out["heads"].append([h for h in range(n_heads) if np.any(o[h * d:(h + 1) * d])])
        out["neurons"].append([int(j) for j in np.flatnonzero(np.any(params[p + "ffn.output.kernel"], axis=1))])
    return out


def full_structure(model) -> dict:
    """The structure of ``model`` with nothing removed (every layer, head and FFN neuron)."""
    d = model.config.attention_head_dim
    layers = model.bert.encoder.layers
    return {"layers": list(range(len(layers))),
            "heads": [list(range(np.shape(l.attention.output.kernel.get_value())[0] // d)) for l in layers],
            "neurons": [list(range(np.shape(l.ffn.output.kernel.get_value())[0])) for l in layers]}


def structure_masks(model, structure) -> dict:
    """``{parameter name: bool keep mask}`` that zeroes what ``structure`` removes: a head's
    Q/K/V columns and biases and its O rows, a neuron's intermediate column and bias and its
    output row, every kernel of a removed layer.  ``apply`` them (`apply_masks`) and
    `structure_of` reads ``structure`` back; `shrink(model, structure=...)` removes the same
    units for real (the inverse pair: simulation vs removal)."""
    d = model.config.attention_head_dim
    full = full_structure(model)
    where = dict(zip(structure["layers"], zip(structure["heads"], structure["neurons"])))
    out = {}
    for i in full["layers"]:
        p = f"bert.encoder.layers.{i}."
        kept = i in where
        heads, neurons = where.get(i, ([], []))
        hm = np.zeros(len(full["heads"][i]), bool)
        hm[list(heads)] = True
        nm = np.zeros(len(full["neurons"][i]), bool)
        nm[list(neurons)] = True
        cols = np.repeat(hm, d)
        h = model.config.hidden_size
        for k in ("query", "key", "value"):
            out[p + f"attention.{k}.kernel"] = np.broadcast_to(cols[None, :], (h, cols.size))
            out[p + f"attention.{k}.bias"] = cols
        out[p + "attention.output.kernel"] = np.broadcast_to(cols[:, None], (cols.size, h))
        out[p + "ffn.intermediate.kernel"] = np.broadcast_to(nm[None, :], (h, nm.size))
        out[p + "ffn.intermediate.bias"] = nm
        out[p + "ffn.output.kernel"] = np.broadcast_to(nm[:, None], (nm.size, h))
        if not kept:
            out = {k: (np.zeros(np.shape(v), bool) if k.startswith(p) else v) for k, v in out.items()}
    return {k: np.array(v) for k, v in out.items()}


def shrunk_config(config, structure):
    """The `BertConfig` of the model `shrink` builds for ``structure`` (per-layer head counts and
    FFN widths); ``flops(shrunk_config(config, st))`` is the exact FLOPs count after removal."""
    return config.replace(
        num_hidden_layers=len(structure["layers"]), head_dim=config.attention_head_dim,
        layer_num_attention_heads=tuple(len(h) for h in structure["heads"]),
        layer_intermediate_sizes=tuple(len(n) for n in structure["neurons"]))


def _set(var, value):
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:  # pragma: no cover - older flax
        var.value = value


def shrink(model, masks=None, structure=None):
    """Returns ``(smaller_model, structure)``; ``structure`` (see `structure_of`) is read from the
    weights (times ``masks``) unless given.  ``model`` is left unchanged."""
    params = _arrays(model, masks)
    cfg = model.config
    d = cfg.attention_head_dim
    st = structure if structure is not None else structure_of(model, masks)
    if not st["layers"]:
        raise ValueError("shrink: every layer is pruned; a BERT needs at least one layer")
    new_cfg = shrunk_config(cfg, st)
    kwargs = {}
    if isinstance(model, models.BertModel) and model.bert.pooler is None:
        kwargs["add_pooling_layer"] = False
    dtype = next(iter(models.named_params(model).values())).get_value().dtype
    # Abstract construction (no random init): every parameter is then set from ``model``.
    small = nnx.eval_shape(lambda: type(model)(new_cfg, rngs=nnx.Rngs(0), param_dtype=dtype, **kwargs))
    for name, var in models.named_params(small).items():
        src = name
        value = None
        if name.startswith("bert.encoder.layers."):
            parts = name.split(".")
            new_i = int(parts[3])
            old_i = st["layers"][new_i]
            parts[3] = str(old_i)
            src = ".".join(parts)
            rest = ".".join(parts[4:])
            cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in st["heads"][new_i]] or
                                  [np.zeros(0, int)]).astype(int)
            neu = np.asarray(st["neurons"][new_i], int)
            a = params[src]
            if rest in ("attention.query.kernel", "attention.key.kernel", "attention.value.kernel"):
                value = a[:, cols]
            elif rest in ("attention.query.bias", "attention.key.bias", "attention.value.bias"):
                value = a[cols]
            elif rest == "attention.output.kernel":
                value = a[cols, :]
            elif rest == "ffn.intermediate.kernel":
                value = a[:, neu]
            elif rest == "ffn.intermediate.bias":
                value = a[neu]
            elif rest == "ffn.output.kernel":
                value = a[neu, :]
        if value is None:
            value = params[src]
        want = tuple(var.get_value().shape)
        if tuple(value.shape) != want:  # pragma: no cover - internal consistency
            raise AssertionError(f"shrink: {name} has shape {value.shape}, expected {want}")
        _set(var, jnp.asarray(value))
    return small, st


# ----------------------------------------------------------------------------- accounting
def count_params(model) -> int:
    """Number of parameters (elements of every ``nnx.Param``)."""
    return int(sum(np.prod(v.get_value().shape) for v in models.named_params(model).values()))


def flops(config, seq_len: int = 128) -> int:
    """Forward FLOPs (2 per multiply-add) of the encoder + pooler for ONE sequence of ``seq_len``
    tokens, from a `BertConfig` (per-layer sizes included); embeddings lookups and the small
    element-wise ops are not counted."""
    t, h, d = seq_len, config.hidden_size, config.attention_head_dim
    total = 0
    for i in range(config.num_hidden_layers):
        w = config.layer_num_heads(i) * d
        inter = config.layer_intermediate_size(i)
        total += 2 * t * h * w * 4          # Q, K, V, O projections
        total += 2 * t * t * w * 2          # scores and context
        total += 2 * t * h * inter * 2      # FFN
    total += 2 * h * h                      # pooler
    return int(total)


def measure_latency(model, batch_size: int = 8, seq_len: int = 128, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one jitted forward pass on random tokens (current backend)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        m = nnx.merge(graphdef, state)
        out = m(ids, mask)
        return out.logits if out.logits is not None else out.last_hidden_state

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, model.config.vocab_size, (batch_size, seq_len)), jnp.int32)
    mask = jnp.ones((batch_size, seq_len), jnp.int32)
    for _ in range(warmup):
        forward(state, ids, mask).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(state, ids, mask).block_until_ready()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
        a, b = [], []
        for _ in range(3):
            a.append(measure_latency(before, batch_size, seq_len, repeats=max(repeats // 3, 1)))
            b.append(measure_latency(after, batch_size, seq_len, repeats=max(repeats // 3, 1)))
        rep.latency_before_s, rep.latency_after_s = float(np.median(a)), float(np.median(b))
    return rep
