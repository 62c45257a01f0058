"""Causal language modelling: pre-train a small Llama-style decoder from scratch, or fine-tune
a decoder checkpoint, on text; held-out perplexity before and after training.

    python train.py --config configs/pretrain_causal_lm.py --workdir runs/decoder
    python train.py --config configs/finetune_causal_lm.py --workdir runs/notes \\
        --config.data.source=notes.txt --config.data.validation=held_out.txt

Objective: next-token cross-entropy (the maximum-likelihood objective of GPT, Radford et al.
2018, 2019): with logits ``z`` and tokens ``x``,

    L = -(1 / |V|) * sum_{(b, t) in V} log softmax(z[b, t])[x[b, t + 1]],

where V holds the positions whose target ``x[b, t + 1]`` and context token ``x[b, t]`` are
both real (attention mask 1).  Documents are packed into blocks of ``data.block_size`` tokens
(GPT-2's packing, `efficient_nlp.data.lm.pack`) and batched in a seeded, resumable order.

Held-out perplexity is ``exp(mean NLL)`` over the packed validation blocks, each scored
independently on every token but its first (block length = stride = ``block_size``,
`efficient_nlp.data.lm.blocks_perplexity`); token accuracy is the fraction of those tokens
that are the argmax prediction.

``config.model_dir``: ``""`` pre-trains from scratch (a byte-level BPE tokenizer trained on
the training texts and ``DecoderForCausalLM(DecoderConfig(**config.model))``); ``"default"``
is `efficient_nlp.models.default_decoder_dir` (the decoder the pre-training config writes);
anything else is a HF decoder directory (GPT-2, Llama, Qwen2, Mistral) or Hub id, whose
tokenizer is used and whose dropout rates ``config.model`` may override.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import time

import jax
import numpy as np
from flax import nnx

from efficient_nlp import distill, models
from efficient_nlp import train as train_lib
from efficient_nlp.data import lm
from efficient_nlp.data.lm_tokenizer import train_tokenizer
from efficient_nlp.data.pipeline import load_tokenizer
from efficient_nlp.models.hf_checkpoint import resolve_model_dir
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.train.evaluate import placed_state

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_DECODER", "DROPOUT_FIELDS", "causal_lm_loss", "lm_loss", "perplexity_eval_fn",
           "read_data", "build_model", "run", "format_results"]

#: ``config.model_dir`` value naming `efficient_nlp.models.default_decoder_dir`.
DEFAULT_DECODER = "default"
#: The ``config.model`` fields a fine-tuning run may set (the architecture comes from the checkpoint).
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob")


# ----------------------------------------------------------------------------- loss
def causal_lm_loss(logits, input_ids, attention_mask=None):
    """Mean next-token cross-entropy: ``logits[:, :-1]`` predict ``input_ids[:, 1:]``.

    A target counts when it and its context token are both real (``attention_mask`` 1 at
    ``t`` and ``t + 1``; no mask = all count).  Log-softmax in float32.  Returns ``(loss,
    {"token_accuracy": fraction of counted targets that are the argmax})``; 0 and 0 when no
    target counts.
    """
    loss, accuracy = distill.next_token_loss(logits, input_ids, attention_mask)
    return loss, {"token_accuracy": accuracy}


def lm_loss(model, batch, rngs):
    """`causal_lm_loss` of ``model`` on a batch ``{"input_ids", "attention_mask"}`` (training
    mode: dropout with ``rngs``), the ``loss_fn`` of `efficient_nlp.train.fit`."""
    out = model(batch["input_ids"], batch["attention_mask"], deterministic=False, rngs=rngs)
    return causal_lm_loss(out.logits, batch["input_ids"], batch["attention_mask"])


# ----------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, input_ids):
    return nnx.merge(graphdef, state)(input_ids).logits


def perplexity_eval_fn(blocks, batch_size):
    """``eval_fn(model) -> {"perplexity", "nll", "token_accuracy"}`` on packed blocks ``[N, T]``
    (`efficient_nlp.data.lm.blocks_perplexity`, logits from one jitted forward pass)."""
    blocks = np.asarray(blocks)

    def eval_fn(model):
        graphdef, state = placed_state(model, train_lib.make_mesh())
        out = lm.blocks_perplexity(lambda ids: _logits(graphdef, state, ids), blocks, int(batch_size))
        return {k: float(out[k]) for k in ("perplexity", "nll", "token_accuracy")}

    return eval_fn


# ----------------------------------------------------------------------------- data
def _is_file(source: str) -> bool:
    """A local file, as `efficient_nlp.data.lm.read_texts` decides (not "builtin", not a hub name)."""
    return source != "builtin" and (os.path.exists(os.path.expanduser(source))
                                    or os.path.splitext(source)[1].lower() in lm.TEXT_EXTENSIONS
                                    or source.startswith((".", "~", os.sep)))


def _first(texts, limit):
    return texts[: int(limit)] if limit else texts


def read_data(d):
    """``(train_texts, validation_texts, validation_name)`` of ``config.data``.

    ``d.validation`` is a split of ``d.source`` ("builtin" or a hub dataset), or a held-out
    file; a local-file source has one split, so it needs a validation file.
    """
    source, validation = str(d.source), str(d.validation)
    if not source:
        raise ValueError("config.data.source is empty: set it to 'builtin', a local text file "
                         f"({', '.join(lm.TEXT_EXTENSIONS)}) or a Hugging Face dataset name")
    if not validation:
        raise ValueError("config.data.validation is empty: set it to a held-out split of the source "
                         "(e.g. 'validation') or to a held-out text file")
    kwargs = dict(text_column=d.text_column, config=d.hub_config or None)
    train_texts = _first(lm.read_texts(source, d.split, **kwargs), d.max_documents)
    if _is_file(validation):
        val_texts, name = lm.read_texts(validation, **kwargs), validation
    elif _is_file(source):
        raise ValueError(
            f"config.data.source={source!r} is a local file, which has one split, so "
            f"config.data.validation={validation!r} cannot name a split of it: set "
            f"config.data.validation to a held-out file ({', '.join(lm.TEXT_EXTENSIONS)})")
    else:
        val_texts, name = lm.read_texts(source, validation, **kwargs), f"{source}:{validation}"
    return train_texts, _first(val_texts, d.max_validation_documents), name


def _pack(tokenizer, texts, block_size, what):
    blocks = lm.pack(lm.tokenize_texts(tokenizer, texts), block_size, eos_id=tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise ValueError(f"the {what} text ({len(texts)} documents) holds fewer than block_size="
                         f"{block_size} tokens: use a smaller config.data.block_size or more text")
    return blocks


# ----------------------------------------------------------------------------- model
def build_model(config, train_texts):
    """``(tokenizer, model, init)``: from scratch (``config.model_dir`` empty) or loaded."""
    block_size = int(config.data.block_size)
    seed = int(config.train.seed)
    fields = dict(config.model.to_dict())
    if not config.model_dir:
        log.info("Training a byte-level BPE tokenizer (vocab %d) on %d documents",
                 config.tokenizer.vocab_size, len(train_texts))
        tokenizer = train_tokenizer(train_texts, config.tokenizer.vocab_size,
                                    min_frequency=config.tokenizer.get("min_frequency", 2))
        fields["vocab_size"] = fields.get("vocab_size") or len(tokenizer)
        fields["max_position_embeddings"] = fields.get("max_position_embeddings") or block_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if fields.get(name) is None:
                fields[name] = getattr(tokenizer, name)
        cfg = models.DecoderConfig(**fields)
        return tokenizer, models.DecoderForCausalLM(cfg, rngs=nnx.Rngs(seed)), "scratch"
    other = sorted(set(fields) - set(DROPOUT_FIELDS))
    if other:
        raise ValueError(
            f"config.model sets {other}, which describe a model trained from scratch (config.model_dir "
            f"empty); with config.model_dir={config.model_dir!r} only {list(DROPOUT_FIELDS)} may be set "
            "(configs/finetune_causal_lm.py is such a config)")
    model_dir = models.default_decoder_dir() if config.model_dir == DEFAULT_DECODER else config.model_dir
    local = resolve_model_dir(model_dir)
    model = models.from_pretrained(local, seed=seed, **fields)
    if not isinstance(model, models.DecoderForCausalLM):
        raise ValueError(f"{model_dir} holds a {type(model).__name__}, not a decoder: the causal_lm recipe "
                         "needs a GPT-2 / Llama / Qwen2 / Mistral checkpoint")
    return load_tokenizer(local), model, model_dir


def _check_fits(cfg, tokenizer, block_size, blocks):
    top = int(max(b.max() for b in blocks))
    if top >= cfg.vocab_size:
        raise ValueError(f"the tokenizer produced id {top}, but the model's vocab_size is {cfg.vocab_size}: "
                         "use the model's own tokenizer (or a larger config.model.vocab_size)")
    if block_size > cfg.max_position_embeddings:
        raise ValueError(f"config.data.block_size={block_size} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}: use a smaller block_size")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token, which separates packed documents")


# ----------------------------------------------------------------------------- recipe
def run(config, workdir):
    """Trains a causal LM as ``config`` says; returns the results (also in ``workdir/results.json``).

    Writes the model with its tokenizer as a HF directory ``workdir/model`` (loadable by
    ``models.from_pretrained``), and copies it to `efficient_nlp.models.default_decoder_dir`
    when ``config.publish_default``.
    """
    start_time = time.perf_counter()
    train_lib.init_distributed(config)
    d, opts = config.data, train_lib.train_options(config)
    block_size = int(d.block_size)
    train_texts, val_texts, val_name = read_data(d)
    tokenizer, model, init = build_model(config, train_texts)
    train_blocks = _pack(tokenizer, train_texts, block_size, "training")
    val_blocks = _pack(tokenizer, val_texts, block_size, "validation")
    _check_fits(model.config, tokenizer, block_size, (train_blocks, val_blocks))

    evaluate = perplexity_eval_fn(val_blocks, opts.eval_batch_size)
    before = evaluate(model)
    log.info("%d training blocks and %d held-out blocks of %d tokens; held-out perplexity before training: %.2f",
             len(train_blocks), len(val_blocks), block_size, before["perplexity"])
    eval_seconds, resumed_at = [0.0], []

    def eval_fn(m):
        t = time.perf_counter()
        out = evaluate(m)
        eval_seconds[0] += time.perf_counter() - t
        return out

    def batches(start_step):
        resumed_at.append(start_step)
        return lm.lm_batches(train_blocks, opts.batch_size, seed=opts.seed, start_step=start_step)

    fit_start = time.perf_counter()
    model, history = train_lib.fit(model, lm_loss, batches, config=config, workdir=workdir, eval_fn=eval_fn)
    train_seconds = time.perf_counter() - fit_start - eval_seconds[0]
    after = {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}

    steps_run = opts.num_steps - resumed_at[0] if resumed_at else 0
    tokens_per_step = opts.batch_size * block_size
    model_dir = os.path.join(workdir, "model")
    published = models.default_decoder_dir(must_exist=False) if config.get("publish_default") else None
    results = {
        "init": init,
        "parameters": distill.num_params(model),
        "architecture": {k: getattr(model.config, k) for k in (
            "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "tie_word_embeddings")},
        "data": {"source": str(d.source), "validation": val_name, "block_size": block_size,
                 "train_documents": len(train_texts), "train_tokens": int(train_blocks.size),
                 "validation_documents": len(val_texts), "validation_blocks": len(val_blocks)},
        "held_out": {"block_size": block_size, "stride": block_size,
                     "scored_tokens": len(val_blocks) * (block_size - 1), "before": before, "after": after},
        "training": {"steps": opts.num_steps, "batch_size": opts.batch_size, "tokens_per_step": tokens_per_step,
                     "epochs": opts.num_steps * tokens_per_step / train_blocks.size,
                     "steps_this_run": steps_run, "train_seconds": train_seconds,
                     "tokens_per_second": tokens_per_step * steps_run / train_seconds if steps_run else None},
        "wall_seconds": time.perf_counter() - start_time,
        "model_dir": model_dir,
        "published_to": published,
    }
    save_outputs(workdir, results, tokenizer, {"model": model})
    if published and train_lib.is_main_process() and os.path.realpath(published) != os.path.realpath(model_dir):
        shutil.copytree(model_dir, published, dirs_exist_ok=True)
    print(format_results(results, os.path.join(workdir, "results.json")))
    return results


def format_results(results, results_path="results.json"):
    """A few lines: what was trained, held-out perplexity before -> after, where the outputs went."""
    h, t, d = results["held_out"], results["training"], results["data"]
    what = ("Pre-trained from scratch" if results["init"] == "scratch" else f"Fine-tuned {results['init']}")
    speed = (f"{t['steps_this_run']} steps in {t['train_seconds'] / 60:.1f} min, "
             f"{t['tokens_per_second']:,.0f} tokens/s" if t["tokens_per_second"] else "no steps run now")
    lines = [
        f"{what}: {results['parameters'] / 1e6:.2f}M-parameter {results['architecture']['model_type']} decoder, "
        f"{t['steps']} steps x {t['tokens_per_step']:,} tokens = {t['epochs']:.1f} epochs of "
        f"{d['train_tokens']:,} training tokens ({speed})",
        f"Held-out perplexity on {d['validation']} ({d['validation_blocks']} blocks of {h['block_size']} tokens, "
        f"stride {h['stride']}): {h['before']['perplexity']:.2f} -> {h['after']['perplexity']:.2f}; "
        f"token accuracy {h['before']['token_accuracy']:.3f} -> {h['after']['token_accuracy']:.3f}",
        f"Model + tokenizer (HF directory, models.from_pretrained): {results['model_dir']}",
    ]
    if results["published_to"]:
        lines.append(f"Copied to the default decoder directory (models.default_decoder_dir()): "
                     f"{results['published_to']}")
    lines.append(f"Results: {results_path}")
    return "\n".join(lines)
