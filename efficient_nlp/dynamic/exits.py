"""Early exit: internal classifiers ("off-ramps") after encoder layers (docs/dynamic.md).

DeeBERT (Xin et al. 2020) puts an off-ramp after every layer: the pooler's shape (tanh dense
on the first token), dropout and a classifier (`ExitHead`).  Exits are numbered by the
layers run before them: exit ``k`` sits after layer ``k`` (1-based) and the last exit is the
model's own head after layer ``L``, so ``exit_logits(model, batch)[-1]`` is exactly the
model's logits.

    model = exits.add_exits(model)                      # exits after layers 1 .. L
    model, _ = train.fit(model, exits.make_loss(), batches, config=config, workdir=workdir)
    # or two-stage: fine-tune the plain model first, then only the exits:
    model, _ = train.fit(exits.add_exits(tuned), exits.make_loss(), batches, ..., trainable=exits.EXITS)
    all_logits = exits.exit_logits(model, batch)        # [E, B, C]
    exit_rules.simulate(np.asarray(all_logits), exit_rules.Entropy(0.3), model.exit_layers)
    exits.save(model, "out/", rule=exit_rules.Entropy(0.3)); model, rule = exits.load("out/")

Training objectives (`exit_loss`): joint training of backbone and exits with PABEE's weighted
average of the per-exit cross-entropies (Zhou et al. 2020), or two-stage training (DeeBERT:
backbone and final head first, then only the exits with `EXITS` as the trainable filter),
optionally distilling the final head into the exits (FastBERT, Liu et al. 2020).

The exits are ``model.exits`` (an ``nnx.List`` of `ExitHead`, one per exit but the last) and
``model.exit_layers`` (sorted layer counts, ``L`` last); they survive ``nnx.clone`` / ``split``
/ ``merge`` and quantization (`efficient_nlp.quant.quantize_model` wraps their Linears too).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_nlp import models, train
from efficient_nlp.models import family as F
from efficient_nlp.models.dropout import Dropout
from efficient_nlp.models.hf_checkpoint import read_safetensors

EXITS_WEIGHTS_NAME = "exits.safetensors"
EARLY_EXIT_NAME = "early_exit.json"
#: Trainable filter of two-stage training: the exit heads' parameters only (backbone and
#: final head frozen).
EXITS = nnx.All(nnx.Param, nnx.PathContains("exits"))


#: How an exit reads the layer's output: ``first``, the first token (DeeBERT, like BERT's pooler);
#: ``mean``, the mean over the real tokens (for models whose first token carries little before the
#: last layers, e.g. sentence encoders trained with mean pooling such as MiniLM).
POOLINGS = ("first", "mean")


def pool(hidden, attention_mask, pooling: str):
    """[B, T, H] -> [B, H]: the first token, or the mean over real tokens (mask 1)."""
    if pooling == "first":
        return hidden[:, 0]
    mask = (jnp.ones(hidden.shape[:2]) if attention_mask is None else jnp.asarray(attention_mask)).astype(hidden.dtype)
    return jnp.einsum("bth,bt->bh", hidden, mask) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)


class ExitHead(nnx.Module):
    """DeeBERT's off-ramp: ``classifier(dropout(tanh(dense(pool(h)))))``, hidden [B, T, H] -> [B, C],
    ``pool`` the first token (``pooling="first"``, DeeBERT) or the mean over real tokens.

    Dropout follows the call's ``deterministic`` (``rngs=nnx.Rngs(dropout=key)`` when False).
    """

    def __init__(self, hidden_size: int, num_labels: int, *, dropout: float = 0.1, init_range: float = 0.02,
                 pooling: str = "first", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; use one of {POOLINGS}")
        self.pooling = pooling
        def linear(n_out):
            return nnx.Linear(hidden_size, n_out, kernel_init=jax.nn.initializers.normal(init_range),
                              bias_init=jax.nn.initializers.zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.dense = linear(hidden_size)
        self.dropout = Dropout(dropout)
        self.classifier = linear(num_labels)

    def __call__(self, hidden, attention_mask=None, *, deterministic: bool = True, rngs=None):
        x = jnp.tanh(self.dense(pool(hidden, attention_mask, self.pooling)))
        return self.classifier(self.dropout(x, deterministic=deterministic, rngs=rngs))


# ----------------------------------------------------------------------------- building
def has_exits(model) -> bool:
    return getattr(model, "exit_layers", None) is not None


def require_exits(model) -> tuple[int, ...]:
    """``model.exit_layers``; ValueError when the model has no exits."""
    if not has_exits(model):
        raise ValueError(f"{type(model).__name__} has no early exits: add them with "
                         "efficient_nlp.dynamic.exits.add_exits(model) (or load a directory written by exits.save)")
    return model.exit_layers


def _num_labels(model) -> int:
    """The class count of an encoder classifier; raises for models early exit cannot serve."""
    fam = F.family_of(model)
    if fam.kind != "encoder":
        raise F.FamilyError(f"early exit supports encoder classifiers; {type(model).__name__} is a {fam.name} "
                            f"{fam.kind} (family {fam.name!r})")
    if "classifier" not in F.head_paths(model):
        raise ValueError(f"early exit needs a sequence classifier; {type(model).__name__} has no classification "
                         "head (build it with models.from_pretrained(dir, num_labels=C))")
    num_labels = int(model.config.num_labels)
    if num_labels < 2:
        raise ValueError(f"early exit needs class probabilities: num_labels must be >= 2, got {num_labels} "
                         "(regression)")
    return num_labels


def add_exits(model, layers: Sequence[int] | None = None, *, seed: int = 0, dropout: float | None = None,
              init_range: float | None = None, pooling: str = "first"):
    """A copy of ``model`` with an `ExitHead` after each of ``layers`` (1-based layer counts).

    Args:
      model: an encoder sequence classifier (any encoder family, >= 2 labels); not changed.
      layers: exit positions in ``1 .. L`` (default all); ``L`` (the model's own head) is
        always the last exit and gets no new head.
      seed: seed of the heads' initialisation.
      dropout: the heads' dropout rate (default the model head's: ``classifier_dropout``, else
        ``hidden_dropout_prob``).
      init_range: std of the heads' normal initialiser (default ``config.initializer_range``).
      pooling: what the heads read (`POOLINGS`): the first token (DeeBERT) or the mean of the
        real tokens.

    Returns:
      The copy, with ``exits`` (``nnx.List`` of `ExitHead`) and ``exit_layers`` (sorted tuple,
      ``L`` last).
    """
    num_labels = _num_labels(model)
    if has_exits(model):
        raise ValueError(f"the model already has exits after layers {list(model.exit_layers)}; "
                         "strip them first with exits.strip_exits(model)")
    n = F.num_layers(model)
    wanted = list(range(1, n + 1)) if layers is None else [int(k) for k in layers]
    bad = [k for k in wanted if not 1 <= k <= n]
    if bad:
        raise ValueError(f"exit layers must be in 1..{n} (layers run before the exit), got {bad}")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"exit layers must be distinct, got {wanted}")
    exit_layers = tuple(sorted(set(wanted) | {n}))
    cfg = model.config
    if dropout is None:
        dropout = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    init_range = cfg.initializer_range if init_range is None else init_range
    dtype = models.named_params(model)["classifier.kernel"].get_value().dtype
    rngs = nnx.Rngs(seed)
    out = train.copy_model(model)
    out.exits = nnx.List([ExitHead(cfg.hidden_size, num_labels, dropout=dropout, init_range=init_range,
                                   pooling=pooling, param_dtype=dtype, rngs=rngs) for _ in exit_layers[:-1]])
    out.exit_layers = exit_layers
    return out


def strip_exits(model):
    """A copy of ``model`` without its exits: the plain model."""
    require_exits(model)
    plain = train.copy_model(model)
    del plain.exits
    del plain.exit_layers
    return plain


# ----------------------------------------------------------------------------- running
def exit_logits(model, batch, *, deterministic: bool = True, rngs=None):
    """Logits of every exit, [E, B, C]: the embedding, the layers between consecutive exits
    (`efficient_nlp.models.family.run_layers`), each exit's head, and the model's own head
    (`family.head`) last, so ``exit_logits(...)[-1]`` is the model's logits."""
    exit_layers = require_exits(model)
    mask = batch.get("attention_mask")
    h = F.embed(model, batch, deterministic=deterministic, rngs=rngs)
    out, start = [], 0
    for e, stop in enumerate(exit_layers):
        h, _ = F.run_layers(model, h, mask, start=start, stop=stop, deterministic=deterministic, rngs=rngs)
        start = stop
        if e < len(model.exits):
            out.append(model.exits[e](h, mask, deterministic=deterministic, rngs=rngs))
        else:
            out.append(F.head(model, h, deterministic=deterministic, rngs=rngs))
    return jnp.stack(out)


