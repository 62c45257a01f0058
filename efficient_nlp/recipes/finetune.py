"""Fine-tuning recipe: a pretrained BERT-family encoder plus a task head.

Cross-entropy for classification (and sentence pairs), mean squared error for
regression (``num_labels == 1``, e.g. STS-B). Every other recipe starts from a model
fine-tuned this way (the full-precision teacher of docs/quantization.md, docs/binarybert.md, docs/distillation.md).
"""
import os

import jax.numpy as jnp
import optax

from efficient_nlp import data as data_lib
from efficient_nlp import distill
from efficient_nlp import models
from efficient_nlp import train as train_lib
from efficient_nlp.recipes.outputs import latency_ms, save_outputs
from efficient_nlp.recipes.common import is_lm


def task_loss(model, batch, rngs):
    """Cross-entropy (classification), MSE (regression) or, for a decoder, the next-token
    cross-entropy of the model's logits."""
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                deterministic=False, rngs=rngs)
    if out.logits.ndim == 3:
        loss, acc = distill.next_token_loss(out.logits, batch["input_ids"], batch["attention_mask"])
        return loss, {"token_accuracy": acc}
    return logits_loss(out.logits, batch["labels"])


def logits_loss(logits, labels):
    """Returns ``(loss, aux)`` for logits [B, C] (C == 1: regression on ``labels``)."""
    if logits.shape[-1] == 1:
        return jnp.mean((logits[:, 0] - labels) ** 2), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"accuracy": accuracy}


def load_model_and_data(config):
    """Loads the task data with the model directory's tokenizer and the model with its head."""
    from efficient_nlp.recipes.common import default_dir, load_data

    model_dir = config.model_dir or default_dir(config)
    d = config.data
    task_data = load_data(config, model_dir)
    if task_data.dev is None:
        raise ValueError(
            f"Task {d.task!r} has no dev split: give config.data.dev_file (or a data_dir "
            "holding the task's dev file) so the recipe can report dev metrics.")
    model = models.from_pretrained(
        model_dir, num_labels=task_data.spec.num_labels, seed=config.train.seed,
        **config.model.to_dict())
    return model, task_data


def run(config, workdir):
    """Fine-tunes ``config.model_dir`` on ``config.data``; returns dev metrics before/after.

    Writes ``workdir/results.json`` and the fine-tuned model with its tokenizer as a HF
    directory ``workdir/model`` (loadable by ``models.from_pretrained``).
    """
    train_lib.init_distributed(config)
    model, task_data = load_model_and_data(config)
    spec = task_data.spec
    eval_fn = train_lib.make_eval_fn(
        task_data.dev, config.train.eval_batch_size,
        lambda predictions, labels, weights: data_lib.compute_metrics(
            spec, predictions, labels, weights))
    before = eval_fn(model)

    def batches(start_step):
        return data_lib.train_batches(task_data.train, config.train.batch_size,
                                      seed=config.train.seed, start_step=start_step)

    model, history = train_lib.fit(model, task_loss, batches, config=config,
                                   workdir=workdir, eval_fn=eval_fn)
    after = {k[len("eval/"):]: v for k, v in history[-1].items() if k.startswith("eval/")}
    results = {"task": spec.name, "train_examples": len(task_data.train["labels"]),
               "dev_examples": len(task_data.dev["labels"]),
               "dev_before": before, "dev_after": after,
               "latency_ms": latency_ms(model, config.data.max_length),
               "latency_note": f"median ms of one forward, batch 1 x {config.data.max_length} tokens, this machine"}
    print(format_results(results))
    # The fine-tuned model as an HF directory: the teacher of the compression recipes.
    save_outputs(workdir, results, task_data.tokenizer, {"model": model})
    if train_lib.is_main_process() and not is_lm(config):  # after the model: it names the classes
        data_lib.save_data_settings(os.path.join(workdir, "model"), config.data.to_dict(), spec)
    return results


def format_results(results):
    """A small table of dev metrics before and after fine-tuning."""
    lines = [f"Task {results['task']}: {results['train_examples']} train / "
             f"{results['dev_examples']} dev examples",
             f"{'metric':<12}{'before':>10}{'after':>10}"]
    for key, value in results["dev_after"].items():
        lines.append(f"{key:<12}{results['dev_before'][key]:>10.4f}{value:>10.4f}")
    if "latency_ms" in results:
        lines.append(f"latency {results['latency_ms']:.1f} ms ({results['latency_note']})")
    return "\n".join(lines)
