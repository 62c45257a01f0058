"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding (docs/pruning.md).

Frankle & Carbin 2019, with rewinding to an early step (Frankle et al. 2020): train; prune the
smallest-magnitude fraction of the SURVIVING weights; rewind the survivors to their values at
step ``k``; repeat for ``R`` rounds.  Each rule's sparsity is the target after the last round;
round ``r`` (1..R) reaches ``s_r = 1 - (1 - s)^(r/R)``, i.e. every round removes the same fraction
``p = 1 - (1 - s)^(1/R)`` of the survivors (the number removed is ``round(s_r * n)``, exact).

The pieces are pure (`round_sparsity`, `imp_masks`, `rewind`); `lottery_ticket` drives them with
the one training loop (`train.fit`) and the masks of `efficient_nlp.prune.pruning`:

* round 0 trains the dense model for ``num_steps``; the state after update ``k`` (the rewind
  point) is the ``fit`` checkpoint of step ``k`` (``fit`` to ``k``, then ``fit`` resumes to the end
  with the same optimizer, so round 0 is one uninterrupted run);
* round ``r`` starts from ``apply_masks(theta_k, m_r)`` and trains ``num_steps - k`` updates on the
  batches ``k+1 ...`` with the masks fixed in the optimizer state (`pruning(masks=...)`: masked
  gradients are zeroed and pruned weights stay exactly 0).  The optimizer state is fresh and its
  warmup / decay schedule spans the ``num_steps - k`` updates of the round (weights are rewound,
  the optimizer is not).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from efficient_nlp.prune import masks as masks_lib
from efficient_nlp.prune.transform import pruning


def round_sparsity(target: float, round_: int, rounds: int) -> float:
    """Sparsity after round ``round_`` of ``rounds``: ``1 - (1 - target)^(round_/rounds)``."""
    if not 0 <= round_ <= rounds or rounds < 1:
        raise ValueError(f"round must be in [0, rounds] with rounds >= 1, got {round_} of {rounds}")
    return float(1.0 - (1.0 - target) ** (round_ / rounds))


def round_rules(rules, round_: int, rounds: int):
    """The rules with every target (rule sparsity, custom per-group sparsities) at round ``round_``."""
    out = []
    for regex, pr in rules:
        dist = pr.distribution
        if isinstance(dist, Mapping):
            dist = {k: round_sparsity(v, round_, rounds) for k, v in dist.items()}
        out.append((regex, dataclasses.replace(pr, sparsity=round_sparsity(pr.sparsity, round_, rounds),
                                               distribution=dist)))
    return out


def imp_masks(params, rules, round_: int, rounds: int, masks=None):
    """Masks of round ``round_``: magnitude of ``params`` ranked among the survivors of ``masks``
    (previous round; None = dense).  Units pruned before get score -1, below every ``|w| >= 0``,
    so they stay pruned and exactly ``round(s_r * n)`` units are removed in total (per rule for
    ``global``, per group for ``uniform``).  Returns a masks pytree like ``params``."""
    rr = round_rules(rules, round_, rounds)
    plan = masks_lib.make_plan(params, rr)
    sel = masks_lib.selected(params, plan)
    old = masks_lib.selected(masks, plan) if masks is not None else {}
    scores = {}
    for n, w in sel.items():
        s = jnp.abs(jnp.asarray(w, jnp.float32))
        if n in old:
            s = jnp.where(jnp.broadcast_to(old[n], s.shape), s, -1.0)
        scores[n] = s
    named = masks_lib.compute_masks(plan, scores)
    if old:  # non-nested distributions (ERK) never revive a pruned weight
        named = {n: m & jnp.broadcast_to(old[n], m.shape) if n in old else m for n, m in named.items()}
    return masks_lib.to_tree(params, plan, named)


def rewind(early_params, masks):
    """Survivors at their rewind-point values, pruned weights at exactly 0."""
    return masks_lib.apply_masks(early_params, masks)


