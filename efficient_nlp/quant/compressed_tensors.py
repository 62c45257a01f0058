"""The compressed-tensors checkpoint format: integer weights packed into int32, readable by the
tools of that ecosystem (``transformers`` with the ``compressed-tensors`` package, vLLM).

    from efficient_nlp.quant.compressed_tensors import load_compressed_tensors, save_compressed_tensors
    save_compressed_tensors(qmodel, out_dir)             # a HF directory, pack-quantized weights
    qmodel = load_compressed_tensors(model_dir)          # ours or compressed elsewhere -> LSQ weights
    imodel, _ = quant.to_integer_model(qmodel)           # runs the integer codes

A directory holds ``config.json`` (the family's HF config plus a ``quantization_config`` with
``quant_method: "compressed-tensors"`` and ``format: "pack-quantized"``) and
``model.safetensors``.  Every quantized Linear weight (HF ``W [out, in]``, our kernel transposed)
is stored as three tensors under its HF module name ``M``:

* ``M.weight_packed`` (int32 ``[out, ceil(in / (32 / b))]``): the signed codes ``q`` of each row
  shifted to ``q + 2^(b-1)`` and packed ``32 / b`` per word, input ``k`` of the row in word
  ``k // (32 / b)`` at bit ``b * (k mod (32 / b))`` (least significant first), the last word
  zero-padded;
* ``M.weight_scale`` (float32): ``[1]`` per tensor (strategy ``tensor``), ``[out, 1]`` per output
  channel (``channel``), ``[out, in / g]`` per group of ``g`` consecutive inputs (``group``,
  ``group_size: g``; our scales ``[in / g, 1, out]`` transposed);
* ``M.weight_shape`` (int64 ``[2]``): ``[out, in]``.

The weight is ``W = weight_scale * q`` (symmetric: no zero point is stored), the same float32
product as our dequantized weight, so the format's own decompression gives our fake-quantized
weights bit for bit.  ``config_groups`` has one scheme per distinct (bits, strategy, group size),
``weights: {num_bits, type: "int", symmetric: true, strategy, group_size}``, whose ``targets``
are the exact HF module names; ``ignore`` lists every Linear left in float.

What is supported (anything else is a ``ValueError`` naming it and the fix):

* bit widths 2, 4 and 8 (`SUPPORTED_BITS`): the widths whose layout every version of the format
  agrees on (32 / b codes per word; 3, 5, 6 and 7 bits were packed differently by older and newer
  versions of the ``compressed-tensors`` package, and the inference kernels read 4 and 8 bits);
  TWN and BWN weights are stored as 2-bit codes; signed (symmetric) grids only
  (``uniform``, ``lsq``, ``pact`` with ``signed=True``, ``twn``, ``bwn``);
* weights only: activation quantizers are NOT stored (the format's dynamic int8 activation scale
  is ``max|x| / 127.5``, ours ``max|x| / 127``; it has no float offsets for asymmetric grids nor
  the attention's q / k / probs inputs), and saving a model that has them warns;
* quantized embeddings (`QuantEmbed`) are stored as their dequantized float table under the
  ordinary HF name: readers compute exactly what our model does, without the size saving;
* Linear weights in the torch ``[out, in]`` layout: GPT-2's Conv1D ``[in, out]`` tensors (and its
  fused ``c_attn``) cannot hold quantized weights in this format; its float layers are fine.

Loading reads symmetric int schemes (``tensor``, ``channel``, ``group``) at 2, 4 or 8 bits into a
model whose quantized Linears have LSQ weight quantizers at the checkpoint's bits and
granularity, kernel = dequantized weight and step = scale, so the fake-quantized forward
reproduces the checkpoint exactly; modules not quantized in the checkpoint stay float.  Format
reference: the ``compressed-tensors`` package (vllm-project/compressed-tensors), which is not
needed here; docs/quantization.md, "compressed-tensors format".
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import warnings

import jax
import numpy as np
from flax import nnx

from efficient_nlp.models import family as F
from efficient_nlp.models import hf_checkpoint as H
from efficient_nlp.models.config import read_config_json
from efficient_nlp.quant import modules as M
from efficient_nlp.quant.export import quantized_weights, weight_codes
from efficient_nlp.quant.packing import pack, unpack
from efficient_nlp.quant.spec import Quantizer, make_spec
from efficient_nlp.quant.transform import ACTIVATION_QUANTIZERS, quantize_model, quantizer_modules

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
#: Code widths written and read (see the module docstring).
SUPPORTED_BITS = (2, 4, 8)
STRATEGIES = ("tensor", "channel", "group")
#: Weight quantizers with a symmetric integer grid (``w = scale * codes``).
_SIGNED_METHODS = ("uniform", "lsq", "pact", "twn", "bwn")
_PARTS = ("weight_packed", "weight_scale", "weight_shape")


class CompressedTensorsError(ValueError):
    """A compressed-tensors checkpoint is malformed or uses something this reader does not support."""


# ----------------------------------------------------------------------------- packing
def pack_int32(codes, bits: int) -> np.ndarray:
    """Signed codes ``[rows, cols]`` -> int32 ``[rows, ceil(cols / (32 // bits))]`` in the
    pack-quantized layout (module docstring), one row at a time: each row is padded with the
    code ``-2^(b-1)`` (field 0) to whole words and packed by `efficient_nlp.quant.packing.pack`,
    whose little-endian fields read as little-endian int32 words are exactly that layout."""
    bits = _check_bits(bits, "pack_int32")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"pack_int32: expected codes [rows, cols], got shape {codes.shape}")
    per = 32 // bits
    rows, cols = codes.shape
    padded = np.pad(codes.astype(np.int64), ((0, 0), (0, (-cols) % per)), constant_values=-(2 ** (bits - 1)))
    words = padded.shape[1] // per
    return pack(padded, bits).reshape(rows, 4 * words).view("<i4").astype(np.int32)


def unpack_int32(packed, bits: int, shape) -> np.ndarray:
    """Inverse of `pack_int32`: the int8 codes ``shape = (rows, cols)`` of ``packed``."""
    bits = _check_bits(bits, "unpack_int32")
    rows, cols = (int(n) for n in shape)
    packed = np.asarray(packed)
    words = math.ceil(cols / (32 // bits))
    if packed.dtype != np.int32 or packed.shape != (rows, words):
        raise ValueError(f"unpack_int32: {rows} x {cols} codes of {bits} bits pack into int32 [{rows}, {words}], "
                         f"got {packed.dtype} {list(packed.shape)}")
    raw = np.ascontiguousarray(packed.astype("<i4")).view(np.uint8).reshape(-1)
    return unpack(raw, bits, (rows, words * (32 // bits)))[:, :cols]


def _check_bits(bits, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"{where}: the compressed-tensors pack-quantized export supports {SUPPORTED_BITS}-bit "
                         f"codes, got {bits!r}")
    return int(bits)


# ----------------------------------------------------------------------------- HF names
def _hf_prefix(model, fam) -> str:
    """The prefix of the base model's tensors as `save_hf_checkpoint` writes them."""
    return "" if H._kind(model) in ("BertModel", "DecoderModel") else fam.hf_prefix


def _full_name(name: str, fam, prefix: str) -> str:
    """The checkpoint name of a `hf_name_map` entry (heads other than the pooler carry no prefix),
    as in `save_hf_checkpoint`."""
    return name if H._group(name, fam.hf_head_groups) not in (None, "pooler.") else prefix + name


def _is_linear_weight(name: str, ours) -> bool:
    """A Linear's weight in the HF checkpoint (torch Linear or GPT-2 Conv1D): every target is a kernel."""
    return name.endswith(".weight") and all(t.endswith(".kernel") for t in H._targets(ours))


# ----------------------------------------------------------------------------- saving
def _scheme_of(q: Quantizer) -> tuple[int, str, int | None]:
    """``(num_bits, strategy, group_size)`` of a weight quantizer, or a ValueError with the fix."""
    if q.method not in _SIGNED_METHODS or not (q.signed or q.method in ("twn", "bwn")):
        raise ValueError(
            f"{q.name}: the compressed-tensors export stores symmetric integer weights (w = scale * codes: "
            f"{_SIGNED_METHODS} with signed=True); asymmetric grids and registered quantizers are not "
            "exported. Quantize these weights with signed=True, keep them in float with a rule, or store our "
            "own packed artefact with quant.export_packed")
    bits = 2 if q.method in ("twn", "bwn") else q.bits
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{q.name}: {bits}-bit weights are not exported in the compressed-tensors format, which is written "
            f"here at {SUPPORTED_BITS} bits (the widths whose packing every version of the format and its "
            f"inference kernels agree on). Quantize these weights at 4 or 8 bits (e.g. make_spec(4, ...)), or "
            "store our own packed artefact with quant.export_packed")
    if q.granularity == "group":
        return bits, "group", q.group_size
    return bits, q.granularity, None


def _hf_scale(scale, strategy: str) -> np.ndarray:
    """Our scale (0-d, ``[1, out]``, ``[in / g, 1, out]``) in the format's layout (``[1]``,
    ``[out, 1]``, ``[out, in / g]``), float32."""
    s = np.asarray(scale, np.float32)
    if strategy == "tensor":
        return s.reshape(1)
    if strategy == "channel":
        return np.ascontiguousarray(s.reshape(1, -1).T)
    return np.ascontiguousarray(s[:, 0, :].T)


def _activation_quantizers(model) -> list[str]:
    return [path for path, _ in quantizer_modules(model) if path.rsplit(".", 1)[-1] in ACTIVATION_QUANTIZERS]


def save_compressed_tensors(qmodel, out_dir: str | os.PathLike) -> str:
    """Write ``qmodel`` (from `quantize_model`, or loaded here) as a compressed-tensors
    pack-quantized HF directory ``out_dir`` (``config.json`` + ``model.safetensors``); returns
    ``out_dir``.

    Every quantized Linear weight becomes ``<HF module>.weight_packed / .weight_scale /
    .weight_shape`` (module docstring); every other tensor (LayerNorm, biases, float Linears,
    embeddings, heads) is written under its ordinary HF name as `save_hf_checkpoint` writes it,
    a quantized embedding as its dequantized float table.  The checkpoint is weight-only: a model
    with activation quantizers is saved without them and a ``UserWarning`` says so (readers then
    run those layers on float activations).  ``ValueError`` (naming the layer and the fix) for a
    quantized weight the format cannot hold: bit widths other than `SUPPORTED_BITS`, asymmetric or
    registered quantizers, GPT-2's Conv1D / fused ``c_attn`` weights, ternary-split layers; and for a
    model without quantized Linear weights (use `save_hf_checkpoint`).
    """
    from safetensors.numpy import save_file

    from efficient_nlp.quant.splitting import SPLIT_MODULES

    kind = H._kind(qmodel)
    split = [p for p, m in nnx.iter_modules(qmodel) if isinstance(m, SPLIT_MODULES)]
    if split:
        raise ValueError(f"save_compressed_tensors: {len(split)} ternary-split layer(s) (two binary halves each) "
                         "have no compressed-tensors form; export the model before split_model, or store it with "
                         "quant.export_packed")
    H._check_shapes_match_config(qmodel)
    fam = F.family_of(qmodel)
    mapping = H.hf_name_map(qmodel)
    params = H.named_params(qmodel)
    prefix = _hf_prefix(qmodel, fam)
    where = {t: (name, ours, transpose) for name, (ours, transpose) in mapping.items() for t in H._targets(ours)}

    packed: dict[str, tuple] = {}   # our kernel path -> (HF module, tensors, scheme key)
    values: dict[str, np.ndarray] = {}
    for path, mod, attr in quantized_weights(qmodel):
        key = f"{path}.{attr}"
        wq = mod.weight_quant
        if isinstance(mod, M.QuantEmbed):
            values[key] = np.asarray(jax.device_get(wq(mod.embedding[...])), np.float32)
            continue
        if key not in where:
            raise ValueError(f"save_compressed_tensors: {key} is outside the {fam.name} family's HF layout")
        name, ours, transpose = where[key]
        if isinstance(ours, tuple) or not transpose:
            raise ValueError(
                f"{mod.site} ({wq.quantizer.name}): its HF tensor {name} is a {fam.name} Conv1D weight [in, out]"
                f"{' fused with ' + str(len(ours) - 1) + ' other projection(s)' if isinstance(ours, tuple) else ''}; "
                "the compressed-tensors format stores quantized torch Linear weights [out, in], so no reader could "
                "load it. Keep this layer in float (a rule with payload None), or store our own packed artefact "
                "with quant.export_packed")
        bits, strategy, group_size = _scheme_of(wq.quantizer)
        c = weight_codes(wq, mod.kernel[...])
        codes = np.asarray(c["codes"]).T  # [out, in]
        module = _full_name(name, fam, prefix)[: -len(".weight")]
        tensors = {"weight_packed": pack_int32(codes, bits), "weight_scale": _hf_scale(c["scale"], strategy),
                   "weight_shape": np.asarray(codes.shape, np.int64)}
        packed[key] = (module, tensors, (bits, strategy, group_size))
    if not packed:
        raise ValueError("save_compressed_tensors: the model has no quantized Linear weights; write a float "
                         "checkpoint with models.save_hf_checkpoint, or quantize it first (quant.quantize_model)")

    out: dict[str, np.ndarray] = {}
    ignore = []
    for name, (ours, transpose) in mapping.items():
        full = _full_name(name, fam, prefix)
        targets = H._targets(ours)
        if targets[0] in packed:
            module, tensors, _ = packed[targets[0]]
            out.update({f"{module}.{part}": arr for part, arr in tensors.items()})
            continue
        arr = np.concatenate([values[t] if t in values else np.asarray(jax.device_get(params[t].get_value()))
                              for t in targets], axis=-1)
        out[full] = np.ascontiguousarray(arr.T if transpose else arr)
        if _is_linear_weight(name, ours):
            ignore.append(full[: -len(".weight")])

    acts = _activation_quantizers(qmodel)
    if acts:
        warnings.warn(
            f"save_compressed_tensors: the checkpoint is weight-only; {len(acts)} activation quantizer(s) (e.g. "
            f"{acts[0]}) are not stored, so readers run those layers on float activations (the format's dynamic "
            "int8 activation scale max|x|/127.5 differs from ours, max|x|/127, and it has no asymmetric float "
            "offsets nor attention-matmul inputs)", UserWarning, stacklevel=2)

    groups: dict[tuple, list[str]] = {}
    for module, _, scheme in packed.values():
        groups.setdefault(scheme, []).append(module)
    config_groups = {}
    for i, ((bits, strategy, group_size), modules) in enumerate(groups.items()):
        config_groups[f"group_{i}"] = {
            "targets": sorted(modules),
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy,
                        "group_size": group_size, "dynamic": False, "actorder": None},
            "input_activations": None, "output_activations": None}
    config = qmodel.config.to_hf_dict(fam.architectures[kind])
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": sorted(ignore), "kv_cache_scheme": None,
        "global_compression_ratio": None}

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(out, os.path.join(out_dir, H.WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, H.CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return out_dir


# ----------------------------------------------------------------------------- loading
def _supported() -> str:
    return (f"symmetric int weights (type 'int', symmetric true) at {SUPPORTED_BITS} bits with strategy "
            f"{STRATEGIES}, format {FORMAT!r}")


def _weight_scheme(group: str, scheme: dict, source: str, ignore_activations: bool) -> dict:
    """``{"bits", "strategy", "group_size", "targets", "activations"}`` of one config group, validated."""
    def bad(what: str) -> CompressedTensorsError:
        return CompressedTensorsError(f"{source}: quantization_config group {group!r}: {what}; this reader "
                                      f"supports {_supported()}")

    if not isinstance(scheme, dict):
        raise bad(f"a preset scheme name with targets {scheme!r} (write the scheme out: weights.num_bits, "
                  "type, symmetric, strategy, group_size)")
    for part in ("input_activations", "output_activations"):
        if scheme.get(part) and not ignore_activations:
            raise bad(f"{part} are quantized ({scheme[part]}); activation quantization is not read. Pass "
                      "ignore_activations=True to load the weights and run float activations")
    fmt = scheme.get("format")
    if fmt not in (None, FORMAT):
        raise bad(f"format {fmt!r}")
    w = scheme.get("weights")
    if not w:
        raise bad("no weight quantization")
    if str(w.get("type", "int")).lower() != "int":
        raise bad(f"weights of type {w.get('type')!r} (e.g. float8)")
    if not w.get("symmetric", True):
        raise bad("asymmetric weights (symmetric: false, with zero points)")
    bits = w.get("num_bits", 8)
    if bits not in SUPPORTED_BITS:
        raise bad(f"num_bits {bits!r}")
    if w.get("dynamic"):
        raise bad("dynamic weight quantization")
    if w.get("actorder") in ("group", "dynamic"):
        raise bad(f"actorder {w.get('actorder')!r} (permuted groups, weight_g_idx)")
    group_size = w.get("group_size")
    strategy = w.get("strategy") or ("tensor" if group_size is None else "channel" if group_size == -1 else "group")
    if strategy not in STRATEGIES:
        raise bad(f"strategy {strategy!r}")
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise bad(f"strategy 'group' with group_size {group_size!r} (needs an int > 0)")
    targets = scheme.get("targets") or []
    return {"bits": bits, "strategy": strategy, "group_size": group_size if strategy == "group" else None,
            "targets": list(targets),
            "activations": bool(scheme.get("input_activations") or scheme.get("output_activations"))}


def read_quantization_config(model_dir: str | os.PathLike, *, ignore_activations: bool = False) -> dict:
    """The validated ``quantization_config`` of a compressed-tensors directory: ``{"groups":
    [dicts with bits, strategy, group_size, targets, activations], "ignore": [...], "activations":
    whether activations or the KV cache are quantized}``.
    `CompressedTensorsError` names what is unsupported (another quant_method or format,
    asymmetric / float weights, activation or KV-cache quantization unless
    ``ignore_activations``, sparsity, transforms)."""
    source = os.fspath(model_dir)
    cfg = read_config_json(source)
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise CompressedTensorsError(f"{source}: config.json has no quantization_config; a float checkpoint "
                                     "loads with models.from_pretrained")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CompressedTensorsError(f"{source}: quant_method {qc.get('quant_method')!r}; this reader supports "
                                     f"{QUANT_METHOD!r} checkpoints with {_supported()}")
    if qc.get("format") not in (FORMAT, "mixed-precision"):
        raise CompressedTensorsError(f"{source}: format {qc.get('format')!r}; this reader supports {_supported()}")
    if qc.get("kv_cache_scheme") and not ignore_activations:
        raise CompressedTensorsError(f"{source}: KV-cache quantization ({qc['kv_cache_scheme']}) is not read; pass "
                                     "ignore_activations=True to load the weights with a float KV cache")
    for extra in ("sparsity_config", "transform_config"):
        if qc.get(extra):
            raise CompressedTensorsError(f"{source}: {extra} is set ({qc[extra]}); sparse or rotated weights are not "
                                         f"read, this reader supports {_supported()}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise CompressedTensorsError(f"{source}: quantization_config has no config_groups")
    schemes = [_weight_scheme(g, s, source, ignore_activations) for g, s in groups.items()]
    return {"groups": schemes, "ignore": list(qc.get("ignore") or []),
            "activations": bool(qc.get("kv_cache_scheme")) or any(s["activations"] for s in schemes)}


def _matches(module: str, target: str) -> bool:
    """A target or ignore entry: ``re:<regex>`` (matched at the start), an exact module name, or
    the class name ``Linear`` (every module holding packed weights, as in the format's own
    model-free readers)."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear"


def _decompress(tensors: dict, module: str, scheme: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(weight [out, in] float32, scale in the format's layout)`` of one packed module; removes
    its tensors from ``tensors``.  `CompressedTensorsError` for a missing or mis-shaped part."""
    bits, strategy, g = scheme["bits"], scheme["strategy"], scheme["group_size"]
    missing = [f"{module}.{p}" for p in _PARTS if f"{module}.{p}" not in tensors]
    if missing:
        raise CompressedTensorsError(f"{source}: {', '.join(missing)} missing; a pack-quantized Linear is stored as "
                                     f"{', '.join(_PARTS)} (the checkpoint is incomplete or corrupted)")
    packed, scale, shape = (tensors.pop(f"{module}.{p}") for p in _PARTS)
    zero = tensors.pop(f"{module}.weight_zero_point", None)
    if zero is not None and np.any(np.asarray(zero) != 0):
        raise CompressedTensorsError(f"{source}: {module}.weight_zero_point is not zero in a symmetric scheme")
    if f"{module}.weight_g_idx" in tensors:
        raise CompressedTensorsError(f"{source}: {module}.weight_g_idx (activation-ordered groups) is not read; "
                                     f"this reader supports {_supported()}")
    shape = np.asarray(shape).reshape(-1)
    if shape.size != 2 or not np.issubdtype(shape.dtype, np.integer) or np.any(shape < 1):
        raise CompressedTensorsError(f"{source}: {module}.weight_shape is {shape.tolist()}, expected [out, in]")
    out, d_in = (int(n) for n in shape)
    try:
        codes = unpack_int32(packed, bits, (out, d_in))
    except ValueError as e:
        raise CompressedTensorsError(f"{source}: {module}.weight_packed does not hold a [{out}, {d_in}] "
                                     f"{bits}-bit weight: {e}") from None
    want = {"tensor": [(1,), ()], "channel": [(out, 1), (out,)],
            "group": [(out, d_in // g)] if g and d_in % g == 0 else []}[strategy]
    scale = np.asarray(scale)
    if tuple(scale.shape) not in want or not np.issubdtype(scale.dtype, np.floating):
        raise CompressedTensorsError(
            f"{source}: {module}.weight_scale is {scale.dtype} {list(scale.shape)}; strategy {strategy!r}"
            f"{f' with group_size {g}' if g else ''} on a [{out}, {d_in}] weight needs a float scale of shape "
            f"{[list(w) for w in want] or f'[out, in / g] with g dividing {d_in}'}")
    s = scale.astype(np.float32)
    c = codes.astype(np.float32)
    if strategy == "group":
        weight = (c.reshape(out, d_in // g, g) * s[:, :, None]).reshape(out, d_in)
    else:
        weight = c * s.reshape(out, 1) if strategy == "channel" else c * s.reshape(())
    return weight, s


def _our_step(scale: np.ndarray, strategy: str) -> np.ndarray:
    """The format's scale as our LSQ step (0-d, ``[1, out]``, ``[in / g, 1, out]``)."""
    if strategy == "tensor":
        return scale.reshape(())
    if strategy == "channel":
        return scale.reshape(1, -1)
    return np.ascontiguousarray(scale.T[:, None, :])


def load_compressed_tensors(model_dir: str | os.PathLike, num_labels: int | None = None, head: str | None = None,
                            *, ignore_activations: bool = False, seed: int = 0):
    """A fake-quantized model from a compressed-tensors pack-quantized directory (or Hub id),
    written by `save_compressed_tensors` or elsewhere.

    The float model is built and loaded by `efficient_nlp.models.from_pretrained` (``num_labels``,
    ``head`` and ``seed`` as there) from the checkpoint's float tensors and its decompressed
    weights; then every quantized Linear gets an LSQ weight quantizer at the checkpoint's bits and
    strategy (``tensor`` / ``channel`` / ``group``) with step = the stored scale, so the model
    computes exactly the checkpoint's weights and can be fine-tuned (QAT) or run in integers with
    `efficient_nlp.quant.to_integer_model`.  Linears not quantized in the checkpoint, and a
    quantized module of a head the model does not have, stay float / are skipped as in
    `from_pretrained`.

    ``ignore_activations=True`` loads a checkpoint that also quantizes activations or the KV cache
    with its weights only (float activations; a warning says so); otherwise that is a
    `CompressedTensorsError`, as are asymmetric, float8, other bit widths or formats, and missing,
    mis-shaped or corrupted tensors (each naming the problem).
    """
    from safetensors.numpy import save_file

    local = H.resolve_model_dir(model_dir)
    qc = read_quantization_config(local, ignore_activations=ignore_activations)
    tensors = H.read_safetensors(local)

    quantized: dict[str, dict] = {}   # HF module -> {"scheme", "scale"}
    for name in sorted(n for n in tensors if n.endswith(".weight_packed")):
        module = name[: -len(".weight_packed")]
        if any(_matches(module, ign) for ign in qc["ignore"] if ign != "Linear"):
            raise CompressedTensorsError(f"{local}: {module} is in the ignore list but holds packed weights")
        scheme = next((s for s in qc["groups"] if any(_matches(module, t) for t in s["targets"])), None)
        if scheme is None:
            raise CompressedTensorsError(f"{local}: {module} holds packed weights but no config group targets it "
                                         f"(targets: {[s['targets'] for s in qc['groups']]})")
        if f"{module}.weight" in tensors:
            raise CompressedTensorsError(f"{local}: {module} holds both a float weight and packed weights")
        weight, scale = _decompress(tensors, module, scheme, local)
        tensors[f"{module}.weight"] = weight
        quantized[module] = {"scheme": scheme, "scale": scale}
    if not quantized:
        raise CompressedTensorsError(f"{local}: no *.weight_packed tensors; the pack-quantized format stores each "
                                     f"quantized Linear as {', '.join(_PARTS)}")
    stray = sorted(n for n in tensors if re.search(r"\.weight_(packed|scale|shape|zero_point|g_idx|global_scale)$", n))
    if stray:
        raise CompressedTensorsError(f"{local}: weight quantization parameters without packed weights: {stray[:6]} "
                                     f"(another format? this reader supports {_supported()})")
    acts = sorted(n for n in tensors if re.search(r"\.(input|output|k|v)_(scale|zero_point|global_scale)$", n))
    if acts and not ignore_activations:
        raise CompressedTensorsError(f"{local}: activation / KV-cache quantization parameters {acts[:6]} are not "
                                     "read; pass ignore_activations=True to load the weights and run float activations")
    for name in acts:
        tensors.pop(name)
    if ignore_activations and (acts or qc["activations"]):
        warnings.warn(f"load_compressed_tensors: the activation / KV-cache quantization of {local} is ignored; the "
                      "model runs float activations", UserWarning, stacklevel=2)

    cfg = read_config_json(local)
    cfg.pop("quantization_config")
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, os.path.join(tmp, H.WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, H.CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        model = H.from_pretrained(tmp, num_labels, head, seed=seed)

    fam = F.family_of(model)
    mapping = H.hf_name_map(model)
    rules, steps = [], {}
    for module, entry in quantized.items():
        name = H._normalize(module + ".weight", fam.hf_prefix)
        if name not in mapping:  # a head the model does not have: from_pretrained skipped it
            logger.info("load_compressed_tensors: %s is not part of %s; skipped", module, type(model).__name__)
            continue
        ours, transpose = mapping[name]
        if isinstance(ours, tuple) or not transpose:
            raise CompressedTensorsError(f"{local}: {module} is a {fam.name} Conv1D weight [in, out]; packed weights "
                                         "are read for torch Linear layers [out, in] only")
        site = ours[: -len(".kernel")]
        s = entry["scheme"]
        gran = s["strategy"]
        q = Quantizer("lsq", s["bits"], True, gran, **({"group_size": s["group_size"]} if gran == "group" else {}))
        rules.append(("^" + re.escape(site) + "$", q))
        steps[site] = _our_step(entry["scale"], gran)
    qmodel, _ = quantize_model(model, make_spec(32, 32, 32, rules=rules))
    for site, step in steps.items():
        var = F.get_module(qmodel, site).weight_quant.step
        if tuple(var.get_value().shape) != step.shape:
            raise CompressedTensorsError(f"{local}: {site}: the LSQ step has shape {tuple(var.get_value().shape)}, "
                                         f"the checkpoint's scale gives {step.shape}")
        var.set_value(jax.numpy.asarray(step, var.get_value().dtype))
    return qmodel


__all__ = ["CompressedTensorsError", "QUANT_METHOD", "FORMAT", "SUPPORTED_BITS", "pack_int32", "unpack_int32",
           "save_compressed_tensors", "load_compressed_tensors", "read_quantization_config"]
