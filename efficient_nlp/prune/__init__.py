"""Pruning (docs/pruning.md): scores, patterns, distributions, schedules, an optax wrapper
keeping masks in the optimizer state, proximal operators, physical shrink of a model.

    from efficient_nlp import prune
    rules = [prune.rule(r"layers\\.\\d+\\.(attention|ffn)\\..*kernel$", "unstructured", 0.9)]
    tx = prune.pruning(base_tx, rules, criterion="movement",
                       schedule=prune.gradual_cubic(begin_step=100, end_step=800, frequency=50))
    # ... train with tx (train.fit(..., optimizer=tx)); masks: prune.get_masks(opt_state)
    masks = prune.make_masks(params, rules)          # one-shot magnitude masks (pure)
    small, structure = prune.shrink(model)           # remove zeroed heads / FFN neurons for real

Everything that only zeroes weights is a *simulation* of sparsity; `shrink` is the real removal
of heads / neurons / layers that makes inference faster.  Heads, FFN neurons and layers are read
from the model's family description (`efficient_nlp.models.family`), so every transform here
works on each model family; `site_regex(model, roles)` writes a rule regex for given site roles.

More procedures on the same pieces: `lottery_ticket` (iterative magnitude pruning with
rewinding), `earlybert_search` / `Slimming` (gates on heads and FFN neurons with L1, pruned once
their mask stabilises), `with_layer_drop` / `remove_layers` (LayerDrop), `flops_structure`
(heads + FFN neurons chosen to a FLOPs target).
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
    site_regex,
    topk_mask,
    unstructured,
)
from efficient_nlp.prune.schedules import SCHEDULES, Schedule, fixed, get_schedule, gradual_cubic, one_shot
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
    full_structure,
    measure_latency,
    shrink,
    shrink_report,
    shrunk_config,
    structure_masks,
    structure_of,
    unit_params,
)
from efficient_nlp.prune.summary import format_summary, layer_summary, plot_summary, sparsity_summary
from efficient_nlp.prune.lottery import LotteryResult, imp_masks, lottery_ticket, rewind, round_rules, round_sparsity
from efficient_nlp.prune.slimming import (
    SearchResult,
    Slimming,
    apply_gates,
    earlybert_search,
    gate_masks,
    gate_structure,
    init_gates,
    l1_penalty,
    mask_distance,
    slimming_loss,
    stabilized,
)
from efficient_nlp.prune.layerdrop import every_other, remove_layers, skip_rates, with_layer_drop
from efficient_nlp.prune.budget import flops_structure, taylor_scores, unit_flops, unit_scores

from efficient_nlp.prune.transform import group_shrink
from efficient_nlp.prune.cross_distillation import (
    correction_loss,
    cross_distillation_loss,
    imitation_loss,
    layerwise_loss,
    soft_cross_distillation_loss,
    sparsify,
)
from efficient_nlp.prune import fewshot
from efficient_nlp.prune import oneshot  # noqa: E402  (SparseGPT, Wanda, magnitude per layer)
from efficient_nlp.prune.oneshot import Sparse, sparsegpt, wanda
from efficient_nlp.prune._registry import register_score

__all__ = [name for name in dir() if not name.startswith("_")]
