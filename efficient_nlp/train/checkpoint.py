"""Checkpoints of the training state with orbax: periodic save, keep N, safe restore.

Layout: ``<directory>/<step>/state`` (the arrays, orbax PyTree format; each process writes
the shards it holds) and ``<directory>/<step>/manifest`` (JSON: every leaf's path, shape,
dtype and checksum). ``directory`` may be on any filesystem `etils.epath` reads
(``gs://bucket/run/checkpoints``); local paths are made absolute.

The state is saved as a nested dict of arrays keyed by the leaves' readable paths
(``params/encoder/layer/0/kernel``), which keeps the format independent of Python
classes (NNX ``State``/``Variable``, optax state tuples). ``restore`` first reads the
manifest and compares it with the target (paths, shapes, dtypes), then restores every
array into a fresh tree with the target's shardings (which may differ from the saved ones:
another mesh, another sharding) and verifies the checksums; only a complete, verified tree
is returned. Problems raise ``CorruptCheckpointError`` (a
file unreadable, truncated or garbled) or ``IncompatibleCheckpointError`` (another
model/optimizer), both naming the step directory and the reason.

All processes of a multi-host run call ``save`` / ``restore`` (orbax coordinates the
writes); ``wait_until_finished`` blocks until asynchronous saves are committed.

Checksums (`device_checksums`): per leaf, the sum modulo 2**32 of a 32-bit hash (murmur3's
finaliser) of every 32-bit word of the array XOR-ed with the hash of its position. Integer sums
are exact in any order, so the value does not depend on how the array is sharded; it is
computed on the devices (no host copy of the arrays on the training thread) and verified the
same way after a restore onto any mesh. Checkpoints of format 1 (host CRC32) still restore.

``set_aside`` moves a corrupt step directory to ``<directory>_corrupt/<step>`` (next to
``<directory>``, so it leaves the step listing and garbage collection never touches it;
nothing is deleted).
"""
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from efficient_nlp.train.distributed import host_value, is_key_array, is_main_process, sync

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # 1: CRC32 of host copies under "crc32"
_MAX_LISTED = 8  # differences listed in an error message


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored. ``step_dir`` names the step directory."""

    def __init__(self, step_dir, reason):
        self.step_dir = str(step_dir)
        self.reason = reason
        super().__init__(f"Cannot restore checkpoint {self.step_dir}: {reason}")


class CorruptCheckpointError(CheckpointError):
    """Files of the checkpoint are missing, truncated or garbled."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint holds a different tree (paths, shapes or dtypes) than the target."""


def _key_name(k):
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)  # pragma: no cover


def leaf_paths(tree):
    """``(paths, leaves, treedef)``; a path is a tuple of names, NNX ``.value`` dropped."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths, leaves = [], []
    for path, leaf in flat:
        names = tuple(_key_name(k) for k in path
                      if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))
        paths.append(names)
        leaves.append(leaf)
    if len(set(paths)) != len(paths):
        raise ValueError("Two leaves of the training state have the same path; cannot "
                         "checkpoint it.")
    return paths, leaves, treedef


def _nest(paths, leaves):
    out = {}
    for path, leaf in zip(paths, leaves):
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"Leaf path {'/'.join(path)} clashes with another leaf.")
        node[path[-1]] = leaf
    return out


def _lookup(nested, path):
    node = nested
    for name in path:
        node = node[name]
    return node


def _savable(x):
    """Typed PRNG keys are stored as their raw uint32 data."""
    return jax.random.key_data(x) if is_key_array(x) else x


def _host_value(x):
    """The full value of ``x`` on this host, or None if it is sharded across hosts."""
    if isinstance(x, jax.Array):
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return None
    return np.asarray(x)


def _crc32(value):
    """Format-1 checksum: CRC32 of the host copy's bytes."""
    value = np.ascontiguousarray(value)
    return zlib.crc32(value.reshape(-1).view(np.uint8)) & 0xFFFFFFFF


