"""Accuracy of the int8 models against float32 on real text: sentence embeddings of MiniLM.

    python benchmarks/int8_accuracy.py [--calib 64] [--eval 256] [--seq 128] [--rows dynamic,static,...]

The embedded model is all-MiniLM-L6-v2, a sentence embedding model: a sentence's embedding is
the attention-mask-weighted mean of the last hidden states.  The text is the built-in offline
corpus (`efficient_nlp.data.corpus`: Python standard-library docstrings, real English), one
paragraph per row, tokenised by the model's tokenizer: ``--calib`` rows of the train split
calibrate the static activation ranges, ``--eval`` rows of the validation split are scored.
Per row of the table, against the float32 model:

* ``cos mean / min``: cosine similarity of the sentence embeddings (mean, worst row);
* ``emb rel``: mean ``||e_q - e_f|| / ||e_f||`` of the sentence embeddings;
* ``hidden rel``: ``||H_q - H_f|| / ||H_f||`` of the last hidden states over the real tokens.
"""
import argparse
import time

import jax
import numpy as np
from flax import nnx

from efficient_nlp import models, quant
from efficient_nlp.data import corpus, pipeline
from efficient_nlp.quant import static_int8 as S

ROWS = {  # name -> to_static_int8 keywords (None: the dynamic per-token W8A8 integer model)
    "dynamic (to_integer_model)": None,
    "static symmetric (previous default)": dict(asymmetric=False),
    "static symmetric + smoothquant 0.5": dict(asymmetric=False, smooth="smoothquant", alpha=0.5),
    "static symmetric + smoothquant 0.8": dict(asymmetric=False, smooth="smoothquant", alpha=0.8),
    "static asymmetric (default)": dict(),
    "static asymmetric percentile 99.99": dict(clip="percentile"),
    "static asymmetric mse": dict(clip="mse"),
    "static asymmetric + smoothquant 0.5": dict(smooth="smoothquant", alpha=0.5),
    "static asymmetric + smoothquant 0.8": dict(smooth="smoothquant", alpha=0.8),
    "static asymmetric + ffn_out float": dict(float_inputs=("ffn_out",)),
    "static asymmetric + ffn_in/out float": dict(float_inputs=("ffn_in", "ffn_out")),
}


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=64, help="calibration rows (train split)")
    p.add_argument("--eval", type=int, default=256, help="evaluation rows (validation split)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (padded / truncated)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of the table, of: {list(ROWS)}")
    return p.parse_args()


def paragraphs(split: str, n: int, min_words: int = 8) -> list[str]:
    """The first ``n`` prose paragraphs (at least ``min_words`` words) of the corpus split."""
    out = []
    for doc in corpus.builtin_corpus(split):
        out += [p for p in doc.split("\n") if len(p.split()) >= min_words and not p.startswith((" ", ">>>"))]
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"the {split} split has only {len(out)} paragraphs of {min_words}+ words; ask for fewer rows")


def hidden_fn(model):
    """Jitted ``(ids, mask, types) -> last hidden state`` of ``model``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask, types):
        return nnx.merge(graphdef, state)(ids, mask, types).last_hidden_state

    return lambda *a: run(state, *a)


def hidden(model, batch, chunk=32) -> np.ndarray:
    fn = hidden_fn(model)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return np.concatenate([np.asarray(fn(*(batch[k][i:i + chunk] for k in keys)))
                           for i in range(0, len(batch["input_ids"]), chunk)])


def scores(h, ref, mask) -> dict:
    """Sentence-embedding cosine / relative error and hidden-state relative error vs ``ref``."""
    m = mask[..., None].astype(np.float64)
    e, f = (np.sum(x * m, 1) / m.sum(1) for x in (h.astype(np.float64), ref.astype(np.float64)))
    cos = np.sum(e * f, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(f, axis=1))
    rel = np.linalg.norm(e - f, axis=1) / np.linalg.norm(f, axis=1)
    hid = np.linalg.norm((h - ref) * m) / np.linalg.norm(ref * m)
    return {"cos mean": cos.mean(), "cos min": cos.min(), "emb rel": rel.mean(), "hidden rel": hid}


def main():
    args = _args()
    model = models.from_pretrained(models.default_model_dir(), num_labels=2)
    tok = pipeline.load_tokenizer(models.default_model_dir())
    calib = pipeline.tokenize(tok, paragraphs("train", args.calib), max_length=args.seq)
    batch = pipeline.tokenize(tok, paragraphs("validation", args.eval), max_length=args.seq)
    print(f"calibration {args.calib} rows, evaluation {args.eval} rows x {args.seq} tokens "
          f"({batch['attention_mask'].sum(1).mean():.1f} real tokens per row)")
    ref = hidden(model, batch)
    print(f"{'model':37s} {'cos mean':>9s} {'cos min':>9s} {'emb rel':>9s} {'hidden rel':>10s} {'build s':>8s}")
    for name in args.rows.split(","):
        t0 = time.perf_counter()
        if ROWS[name] is None:
            qmodel, _ = quant.quantize_model(model, quant.make_spec(8, 8, 8))
            imodel, _ = quant.to_integer_model(qmodel)
        else:
            imodel = S.to_static_int8(model, calib, **ROWS[name]).model
        build = time.perf_counter() - t0
        r = scores(hidden(imodel, batch), ref, batch["attention_mask"])
        print(f"{name:37s} {r['cos mean']:9.5f} {r['cos min']:9.5f} {r['emb rel']:9.4f} {r['hidden rel']:10.4f} "
              f"{build:8.1f}", flush=True)


if __name__ == "__main__":
    main()