def exit_weights(weights, exit_layers: Sequence[int]) -> np.ndarray:
    """Per-exit loss weights, normalised to sum 1: ``"pabee"`` (exit after layer k weighs k),
    ``"uniform"``, or one non-negative number per exit."""
    num_exits = len(exit_layers)
    if isinstance(weights, str):
        if weights == "pabee":
            w = np.asarray(exit_layers, np.float64)
        elif weights == "uniform":
            w = np.ones(num_exits)
        else:
            raise ValueError(f"weights must be 'pabee', 'uniform' or one number per exit, got {weights!r}")
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (num_exits,) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"need one non-negative weight per exit ({num_exits}), not all zero; got {list(weights)}")
    return w / w.sum()


def exit_loss(all_logits, labels, *, exit_layers: Sequence[int] | None = None, weights="pabee",
              final_teacher: bool = False, distill_weight: float = 1.0, temperature: float = 1.0):
    """Training loss of all exits: ``(loss, aux)``.

    ``loss = sum_e w_e CE(z_e, y) + distill_weight * KD`` with ``w`` from `exit_weights`
    (normalised): ``"pabee"`` weighs the exit after layer ``k`` by ``k`` (PABEE, Zhou et al.
    2020: ``sum_j j L_j / sum_j j``), ``"uniform"`` equally, or a sequence.  With
    ``final_teacher`` (FastBERT's self-distillation, Liu et al. 2020) ``KD`` is the mean over
    the other exits of ``T^2 KL(softmax(z_E / T) || softmax(z_e / T))``, the final exit's
    probabilities held fixed (``stop_gradient``).

    Args:
      all_logits: [E, B, C] (`exit_logits`); labels: int [B].
      exit_layers: the layer count of each exit (``model.exit_layers``; default ``1 .. E``,
        exits after every layer).

    Returns:
      ``loss`` and ``aux`` with ``acc_exit<k>`` (accuracy of the exit after layer ``k``) and,
      with ``final_teacher``, ``distill`` (the KD term).
    """
    num_exits, _, num_classes = all_logits.shape
    if num_classes < 2:
        raise ValueError("early-exit training needs class logits (C >= 2); regression heads have no "
                         "class probabilities")
    exit_layers = tuple(range(1, num_exits + 1)) if exit_layers is None else tuple(exit_layers)
    if len(exit_layers) != num_exits:
        raise ValueError(f"got logits of {num_exits} exits but {len(exit_layers)} exit layers {list(exit_layers)}")
    w = jnp.asarray(exit_weights(weights, exit_layers), jnp.float32)
    logits = all_logits.astype(jnp.float32)
    labels = jnp.broadcast_to(jnp.asarray(labels), logits.shape[:2])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=-1)  # [E]
    loss = jnp.sum(w * ce)
    hits = jnp.mean(jnp.argmax(logits, -1) == labels, axis=-1)
    aux = {f"acc_exit{k}": hits[e] for e, k in enumerate(exit_layers)}
    if final_teacher and num_exits > 1:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        teacher = jax.nn.log_softmax(jax.lax.stop_gradient(logits[-1]) / temperature, axis=-1)
        student = jax.nn.log_softmax(logits[:-1] / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)  # [E-1, B]
        kd = temperature ** 2 * jnp.mean(kl)
        loss = loss + distill_weight * kd
        aux["distill"] = kd
    return loss, aux


