"""Dynamic inference: early exit and token skipping (docs/dynamic.md).

    from efficient_nlp.dynamic import exits, exit_rules, tokens
    model = exits.add_exits(model)                      # an off-ramp after every layer
    runner = EarlyExitRunner(model, exit_rules.Entropy(0.2))
    decision = runner(batch)                            # stops where the rule says

    model = tokens.add_token_skip(model, "ltp", max_len=128)
    logits, kept = TokenSkipRunner(model)(batch)        # tokens removed between layers

`sweep` measures a method: accuracy against work and against wall time beside the full model.
"""
from efficient_nlp.dynamic import buckets, exit_rules, exits, segments, sweep, tokens
from efficient_nlp.dynamic.exit_runner import EarlyExitRunner
from efficient_nlp.dynamic.token_runner import TokenSkipRunner

__all__ = ["EarlyExitRunner", "TokenSkipRunner", "buckets", "exit_rules", "exits", "segments", "sweep", "tokens"]
