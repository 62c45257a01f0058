"""Efficient pre-training of encoders: masked-LM data and masking (BERT, RoBERTa's dynamic
masking), ELECTRA replaced-token detection and progressive stacking; the recipe that wires them is
`efficient_nlp.recipes.pretrain` (docs/pretraining.md).

    from efficient_nlp import pretrain
    tok = pretrain.train_wordpiece_tokenizer(texts, 4096)
    blocks = pretrain.encoder_blocks(tok, texts, 128)              # [CLS] ... [SEP] blocks
    loss_fn = pretrain.mlm_loss_fn(vocab_size=len(tok), mask_id=tok.mask_token_id,
                                   special_ids=pretrain.special_ids(tok))
    model = pretrain.ElectraPretrainer(disc_config, generator_fraction=0.25, rngs=nnx.Rngs(0))
    deeper = pretrain.stack_layers(model_with_l_layers)            # 2L layers, layer i + L = layer i
"""
from efficient_nlp.pretrain.data import SPECIAL_TOKENS, encoder_blocks, special_ids, train_wordpiece_tokenizer
from efficient_nlp.pretrain.electra import (
    ElectraPretrainer,
    discriminator_of,
    electra_eval_fn,
    electra_loss_fn,
    generator_config,
    gumbel_max_sample,
    replaced_labels,
)
from efficient_nlp.pretrain.mlm import mask_tokens, mlm_eval_fn, mlm_loss, mlm_loss_fn
from efficient_nlp.pretrain.plots import LossCurve, plot_loss_vs_compute
from efficient_nlp.pretrain.stacking import (
    layer_stack_paths,
    stack_layers,
    stack_opt_state,
    stack_tree,
    stacked_config,
)

__all__ = [
    "ElectraPretrainer", "LossCurve", "SPECIAL_TOKENS", "discriminator_of", "electra_eval_fn", "electra_loss_fn",
    "encoder_blocks", "generator_config", "gumbel_max_sample", "layer_stack_paths", "mask_tokens", "mlm_eval_fn",
    "mlm_loss", "mlm_loss_fn", "plot_loss_vs_compute", "replaced_labels", "special_ids", "stack_layers",
    "stack_opt_state", "stack_tree", "stacked_config", "train_wordpiece_tokenizer",
]