@dataclasses.dataclass(frozen=True)
class ExitLoss:
    """``loss_fn(model, batch, rngs)`` for ``train.fit`` / ``train.run``: `exit_loss` on
    `exit_logits` in training mode.  Hashable, so equal losses share one compiled step."""

    weights: str | tuple[float, ...] = "pabee"
    final_teacher: bool = False
    distill_weight: float = 1.0
    temperature: float = 1.0

    def __call__(self, model, batch, rngs):
        all_logits = exit_logits(model, batch, deterministic=False, rngs=rngs)
        return exit_loss(all_logits, batch["labels"], exit_layers=model.exit_layers, weights=self.weights,
                         final_teacher=self.final_teacher, distill_weight=self.distill_weight,
                         temperature=self.temperature)


def make_loss(*, weights="pabee", final_teacher: bool = False, distill_weight: float = 1.0,
              temperature: float = 1.0) -> ExitLoss:
    """The training loss of a model with exits (`exit_loss`'s options) for ``train.fit``;
    two-stage training passes ``trainable=EXITS`` as well."""
    if not isinstance(weights, str):
        weights = tuple(float(x) for x in weights)
    return ExitLoss(weights, bool(final_teacher), float(distill_weight), float(temperature))


# ----------------------------------------------------------------------------- saving
def _exit_params(model) -> dict[str, nnx.Variable]:
    return {k: v for k, v in models.named_params(model).items() if k.startswith("exits.")}


