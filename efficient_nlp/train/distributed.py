"""Devices, mesh and multi-host plumbing for training.

The mesh has two axes, ``data`` and ``model`` (`make_mesh`; by default ``model`` has size 1,
so ``data`` spans every global device of all hosts). Batches are sharded along their leading
(batch) axis over ``data`` and replicated over ``model``; the training state is placed by
the rules of `efficient_nlp.train.sharding` (replicated by default: data parallelism).
Each host feeds only its own rows (``batch_size // process_count``); ``shard_batch``
assembles the global array with ``jax.make_array_from_process_local_data``.

Multi-host (several processes, e.g. a TPU pod or GPUs on several machines):
``init_distributed(config)`` calls ``jax.distributed.initialize`` once, before any other
JAX call, with ``config.distributed.{coordinator_address, num_processes, process_id,
local_device_ids}`` or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (``config.distributed.auto=True`` lets JAX
detect TPU / Slurm / MPI clusters by itself).
"""
import logging
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

log = logging.getLogger(__name__)
_INITIALIZED = False


def default_distributed_config():
    """``config.distributed`` defaults: single process unless configured or in the env."""
    c = ml_collections.ConfigDict()
    c.auto = False  # True: jax.distributed.initialize() with cluster auto-detection.
    c.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port"
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)
    c.local_device_ids = ml_collections.config_dict.placeholder(str)  # "0,1" or None
    c.cpu_collectives = "gloo"  # CPU cross-process collectives ("gloo" or "mpi").
    c.initialization_timeout = 300
    return c


