"""Blocks the config files share: task data, the teacher and its fine-tuning, training settings,
quantization specs, distillation stages and matches, the few-shot pruning grid.

Each function returns a fresh object (a `ml_collections.ConfigDict`, or plain dicts / lists for
the stages and matches, as the recipes read them), so a config can change its copy freely.
"""
import ml_collections

from efficient_nlp.data.settings import default_data_config
from efficient_nlp.train import default_train_config

# Encoder layers of the embedded MiniLM-L6-H384, the default teacher.  Layer-wise matches are
# written for it; with another teacher pass its depth (the report reads it from the model).
MINILM_LAYERS = 6


# ----------------------------------------------------------------------------- data and teacher
def data_config(task="builtin", max_length=64):
    """``config.data``: the task (a GLUE name, ``builtin`` or ``files``) and how it is read
    (`efficient_nlp.data.settings.default_data_config` lists the keys and their defaults)."""
    return ml_collections.ConfigDict({**default_data_config(), "task": task, "max_length": max_length})


#: Layers of the default decoder (configs/pretrain_causal_lm.py); layer-wise decoder matches use it.
DECODER_LAYERS = 4


def lm_data_config(block_size=128):
    """``config.data`` of causal language modelling (``task="lm"``): text of ``source``
    ("builtin": the standard-library corpus; or a .txt / .jsonl / .parquet file, with the held-out
    text in ``validation``; or a hub dataset name), packed into blocks of ``max_length`` tokens."""
    config = data_config(task="lm", max_length=block_size)
    config.source = "builtin"
    config.validation = ""        # held-out source; "" = the "validation" split of source
    config.max_documents = 0      # 0 = all
    config.eval_blocks = 64       # held-out blocks scored (perplexity, token accuracy); 0 = all
    return config


def text_data_config(source="builtin", validation="validation", block_size=128):
    """``config.data`` of the pre-training recipes (causal LM, masked LM, ELECTRA): raw text from
    ``source`` ("builtin": the standard-library corpus; a local .txt / .jsonl / .parquet file with
    the held-out text in ``validation``; or a hub dataset name), packed into blocks of ``block_size``
    tokens (at most the model's max_position_embeddings)."""
    return ml_collections.ConfigDict(dict(
        source=source,
        split="train",              # split of "builtin" / hub sources.
        validation=validation,      # held-out split of the source, or a held-out file.
        text_column="text",
        hub_config="",
        block_size=block_size,
        max_documents=0,            # 0 = all.
        max_validation_documents=0,
    ))


def as_lm(config, block_size=128):
    """Switch a compression config to the pre-trained decoder (``model_dir`` "" = the default
    decoder, used as the teacher as is) and causal language modelling."""
    config.data = lm_data_config(block_size)
    config.teacher_dir = ""
    config.train.eval_batch_size = 16
    return config


def train_config(**overrides):
    """`default_train_config` with ``overrides``."""
    config = default_train_config()
    config.update(overrides)
    return config


def teacher_train_config():
    """How a missing teacher is fine-tuned first: as configs/quickstart.py."""
    return train_config(num_steps=300, batch_size=32, learning_rate=1e-4, eval_every=100, checkpoint_every=100)


def new_config(recipe, **fields):
    """A config running ``recipe``, with ``fields`` next (in that order)."""
    config = ml_collections.ConfigDict()
    config.recipe = recipe
    for name, value in fields.items():
        config[name] = value
    return config


def add_teacher(config):
    """The fields of a recipe that compresses a fine-tuned teacher: where the teacher is (or the
    model it is fine-tuned from), the built-in task, and the teacher's fine-tuning."""
    config.model_dir = ""      # pretrained model the teacher is fine-tuned from ("" = MiniLM).
    config.teacher_dir = ""    # fine-tuned teacher (HF dir); "" = fine-tune into workdir/teacher.
    config.data = data_config()
    config.teacher_train = teacher_train_config()
    return config


