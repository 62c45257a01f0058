"""The built-in model families, one file each (importing this package registers them; a new
family is one more file here and its import below, see docs/extending.md).

Every encoder family here reuses the BERT-layout modules of `efficient_nlp.models.bert` (a
post-LayerNorm layer: attention ``query / key / value / output`` + FFN ``intermediate /
output``); what differs (embeddings, heads, names in HF checkpoints and configs) is in the
family's file.  The decoder families (GPT-2, the Llama family) share the pre-norm modules of
`efficient_nlp.models.decoder` (``decoders.py`` holds their common layout).
"""
from efficient_nlp.models.families import bert, data2vec_text, distilbert, electra, gpt2, llama, roberta  # noqa: F401
