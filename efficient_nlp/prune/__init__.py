"""Pruning (METHODS.md section 2.1): scores, patterns, distributions, schedules, an optax wrapper
keeping masks in the optimizer state, proximal operators, physical shrink of BERT.

    from efficient_nlp import prune
    rules = [prune.rule(r"layers\\.\\d+\\.(attention|ffn)\\..*kernel$", "unstructured", 0.9)]
    tx = prune.pruning(base_tx, rules, criterion="movement",
                       schedule=prune.gradual_cubic(begin_step=100, end_step=800, frequency=50))
    # ... train with tx (train.fit(..., optimizer=tx)); masks: prune.get_masks(opt_state)
    masks = prune.make_masks(params, rules)          # one-shot magnitude masks (pure)
    small, structure = prune.shrink(model)           # remove zeroed heads / FFN neurons for real

Everything that only zeroes weights is a *simulation* of sparsity; `shrink` is the real removal
of heads / neurons / layers that makes inference faster.
"""
from efficient_nlp.prune.masks import (
    DISTRIBUTIONS,
    Plan,
    PruneRule,
    apply_masks,
    compute_masks,
    make_masks,
    make_plan,
    rule,
    sparsity,
)
from efficient_nlp.prune.patterns import (
    PATTERNS,
    Pattern,
    PatternError,
    block,
    ffn_neurons,
    get_pattern,
    heads,
    layers,
    n_m,
    neurons,
    nm_mask,
    rows,
    topk_mask,
    unstructured,
)
from efficient_nlp.prune.schedules import SCHEDULES, Schedule, get_schedule, gradual_cubic, one_shot
from efficient_nlp.prune.scores import (
    CRITERIA,
    Criterion,
    get_criterion,
    magnitude,
    magnitude_score,
    movement,
    movement_score,
    random,
    random_score,
    saliency,
    saliency_score,
)
from efficient_nlp.prune.transform import (
    PruningState,
    get_masks,
    group_soft_threshold,
    l1_soft_threshold,
    pruning,
    soft_threshold,
)
from efficient_nlp.prune.shrink import (
    ShrinkReport,
    count_params,
    flops,
    measure_latency,
    shrink,
    shrink_report,
    structure_of,
)
from efficient_nlp.prune.summary import format_summary, layer_summary, plot_summary, sparsity_summary

__all__ = [name for name in dir() if not name.startswith("_")]
