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
