"""Few-shot pruning (docs/cross_distillation.md): layer-wise cross distillation and its baselines.

    adapter = fewshot.cnn_adapter(model, fewshot.cnn_rules("unstructured"))
    # or, for a model of efficient_nlp.models: fewshot.encoder_adapter(model, fewshot.encoder_rules(model))
    student, info = fewshot.prune_layerwise(teacher, adapter, shots, loss="cd", mu=0.6,
                                            sparsity=0.9, sparsifier="topk", steps=1000)

`prune_layerwise`: the student starts as a copy of the teacher; for each prunable layer in
order, the teacher's and the (partly pruned) student's inputs of that layer are captured on the
few-shot set, that layer's student weights (kernel and bias) are optimised with Adam under the
chosen loss (`cross_distillation.layer_loss`: ``cd``, ``scd``, ``layerwise`` = "w/o CD", ...),
and after every step the kernel is sparsified (`cross_distillation.sparsify`: annealed top-k
projection or proximal step) with the target ramped linearly over the first ``ramp`` of the
steps (constant step size there, cosine decay to 0 afterwards, `layer_lr_schedule`); a final
projection makes the layer's sparsity exactly the target.  The defaults (1000 steps at 1e-2)
make a digits-CNN layer reach the exact minimiser of its loss on the final mask; far fewer or
smaller steps leave each layer near its magnitude-pruned start (attenuated outputs that compound
layer after layer), which ruins CD in particular: its loss never asks for compensation.  Optionally
(`finetune`) the whole student is then trained end to end on the few-shot data with the
pruned weights held at zero.

Baselines: `l1_prune` (data-free L1-norm pruning), `l1_prune` + `finetune` with cross-entropy
(back-propagation), `l1_prune` + `finetune` with `fitnet_loss` (FitNet-style hints on every
pruned layer's input plus the logits).

An adapter (`Adapter`) tells the algorithm which layers to prune (`LayerSpec`: parameter path,
layer function, sparsity pattern, activation) and how to capture their inputs; rules
``[(regex, Pattern)]`` pick the layers and their patterns (`efficient_nlp.tree`, first matching
rule wins).  The full batch of few-shot data is used at every step (it is small by definition).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from efficient_nlp import tree as tree_lib
from efficient_nlp.models import family as F
from efficient_nlp.prune import cross_distillation as cd
from efficient_nlp.prune.patterns import Pattern, heads, neurons, rows, site_regex, topk_mask, unstructured
from efficient_nlp.train.evaluate import predict
from efficient_nlp.train.step import copy_model


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One prunable layer: params at ``name + ".kernel"`` / ``".bias"``; ``layer_fn(w, h)``;
    ``pattern`` groups the kernel's removable units; ``activation`` follows the layer (SCD)."""

    name: str
    layer_fn: Callable
    pattern: Pattern
    activation: Callable | None = None


@dataclasses.dataclass(frozen=True)
class Adapter:
    """``features(model, data) -> {layer name: input}`` (jittable, unflattened), ``logits(model,
    data)`` (jittable), ``flatten(x, data)`` -> rows for the layer loss (outside jit; e.g. an
    encoder's valid tokens), ``weights(data)`` -> broadcastable feature weights for hints (or None)."""

    layers: tuple
    features: Callable
    logits: Callable
    flatten: Callable = lambda x, data: x
    weights: Callable = lambda data: None


def _relu(x):
    return jax.nn.relu(x)


# ----------------------------------------------------------------------------- adapters
def _cnn_features(model, data):
    return model(data["images"], capture=True)[1]


def _cnn_logits(model, data):
    return model(data["images"])