def _get(section, key, default=None):
    if section is None:
        return default
    try:
        value = section.get(key, default) if hasattr(section, "get") else getattr(
            section, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def init_distributed(config=None):
    """Initialises multi-host JAX once; a no-op for a single process.

    Reads ``config.distributed`` (see ``default_distributed_config``), falling back to the
    environment variables ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``. Must run before any JAX computation. Returns True when this call
    (or an earlier one) set up a multi-process run.
    """
    global _INITIALIZED
    if _INITIALIZED or _jax_distributed_initialized():
        _INITIALIZED = True
        return True
    section = _get(config, "distributed") if config is not None else None
    env = os.environ
    address = _get(section, "coordinator_address") or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _get(section, "num_processes") or env.get("JAX_NUM_PROCESSES")
    process_id = _get(section, "process_id")
    if process_id is None:
        process_id = env.get("JAX_PROCESS_ID")
    auto = bool(_get(section, "auto", False))
    if not auto and (address is None or num_processes is None):
        return False  # single process
    if not auto and int(num_processes) <= 1:
        return False
    collectives = _get(section, "cpu_collectives", "gloo")
    if collectives:
        try:  # Only matters for CPU devices; the flag is absent in some jax versions.
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        except (AttributeError, KeyError, ValueError) as e:  # pragma: no cover
            log.warning("could not set jax_cpu_collectives_implementation=%s: %s",
                        collectives, e)
    kwargs = {}
    if not auto:
        if process_id is None:
            raise ValueError(
                "Multi-host run with coordinator_address/num_processes set needs "
                "config.distributed.process_id (or JAX_PROCESS_ID).")
        kwargs = dict(coordinator_address=str(address), num_processes=int(num_processes),
                      process_id=int(process_id))
    ids = _get(section, "local_device_ids")
    if ids not in (None, ""):
        kwargs["local_device_ids"] = [int(i) for i in str(ids).split(",")]
    timeout = _get(section, "initialization_timeout")
    if timeout:
        kwargs["initialization_timeout"] = int(timeout)
    try:
        jax.distributed.initialize(**kwargs)
    except TypeError:  # pragma: no cover - a jax without initialization_timeout
        kwargs.pop("initialization_timeout", None)
        jax.distributed.initialize(**kwargs)
    _INITIALIZED = True
    log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
    return True


def _jax_distributed_initialized():
    fn = getattr(jax.distributed, "is_initialized", None)
    if fn is None:  # pragma: no cover - older jax
        return False
    try:
        return bool(fn())
    except Exception:  # pragma: no cover
        return False


def is_main_process():
    """True on process 0 (the one that writes metrics, results and logs)."""
    return jax.process_index() == 0


def make_mesh(devices=None, shape=None):
    """The 2-D mesh (``data``, ``model``) over ``devices`` (default: all global devices).

    ``shape``: ``{"data": n, "model": m}`` with -1 for "the remaining devices" (default
    ``{"data": -1, "model": 1}``); see `efficient_nlp.train.sharding.make_mesh`.
    """
    from efficient_nlp.train import sharding  # sharding builds on this module
    return sharding.make_mesh(shape, devices)


def replicated(mesh):
    """Sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh):
    """Sharding that splits the leading (batch) axis over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree, mesh):
    """Copies a host-identical pytree onto every device of ``mesh`` (multi-host safe).

    Every process must pass the same values (numpy, local jax arrays, or global arrays
    that are replicated). Always allocates new buffers (never aliases of the inputs, so
    the result can be donated safely); `place` skips what is already in place.
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def put(tree, shardings):
    """`replicate` with one sharding per leaf: ``shardings`` is a pytree of shardings with
    the structure of ``tree`` (e.g. from `efficient_nlp.train.sharding.shardings`). New
    buffers, safe to donate; multi-host safe for host-identical values."""
    return jax.tree.map(_put, tree, shardings)


def place(tree, mesh):
    """`replicate` except that arrays already replicated over ``mesh`` are returned as they
    are (no copy, no transfer): for read-only uses such as evaluation, never for donation."""
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and _is_placed(x, sharding):
            return x
        return _put(x, sharding)

    return jax.tree.map(put, tree)


def _is_placed(x, sharding):
    try:
        return x.sharding.is_equivalent_to(sharding, x.ndim)
    except (AttributeError, ValueError):  # pragma: no cover - exotic shardings
        return False


def _put(x, sharding):
    """A new copy of ``x`` placed with ``sharding`` (device to device in a single process)."""
    local = not isinstance(x, jax.Array) or x.is_fully_addressable
    if sharding.is_fully_addressable and local:
        if isinstance(x, jax.Array) and len(sharding.device_set) > 1:
            x = x.copy()  # to several devices, device_put keeps x's own buffer on its device
        return jax.device_put(x if isinstance(x, jax.Array) else np.asarray(x), sharding, may_alias=False)
    if is_key_array(x):  # typed PRNG keys: replicate their raw data
        data = _put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = host_value(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def is_key_array(x):
    """True for typed PRNG key arrays (``jax.random.key``)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def host_value(x):
    """The full value of ``x`` as numpy on this host.

    Local and replicated global arrays are read directly; an array sharded across hosts
    is all-gathered (a collective: every process must call this for it).
    """
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def shard_batch(host_batch, mesh):
    """Builds global arrays from this host's numpy batch (a pytree of arrays).

    Leading axis: this host's rows, concatenated over hosts in process order, sharded over
    ``data`` and replicated over the other mesh axes. Scalars (ndim 0) are replicated and
    must agree across hosts. The local batch size must be divisible by the number of
    ``data`` positions of this host's devices.
    """
    data_sharding = batch_sharding(mesh)
    rep = replicated(mesh)
    n_local = _local_data_shards(mesh)

    def put(x):
        if isinstance(x, jax.Array) and _is_placed(x, data_sharding if x.ndim else rep):
            return x  # already a global batch array
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(rep, x)
        if x.shape[0] % max(n_local, 1):
            raise ValueError(
                f"Host-local batch of {x.shape[0]} rows cannot be split evenly over this "
                f"host's {n_local} data-parallel device groups; make batch_size // "
                f"process_count a multiple of {n_local}.")
        return jax.make_array_from_process_local_data(data_sharding, x)

    return jax.tree.map(put, host_batch)


def _local_data_shards(mesh):
    """How many distinct ``data`` positions this host's devices occupy in ``mesh``."""
    axis = mesh.axis_names.index(DATA_AXIS)
    me = jax.process_index()
    positions = {index[axis] for index, d in np.ndenumerate(mesh.devices) if d.process_index == me}
    return len(positions)


def to_host(tree):
    """Fetches a pytree of jax arrays to numpy on this host (see ``host_value``).

    Works on every process of a multi-host run for replicated arrays (metrics, params).
    """
    return jax.tree.map(host_value, tree)


def scalars_to_host(tree):
    """``to_host`` and convert every leaf to a Python float (for logging)."""
    return jax.tree.map(lambda x: float(np.asarray(x).reshape(-1)[0]) if np.size(x) == 1
                        else np.asarray(x), to_host(tree))


def sync(name):
    """Barrier across processes (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
