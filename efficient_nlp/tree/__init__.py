"""Rule selection of pytree leaves by regular expressions over their dotted paths.

The one selection mechanism of every transform (pruning, quantization, ...)::

    from efficient_nlp import tree
    tree.names(params)                       # ['bert.embeddings.layer_norm.bias', ...]
    tree.select(params, r"attention\\.(query|key)\\.kernel$")        # bool mask pytree
    tree.select(params, [(r"ffn\\..*kernel$", 0.9), (r"kernel$", 0.5)], default=0.0)  # labels
"""
from efficient_nlp.tree.rules import (
    Rule,
    RuleError,
    compile_rules,
    match,
    named_leaves,
    names,
    path_str,
    select,
)

__all__ = ["Rule", "RuleError", "compile_rules", "match", "named_leaves", "names", "path_str",
           "select"]