def cnn_rules(structure: str = "unstructured", *, first_conv: bool = False, dense: bool = False,
              classifier: bool = False):
    """``[(regex, Pattern)]`` for `SmallCNN`.

    Unstructured: every conv's weights; structured: the input channels of the convs (conv 0's
    input is the image, so it has none to prune) and the input rows of the dense layers.  By
    default, as in Bai et al.'s code (``weight_sparse_learner``: every ``Conv2d`` but the first,
    no ``Linear``), the first conv and the dense layers stay dense: ``first_conv``, ``dense``
    (the hidden dense) and ``classifier`` add them."""
    if structure not in ("unstructured", "structured"):
        raise ValueError(f"structure must be 'unstructured' or 'structured', got {structure!r}")
    if structure == "unstructured":
        convs = r"^convs\.\d+$" if first_conv else r"^convs\.([1-9]\d*)$"
        names = [convs] + ([r"^dense$"] if dense else []) + ([r"^classifier$"] if classifier else [])
        return [("|".join(names), unstructured())]
    out = [(r"^convs\.([1-9]\d*)$", neurons(axis=2))]
    names = ([r"^dense$"] if dense else []) + ([r"^classifier$"] if classifier else [])
    return out + ([("|".join(names), rows())] if names else [])


def _specs(names, rules, make) -> tuple:
    """``make(name, pattern)`` for each of ``names`` (in order) that a rule selects."""
    found = tree_lib.match({n: 0 for n in names}, rules, allow_unused=True)
    return tuple(make(n, found[n].payload) for n in names if n in found)


def cnn_adapter(model, rules) -> Adapter:
    """Adapter for `efficient_nlp.models.cnn.SmallCNN` (data: ``{"images", "labels"}``)."""
    def spec(name, pat):
        if name.startswith("convs."):
            return LayerSpec(name, cd.conv_layer, pat, _relu)
        return LayerSpec(name, cd.dense_layer, pat, _relu if name == "dense" else None)

    return Adapter(_specs(model.layer_names(), rules, spec), _cnn_features, _cnn_logits)


def _encoder_features(model, data):
    sites = F.sites(model)
    inputs = {s.role: F.site_input(model, s.role) for s in sites}
    out = F.forward(model, data, capture=tuple(sorted(set(inputs.values()))))
    return {s.path: out.intermediates[inputs[s.role]][s.layer] for s in sites}


def _encoder_logits(model, data):
    return F.forward(model, data).logits


def _token_flatten(x, data):
    return jnp.asarray(np.asarray(x)[np.asarray(data["attention_mask"]) > 0])


def _token_weights(data):
    return jnp.asarray(data["attention_mask"], jnp.float32)[..., None]


def encoder_rules(model, structure: str = "unstructured"):
    """``[(regex, Pattern)]`` over the layer-site module paths of a model of
    `efficient_nlp.models` (its family description): unstructured (every matmul site of every
    layer) or structured (heads = row blocks of the ``o`` site, FFN neurons = rows of the
    ``ffn_out`` site: what `prune.shrink` removes)."""
    if structure == "unstructured":
        return [(site_regex(model, leaves=None), unstructured())]
    if structure == "structured":
        F.family_of(model).require("o", "ffn_out", what="structured few-shot pruning")
        return [(site_regex(model, ("o",), leaves=None), heads(family=model)),
                (site_regex(model, ("ffn_out",), leaves=None), rows())]
    raise ValueError(f"structure must be 'unstructured' or 'structured', got {structure!r}")


def encoder_adapter(model, rules) -> Adapter:
    """Adapter for a sequence classifier of `efficient_nlp.models` (any family; data: tokenised
    arrays with labels): its layer sites (`efficient_nlp.models.family.sites`), each fed the
    capture its family names (`family.site_input`), valid tokens only."""
    specs = _specs([s.path for s in F.sites(model)], rules, lambda n, pat: LayerSpec(n, cd.dense_layer, pat, None))
    return Adapter(specs, _encoder_features, _encoder_logits, _token_flatten, _token_weights)


# ----------------------------------------------------------------------------- model access
def get_layer(model, name: str) -> dict:
    """``{"kernel", "bias"}`` arrays of the layer at ``name`` (a dotted module path)."""
    mod = F.get_module(model, name)
    out = {"kernel": mod.kernel.get_value()}
    if getattr(mod, "bias", None) is not None:
        out["bias"] = mod.bias.get_value()
    return out


