"""ELECTRA's discriminator: the encoder plus a per-token replaced-token-detection head.

ELECTRA (Clark et al. 2020) pre-trains an encoder as a discriminator: a small masked-LM
generator fills masked positions with sampled tokens and the discriminator predicts, for
every input token, whether it is the original or a replacement.  The head reads each
position's final hidden state ``h_t`` and gives one logit

    z_t = w_2 . act(W_1 h_t + b_1) + b_2,       p(replaced at t) = sigmoid(z_t),

with ``W_1`` a ``hidden x hidden`` dense layer and ``act`` the model's ``hidden_act`` (GELU),
as in the HF ``ElectraForPreTraining`` (tensors ``discriminator_predictions.dense`` and
``discriminator_predictions.dense_prediction``), so checkpoints load tensor for tensor.  The
training objective lives in `efficient_nlp.pretrain.electra`; fine-tuning loads the saved
discriminator as a classifier (``from_pretrained(dir, num_labels=k)``), which drops this head.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from efficient_nlp.models.bert import Encoder, _linear, activation
from efficient_nlp.models.config import BertConfig


class ElectraDiscriminatorHead(nnx.Module):
    """dense(hidden, hidden) -> activation -> dense(hidden, 1), squeezed: [B,T,H] -> [B,T]."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        h = config.hidden_size
        self.hidden_act = config.hidden_act
        self.dense = _linear(config, h, h, dtype, param_dtype, rngs)
        self.dense_prediction = _linear(config, h, 1, dtype, param_dtype, rngs)

    def __call__(self, hidden_states):
        x = activation(self.hidden_act)(self.dense(hidden_states))
        return self.dense_prediction(x)[..., 0].astype(jnp.float32)  # float32 logits for the loss


class ElectraForPreTraining(Encoder):
    """ELECTRA encoder (no pooler) + `ElectraDiscriminatorHead`; ``logits`` is [B,T]: the
    logit that each token was replaced (positive = replaced).

    Args:
      config: a `BertConfig` with ``model_type="electra"`` (``embedding_size`` may differ from
        ``hidden_size``; the embeddings are then projected).
      rngs: ``nnx.Rngs`` for the initial weights.
      dtype: computation dtype; param_dtype: storage dtype of the parameters.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        if config.model_type != "electra":
            raise ValueError(f"ElectraForPreTraining needs an ELECTRA config, got model_type={config.model_type!r}; "
                             "use config.replace(model_type='electra')")
        self._init_backbone(config, False, dtype, param_dtype, rngs)
        self.discriminator_predictions = ElectraDiscriminatorHead(config, dtype=dtype, param_dtype=param_dtype,
                                                                  rngs=rngs)

    def head(self, hidden_states, *, deterministic: bool = True, rngs=None, pooled=None):
        return self.discriminator_predictions(hidden_states)


__all__ = ["ElectraDiscriminatorHead", "ElectraForPreTraining"]