def save(model, out_dir: str | os.PathLike, rule=None) -> str:
    """Write the base model as a HF checkpoint (``config.json``, ``model.safetensors``), the
    exit heads in ``exits.safetensors`` (our parameter names, ``exits.0.dense.kernel`` ...) and
    ``early_exit.json`` (exit layers, labels, dropout and the exit ``rule``, if any); returns
    ``out_dir``."""
    from safetensors.numpy import save_file

    from efficient_nlp.dynamic import exit_rules

    exit_layers = require_exits(model)
    if rule is not None:
        exit_rules.check_rule(rule, len(exit_layers))
    out_dir = os.fspath(out_dir)
    models.save_hf_checkpoint(strip_exits(model), out_dir)
    tensors = {k: np.ascontiguousarray(jax.device_get(v.get_value())) for k, v in _exit_params(model).items()}
    save_file(tensors, os.path.join(out_dir, EXITS_WEIGHTS_NAME))
    record = {"exit_layers": list(exit_layers), "num_labels": int(model.config.num_labels),
              "dropout": float(model.exits[0].dropout.rate) if len(model.exits) else None,
              "pooling": model.exits[0].pooling if len(model.exits) else "first",
              "rule": None if rule is None else exit_rules.rule_to_dict(rule)}
    with open(os.path.join(out_dir, EARLY_EXIT_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return out_dir


def load(out_dir: str | os.PathLike, **kwargs):
    """The model and rule of a directory written by `save`: ``(model, rule or None)``.
    ``kwargs`` go to ``models.from_pretrained`` (dtype, dropout overrides)."""
    from efficient_nlp.dynamic import exit_rules

    out_dir = os.fspath(out_dir)
    record_path = os.path.join(out_dir, EARLY_EXIT_NAME)
    weights_path = os.path.join(out_dir, EXITS_WEIGHTS_NAME)
    for path in (record_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {os.path.basename(path)} in {out_dir}: it is not a directory written by "
                                    "efficient_nlp.dynamic.exits.save (a plain model loads with models.from_pretrained)")
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        exit_layers = [int(k) for k in record["exit_layers"]]
        num_labels = int(record["num_labels"])
        rule = None if record.get("rule") is None else exit_rules.rule_from_dict(record["rule"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record_path} is not a valid early-exit record ({type(e).__name__}: {e})") from e
    base = models.from_pretrained(out_dir, num_labels=num_labels, **kwargs)
    n = F.num_layers(base)
    if not exit_layers or exit_layers[-1] != n:
        raise ValueError(f"{record_path}: exit_layers {exit_layers} must end with the checkpoint's {n} layers")
    model = add_exits(base, exit_layers, dropout=record.get("dropout"), pooling=record.get("pooling", "first"))
    tensors = read_safetensors(weights_path)
    params = _exit_params(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    misshaped = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(v.get_value().shape)}"
                 for k, v in params.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.get_value().shape)]
    if missing or unexpected or misshaped:
        raise ValueError(f"{weights_path} does not match exits after layers {exit_layers[:-1]}: "
                         f"missing {missing}, unexpected {unexpected}, misshaped {misshaped}")
    for k, v in params.items():
        v.set_value(jnp.asarray(tensors[k], v.get_value().dtype))
    if rule is not None:
        exit_rules.check_rule(rule, len(exit_layers))
    return model, rule


__all__ = ["EARLY_EXIT_NAME", "EXITS", "EXITS_WEIGHTS_NAME", "ExitHead", "POOLINGS", "pool", "ExitLoss", "add_exits", "exit_logits",
           "exit_loss", "exit_weights", "has_exits", "load", "make_loss", "require_exits", "save", "strip_exits"]