def set_layer(model, name: str, w: dict) -> None:
    mod = F.get_module(model, name)
    for key, value in w.items():
        var = getattr(mod, key)
        if hasattr(var, "set_value"):
            var.set_value(value)
        else:  # pragma: no cover - older flax
            var.value = value


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(fn, graphdef, state, data):
    return fn(nnx.merge(graphdef, state), data)


def run_model(fn, model, data):
    """``fn(model, data)`` jitted (``fn`` must be hashable, e.g. a module-level function)."""
    graphdef, state = nnx.split(model)
    return _apply(fn, graphdef, state, {k: jnp.asarray(v) for k, v in data.items()})


def accuracy(adapter: Adapter, model, data, batch_size: int = 256) -> float:
    """Fraction of ``data`` whose argmax of ``adapter.logits`` is its label (`train.predict`)."""
    logits = predict(model, _inputs_only(data), batch_size, predict_fn=adapter.logits)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(data["labels"])))


def _inputs_only(data):
    return {k: v for k, v in data.items() if k != "labels"}


# ----------------------------------------------------------------------------- one layer
def layer_lr_schedule(learning_rate: float, steps: int, ramp_steps: int):
    """Adam's step size for one layer: constant while the sparsity target ramps up, then cosine
    decay to 0 over the remaining steps, so the last iterates settle on the optimum of the loss
    on the final mask instead of hovering ``~learning_rate`` away from it (Adam's steps do not
    shrink with the gradient)."""
    tail = steps - ramp_steps
    if tail <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules([optax.constant_schedule(learning_rate),
                                 optax.cosine_decay_schedule(learning_rate, tail)], [ramp_steps])


@functools.lru_cache(maxsize=256)
def _layer_runner(spec: LayerSpec, loss: str, activation, steps: int, learning_rate: float, ramp_steps: int,
                  sparsifier: str):
    """The jitted optimisation of one layer (cached: seeds, sparsities and loss weights reuse it)."""
    tx = optax.adam(layer_lr_schedule(learning_rate, steps, ramp_steps))
    kname = spec.name + ".kernel"

    def run(w_s, w_t, h_s, h_t, hp):
        loss_fn = cd.layer_loss(loss, mu=hp["mu"], alpha=hp["alpha"], beta=hp["beta"], activation=activation)

        def body(carry, t):
            w, st = carry
            value, g = jax.value_and_grad(loss_fn)(w, w_t, h_s, h_t, spec.layer_fn)
            u, st = tx.update(g, st, w)
            w = optax.apply_updates(w, u)
            s_t = cd.linear_ramp(t + 1, ramp_steps, hp["sparsity"])
            w = dict(w, kernel=cd.sparsify(w["kernel"], s_t, method=sparsifier, pattern=spec.pattern,
                                           name=kname, lam_extra=hp["lam_extra"]))
            return (w, st), value

        (w, _), losses = jax.lax.scan(body, (w_s, tx.init(w_s)), jnp.arange(steps))
        w = dict(w, kernel=cd.sparsify(w["kernel"], hp["sparsity"], method="topk", pattern=spec.pattern,
                                       name=kname))
        return w, losses

    return jax.jit(run)


def optimize_layer(w_s, w_t, h_s, h_t, spec: LayerSpec, *, loss: str = "cd", mu: float = 0.6, alpha: float = 0.9,
                   beta: float = 0.3, sparsity: float = 0.9, steps: int = 1000, learning_rate: float = 1e-2,
                   ramp: float = 1 / 3, sparsifier: str = "topk", lam_extra: float = 0.0):
    """Optimises one layer's student weights ``w_s`` (Adam, full batch, ``steps`` steps) under
    the loss named ``loss`` (`cross_distillation.layer_loss`; SCD / layer-wise use
    ``spec.activation``), sparsifying the kernel after every step with the target ramped
    linearly over ``ramp * steps``; returns ``(w, losses)`` with the kernel at exactly
    ``sparsity`` (final top-k projection)."""
    if sparsifier not in cd.SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {sparsifier!r}; choose one of {cd.SPARSIFIERS}")
    cd.layer_loss(loss)  # validates the name
    run = _layer_runner(spec, loss, spec.activation, int(steps), float(learning_rate), int(round(ramp * steps)),
                        sparsifier)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in
          dict(mu=mu, alpha=alpha, beta=beta, sparsity=sparsity, lam_extra=lam_extra).items()}
    return run(w_s, w_t, h_s, h_t, hp)