def _fmix32(h):
    """murmur3's 32-bit finaliser: a bijection of uint32 that mixes every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x):
    """The array's bytes as uint32 words (one per element; two for 8-byte types)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_ or (jnp.issubdtype(dtype, jnp.integer) and jnp.iinfo(dtype).bits < 8):
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x):
    words = _words(x)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # row-major flat index, modulo 2**32
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
        stride = (stride * words.shape[axis]) % 2**32
    return jnp.sum(_fmix32(words ^ _fmix32(position + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves):
    return jnp.stack([_checksum(x) for x in leaves]) if leaves else jnp.zeros((0,), jnp.uint32)


def device_checksums(leaves):
    """The checksum (module docstring) of every array of ``leaves`` as Python ints; computed on
    the arrays' devices, whatever their sharding (multi-host: every process calls it)."""
    return [int(c) for c in host_value(_checksums(list(leaves)))]


def _dtype_name(x):
    return str(np.dtype(x.dtype))


class Checkpointer:
    """Orbax ``CheckpointManager`` wrapper for one training run's state.

    Args:
      directory: where step directories go (created): a local path or an `etils.epath`
        path / URL (``gs://...``); ``self.directory`` is its `epath.Path`.
      max_to_keep: keep only the newest N checkpoints (None: all).
      async_save: write in a background thread (call ``wait_until_finished``/``close``).
      checksums: store a checksum of every leaf and verify it on restore.
    """

    def __init__(self, directory, *, max_to_keep=None, async_save=True, checksums=True):
        self.directory = _absolute(directory)
        self.checksums = checksums
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=bool(async_save))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries -----------------------------------------------------------------------
    def step_dir(self, step):
        """The directory of checkpoint ``step`` (a string)."""
        return str(self.directory / str(int(step)))

    def all_steps(self):
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self):
        return self._manager.latest_step()

    # -- save --------------------------------------------------------------------------
    def manifest(self, tree, step):
        """The JSON manifest of ``tree``: format, step and per leaf shape, dtype, checksum."""
        paths, leaves, _ = leaf_paths(tree)
        leaves = [_savable(x) for x in leaves]
        sums = device_checksums(leaves) if self.checksums else [None] * len(leaves)
        entries = {}
        for path, leaf, checksum in zip(paths, leaves, sums):
            entry = {"shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf)}
            if checksum is not None:
                entry["checksum"] = checksum
            entries["/".join(path)] = entry
        return {"format": FORMAT_VERSION, "step": int(step), "leaves": entries}

    def save(self, step, tree):
        """Saves ``tree`` as ``step`` (skipped if that step exists); all processes call it."""
        step = int(step)
        if step in self.all_steps():
            return False
        paths, leaves, _ = leaf_paths(tree)
        leaves = [_savable(x) for x in leaves]
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_nest(paths, leaves)),
            manifest=ocp.args.JsonSave(self.manifest(tree, step)))
        return self._manager.save(step, args=args, force=True)

    # -- restore -----------------------------------------------------------------------
    def restore(self, step, target):
        """Restores ``step`` into a new tree shaped, typed and sharded like ``target``.

        Raises ``CorruptCheckpointError`` / ``IncompatibleCheckpointError`` (never
        returns a partly restored tree).
        """
        step = int(step)
        self.wait_until_finished()
        step_dir = self.step_dir(step)
        if not epath.Path(step_dir).is_dir():
            raise CorruptCheckpointError(step_dir, "the step directory does not exist")
        manifest = self._read_manifest(step, step_dir)
        paths, target_leaves, treedef = leaf_paths(target)
        leaves = [_savable(x) for x in target_leaves]
        self._check_compatible(manifest, paths, leaves, step_dir)

        abstract = [self._abstract(leaf) for leaf in leaves]
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_nest(paths, abstract))))
            restored = restored["state"]
            new_leaves = [_lookup(restored, p) for p in paths]
        except Exception as e:  # orbax / tensorstore raise many types
            raise CorruptCheckpointError(
                step_dir, f"reading the arrays failed ({type(e).__name__}: "
                f"{_short(e)})") from e

        bad = []
        for path, leaf, want in zip(paths, new_leaves, abstract):
            if tuple(np.shape(leaf)) != tuple(want.shape) or \
                    _dtype_name(leaf) != _dtype_name(want):
                bad.append(f"{'/'.join(path)}: restored {np.shape(leaf)} {_dtype_name(leaf)}")
        if not bad:
            bad = _checksum_mismatches(manifest, paths, new_leaves)
        if bad:
            raise CorruptCheckpointError(
                step_dir, "restored arrays do not match the manifest: " + _listing(bad))
        new_leaves = [
            jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(t)) if is_key_array(t)
            else leaf for leaf, t in zip(new_leaves, target_leaves)]
        return jax.tree_util.tree_unflatten(treedef, new_leaves)

    def restore_latest(self, target):
        """``(step, tree)`` for the newest checkpoint, or ``(None, None)`` if none."""
        step = self.latest_step()
        if step is None:
            return None, None
        return step, self.restore(step, target)

    def _read_manifest(self, step, step_dir):
        try:
            out = self._manager.restore(
                step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore()))
            manifest = out["manifest"]
        except Exception as e:
            raise CorruptCheckpointError(
                step_dir, f"the manifest is missing or unreadable ({type(e).__name__}: "
                f"{_short(e)})") from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("leaves"), dict):
            raise CorruptCheckpointError(step_dir, "the manifest is malformed")
        if manifest.get("format") not in _READABLE_FORMATS:
            raise IncompatibleCheckpointError(
                step_dir, f"format {manifest.get('format')!r}, expected one of {list(_READABLE_FORMATS)}")
        return manifest

    @staticmethod
    def _check_compatible(manifest, paths, leaves, step_dir):
        saved = manifest["leaves"]
        names = ["/".join(p) for p in paths]
        missing = [n for n in names if n not in saved]
        unexpected = sorted(set(saved) - set(names))
        problems = []
        if missing:
            problems.append(f"missing in the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"not in the model/optimizer: {_listing(unexpected)}")
        mismatched = []
        for name, leaf in zip(names, leaves):
            entry = saved.get(name)
            if entry is None:
                continue
            try:
                shape, dtype = tuple(entry["shape"]), entry["dtype"]
            except (KeyError, TypeError):
                raise CorruptCheckpointError(step_dir, f"manifest entry {name} is malformed")
            if shape != tuple(np.shape(leaf)) or dtype != _dtype_name(leaf):
                mismatched.append(f"{name}: checkpoint {list(shape)} {dtype} vs target "
                                  f"{list(np.shape(leaf))} {_dtype_name(leaf)}")
        if mismatched:
            problems.append(f"shape/dtype mismatch: {_listing(mismatched)}")
        if problems:
            raise IncompatibleCheckpointError(
                step_dir, "it was written for a different model or optimizer; "
                + "; ".join(problems))

    @staticmethod
    def _abstract(leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        leaf = np.asarray(leaf)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    # -- corrupt checkpoints -------------------------------------------------------------
    @property
    def corrupt_directory(self):
        """Where ``set_aside`` moves corrupt step directories: ``<directory>_corrupt``."""
        return str(self.directory.parent / (self.directory.name + "_corrupt"))

    def set_aside(self, step):
        """Moves step directory ``step`` to ``corrupt_directory`` (as ``<step>``, or
        ``<step>.<n>`` if that name is taken); returns the new path. All processes call it
        (process 0 moves). Later saves, including one of the same step, work as usual."""
        self.wait_until_finished()
        aside = epath.Path(self.corrupt_directory)
        name, n = str(int(step)), 0
        while (aside / name).exists():
            n += 1
            name = f"{int(step)}.{n}"
        target = aside / name
        sync(f"checkpoint_set_aside_{int(step)}_named")  # every process named it first
        if is_main_process():
            aside.mkdir(parents=True, exist_ok=True)
            epath.Path(self.step_dir(step)).rename(target)
        sync(f"checkpoint_set_aside_{int(step)}")
        self._manager.reload()
        return str(target)

    # -- lifecycle -----------------------------------------------------------------------
    def wait_until_finished(self):
        self._manager.wait_until_finished()

    def close(self):
        """Waits for pending saves and releases the manager."""
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _absolute(directory):
    """``directory`` as an `epath.Path`; a relative local path made absolute."""
    path = epath.Path(directory)
    return path if path.is_absolute() else path.absolute()


def _checksum_mismatches(manifest, paths, leaves):
    """``["<path>: checksum mismatch", ...]`` of restored ``leaves`` against the manifest
    (format 2: `device_checksums`; format 1: CRC32 of host copies)."""
    entries = [manifest["leaves"]["/".join(p)] for p in paths]
    if manifest["format"] == 1:
        values = [None if e.get("crc32") is None else _host_value(x) for e, x in zip(entries, leaves)]
        found = [None if v is None else _crc32(v) for v in values]
        wanted = [e.get("crc32") for e in entries]
    else:
        checked = [i for i, e in enumerate(entries) if e.get("checksum") is not None]
        sums = dict(zip(checked, device_checksums([leaves[i] for i in checked])))
        found = [sums.get(i) for i in range(len(entries))]
        wanted = [e.get("checksum") for e in entries]
    return [f"{'/'.join(p)}: checksum mismatch" for p, got, want in zip(paths, found, wanted)
            if got is not None and want is not None and got != want]


def _short(e, limit=300):
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _listing(items):
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (and {more} more)" if more > 0 else "")
