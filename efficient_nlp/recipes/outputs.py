"""What every recipe leaves in its workdir: ``results.json`` and its models as HF directories."""
import json
import os

from efficient_nlp import models
from efficient_nlp import train as train_lib


def save_outputs(workdir, results, tokenizer, saved_models):
    """On the main process: each ``{subdir: model}`` (None skipped) as a HF directory with the
    tokenizer (loadable by ``models.from_pretrained``), and ``results`` (unless None) as
    ``results.json``."""
    if not train_lib.is_main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    for subdir, model in saved_models.items():
        if model is not None:
            out = os.path.join(workdir, subdir)
            models.save_hf_checkpoint(model, out)
            tokenizer.save_pretrained(out)
    if results is not None:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)


def report_to_file(workdir, filename, report) -> str:
    """Writes a long table (``str(report)``) to ``workdir/filename`` on the main process and prints
    only its first line and where the rest is; returns the path."""
    text = str(report)
    path = os.path.join(workdir, filename)
    if train_lib.is_main_process():
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"{text.splitlines()[0] if text else filename} (table: {path})")
    return path


def latency_ms(model, seq_len: int, batch_size: int = 1, repeats: int = 10) -> float:
    """Median milliseconds of one forward pass of ``model`` on random tokens, ``batch_size`` x
    ``seq_len`` (`efficient_nlp.train.measure_latency`; compilation not timed), on this machine."""
    batch = train_lib.token_batch(model.config.vocab_size, batch_size, int(seq_len))
    return 1e3 * train_lib.measure_latency(model, batch, repeats=repeats)


def deployed_quantized(qmodel):
    """``(model, how)``: the integer model of a fake-quantized ``qmodel`` (``"int8"``), or
    ``qmodel`` itself (``"fake quant"``) when a registered quantizer has no integer codes."""
    from efficient_nlp import quant
    try:
        return quant.to_integer_model(qmodel)[0], "int8"
    except ValueError:  # registered quantizers: fake quantization only (to_integer_model says so)
        return qmodel, "fake quant"