# ----------------------------------------------------------------------------- the algorithm
def prune_layerwise(teacher, adapter: Adapter, data, *, loss: str = "cd", mu: float = 0.6, alpha: float = 0.9,
                    beta: float = 0.3, sparsity: float = 0.9, sparsifier: str = "topk", steps: int = 1000,
                    learning_rate: float = 1e-2, ramp: float = 1 / 3, lam_extra: float = 0.0):
    """Layer-wise few-shot pruning of a copy of ``teacher`` (see the module docstring).

    Returns ``(student, info)``; ``info["layers"]`` has per layer the name, the achieved unit
    sparsity and the first / last loss values."""
    student = copy_model(teacher)
    inputs = _inputs_only(data)
    feats_t = run_model(adapter.features, teacher, inputs)
    info = {"layers": []}
    for spec in adapter.layers:
        h_t = adapter.flatten(feats_t[spec.name], inputs)
        h_s = adapter.flatten(run_model(adapter.features, student, inputs)[spec.name], inputs)
        w, losses = optimize_layer(get_layer(student, spec.name), get_layer(teacher, spec.name), h_s, h_t,
                                   spec, loss=loss, mu=mu, alpha=alpha, beta=beta, sparsity=sparsity,
                                   steps=steps, learning_rate=learning_rate, ramp=ramp, sparsifier=sparsifier,
                                   lam_extra=lam_extra)
        set_layer(student, spec.name, w)
        info["layers"].append({"name": spec.name, "sparsity": cd.unit_sparsity(w["kernel"], spec.pattern,
                                                                                spec.name + ".kernel"),
                               "loss_first": float(losses[0]), "loss_last": float(losses[-1])})
    return student, info


def l1_prune(teacher, adapter: Adapter, *, sparsity: float):
    """Data-free L1-norm pruning: every prunable kernel of a copy of ``teacher`` loses the
    ``round(sparsity * units)`` units (elements / channels / heads) of smallest L1 norm
    (Li et al. 2017; unstructured: magnitude pruning)."""
    student = copy_model(teacher)
    for spec in adapter.layers:
        w = get_layer(student, spec.name)
        name = spec.name + ".kernel"
        l1 = spec.pattern.reduce(name, jnp.abs(w["kernel"]).astype(jnp.float32))
        k = int(round(sparsity * l1.size))
        keep = spec.pattern.expand(name, topk_mask(l1.reshape(-1), k).reshape(l1.shape), w["kernel"].shape)
        set_layer(student, spec.name, dict(w, kernel=jnp.where(keep, w["kernel"], jnp.zeros((), w["kernel"].dtype))))
    return student


# ----------------------------------------------------------------------------- end to end
def pruned_masks(model, adapter: Adapter):
    """``{param path: bool keep-mask}`` of every prunable kernel (True where non-zero)."""
    return {spec.name + ".kernel": get_layer(model, spec.name)["kernel"] != 0 for spec in adapter.layers}


@functools.lru_cache(maxsize=64)
def ce_loss(adapter: Adapter):
    """Cross-entropy on the few-shot labels (back-propagation fine-tuning)."""
    def loss(model, teacher_out, data):
        logits = adapter.logits(model, data)
        return optax.softmax_cross_entropy_with_integer_labels(logits, data["labels"]).mean()
    return loss


