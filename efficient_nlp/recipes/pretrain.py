"""Pre-train an encoder on text: masked language modelling (BERT) or replaced-token detection
(ELECTRA), from scratch or continued, optionally growing the model by progressive stacking.

    python train.py --config configs/pretrain_mlm.py --workdir runs/mlm
    python train.py --config configs/pretrain_electra.py --workdir runs/electra
    python train.py --config configs/pretrain_stacking.py --workdir runs/stacked
    python train.py --config configs/finetune.py --workdir runs/mlm_task --config.model_dir=runs/mlm/model

Objectives (``config.objective``):

* ``"mlm"`` (Devlin et al. 2019): 15 % of the real, non-special tokens are selected (80 % of them
  become ``[MASK]``, 10 % a random token, 10 % stay), drawn afresh every step (RoBERTa's dynamic
  masking); the loss is the cross-entropy of the original token at the selected positions
  (`efficient_nlp.pretrain.mlm`).
* ``"electra"`` (Clark et al. 2020): a small generator (``electra.generator_fraction`` of the
  discriminator's width) is trained as the masked LM; its samples replace the selected tokens and
  the discriminator learns, for every token, whether it was replaced:
  ``L = L_MLM(generator) + electra.disc_weight * L_disc`` (weight 50), embeddings shared
  (`efficient_nlp.pretrain.electra`).  The discriminator is what is kept: ``workdir/model``.

Progressive stacking (Gong et al. 2019; ``config.stacking.enabled``): an ``L/2``-layer model
trains for ``stacking.first_steps`` steps, its layers are copied on top of themselves (layer
``i + L/2`` starts as layer ``i``) and the ``L``-layer model trains for the remaining steps.  With
``stacking.optimizer="carry"`` the Adam moments are copied the same way and the learning-rate
schedule runs on over both stages; ``"reset"`` starts a fresh optimizer and schedule.

Data: ``config.data`` as in causal language modelling (the built-in corpus, a local text file
with a held-out file, or a hub dataset), packed into blocks ``[CLS] ... [SEP]`` of
``data.block_size`` tokens with ``[SEP]`` between documents (`efficient_nlp.pretrain.data`).
From scratch, a WordPiece tokenizer of ``tokenizer.vocab_size`` is trained on the training text
(kept in ``workdir/tokenizer`` so a resumed run uses the same one); a continued run uses the
tokenizer of ``config.model_dir``.

The held-out loss (fixed masking, so numbers are comparable between evaluations and runs) is
logged every ``train.eval_every`` steps with the training FLOPs and seconds spent so far
(``results["curve"]``): loss against compute, not steps, is what compares runs of different
cost (`efficient_nlp.pretrain.plots.plot_loss_vs_compute`).
"""
from __future__ import annotations

import copy
import logging
import os
import time

from flax import nnx

from efficient_nlp import distill, models
from efficient_nlp import train as train_lib
from efficient_nlp.data import lm
from efficient_nlp.data.pipeline import load_tokenizer
from efficient_nlp.models import flops as flops_lib
from efficient_nlp.models.hf_checkpoint import resolve_model_dir
from efficient_nlp.pretrain import data as pdata
from efficient_nlp.pretrain import electra, mlm, stacking
from efficient_nlp.recipes.causal_lm import read_data
from efficient_nlp.recipes.outputs import save_outputs
from efficient_nlp.train.checkpoint import Checkpointer
from efficient_nlp.train.step import init_state

log = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "run", "format_results", "encoder_config", "step_flops"]

OBJECTIVES = ("mlm", "electra")
#: ``config.model_dir`` value naming the embedded MiniLM (`efficient_nlp.models.default_model_dir`).
DEFAULT_ENCODER = "default"
#: ``config.model`` fields a continued run may set (the architecture comes from the checkpoint).
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


# ----------------------------------------------------------------------------- set-up
def _check(config):
    objective = config.get("objective", "mlm")
    if objective not in OBJECTIVES:
        raise ValueError(f"config.objective={objective!r} is not one of {list(OBJECTIVES)}")
    st = config.stacking
    if st.enabled:
        layers, first = int(config.model.num_hidden_layers), int(st.first_steps)
        if config.model_dir:
            raise ValueError("progressive stacking grows a model trained from scratch: leave config.model_dir "
                             "empty or set config.stacking.enabled=False")
        if objective != "mlm":
            raise ValueError("progressive stacking is implemented for config.objective='mlm'; "
                             "set config.stacking.enabled=False for ELECTRA")
        if layers < 2 or layers % 2:
            raise ValueError(f"progressive stacking doubles an L/2-layer model: config.model.num_hidden_layers "
                             f"must be even and >= 2, got {layers}")
        if not 0 < first < int(config.train.num_steps):
            raise ValueError(f"config.stacking.first_steps={first} must be between 1 and "
                             f"config.train.num_steps - 1 = {int(config.train.num_steps) - 1}")
        if st.optimizer not in ("carry", "reset"):
            raise ValueError(f"config.stacking.optimizer must be 'carry' or 'reset', got {st.optimizer!r}")
    if objective == "electra" and config.model_dir:
        raise ValueError("ELECTRA pre-training here starts from scratch (a generator and a discriminator "
                         "sharing embeddings): leave config.model_dir empty, or use config.objective='mlm' to "
                         "continue pre-training a checkpoint")
    return objective