def student_train_config(**overrides):
    """``config.train`` of the distilling recipes; num_steps / learning_rate come from the stages."""
    return train_config(**{**dict(batch_size=32, eval_batch_size=128, eval_every=100, checkpoint_every=100,
                                  warmup_ratio=0.1), **overrides})


# ----------------------------------------------------------------------------- quantization
def quant_config(a_bits, activation_method, w_bits=None, e_bits=None, weight_method=""):
    """``config.quant``: bits and methods of the weights and word embeddings (left out when
    ``w_bits`` is None: the recipe decides them) and of the activations."""
    if w_bits is None:
        fields = dict(a_bits=a_bits)
    else:
        fields = dict(
            w_bits=w_bits, e_bits=e_bits, a_bits=a_bits,
            weight_method=weight_method,        # "" = by bits: 1 bwn, 2 twn, else uniform
            weight_granularity="")              # "" = channel for uniform / lsq, tensor for twn / bwn
    fields.update(
        activation_method=activation_method,    # uniform (per-token range) | lsq (learned steps) | pact
        activation_granularity="",              # "" = token; "example" (one range per example)
        rules=[])                               # [[regex, None or {field: value}], ...]
    return ml_collections.ConfigDict(fields)


# ----------------------------------------------------------------------------- distillation
def stage(name, num_steps, learning_rate, matches, hard_label_weight=0.0):
    """One distillation stage of ``config.distill.stages``."""
    return dict(name=name, num_steps=num_steps, learning_rate=learning_rate, matches=matches,
                hard_label_weight=hard_label_weight)


def prediction_matches(temperature=1.0):
    """Soft cross-entropy on the logits."""
    return [dict(feature="logits", loss="soft_ce", temperature=temperature)]


def two_stages(intermediate, steps, learning_rates, prediction=None):
    """TinyBERT / TernaryBERT two-stage KD: the ``intermediate`` matches, then the prediction
    layer (``prediction``, default soft CE at T=1); ``steps`` and ``learning_rates`` per stage."""
    return [stage("intermediate", steps[0], learning_rates[0], intermediate),
            stage("prediction", steps[1], learning_rates[1],
                  prediction_matches() if prediction is None else prediction)]


def layerwise_matches(layers, features):
    """Embedding output, then each ``(feature, loss)`` of ``features`` for every layer, student
    layer i <- teacher layer i (a student as deep as its teacher)."""
    matches = [dict(feature="embedding", loss="hidden_mse")]
    for feature, loss in features:
        matches += [dict(feature=feature, loss=loss, student_layer=i, teacher_layer=i) for i in range(layers)]
    return matches


# ----------------------------------------------------------------------------- cross distillation
def add_fewshot_grid(config, structure):
    """The few-shot pruning grid: sparsities x shots (examples per class) x seeds x methods."""
    config.structure = structure
    config.sparsities = (0.5, 0.7, 0.9)
    config.shots = (1, 5, 10)
    config.seeds = (0, 1, 2)
    config.methods = ("l1", "bp", "fitnet", "wo_cd", "cd", "scd")
    return config


def cd_settings(mu, alpha, beta, steps, learning_rate, finetune_lr):
    """``config.cd``: the loss mix of cross distillation, the sparsifier and the per-layer steps."""
    return ml_collections.ConfigDict(dict(
        mu=mu, alpha=alpha, beta=beta,
        sparsifier="topk",          # "topk" (official code) | "prox" (proximal, same schedule)
        lam_extra=0.0,              # prox only: extra L1 strength on top of the scheduled lambda
        steps=steps, learning_rate=learning_rate, ramp=1 / 3,   # per layer
        finetune_steps=0, finetune_lr=finetune_lr))   # optional end-to-end fine-tuning afterwards


def cd_baselines(learning_rate, steps=200):
    """``config.baselines``: back-prop and FitNet fine-tuning of the pruned student."""
    return ml_collections.ConfigDict(dict(bp_steps=steps, bp_lr=learning_rate, fitnet_steps=steps,
                                          fitnet_lr=learning_rate))