@functools.lru_cache(maxsize=64)
def fitnet_loss(adapter: Adapter, logit_weight: float = 1.0):
    """FitNet-style hints: MSE between student and teacher inputs of every prunable layer
    (valid positions only) plus ``logit_weight`` times the MSE of the logits."""
    def loss(model, teacher_out, data):
        feats = adapter.features(model, data)
        wts = adapter.weights(data)
        total = 0.0
        for spec in adapter.layers:
            d = jnp.square(feats[spec.name] - teacher_out["features"][spec.name])
            total = total + (jnp.mean(d) if wts is None else
                             jnp.sum(d * wts) / (jnp.sum(wts) * d.shape[-1]))
        total = total / max(len(adapter.layers), 1)
        return total + logit_weight * jnp.mean(jnp.square(adapter.logits(model, data) - teacher_out["logits"]))
    return loss


def _teacher_out(adapter, model, data):
    return {"features": adapter.features(model, data), "logits": adapter.logits(model, data)}


@functools.lru_cache(maxsize=64)
def _teacher_out_fn(adapter: Adapter):
    return functools.partial(_teacher_out, adapter)


@functools.lru_cache(maxsize=64)
def _finetune_runner(graphdef, loss_fn, steps: int, learning_rate: float):
    tx = optax.adam(learning_rate)

    def run(params, rest, masks, t_out, data):
        def body(carry, _):
            p, st = carry
            loss, g = jax.value_and_grad(lambda q: loss_fn(nnx.merge(graphdef, q, rest), t_out, data))(p)
            g = jax.tree.map(lambda gi, m: jnp.where(m, gi, jnp.zeros((), gi.dtype)), g, masks)
            u, st = tx.update(g, st, p)
            p = jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype)), optax.apply_updates(p, u), masks)
            return (p, st), loss

        (p, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
        return p, losses

    return jax.jit(run)


def finetune(student, teacher, adapter: Adapter, data, loss_fn: Callable, *, steps: int = 200,
             learning_rate: float = 1e-4):
    """End-to-end training of ``student`` (in place) on the few-shot ``data`` (full batch, Adam)
    with ``loss_fn(model, teacher_out, data)`` (`ce_loss`, `fitnet_loss`); pruned kernel entries
    stay exactly zero.  Returns ``student``."""
    if steps <= 0:
        return student
    from efficient_nlp import tree as tree_lib

    data = {k: jnp.asarray(v) for k, v in data.items()}
    t_out = run_model(_teacher_out_fn(adapter), teacher, _inputs_only(data))
    masks = pruned_masks(student, adapter)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    mask_tree = jax.tree_util.tree_map_with_path(
        lambda p, w: masks.get(tree_lib.path_str(p), jnp.ones((), bool)), params)
    run = _finetune_runner(graphdef, loss_fn, int(steps), float(learning_rate))
    params, _ = run(params, rest, mask_tree, t_out, data)
    nnx.update(student, params)
    return student


# ----------------------------------------------------------------------------- diagnostics
def estimation_errors(teacher, student, adapter: Adapter, data) -> dict:
    """Per prunable layer: ``||w_T h_T - w_S h_S||^2 / ||w_T h_T||^2`` on ``data`` (each model
    fed its own inputs, i.e. errors accumulated through the earlier layers)."""
    inputs = _inputs_only(data)
    ft = run_model(adapter.features, teacher, inputs)
    fs = run_model(adapter.features, student, inputs)
    out = {}
    for spec in adapter.layers:
        y_t = spec.layer_fn(get_layer(teacher, spec.name), adapter.flatten(ft[spec.name], inputs))
        y_s = spec.layer_fn(get_layer(student, spec.name), adapter.flatten(fs[spec.name], inputs))
        out[spec.name] = float(jnp.sum(jnp.square(y_t - y_s)) / jnp.maximum(jnp.sum(jnp.square(y_t)), 1e-30))
    return out


def sparsity_per_layer(model, adapter: Adapter) -> dict:
    """``{layer name: fraction of zero units}`` under each layer's pattern."""
    return {spec.name: cd.unit_sparsity(get_layer(model, spec.name)["kernel"], spec.pattern,
                                        spec.name + ".kernel") for spec in adapter.layers}

