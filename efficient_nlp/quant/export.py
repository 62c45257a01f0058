"""Real low-bit artefacts of a fake-quantized model: integer codes bit-packed into bytes + scales.

    artifact = quant.export_packed(qmodel)          # {"manifest": {...}, "tensors": {name: ndarray}}
    quant.save_packed(artifact, out_dir)            # out_dir/model.safetensors + out_dir/manifest.json
    quant.packed_size_mb(out_dir)                   # bytes on disk / 2^20: the reported size
    artifact = quant.load_packed(out_dir)           # bit-exact; checksums verified
    restored = quant.restore(artifact, template)    # template: quantize_model(<float model>, same spec)

What is stored (every value float32 unless said otherwise):

* every quantized weight (a `QuantLinear` kernel, a `QuantEmbed` table, and each binary half
  ``kernel1`` / ``kernel2`` (``embedding1`` / ``embedding2``) of a ternary-split `SplitLinear` /
  `SplitEmbed`, docs/binarybert.md: two 1-bit code tensors and two scales) at parameter path ``P`` as
  ``P.codes`` (``uint8``: the int8 codes of `efficient_nlp.quant.quantizers` packed by
  `efficient_nlp.quant.packing` at 1 bit (BWN), 2 bits (TWN and 2-bit), 4 bits (3- and 4-bit) or
  8 bits (5..8-bit), C order), ``P.scale`` (0-d per tensor, keepdims ``[1, out]`` / ``[V, 1]`` per
  channel / row, ``[d_in // g, 1, out]`` per group of ``g`` input rows), ``P.zero_point`` for
  asymmetric (unsigned) grids, and ``P.offset`` for learned
  asymmetric ones (LSQ+ offset, PACT ``lo``) so that dequantization repeats the QAT forward's
  arithmetic exactly;
* every other variable under its own path: LayerNorm, biases, position / token-type embeddings,
  the classifier, learned quantizer state (``...input_quant.step``, ``...weight_quant.lo``);
  floating values as float32, integer ones as they are;
* a JSON-able manifest: format and version, the model class and config
  (``model.config.to_dict()`` when there is one), one entry per quantized weight (site, method,
  bits, packed bits, signed, granularity, reduced axis, ``group_size`` for group-wise scales,
  shape, dtype, tensor names) and every quantizer module of the model (path, method, bits,
  signed, granularity, axis, group_size for groups).

The latent full-precision weights are not stored (that is the point).  `restore` writes the
dequantized values back as latent weights and *freezes* the weight quantizers
(``QuantizerModule.frozen``: the value is already on the grid and passes through), so the
restored model computes exactly what the exported one did.  Unfrozen, the quantizers re-quantize
their own output: uniform, LSQ, PACT, TWN and BWN all give the same codes again (TWN's threshold
moves to ``0.7 * alpha * kept/n < alpha`` but keeps exactly the non-zeros), with scales equal up to
float rounding of the recomputed means (a few ulps), so QAT can continue from a restored model.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp import train, tree
from efficient_nlp.quant import modules as M
from efficient_nlp.quant import quantizers as Q
from efficient_nlp.quant.packing import pack, unpack
from efficient_nlp.quant.spec import METHODS
from efficient_nlp.quant.transform import _dotted, quantizer_modules

FORMAT = "efficient_nlp.quant.packed"
VERSION = 1
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class PackedArtifactError(ValueError):
    """A packed artefact directory is missing, incomplete, corrupted or does not fit the model."""


# ----------------------------------------------------------------------------- codes of one weight
def pack_bits(bits: int) -> int:
    """The packed width of ``bits``-bit codes: 1, 2, 4 (3- and 4-bit) or 8 (5..8-bit)."""
    return 1 if bits == 1 else 2 if bits == 2 else 4 if bits <= 4 else 8


def weight_codes(wq: M.QuantizerModule, w) -> dict[str, Any]:
    """The integer codes behind ``wq(w)`` (a weight quantizer applied to its latent weight).

    Returns ``{"codes": int8, "scale": float32, "zero_point": float32 or None, "offset": float32
    or None}`` with ``wq(w) == dequantize_weight(wq.quantizer, **result)`` element for element
    (the same float operations as the quantizer's forward pass).  Signed grids have
    ``zero_point = None`` (``w_hat = scale * codes``); unsigned grids store their levels offset by
    ``-2^(b-1)`` (the quantizers' int8 convention) with the float ``zero_point`` of
    ``w_hat = scale * (codes - zero_point)`` and, for learned ones, the ``offset`` (LSQ+ offset,
    PACT ``lo``) that the exact dequantization adds.  Group-wise quantizers give scales (and
    zero points, offsets) ``[d_in // g, 1, out]``; the codes keep the kernel's shape.
    """
    q = wq.quantizer
    m, b, signed, axis = q.method, q.bits, q.signed, wq.axis
    g = q.group_size if q.granularity == "group" else 0
    w = jnp.asarray(w, jnp.float32)
    zp = offset = None
    if m == "twn":
        codes, scale = Q.ternary_codes(w, axis)
    elif m == "bwn":
        codes, scale = Q.binary_codes(w, axis)
    elif m == "uniform":
        scale, zp = Q.uniform_params(w, b, signed, axis, "absmax" if signed else "minmax", group_size=g)
        codes = Q.quantize_codes(w, scale, zp, b, signed)  # group scales apply through the view
        zp = None if signed else zp
    elif m in ("lsq", "pact"):
        if m == "lsq":  # the step and clip values as the forward uses them: positive, ordered
            scale = Q.positive_step(jnp.asarray(wq.step[...], w.dtype))
            y = Q.group_view(w, g) if g else w
            offset = None if signed else jnp.asarray(wq.offset[...], w.dtype)
        else:
            lo, hi = Q.clip_bounds(jnp.asarray(wq.lo[...], w.dtype), jnp.asarray(wq.hi[...], w.dtype))
            y = jnp.minimum(jnp.maximum(w, lo), hi)
            scale = Q.clip_scale(lo, hi, b, signed)
            offset = None if signed else lo
        qn, qp = Q.qrange(b, signed)
        if signed:
            codes = jnp.clip(jnp.round(y / scale), qn, qp).astype(jnp.int8)
        else:
            u = jnp.clip(jnp.round((y - offset) / scale), 0, qp)
            codes = (u - 2 ** (b - 1)).astype(jnp.int8)
            zp = -offset / scale - 2 ** (b - 1)
        codes = Q.ungroup(codes) if g else codes
    else:  # a quantizer added with register_quantizer
        raise ValueError(
            f"{q.name}: the registered quantizer {m!r} has no integer codes (fake quantization only); "
            f"the packed export and the integer model know the built-in methods {METHODS}: quantize "
            "these weights with one of them, or keep the fake-quantized model")
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)  # noqa: E731
    return {"codes": codes, "scale": f32(scale), "zero_point": f32(zp), "offset": f32(offset)}


def dequantize_weight(quantizer, codes, scale, zero_point=None, offset=None):
    """The float32 weight of ``codes`` (inverse of `weight_codes`, the same arithmetic as the
    quantizer's forward): ``scale * codes`` (signed), ``scale * (codes - zero_point)`` (uniform
    unsigned), ``scale * (codes + 2^(b-1)) + offset`` (LSQ+ / PACT unsigned).  Group scales
    ``[d_in // g, 1, out]`` apply to codes ``[d_in, out]`` through `quantizers.group_view`."""
    codes = jnp.asarray(codes).astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    g = Q.group_size_of(codes, scale)
    if g:
        return Q.ungroup(dequantize_weight(quantizer, Q.group_view(codes, g), scale, zero_point, offset))
    if quantizer.signed or quantizer.method in ("twn", "bwn"):
        return scale * codes
    if offset is None:
        return Q.dequantize(codes, scale, zero_point)
    return scale * (codes + 2 ** (quantizer.bits - 1)) + jnp.asarray(offset, jnp.float32)


# ----------------------------------------------------------------------------- model walking
def quantized_weights(model) -> list[tuple[str, Any, str]]:
    """``[(module path, QuantLinear or QuantEmbed, weight attribute)]`` with a weight quantizer."""
    out = []
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, (M.QuantLinear, M.QuantEmbed)) and mod.weight_quant is not None:
            out.append((_dotted(path), mod, "kernel" if isinstance(mod, M.QuantLinear) else "embedding"))
    return out


def _packed_weights(model) -> list[tuple[str, Any, str, M.QuantizerModule, str]]:
    """``[(parameter path, module, weight attribute, weight quantizer, site)]`` of every weight
    stored as codes: the `quantized_weights` and both binary halves of every split matrix
    (`efficient_nlp.quant.splitting`: ``kernel1`` / ``kernel2``, sites ``<site>.w1`` / ``.w2``)."""
    from efficient_nlp.quant.splitting import SPLIT_MODULES

    out = []
    for path, mod in nnx.iter_modules(model):
        mpath = _dotted(path)
        if isinstance(mod, (M.QuantLinear, M.QuantEmbed)) and mod.weight_quant is not None:
            attr = "kernel" if isinstance(mod, M.QuantLinear) else "embedding"
            out.append((f"{mpath}.{attr}" if mpath else attr, mod, attr, mod.weight_quant, mod.site))
        elif isinstance(mod, SPLIT_MODULES):
            for attr, wq, site in mod.halves():
                out.append((f"{mpath}.{attr}" if mpath else attr, mod, attr, wq, site))
    return out


def _quantizer_entry(q, axis) -> dict:
    entry = {"method": q.method, "bits": q.bits, "signed": q.signed, "granularity": q.granularity,
             "axis": axis}
    if q.granularity == "group":
        entry["group_size"] = q.group_size
    return entry


def _model_config(model):
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        try:
            d = cfg.to_dict()
            json.dumps(d)
            return d
        except (TypeError, ValueError):
            return None
    return None


def export_packed(qmodel) -> dict:
    """The packed artefact of a fake-quantized model: ``{"manifest": dict, "tensors": {name:
    np.ndarray}}`` (see the module docstring).  Host-side; runs the weight quantizers once."""
    from efficient_nlp.quant.transform import quantizer_modules

    tensors: dict[str, np.ndarray] = {}
    weights = {}
    for key, mod, attr, wq, site in _packed_weights(qmodel):
        w = getattr(mod, attr)[...]
        c = weight_codes(wq, w)
        codes = np.asarray(c["codes"])
        pb = pack_bits(wq.quantizer.bits)
        names = {"codes": key + ".codes", "scale": key + ".scale"}
        tensors[names["codes"]] = pack(codes, pb, signed=True)
        tensors[names["scale"]] = np.asarray(c["scale"], np.float32)
        for extra in ("zero_point", "offset"):
            if c[extra] is not None:
                names[extra] = f"{key}.{extra}"
                tensors[names[extra]] = np.asarray(c[extra], np.float32)
        weights[key] = {"site": site, **_quantizer_entry(wq.quantizer, wq.axis), "pack_bits": pb,
                        "shape": list(codes.shape), "dtype": str(np.dtype(w.dtype)), "tensors": names}
    other = []
    for name, leaf in tree.named_leaves(nnx.state(qmodel)):
        if name in weights:
            continue
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        if name in tensors:
            raise PackedArtifactError(f"export_packed: variable {name!r} collides with a packed tensor name")
        tensors[name] = np.asarray(a, order="C")
        other.append(name)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "model_class": f"{type(qmodel).__module__}.{type(qmodel).__qualname__}",
        "config": _model_config(qmodel),
        "weights": weights,
        "variables": other,
        "quantizers": {p: _quantizer_entry(m.quantizer, m.axis) for p, m in quantizer_modules(qmodel)},
    }
    return {"manifest": manifest, "tensors": tensors}


# ----------------------------------------------------------------------------- files
def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _check_artifact(artifact):
    if not isinstance(artifact, dict) or set(artifact) != {"manifest", "tensors"}:
        raise PackedArtifactError("expected an artefact dict {'manifest': ..., 'tensors': ...} from export_packed")
    if artifact["manifest"].get("format") != FORMAT:
        raise PackedArtifactError(f"not a packed quantized artefact (format {artifact['manifest'].get('format')!r})")


def save_packed(artifact: dict, out_dir) -> str:
    """Writes ``out_dir/model.safetensors`` (every tensor) and ``out_dir/manifest.json`` (the
    manifest plus dtype, shape and SHA-256 of each tensor); returns ``out_dir``."""
    from safetensors.numpy import save_file

    _check_artifact(artifact)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: np.asarray(v, order="C") for k, v in artifact["tensors"].items()}
    manifest = dict(artifact["manifest"])
    manifest["tensors"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": _sha256(v)}
                           for k, v in sorted(tensors.items())}
    save_file(tensors, os.path.join(out_dir, TENSORS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return out_dir


def load_packed(out_dir) -> dict:
    """Reads an artefact written by `save_packed`, bit-exactly; a missing directory or file, a
    file that does not parse, a missing / extra tensor or a checksum, dtype or shape mismatch
    raises `PackedArtifactError` naming the problem."""
    from safetensors.numpy import load_file

    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise PackedArtifactError(f"packed artefact directory {out_dir!r} does not exist")
    paths = {n: os.path.join(out_dir, n) for n in (TENSORS_FILE, MANIFEST_FILE)}
    for n, p in paths.items():
        if not os.path.isfile(p):
            raise PackedArtifactError(f"packed artefact {out_dir!r} lacks {n} (written by save_packed)")
    try:
        with open(paths[MANIFEST_FILE]) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise PackedArtifactError(f"{paths[MANIFEST_FILE]} is corrupted (not JSON): {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "tensors" not in manifest:
        raise PackedArtifactError(f"{paths[MANIFEST_FILE]} is not a packed quantized artefact manifest")
    if manifest.get("version") != VERSION:
        raise PackedArtifactError(f"{paths[MANIFEST_FILE]}: unsupported version {manifest.get('version')!r} "
                                  f"(this code reads version {VERSION})")
    try:
        tensors = load_file(paths[TENSORS_FILE])
    except Exception as e:  # safetensors raises its own error types for a broken header / size
        raise PackedArtifactError(f"{paths[TENSORS_FILE]} is corrupted or truncated: {e}") from e
    expected = manifest.pop("tensors")
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PackedArtifactError(f"{paths[TENSORS_FILE]} does not match the manifest: missing {missing[:5]}, "
                                  f"unexpected {extra[:5]}")
    for k, meta in expected.items():
        a = tensors[k]
        if str(a.dtype) != meta["dtype"] or list(a.shape) != meta["shape"]:
            raise PackedArtifactError(f"tensor {k!r}: {a.dtype}{list(a.shape)} in the file, manifest says "
                                      f"{meta['dtype']}{meta['shape']}")
        if _sha256(a) != meta["sha256"]:
            raise PackedArtifactError(f"tensor {k!r}: checksum mismatch (the file is corrupted or was "
                                      f"changed after save_packed)")
    return {"manifest": manifest, "tensors": tensors}


def packed_size_mb(out_dir) -> float:
    """Bytes of the files in ``out_dir`` (tensors and manifest) / 2^20."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise PackedArtifactError(f"packed artefact directory {out_dir!r} does not exist")
    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir)
                if os.path.isfile(os.path.join(out_dir, n)))
    return total / 2 ** 20


# ----------------------------------------------------------------------------- restore
def unpacked_weights(artifact) -> dict[str, np.ndarray]:
    """``{parameter path: float32 dequantized weight}`` of every packed weight."""
    out = {}
    t = artifact["tensors"]
    for key, e in artifact["manifest"]["weights"].items():
        names = e["tensors"]
        codes = unpack(t[names["codes"]], e["pack_bits"], e["shape"], signed=True)
        q = _Q(e)
        out[key] = np.asarray(dequantize_weight(q, codes, t[names["scale"]], _get(t, names, "zero_point"),
                                                _get(t, names, "offset")))
    return out


def weight_code_arrays(artifact) -> dict[str, dict[str, Any]]:
    """``{parameter path: {"codes": int8 ndarray, "scale", "zero_point", "offset", "entry"}}``."""
    t = artifact["tensors"]
    out = {}
    for key, e in artifact["manifest"]["weights"].items():
        names = e["tensors"]
        out[key] = {"codes": unpack(t[names["codes"]], e["pack_bits"], e["shape"], signed=True),
                    "scale": t[names["scale"]], "zero_point": _get(t, names, "zero_point"),
                    "offset": _get(t, names, "offset"), "entry": e}
    return out


def _get(t, names, what):
    return t[names[what]] if what in names else None


class _Q:
    """The Quantizer fields a manifest entry holds (for `dequantize_weight`)."""

    def __init__(self, e):
        self.method, self.bits, self.signed = e["method"], e["bits"], e["signed"]


def restore(artifact: dict, template, *, frozen: bool = True):
    """A copy of ``template`` (a fake-quantized model of the same architecture and spec, e.g.
    ``quantize_model(<float model>, spec)[0]``; for a ternary-split model, `split_model` of such a
    model with the same sites) holding the artefact's values.

    Quantized weights come back as their dequantized values (the latent weights are gone by
    design) and other variables as stored (cast to the template's dtypes).  ``frozen=True``
    marks the weight quantizers as already quantized (pass-through), so the model computes
    bit for bit what the exported model did; ``frozen=False`` re-quantizes them on every call
    (same codes, scales within float rounding), e.g. to continue QAT.  A template whose
    quantized sites, quantizers or shapes differ from the artefact raises `PackedArtifactError`.
    The template's learned activation quantizers need no calibration: their state is restored.
    """
    _check_artifact(artifact)
    manifest, t = artifact["manifest"], artifact["tensors"]
    model = train.copy_model(template)
    mods = {key: wq for key, _, _, wq, _ in _packed_weights(model)}
    want = manifest["weights"]
    if set(mods) != set(want):
        raise PackedArtifactError(
            f"the template's quantized weights differ from the artefact's: only in the template "
            f"{sorted(set(mods) - set(want))[:5]}, only in the artefact {sorted(set(want) - set(mods))[:5]}")
    for key, wq in mods.items():
        got = _quantizer_entry(wq.quantizer, wq.axis)
        stored = {k: want[key].get(k) for k in set(got) | ({"group_size"} & set(want[key]))}
        if got != stored:
            raise PackedArtifactError(f"weight {key!r}: the template quantizes it with {got}, the artefact "
                                      f"with {stored}; build the template with the exported spec")
    values = unpacked_weights(artifact)
    values.update({n: t[n] for n in manifest["variables"]})
    state = nnx.state(model)
    names = tree.named_leaves(state)
    missing = sorted(n for n, _ in names if n not in values)
    if missing:
        raise PackedArtifactError(f"the artefact lacks {len(missing)} variable(s) of the template, "
                                  f"e.g. {missing[:5]}")
    have = dict(names)
    for n in values:
        if n not in have:
            raise PackedArtifactError(f"the template has no variable {n!r} (different architecture?)")
        if tuple(np.shape(values[n])) != tuple(np.shape(have[n])):
            raise PackedArtifactError(f"variable {n!r}: artefact shape {np.shape(values[n])}, template "
                                      f"shape {np.shape(have[n])}")

    def put(path, leaf):
        return jnp.asarray(values[tree.path_str(path)], dtype=jnp.asarray(leaf).dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(put, state))
    for wq in mods.values():
        wq.frozen = frozen
    for _, qm in quantizer_modules(model):  # learned activation state (LSQ step, PACT clip) came from the artefact
        qm.calibrated = True
    return model


def artifact_nbytes(artifact) -> int:
    """Bytes of the artefact's tensor data (no headers): what the cost report's size counts."""
    return sum(int(np.asarray(v).nbytes) for v in artifact["tensors"].values())


__all__ = ["PackedArtifactError", "export_packed", "save_packed", "load_packed", "packed_size_mb",
           "restore", "weight_codes", "dequantize_weight", "unpacked_weights", "weight_code_arrays",
           "quantized_weights", "pack_bits", "artifact_nbytes"]
