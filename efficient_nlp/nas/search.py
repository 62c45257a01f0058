"""The two-stage APS search loop (docs/nas.md), data parallel, checkpointed, resumable.

Stage 1 (warm-up, ``warmup_fraction`` of the steps): every step samples one width per decision
uniformly and trains the supernet's meta weights (``nnx.Param``) on a training batch.
Stage 2: the architecture of every step comes from the controller; after the weight update the
controller samples ``controller_samples`` architectures, scores them on a validation batch
(reward ``Acc * (B(a)/B)^gamma``) and takes one REINFORCE step (moving-average baseline, entropy
bonus); with transitional sharing, P and Q are annealed (projected gradient descent on Phi,
``anneal_tau``), Q for ``anneal_period`` steps with P fixed, then P with Q fixed, and so on.
Afterwards beam search gives the top-N architectures by the controller's likelihood and the one
closest to the budget from below is chosen (`choose`).

The whole state (step, meta weights, P/Q, optimizer states, controller, baseline) is one pytree,
replicated over the ``data`` mesh axis (batches sharded), saved with
`efficient_nlp.train.Checkpointer`.  Step ``t`` uses training batch ``t - 1`` and validation batch
``t - 1`` of seeded streams and the key ``fold_in(key(seed), t)``, so a resumed run repeats what
an uninterrupted one does.  Metrics go to ``metrics.jsonl`` (`efficient_nlp.train.MetricsWriter`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import train as train_lib
from efficient_nlp.nas import controller as ctrl_lib
from efficient_nlp.nas import sharing
from efficient_nlp.nas.aps import Transform, model_sharing_level

log = logging.getLogger(__name__)


def default_search_config():
    """``config.search`` defaults."""
    return ml_collections.ConfigDict(dict(
        sharing="transitional",      # ordinal | independent | transitional
        num_steps=600,
        warmup_fraction=1 / 3,       # stage 1: uniform sampling, weights only
        batch_size=64,               # GLOBAL batch size
        eval_batch_size=512,
        learning_rate=3e-3,          # AdamW on the meta weights (warmup + linear decay)
        warmup_ratio=0.05,
        weight_decay=1e-4,
        grad_clip=1.0,
        controller_hidden=100,
        controller_lr=5e-3,
        controller_samples=8,        # architectures scored per controller step
        entropy_weight=4e-3,
        baseline_decay=0.99,
        budget_fraction=0.0,         # B = fraction * max FLOPs; 0 = no budget
        alpha=0.0,
        beta=-0.1,
        anneal="auto",               # auto: only for transitional sharing; or True / False
        anneal_tau=1e-3,             # see sharing.projected_step; tune to the layers' Phi scale
        anneal_noise=1e-3,           # symmetry breaking at the first annealing step (see below)
        anneal_every=1,
        anneal_period=10,
        top_n=5,
        beam_width=64,
        log_every=20,
        alignment=True,              # log the gradient cosine of the widest vs 2nd-widest arch
        marginal_samples=256,
        checkpoint_every=100,
        keep_checkpoints=2,
        resume=True,
        async_checkpointing=True,
        stop_after=0,                # >0: stop after this step (simulates an interruption)
        tensorboard=False,
    ))


class SearchState(NamedTuple):
    step: Any
    params: Any
    transforms: Any
    rest: Any
    opt_state: Any
    ctrl_params: Any
    ctrl_opt_state: Any
    baseline: Any
    baseline_init: Any


def _cross_entropy(logits, labels, weights=None):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if weights is None:
        return jnp.mean(ce), jnp.mean(correct)
    w = weights / jnp.maximum(jnp.sum(weights), 1.0)
    return jnp.sum(ce * w), jnp.sum(correct * w)


def _axis_name(path):
    for k in reversed(path):
        name = getattr(k, "key", getattr(k, "name", None))
        if name in ("p", "q"):
            return name
    return None


class Searcher:
    """Builds the jitted steps for a space + config; ``run(workdir)`` does the search."""

    def __init__(self, space, cfg, *, seed: int = 0, mesh=None):
        self.space, self.cfg, self.seed = space, cfg, int(seed)
        self.mesh = mesh or train_lib.make_mesh()
        self.rep = train_lib.replicated(self.mesh)
        self.flops = space.flops
        self.budget = (float(cfg.budget_fraction) * self.flops.max()
                       if float(cfg.budget_fraction) > 0 else None)
        self.warmup_steps = int(round(float(cfg.warmup_fraction) * int(cfg.num_steps)))
        anneal = cfg.anneal
        self.anneal = (cfg.sharing == "transitional") if anneal == "auto" else bool(anneal)
        supernet = space.supernet(cfg.sharing, self.seed)
        self.graphdef, params, transforms, rest = nnx.split(supernet, nnx.Param, Transform, ...)
        controller = ctrl_lib.Controller([len(c) for c in space.candidates],
                                         hidden=int(cfg.controller_hidden),
                                         rngs=nnx.Rngs(self.seed + 1))
        self.ctrl_graphdef, ctrl_params = nnx.split(controller, nnx.Param)
        self.tx = train_lib.make_optimizer(cfg, int(cfg.num_steps))
        self.ctrl_tx = optax.adam(float(cfg.controller_lr))
        state = SearchState(
            step=np.zeros((), np.int32), params=params, transforms=transforms, rest=rest,
            opt_state=None, ctrl_params=ctrl_params, ctrl_opt_state=None,
            baseline=np.zeros((), np.float32), baseline_init=np.zeros((), np.float32))
        state = train_lib.replicate(state, self.mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.rep)(state.params)
        ctrl_opt = jax.jit(self.ctrl_tx.init, out_shardings=self.rep)(state.ctrl_params)
        self.state = state._replace(opt_state=opt_state, ctrl_opt_state=ctrl_opt)
        out = (self.rep, self.rep)
        self._warmup = jax.jit(self._warmup_step, donate_argnums=0, out_shardings=out)
        self._search = jax.jit(self._search_step, donate_argnums=0, out_shardings=out)
        self._diag = jax.jit(self._diagnostics, out_shardings=self.rep)
        self._correct = jax.jit(self._weighted_correct)  # arch traced: one compilation per batch shape

    # -- pure pieces ----------------------------------------------------------------------
    def _key(self, step):
        return jax.random.fold_in(jax.random.key(self.seed), step)

    def _model(self, params, state):
        return nnx.merge(self.graphdef, params, state.transforms, state.rest)

    def _controller(self, ctrl_params):
        return nnx.merge(self.ctrl_graphdef, ctrl_params)

    def _loss(self, params, state, batch, arch, key, train=True):
        model = self._model(params, state)
        logits = self.space.supernet_logits(model, batch, arch, train, nnx.Rngs(dropout=key))
        return _cross_entropy(logits, batch["labels"], batch.get("weight"))

    def _train_weights(self, state, batch, arch, key):
        (loss, acc), grads = jax.value_and_grad(
            lambda p: self._loss(p, state, batch, arch, key), has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(params=params, opt_state=opt_state), loss, acc

    def _warmup_step(self, state, batch, val_batch):
        step = state.step + 1
        key = self._key(step)
        counts = jnp.asarray([len(c) for c in self.space.candidates])
        arch = jax.random.randint(jax.random.fold_in(key, 0), counts.shape, 0, counts)
        state, loss, acc = self._train_weights(state, batch, arch, jax.random.fold_in(key, 1))
        return state._replace(step=step), {"loss": loss, "accuracy": acc}

    def _search_step(self, state, batch, val_batch):
        cfg = self.cfg
        step = state.step + 1
        key = self._key(step)
        ctrl = self._controller(state.ctrl_params)
        arch, _, _ = ctrl_lib.sample(ctrl, jax.random.fold_in(key, 0), 1,
                                     flops_model=self.flops, budget=self.budget)
        state, loss, acc = self._train_weights(state, batch, arch[0], jax.random.fold_in(key, 1))

        archs, _, _ = ctrl_lib.sample(ctrl, jax.random.fold_in(key, 2),
                                      int(cfg.controller_samples), flops_model=self.flops,
                                      budget=self.budget)
        accs = jax.lax.map(
            lambda a: self._loss(state.params, state, val_batch, a, key, train=False)[1], archs)
        rewards = ctrl_lib.reward(accs, self.flops(archs), self.budget, alpha=float(cfg.alpha),
                                  beta=float(cfg.beta))

        def controller_loss(cp):
            logp, ent = ctrl_lib.log_prob(self._controller(cp), archs, flops_model=self.flops,
                                          budget=self.budget)
            return ctrl_lib.reinforce_loss(logp, ent, rewards, state.baseline,
                                           float(cfg.entropy_weight)), jnp.mean(ent)

        (closs, entropy), cgrads = jax.value_and_grad(controller_loss, has_aux=True)(
            state.ctrl_params)
        cupdates, ctrl_opt = self.ctrl_tx.update(cgrads, state.ctrl_opt_state, state.ctrl_params)
        ctrl_params = optax.apply_updates(state.ctrl_params, cupdates)
        baseline, init = ctrl_lib.update_baseline(state.baseline, state.baseline_init, rewards,
                                                  float(cfg.baseline_decay))
        state = state._replace(ctrl_params=ctrl_params, ctrl_opt_state=ctrl_opt,
                               baseline=baseline, baseline_init=init)
        if self.anneal:
            k = step - self.warmup_steps - 1
            which_p = (k // int(cfg.anneal_period)) % 2 == 1      # Q first, then P, ...
            do = (k % int(cfg.anneal_every)) == 0
            transforms = jax.lax.cond(k == 0, lambda tr: self._perturb(tr, key), lambda tr: tr,
                                      state.transforms)
            transforms = jax.lax.cond(
                do, lambda tr: self._anneal(state, tr, which_p), lambda tr: tr, transforms)
            state = state._replace(transforms=transforms)
        metrics = {"loss": loss, "accuracy": acc, "val_reward": jnp.mean(rewards),
                   "val_accuracy_sampled": jnp.mean(accs), "controller_loss": closs,
                   "controller_entropy": entropy, "baseline": baseline}
        return state._replace(step=step), metrics

    def _perturb(self, transforms, key):
        """Ordinal P/Q are a stationary point of Phi on the spheres (its gradient there is radial),
        so annealing starts with a tiny random perturbation of the non-padding columns."""
        leaves, treedef = jax.tree.flatten(transforms)
        out = []
        for n, t in enumerate(leaves):
            alive = jnp.sum(jnp.square(t), axis=-2, keepdims=True) > 0
            noise = jax.random.normal(jax.random.fold_in(key, 1000 + n), t.shape, t.dtype)
            out.append(sharing.normalize_columns(
                jnp.where(alive, t + float(self.cfg.anneal_noise) * noise, 0.0)))
        return jax.tree.unflatten(treedef, out)

    def _anneal(self, state, transforms, which_p):
        """One projected-gradient step on Phi (sum over layers) for the P's or the Q's."""
        def phi(tr):
            return model_sharing_level(nnx.merge(self.graphdef, state.params, tr, state.rest))

        grads = jax.grad(phi)(transforms)
        tau = float(self.cfg.anneal_tau)

        def update(path, t, g):
            axis = _axis_name(path)
            new = sharing.projected_step(t, g, tau)
            chosen = which_p if axis == "p" else jnp.logical_not(which_p)
            return jnp.where(chosen, new, t)

        return jax.tree_util.tree_map_with_path(update, transforms, grads)

    def _diagnostics(self, state, batch):
        """Phi, the controller's marginals, the greedy arch and the gradient alignment."""
        model = self._model(state.params, state)
        out = {"phi": model_sharing_level(model)}
        ctrl = self._controller(state.ctrl_params)
        key = jax.random.fold_in(self._key(state.step), 7)
        out["marginals"] = ctrl_lib.marginals(ctrl, key, int(self.cfg.marginal_samples),
                                              flops_model=self.flops, budget=self.budget)
        greedy, _, _ = ctrl_lib.sample(ctrl, key, 1, flops_model=self.flops, budget=self.budget,
                                       greedy=True)
        out["greedy"] = greedy[0]
        if self.cfg.alignment:
            top = jnp.asarray(self.flops.max_arch())
            second = jnp.maximum(top - 1, 0)
            g = [jax.grad(lambda p: self._loss(p, state, batch, a, key, train=False)[0])(
                state.params) for a in (top, second)]
            flat = [jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(gi)]) for gi in g]
            out["grad_alignment"] = jnp.dot(flat[0], flat[1]) / jnp.maximum(
                jnp.linalg.norm(flat[0]) * jnp.linalg.norm(flat[1]), 1e-12)
        return out

    def _weighted_correct(self, state, batch, arch):
        """Weighted number of correct predictions of the supernet with ``arch`` on ``batch``."""
        acc = self._loss(state.params, state, batch, arch, jax.random.key(0), train=False)[1]
        return acc * jnp.sum(batch["weight"])

    # -- host side --------------------------------------------------------------------------
    def evaluate(self, arch, arrays, batch_size=None):
        """Accuracy of the supernet with ``arch`` on ``arrays`` (every example once)."""
        batch_size = batch_size or int(self.cfg.eval_batch_size)
        arch = train_lib.replicate(np.asarray(arch, np.int32), self.mesh)
        correct = total = 0.0
        for b in data_lib.eval_batches(arrays, batch_size):
            correct += float(self._correct(self.state, train_lib.shard_batch(b, self.mesh), arch))
            total += float(np.sum(b["weight"]))
        return correct / max(total, 1.0)

    def run(self, workdir):
        """Runs (or resumes) the search; returns the metric records of this call."""
        cfg = self.cfg
        num_steps = int(cfg.num_steps)
        stop = int(cfg.stop_after) or num_steps
        ckpt = train_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      max_to_keep=int(cfg.keep_checkpoints) or None,
                                      async_save=bool(cfg.async_checkpointing))
        history = []
        writer = None
        try:
            start = 0
            latest = ckpt.latest_step()
            if latest is not None:
                if not cfg.resume:
                    raise ValueError(f"{ckpt.directory} holds checkpoints but search.resume=False")
                self.state = ckpt.restore(latest, self.state)
                start = int(train_lib.to_host(self.state.step))
                log.info("search resumed at step %d", start)
            if train_lib.is_main_process():
                _truncate(workdir, start)
            writer = train_lib.MetricsWriter(workdir, tensorboard=bool(cfg.tensorboard))
            bs = int(cfg.batch_size)
            train_it = data_lib.train_batches(self.space.data["search_train"], bs,
                                              seed=self.seed, start_step=start)
            val_it = data_lib.train_batches(self.space.data["val"], bs, seed=self.seed + 1,
                                            start_step=start)
            window = []
            for t in range(start + 1, min(num_steps, stop) + 1):
                batch = train_lib.shard_batch(next(train_it), self.mesh)
                val = train_lib.shard_batch(next(val_it), self.mesh)
                fn = self._warmup if t <= self.warmup_steps else self._search
                self.state, metrics = fn(self.state, batch, val)
                window.append(metrics)
                last = t == num_steps or t == stop
                if last or t % int(cfg.log_every) == 0:
                    history.append(writer.write(t, self._record(window, batch)))
                    window = []
                    log.info("search step %d/%d %s", t, num_steps, _fmt(history[-1]))
                if last or (int(cfg.checkpoint_every) and t % int(cfg.checkpoint_every) == 0):
                    ckpt.save(t, self.state)
        finally:
            try:
                ckpt.close()
            finally:
                if writer is not None:
                    writer.close()
        return history

    def _record(self, window, batch):
        host = train_lib.scalars_to_host(window)
        rec = {k: float(np.mean([h[k] for h in host if k in h])) for k in host[-1]}
        diag = train_lib.to_host(self._diag(self.state, batch))
        rec["phi"] = float(diag["phi"])
        if "grad_alignment" in diag:
            rec["grad_alignment"] = float(diag["grad_alignment"])
        for d, name in enumerate(self.space.decisions):
            for a in range(len(self.space.candidates[d])):
                rec[f"prob/{name}/{a}"] = float(diag["marginals"][d, a])
        greedy = np.asarray(diag["greedy"])
        rec["greedy_flops_ratio"] = float(self.flops(greedy) / self.flops.max())
        return rec

    def top_architectures(self):
        """Beam search on the current controller: ``[(arch, log_prob, flops)]``."""
        ctrl = self._controller(train_lib.to_host(self.state.ctrl_params))
        beams = ctrl_lib.beam_search(ctrl, int(self.cfg.top_n), beam_width=int(self.cfg.beam_width),
                                     flops_model=self.flops, budget=self.budget)
        return [(a, lp, self.flops(np.asarray(a))) for a, lp in beams]


def choose(candidates, budget):
    """The architecture among ``[(arch, log_prob, flops)]`` closest to ``budget`` from below
    (the most likely one without a budget; the cheapest if none fits)."""
    if budget is None:
        return candidates[0]
    fits = [c for c in candidates if c[2] <= budget]
    if fits:
        return max(fits, key=lambda c: (c[2], c[1]))
    cheapest = min(candidates, key=lambda c: c[2])
    log.warning("none of the %d top architectures fits the FLOPs budget %.4g; taking the cheapest (%.4g "
                "FLOPs, %.2fx the budget): search longer or raise search.top_n / search.beam_width",
                len(candidates), budget, cheapest[2], cheapest[2] / budget)
    return cheapest


def _truncate(workdir, start):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _fmt(record):
    keys = ("loss", "accuracy", "val_reward", "phi", "grad_alignment", "greedy_flops_ratio")
    return " ".join(f"{k}={record[k]:.4g}" for k in keys if k in record)