def _model_dir(config):
    """``config.model_dir`` with "default" = the embedded MiniLM; "" = from scratch."""
    return models.default_model_dir() if config.model_dir == DEFAULT_ENCODER else config.model_dir


def _tokenizer(config, workdir, train_texts):
    """The model directory's tokenizer (continued), else the one trained for this workdir."""
    if config.model_dir:
        return load_tokenizer(resolve_model_dir(_model_dir(config)))
    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.isdir(tok_dir):
        return load_tokenizer(tok_dir)
    log.info("Training a WordPiece tokenizer (vocab %d) on %d documents", config.tokenizer.vocab_size,
             len(train_texts))
    return pdata.train_wordpiece_tokenizer(
        train_texts, config.tokenizer.vocab_size, tok_dir if train_lib.is_main_process() else None,
        min_frequency=config.tokenizer.min_frequency)


def encoder_config(config, tokenizer, num_layers=None):
    """The `models.BertConfig` of ``config.model`` for a model trained from scratch (vocabulary
    and positions filled from the tokenizer and ``data.block_size``; ``num_layers`` overrides)."""
    fields = dict(config.model.to_dict())
    fields["vocab_size"] = fields.get("vocab_size") or len(tokenizer)
    fields["max_position_embeddings"] = fields.get("max_position_embeddings") or int(config.data.block_size)
    fields["pad_token_id"] = tokenizer.pad_token_id
    if not fields.get("embedding_size"):
        fields.pop("embedding_size", None)
    if config.objective == "electra":
        fields["model_type"] = "electra"
    if num_layers is not None:
        fields["num_hidden_layers"] = int(num_layers)
    return models.BertConfig(**fields)


def _build(config, tokenizer, num_layers=None):
    seed = int(config.train.seed)
    if config.model_dir:
        extra = sorted(set(config.model.to_dict()) - set(DROPOUT_FIELDS))
        if extra:
            raise ValueError(f"config.model sets {extra}, which describe a model trained from scratch; with "
                             f"config.model_dir={config.model_dir!r} only {list(DROPOUT_FIELDS)} may be set")
        fields = {k: v for k, v in config.model.to_dict().items() if k in DROPOUT_FIELDS}
        return models.from_pretrained(_model_dir(config), head="mlm", seed=seed, **fields)
    cfg = encoder_config(config, tokenizer, num_layers)
    if config.objective == "electra":
        return electra.ElectraPretrainer(cfg, generator_fraction=config.electra.generator_fraction,
                                         rngs=nnx.Rngs(seed))
    return models.BertForMaskedLM(cfg, rngs=nnx.Rngs(seed))


def _objective_fns(config, tokenizer, val_blocks):
    kw = dict(vocab_size=len(tokenizer), mask_id=tokenizer.mask_token_id,
              special_ids=pdata.special_ids(tokenizer))
    rate, batch = float(config.mlm.rate), int(config.train.eval_batch_size)
    if config.objective == "electra":
        return (electra.electra_loss_fn(rate=rate, disc_weight=float(config.electra.disc_weight), **kw),
                electra.electra_eval_fn(val_blocks, batch, **kw))
    return mlm.mlm_loss_fn(rate=rate, **kw), mlm.mlm_eval_fn(val_blocks, batch, **kw)


def step_flops(model, batch_size, seq_len):
    """Training FLOPs of one step of ``model`` from the family FLOPs model
    (`efficient_nlp.models.flops.train_flops`: 3 x forward, the head at every position included);
    an ELECTRA pre-trainer counts its generator and its discriminator."""
    if isinstance(model, electra.ElectraPretrainer):
        return step_flops(model.generator, batch_size, seq_len) + step_flops(model.discriminator, batch_size, seq_len)
    return flops_lib.train_flops(model, seq_len, batch_size)


