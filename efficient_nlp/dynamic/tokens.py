"""Token skipping: PoWER-BERT (Goyal et al., ICML 2020) and LTP, Learned Token Pruning (Kim et
al., KDD 2022).  Later layers run on fewer tokens; the tokens that receive little attention go.

Significance.  Layer j's attention probabilities A_j [B,N,T,T] (query q, key t) and query weights
w [B,T] (1 for a kept real token, 0 for padding or a removed token, the soft keep-weight in
training) give each token the attention it receives, summed over heads and queries::

    s_j[b,t] = sum_h sum_q w[b,q] A_j[b,h,q,t]                        (PoWER-BERT)
    s~_j[b,t] = s_j[b,t] / (N * sum_q w[b,q])                         (LTP: mean attention received)

Each query's probabilities sum to 1, so s~ sums to 1 over the tokens and averages 1 / n for n
kept tokens, whatever the length.  Padding and removed tokens are masked keys: they get 0.

Where tokens leave.  After layer j runs, the tokens that layers j+1 .. L-1 see are chosen from
layer j's significance (PoWER-BERT puts its extraction inside layer j, after attention; we place
it after the layer so that every encoder family runs unchanged through
`efficient_nlp.models.family.run_layers`).  Removal is permanent (a removed token never comes
back) and the first token (``[CLS]``, the one the head reads) is always kept.  Row j of the
parameters belongs to the selection after layer j, so ``kept_counts[:, j]`` counts the real
tokens layer j+1 runs on (the last column: the tokens that reach the head, which reads the
first); `layer_tokens` gives the tokens each layer runs on.

Soft removal = hard removal on 0/1 masks.  A token's keep-weight m in [0, 1] is the product of its
per-layer factors so far; every later layer adds ``log m_t`` to the attention logits of key t (on
top of the padding bias; m = 0 gives the padding bias itself).  Then for each query q::

    softmax_t(z_qt + log m_t) = m_t exp(z_qt) / sum_u m_u exp(z_qu)

i.e. the keys are re-weighted by m and renormalised.  With m in {0, 1} a removed token gets
probability exactly 0 as a key and value, so every kept token's output equals running the layer
on the kept tokens alone (the removed tokens' own rows are computed but read by nothing: the
attention is the only place tokens mix, and the head reads the kept first token).  So
`soft_forward` with 0/1 weights, `hard_forward` (masks, fixed shape) and
`efficient_nlp.dynamic.token_runner.TokenSkipRunner` (tokens physically gathered out) compute
the same function, up to float summation order.

PoWER-BERT.  Per layer a retention vector r_j in [0, 1]^T (T = ``max_len``, the padded input
length): the token of significance rank k (0 = most significant; the first token ranks first,
padding last) is multiplied by r_j[k].  ``r = clip(retention, 0, 1)``, initialised at 1 (keep
all): the clip is the paper's projection onto [0, 1] and keeps the L1 gradient a constant lambda
inside, where a sigmoid's would vanish near 1, where r starts.  Training loss
``task + lambda * sum_j sum_k r_j[k]``; then `fix_retention` sets the counts
``l_j = clip(round(sum_k r_j[k]), 1, T)`` made non-increasing with depth, and the hard stage keeps
the top-l_j tokens by significance (first token always; padding, which receives no attention,
goes first).  Counts are absolute for the padded length T: a row with fewer real tokens keeps
them all until l_j falls below its own count.

LTP.  A threshold theta_j per layer on s~: training mask factor
``sigmoid((s~ - theta_j) / temperature)`` and loss ``task + lambda * mean_j (fraction of real
tokens kept after layer j)`` (the L1 norm of the masks over real tokens, per row and layer);
inference keeps the tokens with ``s~ > theta_j``.  Default threshold 0 (every token with any
attention is kept: hard removal then equals the full model) and temperature
`DEFAULT_TEMPERATURE` = 1e-3: s~ averages 1 / n (0.008 at 128 tokens, 0.02 at 50), so the soft
mask goes from 0.12 to 0.88 within +-2e-3 of theta, a fraction of the scores' spread.
A threshold of -inf keeps everything.

    model = tokens.add_token_skip(model, "power", max_len=128)
    model, _ = train.fit(model, tokens.make_loss(penalty=1e-4), batches, config=cfg, workdir=w)
    model = tokens.fix_retention(model)                   # counts l_j, then fine-tune hard (optional)
    logits, kept = tokens.hard_forward(model, batch)      # fixed shape; TokenSkipRunner removes tokens
    tokens.save(model, "out/"); again = tokens.load("out/")
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import models
from efficient_nlp.models import family as F
from efficient_nlp.models.bert import MASK_VALUE

METHODS = ("power", "ltp")
DEFAULT_TEMPERATURE = 1e-3
STATE_NAME = "token_skip.safetensors"
RECORD_NAME = "token_skip.json"
_PARAM_OF = {"power": "retention", "ltp": "threshold"}


# ----------------------------------------------------------------------------- significance
def significance(probs, query_weight, *, normalise: bool = False):
    """Attention each token receives: ``s[b,t] = sum_h sum_q w[b,q] probs[b,h,q,t]`` -> [B,T].

    ``probs`` [B,N,T,T] are one layer's attention probabilities, ``query_weight`` [B,T] the
    weight of each query (0 for padding and removed tokens).  ``normalise`` (LTP): divided by
    ``N * sum_q w[b,q]``, the mean attention received.  Float32, summed elementwise (no matmul,
    so no reduced-precision matmul changes a ranking)."""
    probs = jnp.asarray(probs, jnp.float32)
    w = jnp.asarray(query_weight, jnp.float32)
    s = jnp.sum(probs * w[:, None, :, None], axis=(1, 2))
    if normalise:
        s = s / jnp.maximum(probs.shape[1] * jnp.sum(w, axis=-1, keepdims=True), 1e-30)
    return s


def _ranks(s, candidates):
    """Rank of each token by significance (0 = first): the first position ranks first, tokens
    outside ``candidates`` last, ties by position."""
    score = jnp.where(candidates, s, -jnp.inf)
    score = jnp.where(jnp.arange(s.shape[-1]) == 0, jnp.inf, score)
    order = jnp.argsort(-score, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def key_bias(attention_mask, keep_weight):
    """Additive attention bias [B,1,1,T] of soft removal: ``log m_t`` for a real token with
    keep-weight m_t > 0, the padding bias (`efficient_nlp.models.bert.MASK_VALUE`) for padding
    and m_t = 0.  With m all ones it equals the plain padding bias exactly."""
    on = (jnp.asarray(attention_mask) > 0) & (keep_weight > 0)
    log_m = jnp.log(jnp.where(on, keep_weight, 1.0))
    return jnp.where(on, log_m, MASK_VALUE)[:, None, None, :].astype(jnp.float32)


# ----------------------------------------------------------------------------- the parameters
class TokenSkip(nnx.Module):
    """Per-layer token-skipping parameters, attached to a model as ``model.token_skip``.

    ``method`` "power": ``retention`` Param [L, max_len] (PoWER-BERT's r, used clipped to
    [0, 1]) and ``counts`` (the fixed l_j of the hard stage, a tuple, None before
    `fix_retention` / `set_counts`).  "ltp": ``threshold`` Param [L] (LTP's theta_j) and
    ``temperature`` of the soft mask.  ``method``, ``max_len``, ``temperature`` and ``counts``
    are static (part of the graph definition).
    """

    def __init__(self, method: str, num_layers: int, max_len: int, *, init=None,
                 temperature: float = DEFAULT_TEMPERATURE):
        if method not in METHODS:
            raise ValueError(f"unknown token-skipping method {method!r}; methods are {METHODS}")
        if int(max_len) < 1:
            raise ValueError(f"max_len (the padded input length T) must be >= 1, got {max_len}")
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.method = method
        self.max_len = int(max_len)
        self.temperature = float(temperature)
        if method == "power":
            value = np.broadcast_to(np.asarray(1.0 if init is None else init, np.float32),
                                    (num_layers, self.max_len))
            self.retention = nnx.Param(jnp.asarray(value))
        else:
            value = np.broadcast_to(np.asarray(0.0 if init is None else init, np.float32), (num_layers,))
            self.threshold = nnx.Param(jnp.asarray(check_thresholds(value, num_layers), jnp.float32))
        self.counts = None

    @property
    def num_layers(self) -> int:
        return int(self.params().shape[0])

    def params(self):
        """The learned array: ``retention`` [L, T] (PoWER) or ``threshold`` [L] (LTP)."""
        return getattr(self, _PARAM_OF[self.method])[...]


def check_counts(counts, num_layers: int, max_len: int) -> tuple[int, ...]:
    """PoWER-BERT counts: one integer per layer in [1, max_len], non-increasing with depth."""
    values = [float(c) for c in counts]
    if len(values) != num_layers:
        raise ValueError(f"need one count per layer ({num_layers}), got {len(values)}: {list(counts)}")
    if any(not math.isfinite(c) or c != int(c) for c in values):
        raise ValueError(f"counts must be whole numbers, got {list(counts)}")
    out = tuple(int(c) for c in values)
    if any(c < 1 or c > max_len for c in out):
        raise ValueError(f"counts must be in [1, {max_len}] (the first token is always kept; max_len is the "
                         f"padded length T), got {list(out)}")
    rising = [j for j in range(1, len(out)) if out[j] > out[j - 1]]
    if rising:
        j = rising[0]
        raise ValueError(f"counts must not increase with depth (a removed token never comes back), but layer {j} "
                         f"keeps {out[j]} > {out[j - 1]} kept after layer {j - 1}: {list(out)}")
    return out


def check_thresholds(thresholds, num_layers: int) -> np.ndarray:
    """LTP thresholds: one per layer, finite or -inf (keep every token); NaN and +inf rejected."""
    values = np.asarray(thresholds, np.float64).reshape(-1)
    if values.shape[0] != num_layers:
        raise ValueError(f"need one threshold per layer ({num_layers}), got {values.shape[0]}: {values.tolist()}")
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
        raise ValueError(f"thresholds must be finite (or -inf: keep every token), got {values.tolist()}")
    return values


def token_skip_of(model) -> TokenSkip:
    """The model's `TokenSkip`; ValueError when it has none."""
    skip = getattr(model, "token_skip", None)
    if not isinstance(skip, TokenSkip):
        raise ValueError(f"{type(model).__name__} has no token_skip: add it with "
                         "efficient_nlp.dynamic.tokens.add_token_skip(model, 'power' | 'ltp', max_len=...)")
    return skip


def check_model(model) -> None:
    """Raise unless ``model`` is an encoder sequence classifier (`FamilyError` for a decoder)."""
    fam = F.family_of(model)
    if fam.kind != "encoder":
        raise F.FamilyError(f"token skipping supports encoder families only; {fam.name!r} is a {fam.kind} "
                            "(a causal model's later tokens need every earlier one)")
    if not any(p.rpartition(".")[2] == "classifier" for p in F.head_paths(model)):
        raise ValueError(f"token skipping needs a sequence-classification model (its head reads the first token), "
                         f"got {type(model).__name__}; build one with models.from_pretrained(dir, num_labels=...)")


def add_token_skip(model, method: str, *, max_len: int, init=None, temperature: float = DEFAULT_TEMPERATURE):
    """A copy of ``model`` with ``model.token_skip`` = `TokenSkip` (``model`` is unchanged).

    Args:
      model: an encoder sequence classifier of any family (decoders raise `FamilyError`).
      method: ``"power"`` (PoWER-BERT retention vectors) or ``"ltp"`` (learned thresholds).
      max_len: the padded input length T (PoWER's ranks; batches may be shorter, not longer).
      init: initial retention (default 1: keep all) or threshold (default 0: keep every token
        that receives attention); a scalar or one value per entry.
      temperature: LTP's soft-mask temperature (default `DEFAULT_TEMPERATURE`).
    """
    check_model(model)
    if isinstance(getattr(model, "token_skip", None), TokenSkip):
        raise ValueError("the model already has a token_skip; change it with set_counts / set_thresholds, or "
                         "start again from the model without it")
    skip = TokenSkip(method, F.num_layers(model), max_len, init=init, temperature=temperature)
    out = nnx.clone(model)
    out.token_skip = skip
    return out


def _with_skip(model, **changes):
    """A copy of ``model`` whose token_skip has ``changes`` (static attributes or the Param)."""
    out = nnx.clone(model)
    skip = token_skip_of(out)
    for name, value in changes.items():
        if name in _PARAM_OF.values():
            getattr(skip, name).set_value(jnp.asarray(value, jnp.float32))
        else:
            setattr(skip, name, value)
    return out


def set_counts(model, counts: Sequence[int]):
    """A copy of a PoWER model with the hard-stage counts l_j (validated by `check_counts`)."""
    skip = token_skip_of(model)
    if skip.method != "power":
        raise ValueError(f"set_counts is for method 'power'; this model's token_skip is {skip.method!r} "
                         "(use set_thresholds)")
    return _with_skip(model, counts=check_counts(counts, skip.num_layers, skip.max_len))


def set_thresholds(model, thresholds: Sequence[float]):
    """A copy of an LTP model with thresholds theta_j (validated by `check_thresholds`)."""
    skip = token_skip_of(model)
    if skip.method != "ltp":
        raise ValueError(f"set_thresholds is for method 'ltp'; this model's token_skip is {skip.method!r} "
                         "(use set_counts)")
    return _with_skip(model, threshold=check_thresholds(thresholds, skip.num_layers))


def retained_counts(retention) -> tuple[int, ...]:
    """PoWER-BERT's counts from retention [L, T]: ``l_j = clip(round(sum_k clip(r_j[k], 0, 1)), 1, T)``,
    then the running minimum over depth (non-increasing)."""
    r = np.clip(np.asarray(jax.device_get(retention), np.float64), 0.0, 1.0)
    counts = np.clip(np.rint(r.sum(axis=-1)), 1, r.shape[-1]).astype(int)
    return tuple(int(c) for c in np.minimum.accumulate(counts))


def fix_retention(model):
    """A copy of a PoWER model with ``counts`` = `retained_counts` of its learned retention."""
    skip = token_skip_of(model)
    if skip.method != "power":
        raise ValueError(f"fix_retention is for method 'power'; this model's token_skip is {skip.method!r}")
    return set_counts(model, retained_counts(skip.retention[...]))


# ----------------------------------------------------------------------------- forward passes
def _inputs(model, batch):
    skip = token_skip_of(model)
    t = np.shape(batch["input_ids"])[-1]
    if skip.method == "power" and t > skip.max_len:
        raise ValueError(f"batch length {t} exceeds the token_skip's max_len={skip.max_len} (PoWER ranks 0 .. T-1); "
                         "pad to at most max_len or add the token skip with a larger max_len")
    mask = batch.get("attention_mask")
    mask = jnp.ones(np.shape(batch["input_ids"]), jnp.int32) if mask is None else jnp.asarray(mask)
    return skip, mask


def select_hard(skip: TokenSkip, layer: int, probs, alive):
    """Hard removal after ``layer``: the tokens still alive (real and kept) for the next layers,
    from the layer's attention ``probs`` [B,N,T,T] and the tokens ``alive`` [B,T] (bool) it ran
    on.  PoWER: the top-``counts[layer]`` by significance; LTP: ``s~ > threshold[layer]``;
    the first position is kept whenever alive."""
    s = significance(probs, alive, normalise=skip.method == "ltp")
    first = jnp.arange(alive.shape[-1]) == 0
    if skip.method == "power":
        chosen = _ranks(s, alive) < skip.counts[layer]
    else:
        chosen = s > skip.threshold[...][layer]
    return alive & (chosen | first)


def hard_layer(model, skip: TokenSkip, layer: int, hidden, alive):
    """Layer ``layer`` on ``hidden`` [B,T,H] with keys/queries ``alive`` [B,T], then `select_hard`
    -> ``(hidden, alive, kept count [B])`` (shared by `hard_forward` and the runner)."""
    hidden, inter = F.run_layers(model, hidden, alive.astype(jnp.int32), start=layer, stop=layer + 1,
                                 capture=("attn_probs",))
    alive = select_hard(skip, layer, inter["attn_probs"][0], alive)
    return hidden, alive, jnp.sum(alive, axis=-1, dtype=jnp.int32)


def require_schedule(skip: TokenSkip) -> None:
    """Raise unless hard removal is defined (a PoWER model needs its counts)."""
    if skip.method == "power" and skip.counts is None:
        raise ValueError("PoWER hard removal needs the counts l_j: call fix_retention(model) after the soft "
                         "stage, or set_counts(model, counts)")


def hard_forward(model, batch: Mapping):
    """Reference hard removal at fixed shape -> ``(logits [B,C], kept_counts [B,L])``.

    Removed tokens are masked (as padding) instead of gathered out, so one jitted call serves a
    whole sweep; `efficient_nlp.dynamic.token_runner.TokenSkipRunner` computes the same
    function removing them.  ``kept_counts[b, j]``: real tokens kept after layer j (those layer
    j+1 runs on).  With full retention (counts all T, thresholds -inf) the logits are the
    model's own."""
    skip, mask = _inputs(model, batch)
    require_schedule(skip)
    hidden = F.embed(model, batch)
    alive = mask > 0
    counts = []
    for j in range(F.num_layers(model)):
        hidden, alive, count = hard_layer(model, skip, j, hidden, alive)
        counts.append(count)
    return F.head(model, hidden), jnp.stack(counts, axis=-1)


def _select_soft(skip: TokenSkip, layer: int, probs, keep, real):
    """The keep-weights after ``layer``: ``keep`` times PoWER's ``r[rank]`` or LTP's sigmoid
    factor; the first position keeps weight 1."""
    t = keep.shape[-1]
    if skip.method == "power":
        s = significance(probs, keep * real)
        r = jnp.clip(skip.retention[...][layer, :t], 0.0, 1.0)
        factor = r[_ranks(jax.lax.stop_gradient(s), real > 0)]
    else:
        s = significance(probs, keep * real, normalise=True)
        factor = jax.nn.sigmoid((s - skip.threshold[...][layer]) / skip.temperature)
    return keep * jnp.where(jnp.arange(t) == 0, 1.0, factor)


def soft_forward(model, batch: Mapping, *, deterministic: bool = True, rngs=None):
    """The training forward pass with soft removal (`key_bias` of the keep-weights) ->
    ``(logits, aux)``.

    ``aux["kept"]`` [L]: the mean over rows of the fraction of real tokens kept after each layer
    (sum of keep-weights over real tokens / real tokens); ``aux["penalty"]``: PoWER
    ``sum_j sum_k clip(r_j[k], 0, 1)``, LTP ``mean(aux["kept"])``."""
    skip, mask = _inputs(model, batch)
    real = (mask > 0).astype(jnp.float32)
    hidden = F.embed(model, batch, deterministic=deterministic, rngs=rngs)
    keep = jnp.ones(real.shape, jnp.float32)
    kept = []
    for j in range(F.num_layers(model)):
        hidden, inter = F.run_layers(model, hidden, mask, start=j, stop=j + 1, capture=("attn_probs",),
                                     bias=key_bias(mask, keep), deterministic=deterministic, rngs=rngs)
        keep = _select_soft(skip, j, inter["attn_probs"][0], keep, real)
        kept.append(jnp.mean(jnp.sum(keep * real, -1) / jnp.maximum(jnp.sum(real, -1), 1.0)))
    kept = jnp.stack(kept)
    if skip.method == "power":
        penalty = jnp.sum(jnp.clip(skip.retention[...], 0.0, 1.0))
    else:
        penalty = jnp.mean(kept)
    return F.head(model, hidden, deterministic=deterministic, rngs=rngs), {"kept": kept, "penalty": penalty}


def make_loss(*, penalty: float, task_weight: float = 1.0):
    """``loss_fn(model, batch, rngs) -> (loss, aux)`` for `efficient_nlp.train.fit`:
    ``task_weight * task + penalty * aux["penalty"]`` of `soft_forward` (task: cross-entropy,
    MSE for regression, `efficient_nlp.recipes.finetune.logits_loss`); aux holds the task
    metrics, ``task_loss``, ``penalty`` and ``kept`` (the mean kept fraction over layers)."""
    from efficient_nlp.recipes.finetune import logits_loss

    lam, weight = float(penalty), float(task_weight)
    if not (math.isfinite(lam) and lam >= 0 and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"penalty and task_weight must be finite and >= 0, got penalty={penalty}, "
                         f"task_weight={task_weight}")

    def loss_fn(model, batch, rngs):
        logits, aux = soft_forward(model, batch, deterministic=rngs is None, rngs=rngs)
        task, metrics = logits_loss(logits, batch["labels"])
        loss = weight * task + lam * aux["penalty"]
        return loss, {**metrics, "task_loss": task, "penalty": aux["penalty"], "kept": jnp.mean(aux["kept"])}

    return loss_fn


def layer_tokens(kept_counts, attention_mask):
    """Tokens each layer runs on [B,L] from `hard_forward`'s ``kept_counts`` [B,L]: the real
    tokens for layer 0, then ``kept_counts[:, j-1]`` for layer j."""
    real = np.sum(np.asarray(attention_mask) > 0, axis=-1, keepdims=True)
    kept = np.asarray(kept_counts)
    return np.concatenate([real, kept[:, :-1]], axis=-1)


# ----------------------------------------------------------------------------- saving
def save(model, out_dir: str | os.PathLike) -> str:
    """Write the base model as a HF checkpoint (without ``token_skip``) plus ``token_skip.safetensors``
    (the retention or threshold array) and ``token_skip.json`` (method, counts, thresholds,
    temperature, max_len, num_layers); returns ``out_dir``."""
    from safetensors.numpy import save_file

    skip = token_skip_of(model)
    base = nnx.clone(model)
    del base.token_skip
    out_dir = os.fspath(out_dir)
    models.save_hf_checkpoint(base, out_dir)
    name = _PARAM_OF[skip.method]
    array = np.asarray(jax.device_get(skip.params()), np.float32)
    save_file({name: np.ascontiguousarray(array)}, os.path.join(out_dir, STATE_NAME))
    record = {"method": skip.method, "num_layers": skip.num_layers, "max_len": skip.max_len,
              "temperature": skip.temperature, "counts": None if skip.counts is None else list(skip.counts),
              "thresholds": array.tolist() if skip.method == "ltp" else None}
    with open(os.path.join(out_dir, RECORD_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return out_dir


def _read_record(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {RECORD_NAME} in {os.path.dirname(path)}: not a directory written by "
                                "efficient_nlp.dynamic.tokens.save (a plain checkpoint loads with "
                                "models.from_pretrained)")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); write it again with tokens.save") from err
    need = ("method", "num_layers", "max_len", "temperature", "counts", "thresholds")
    missing = [k for k in need if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"{path} lacks {missing}; write it again with tokens.save")
    return record


def load(out_dir: str | os.PathLike, **kwargs):
    """The model of a directory written by `save` (``kwargs`` go to `models.from_pretrained`, a
    sequence classifier).  Raises FileNotFoundError for a missing file, ValueError for a corrupt
    one or one that does not match the checkpoint."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out_dir = os.fspath(out_dir)
    record = _read_record(os.path.join(out_dir, RECORD_NAME))
    method = record["method"]
    if method not in METHODS:
        raise ValueError(f"{out_dir}/{RECORD_NAME}: unknown method {method!r}; methods are {METHODS}")
    path = os.path.join(out_dir, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {STATE_NAME} in {out_dir}: write the directory again with tokens.save")
    try:
        tensors = load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); write it again with tokens.save") from err
    name = _PARAM_OF[method]
    if name not in tensors:
        raise ValueError(f"{path} holds {sorted(tensors)}, not {name!r} (method {method!r})")
    model = models.from_pretrained(out_dir, head="classification", **kwargs)
    n, t = F.num_layers(model), int(record["max_len"])
    array = tensors[name]
    want = (n, t) if method == "power" else (n,)
    if int(record["num_layers"]) != n or array.shape != want:
        raise ValueError(f"{out_dir}: token_skip {name} has shape {array.shape} for num_layers={record['num_layers']}, "
                         f"max_len={t}, but the checkpoint has {n} layers (expected {want})")
    if method == "ltp" and not np.array_equal(np.asarray(record["thresholds"], np.float32), array):
        raise ValueError(f"{out_dir}: thresholds in {RECORD_NAME} {record['thresholds']} differ from {STATE_NAME} "
                         f"{array.tolist()}; write the directory again with tokens.save")
    model = add_token_skip(model, method, max_len=t, init=array, temperature=float(record["temperature"]))
    if record["counts"] is not None:
        model = set_counts(model, record["counts"])
    return model


__all__ = [
    "DEFAULT_TEMPERATURE", "METHODS", "RECORD_NAME", "STATE_NAME", "TokenSkip", "add_token_skip", "check_counts",
    "check_model", "check_thresholds", "fix_retention", "hard_forward", "hard_layer", "key_bias", "layer_tokens",
    "load", "make_loss", "require_schedule", "retained_counts", "save", "select_hard", "set_counts",
    "set_thresholds", "significance", "soft_forward", "token_skip_of",
]
