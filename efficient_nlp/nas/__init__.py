"""Neural architecture search with affine parameter sharing (APS; Wang et al. 2020; docs/nas.md).

    from efficient_nlp import nas
    nas.sharing_level(Ps, Qs)                  # Phi of one layer (closed form)
    layer = nas.ApsDense(384, 1536, out_widths=(384, 768, 1152, 1536), sharing="ordinal", rngs=...)
    searcher = nas.Searcher(nas.build_space(config), config.search); searcher.run(workdir)

Modules: `aps` (affine-shared layers, P/Q initialisations), `sharing` (Phi, its gradient, the
projected annealing step), `controller` (LSTM policy, REINFORCE, beam search), `flops` (FLOPs
model), `spaces` (digits ResNet, encoder widths), `search` (the two-stage loop), `plots`.
The recipe is `efficient_nlp.recipes.nas`.
"""
from efficient_nlp.nas.aps import (
    SHARING_KINDS,
    ApsConv,
    ApsDense,
    ApsLayer,
    Transform,
    WidthBatchNorm,
    aps_layers,
    independent_transforms,
    init_transforms,
    model_sharing_level,
    ordinal_transforms,
)
from efficient_nlp.nas.controller import (
    Controller,
    beam_search,
    log_prob,
    reinforce_loss,
    reward,
    sample,
    update_baseline,
)
from efficient_nlp.nas.flops import FlopsModel, bert_flops_model, encoder_flops_model, resnet_flops_model
from efficient_nlp.nas.search import Searcher, choose, default_search_config
from efficient_nlp.nas.sharing import (
    anneal_step,
    normalize_columns,
    pair_sum,
    projected_step,
    sharing_level,
    sharing_level_grad,
)
from efficient_nlp.nas.spaces import (
    SPACES,
    ApsBert,
    ApsEncoder,
    ApsResNet,
    SearchSpace,
    bert_child,
    build_space,
    encoder_child,
    register_space,
)

__all__ = [
    "SHARING_KINDS", "SPACES", "register_space", "ApsBert", "ApsConv", "ApsEncoder", "ApsDense", "ApsLayer", "ApsResNet", "Controller",
    "FlopsModel", "SearchSpace", "Searcher", "Transform", "WidthBatchNorm", "anneal_step",
    "aps_layers", "beam_search", "bert_child", "bert_flops_model", "build_space", "choose",
    "encoder_child", "encoder_flops_model",
    "default_search_config", "independent_transforms", "init_transforms", "log_prob",
    "model_sharing_level", "normalize_columns", "ordinal_transforms", "pair_sum",
    "projected_step", "reinforce_loss", "resnet_flops_model", "reward", "sample",
    "sharing_level", "sharing_level_grad", "update_baseline",
]