# ----------------------------------------------------------------------------- training
def _fit_stage(model, loss_fn, evaluate, eval_key, blocks, config, workdir, *, num_steps, offset,
               optimizer=None, lr_schedule=None, opt_state=None):
    """One ``train.fit`` of ``num_steps`` steps in ``workdir``.  Returns ``(model, points,
    seconds, flops_per_step)``: one point per evaluation (``step`` counted from ``offset``, the
    stage's training ``seconds`` so far, evaluation time excluded, and the held-out loss)."""
    cfg = copy.deepcopy(config)
    cfg.train.num_steps = int(num_steps)
    batch = int(config.train.batch_size)
    clock = {"start": time.perf_counter(), "eval": 0.0, "at": []}

    def eval_fn(m):
        t = time.perf_counter()
        clock["at"].append(t - clock["start"] - clock["eval"])
        out = evaluate(m)
        clock["eval"] += time.perf_counter() - t
        return out

    def batches(start_step):
        clock["start"], clock["eval"] = time.perf_counter(), 0.0
        return lm.lm_batches(blocks, batch, seed=int(config.train.seed) + offset, start_step=start_step)

    model, history = train_lib.fit(model, loss_fn, batches, config=cfg, workdir=workdir, eval_fn=eval_fn,
                                   optimizer=optimizer, lr_schedule=lr_schedule, opt_state=opt_state)
    evals = [r for r in history if eval_key in r]
    points = [{"step": offset + int(r["step"]), "seconds": s, "loss": float(r[eval_key])}
              for r, s in zip(evals, clock["at"])]
    seconds = time.perf_counter() - clock["start"] - clock["eval"]
    after = {k[len("eval/"):]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    return model, points, {"seconds": seconds, "after": after,
                           "flops_per_step": step_flops(model, batch, int(config.data.block_size))}


def _layers(model):
    return (model.discriminator if isinstance(model, electra.ElectraPretrainer) else model).config.num_hidden_layers


def _stage1_opt_state(workdir, model, optimizer, step):
    """The optimizer state saved with stage 1's last checkpoint (what ``carry`` copies)."""
    _, template = init_state(model, optimizer)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return ckpt.restore(step, template).opt_state
    finally:
        ckpt.close()


def _train(config, workdir, tokenizer, loss_fn, evaluate, eval_key, train_blocks):
    """Trains as configured (one stage, or two with progressive stacking); returns the model, the
    curve (held-out loss against cumulative FLOPs and seconds), the last held-out metrics and the
    stages (layers, steps, FLOPs per step, seconds)."""
    total = int(config.train.num_steps)
    st = config.stacking
    if not st.enabled:
        model = _build(config, tokenizer)
        model, points, out = _fit_stage(model, loss_fn, evaluate, eval_key, train_blocks, config, workdir,
                                        num_steps=total, offset=0)
        for p in points:
            p["flops"] = out["flops_per_step"] * p["step"]
        layers = _layers(model)
        return model, points, out.pop("after"), [{"layers": layers, "steps": total, **out}]
    layers, first = int(config.model.num_hidden_layers), int(st.first_steps)
    carry = st.optimizer == "carry"
    small = _build(config, tokenizer, num_layers=layers // 2)
    schedule = train_lib.make_lr_schedule(config, total)
    if carry:  # one optimizer and one schedule over both stages; the update count carries on
        opt1 = opt2 = train_lib.make_optimizer(config, total)
        sched1, sched2 = schedule, (lambda c: schedule(c + first))
    else:
        opt1, opt2 = train_lib.make_optimizer(config, first), train_lib.make_optimizer(config, total - first)
        sched1, sched2 = train_lib.make_lr_schedule(config, first), train_lib.make_lr_schedule(config, total - first)
    dir1, dir2 = os.path.join(workdir, "stage1"), os.path.join(workdir, "stage2")
    small, pts1, out1 = _fit_stage(small, loss_fn, evaluate, eval_key, train_blocks, config, dir1,
                                         num_steps=first, offset=0, optimizer=opt1, lr_schedule=sched1)
    state = stacking.stack_opt_state(_stage1_opt_state(dir1, small, opt1, first), layers // 2) if carry else None
    big = stacking.stack_layers(small)
    log.info("Progressive stacking: %d -> %d layers after step %d (optimizer %s)", layers // 2, layers, first,
             st.optimizer)
    big, pts2, out2 = _fit_stage(big, loss_fn, evaluate, eval_key, train_blocks, config, dir2,
                                       num_steps=total - first, offset=first, optimizer=opt2, lr_schedule=sched2,
                                       opt_state=state)
    fps1, fps2 = out1["flops_per_step"], out2["flops_per_step"]
    for p in pts1:
        p["flops"] = fps1 * p["step"]
    for p in pts2:
        p["flops"] = fps1 * first + fps2 * (p["step"] - first)
        p["seconds"] += out1["seconds"]
    out1.pop("after")
    after = out2.pop("after")
    stages = [{"layers": layers // 2, "steps": first, **out1},
              {"layers": layers, "steps": total - first, "optimizer": st.optimizer, **out2}]
    return big, pts1 + pts2, after, stages


# ----------------------------------------------------------------------------- recipe
def run(config, workdir):
    """Pre-trains as ``config`` says; returns the results (also in ``workdir/results.json``).

    Writes ``workdir/model`` (the masked LM, or ELECTRA's discriminator, with its tokenizer: a HF
    directory that the fine-tuning recipe takes as ``config.model_dir``); ELECTRA's generator goes
    to ``workdir/generator``.
    """
    start_time = time.perf_counter()
    train_lib.init_distributed(config)
    objective = _check(config)
    d = config.data
    block_size = int(d.block_size)
    train_texts, val_texts, val_name = read_data(d)
    tokenizer = _tokenizer(config, workdir, train_texts)
    train_blocks = pdata.encoder_blocks(tokenizer, train_texts, block_size)
    val_blocks = pdata.encoder_blocks(tokenizer, val_texts, block_size)
    print(f"data: {len(train_blocks)} training / {len(val_blocks)} held-out blocks of {block_size} tokens "
          f"({len(train_texts)} / {len(val_texts)} documents of {d.source}), vocabulary {len(tokenizer)}")
    loss_fn, evaluate = _objective_fns(config, tokenizer, val_blocks)
    eval_key = "eval/mlm_loss" if objective == "mlm" else "eval/disc_loss"

    model, curve, after, stages = _train(config, workdir, tokenizer, loss_fn, evaluate, eval_key, train_blocks)
    kept = model.discriminator if objective == "electra" else model
    tokens_per_step = int(config.train.batch_size) * block_size
    steps = int(config.train.num_steps)
    train_seconds = sum(s["seconds"] for s in stages)
    results = {
        "objective": objective,
        "init": config.model_dir or "scratch",
        "parameters": distill.num_params(kept),
        "architecture": {k: getattr(kept.config, k) for k in (
            "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size")},
        "data": {"source": str(d.source), "validation": val_name, "block_size": block_size,
                 "train_documents": len(train_texts), "train_tokens": int(train_blocks.size),
                 "validation_blocks": len(val_blocks)},
        "held_out": {"metric": eval_key[len("eval/"):], "after": after},
        "training": {"steps": steps, "batch_size": int(config.train.batch_size),
                     "tokens_per_step": tokens_per_step, "epochs": steps * tokens_per_step / train_blocks.size,
                     "train_seconds": train_seconds,
                     "flops": sum(s["flops_per_step"] * s["steps"] for s in stages),
                     "flops_note": "family FLOPs model, training = 3 x forward", "stages": stages},
        "curve": curve,
        "wall_seconds": time.perf_counter() - start_time,
        "model_dir": os.path.join(workdir, "model"),
    }
    if objective == "electra":
        results["generator_parameters"] = distill.num_params(model.generator)
    outputs = {"model": kept}
    if objective == "electra":
        outputs["generator"] = model.generator
    save_outputs(workdir, results, tokenizer, outputs)
    print(format_results(results, os.path.join(workdir, "results.json")))
    return results


def format_results(results, results_path="results.json"):
    """A few lines: what was trained, with what compute, the held-out loss, where the outputs went."""
    t, a, h = results["training"], results["architecture"], results["held_out"]
    what = "Pre-trained from scratch" if results["init"] == "scratch" else f"Continued {results['init']}"
    stages = " then ".join(f"{s['layers']} layers x {s['steps']} steps" for s in t["stages"])
    lines = [
        f"{what} ({results['objective']}): {results['parameters'] / 1e6:.2f}M-parameter {a['model_type']} encoder, "
        f"{stages} of {t['tokens_per_step']:,} tokens ({t['epochs']:.1f} epochs), "
        f"{t['flops']:.3g} training FLOPs in {t['train_seconds'] / 60:.1f} min",
        f"Held-out {h['metric']}: " + ", ".join(f"step {p['step']}: {p['loss']:.3f}" for p in results["curve"]),
        f"Model + tokenizer (HF directory; fine-tune it with configs/finetune.py --config.model_dir=...): "
        f"{results['model_dir']}",
        f"Results: {results_path}",
    ]
    return "\n".join(lines)
