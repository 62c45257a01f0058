"""Name -> constructor lookup shared by the pruning registries (criteria, patterns, schedules),
and `register_score`, which adds a user's score function as a pruning criterion."""
import inspect


def resolve(registry, value, kind, instance_type, **kwargs):
    """``value`` itself if it is an ``instance_type``, else ``registry[value](**kwargs)``;
    an unknown name, or arguments the constructor does not take, raise ``ValueError`` naming
    ``kind`` and the valid names / arguments."""
    if isinstance(value, instance_type):
        return value
    if value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(registry)}")
    try:
        inspect.signature(registry[value]).bind(**kwargs)
    except TypeError as e:
        params = list(inspect.signature(registry[value]).parameters)
        raise ValueError(f"{kind} {value!r}: bad arguments {sorted(kwargs)} ({e}); it takes {params}") from None
    return registry[value](**kwargs)


def register_score(name, fn):
    """Adds the pruning criterion ``name`` (``config.prune.criterion = name``) from a pure score.

    ``fn(params, grads) -> scores`` maps a pytree of the selected weights and their gradients
    (``{path: array}``) to scores of the same shapes; higher = more important, the lowest are
    pruned.  Like movement and saliency (docs/pruning.md), the criterion keeps the running sum
    ``S = sum_t fn(w_t, g_t)`` over the updates in the optimizer state and prunes by ``S`` (at a
    one-shot step 0, before any update, ``S`` is 0 everywhere).  Registration lasts for the
    process (a notebook cell works).  A taken name or a ``fn`` that cannot take two positional
    arguments raises ``ValueError``.
    """
    import jax

    from efficient_nlp.prune.scores import CRITERIA, Criterion, _zeros

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"pruning criterion name must be an identifier string, got {name!r}")
    if name in CRITERIA:
        raise ValueError(f"pruning criterion {name!r} already exists; pick another name "
                         f"(taken: {sorted(CRITERIA)})")
    try:
        inspect.signature(fn).bind("params", "grads")
    except (TypeError, ValueError) as e:
        raise ValueError(f"register_score({name!r}): fn must be callable as fn(params, grads) -> scores "
                         f"({e})") from None

    def accumulate(stats, params, grads):
        return jax.tree.map(lambda s, x: s + x.astype(s.dtype), stats, fn(params, grads))

    CRITERIA[name] = lambda: Criterion(name, _zeros, accumulate, lambda params, stats: stats)
