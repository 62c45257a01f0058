"""Name -> constructor lookup shared by the pruning registries (criteria, patterns, schedules)."""


def resolve(registry, value, kind, instance_type, **kwargs):
    """``value`` itself if it is an ``instance_type``, else ``registry[value](**kwargs)``;
    an unknown name raises ``ValueError`` naming ``kind`` and the valid names."""
    if isinstance(value, instance_type):
        return value
    if value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(registry)}")
    return registry[value](**kwargs)