@dataclasses.dataclass
class LotteryResult:
    model: Any              # the trained ticket of the last round
    masks: Any              # its masks (pytree like the nnx.Param state)
    rounds: list            # [{"round", "sparsity", "target", **final eval metrics}]


def _train_config(config, num_steps):
    from efficient_nlp import train as train_lib
    opts = dataclasses.asdict(train_lib.train_options(config))
    opts["num_steps"] = int(num_steps)
    return ml_collections.ConfigDict({"train": opts})


def lottery_ticket(model, loss_fn, batches, *, config, workdir, rules, rounds: int, rewind_step: int,
                   eval_fn=None, on_round_start: Callable | None = None, optimizer_fn=None) -> LotteryResult:
    """Iterative magnitude pruning with rewinding to update ``rewind_step`` (see the module doc).

    Args:
      model, loss_fn, batches, config, eval_fn: as for `train.fit` (``config.train.num_steps``
        updates per round; ``batches(start)`` must yield the batches of updates ``start+1 ...``).
      workdir: round ``r`` trains in ``workdir/round_<r>`` (checkpoints, metrics).
      rules: ``[(regex, PruneRule)]``; each rule's sparsity is reached after the last round.
      rounds: number of prune-rewind-retrain rounds ``R >= 1``.
      rewind_step: ``k`` with ``0 <= k < num_steps`` (0: rewind to the initial weights).
      on_round_start: ``fn(round, model, masks)`` called with the rewound model of each round
        (round 0: the dense initial model, masks None).
      optimizer_fn: ``fn(config, num_steps) -> optax transformation`` (default
        `train.make_optimizer`).
    """
    from efficient_nlp import train as train_lib

    make_opt = optimizer_fn or train_lib.make_optimizer
    total = train_lib.train_options(config).num_steps
    k = int(rewind_step)
    if not 0 <= k < total:
        raise ValueError(f"rewind_step must be in [0, num_steps={total}), got {rewind_step}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masks_lib.make_plan(params, rules)  # validate the rules before any training

    def run(m, steps, wd, tx, feed):
        return train_lib.fit(m, loss_fn, feed, config=_train_config(config, steps), workdir=wd,
                             eval_fn=eval_fn, optimizer=tx)

    def summary(r, masks, history):
        row = {"round": r, "target": round_sparsity(_first_target(rules), r, rounds) if r else 0.0,
               "sparsity": masks_lib.sparsity(masks_lib.selected(masks, plan)) if masks is not None else 0.0}
        row.update({key[len("eval/"):]: v for key, v in history[-1].items() if key.startswith("eval/")}
                   if history else {})
        return row

    plan = masks_lib.make_plan(params, rules)
    if on_round_start is not None:
        on_round_start(0, model, None)
    wd0 = os.path.join(workdir, "round_0")
    tx0 = make_opt(_train_config(config, total), total)
    if k > 0:
        early, _ = run(model, k, wd0, tx0, batches)
        early_params = nnx.split(early, nnx.Param, ...)[1]
    else:
        early_params = params
    early_params = jax.tree.map(jnp.array, early_params)  # a copy: fit donates its buffers
    trained, history = run(model, total, wd0, tx0, batches)  # resumes from the step-k checkpoint
    results = [summary(0, None, history)]
    masks = None
    for r in range(1, int(rounds) + 1):
        trained_params = nnx.split(trained, nnx.Param, ...)[1]
        masks = imp_masks(trained_params, rules, r, int(rounds), masks)
        start = nnx.merge(graphdef, rewind(early_params, masks), rest)
        if on_round_start is not None:
            on_round_start(r, start, masks)
        tx = pruning(make_opt(_train_config(config, total - k), total - k), rules, masks=masks)
        trained, history = run(start, total - k, os.path.join(workdir, f"round_{r}"), tx,
                               lambda s: batches(s + k))
        results.append(summary(r, masks, history))
    return LotteryResult(trained, masks, results)


def _first_target(rules):
    return float(rules[0][1].sparsity)
