"""Search spaces: what is searched (decisions, candidates, FLOPs) kept apart from how (search.py).

* ``cnn``: a ResNet-20-style CNN (3 stages of ``blocks_per_stage`` basic blocks, 16/32/64 channels
  at full width) on the offline digits images (`efficient_nlp.data.load_digits`); decisions: each
  stage's width (the residual stream, shared by the blocks of the stage) and each block's inner
  width.  Retraining builds the same network with one candidate per decision (physically narrow).
* ``encoder`` (also ``bert``): the heads and the FFN width of every layer of a pretrained
  encoder classifier of any post-LayerNorm family (BERT, RoBERTa, DistilBERT, ELECTRA; default:
  the embedded MiniLM) on a text task (default: the built-in task).  The supernet's meta weights
  are the pretrained kernels of the layers' sites (found through the model's family
  description); with ordinal (or the start of transitional) sharing the widest candidate *is*
  the pretrained model.  The chosen architecture becomes a physically smaller model of the same
  class (per-layer head counts / FFN sizes) whose weights are the candidate kernels ``W^{i,o}``
  (``retrain.init = "inherit"``) or fresh (``"scratch"``).

A `SearchSpace` gives: ``decisions`` (names), ``candidates`` (widths per decision, ascending),
``flops`` (`FlopsModel`), ``supernet(sharing, seed)``, ``supernet_logits(model, batch, arch,
train, rngs)``, ``child(arch, supernet, seed)``, ``child_logits(model, batch, train, rngs)`` and
the ``data`` splits (``search_train`` / ``val`` for the search, ``train`` for retraining, ``test``
for the final report).  `register_space` adds a user's space under a new ``config.space.kind``.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efficient_nlp.models import family as F
from efficient_nlp.nas.aps import ApsConv, ApsDense, WidthBatchNorm
from efficient_nlp.nas.flops import FlopsModel, encoder_flops_model, resnet_flops_model


@dataclasses.dataclass
class SearchSpace:
    name: str
    decisions: tuple[str, ...]
    candidates: tuple[tuple[int, ...], ...]
    flops: FlopsModel
    supernet: Callable[[str, int], Any]
    supernet_logits: Callable
    child: Callable
    child_logits: Callable
    data: dict
    extra: dict = dataclasses.field(default_factory=dict)

    def describe(self, arch) -> dict:
        return {name: int(self.candidates[d][int(a)]) for d, (name, a) in
                enumerate(zip(self.decisions, arch))}


# ----------------------------------------------------------------------------- CNN
class ApsResNet(nnx.Module):
    """ResNet-20-style CNN (basic blocks, projection shortcuts where the stage changes) whose
    channel widths are chosen per call by ``arch`` (candidate indices, see `cnn_decisions`)."""

    def __init__(self, candidates, *, blocks_per_stage: int = 3, in_channels: int = 1,
                 num_classes: int = 10, sharing: str = "ordinal", rngs: nnx.Rngs):
        self.candidates = tuple(tuple(c) for c in candidates)
        self.blocks_per_stage = int(blocks_per_stage)
        n = self.blocks_per_stage
        self.stage_dec = [s * (1 + n) for s in range(3)]
        cand = self.candidates
        maxw = [c[-1] for c in cand]
        sd = self.stage_dec

        def conv(i_dec, o_dec, k=3, stride=1, c_in=None):
            return ApsConv(c_in if i_dec is None else maxw[i_dec], maxw[o_dec], k, stride=stride,
                           in_widths=None if i_dec is None else _multi(cand[i_dec]),
                           out_widths=_multi(cand[o_dec]), sharing=sharing, rngs=rngs)

        def norm(o_dec):
            return WidthBatchNorm(maxw[o_dec], cand[o_dec])

        self.stem = conv(None, sd[0], c_in=in_channels)
        self.stem_bn = norm(sd[0])
        blocks = []
        for s in range(3):
            for b in range(n):
                inner = sd[s] + 1 + b
                prev = sd[s - 1] if (s > 0 and b == 0) else sd[s]
                stride = 2 if (s > 0 and b == 0) else 1
                blk = nnx.Dict(conv1=conv(prev, inner, stride=stride), bn1=norm(inner),
                               conv2=conv(inner, sd[s]), bn2=norm(sd[s]))
                if prev != sd[s]:
                    blk["proj"] = conv(prev, sd[s], k=1, stride=stride)
                    blk["proj_bn"] = norm(sd[s])
                blocks.append(blk)
        self.blocks = nnx.List(blocks)
        self.head = ApsDense(maxw[sd[2]], num_classes, in_widths=_multi(cand[sd[2]]),
                             sharing=sharing, rngs=rngs)

    def _idx(self, arch, d):
        return None if len(self.candidates[d]) == 1 else arch[d]

    def __call__(self, images, arch=None, weights=None):
        """``images`` [N, H, W, C] -> logits; ``weights`` [N] weight the BatchNorm statistics."""
        if arch is None:
            arch = jnp.zeros(len(self.candidates), jnp.int32)
        ix = lambda d: self._idx(arch, d)  # noqa: E731
        sd, n = self.stage_dec, self.blocks_per_stage
        h = jax.nn.relu(self.stem_bn(self.stem(images, None, ix(sd[0])), ix(sd[0]), weights))
        k = 0
        for s in range(3):
            for b in range(n):
                blk = self.blocks[k]
                k += 1
                inner = sd[s] + 1 + b
                prev = sd[s - 1] if (s > 0 and b == 0) else sd[s]
                t = jax.nn.relu(blk["bn1"](blk["conv1"](h, ix(prev), ix(inner)), ix(inner), weights))
                t = blk["bn2"](blk["conv2"](t, ix(inner), ix(sd[s])), ix(sd[s]), weights)
                if "proj" in blk:
                    h = blk["proj_bn"](blk["proj"](h, ix(prev), ix(sd[s])), ix(sd[s]), weights)
                h = jax.nn.relu(t + h)
        pooled = jnp.mean(h, axis=(1, 2))
        return self.head(pooled, ix(sd[2]))


def _multi(widths):
    """Candidate widths of an axis, or None when there is a single one (a fixed axis)."""
    return None if len(widths) == 1 else tuple(widths)


def cnn_decisions(blocks_per_stage: int, base_widths=(16, 32, 64), ratios=(0.25, 0.5, 0.75, 1.0)):
    """``(names, candidates)``: per stage ``stage{s}`` then ``stage{s}.block{b}``."""
    names, cands = [], []
    for s, base in enumerate(base_widths):
        widths = tuple(sorted({max(1, int(round(r * base))) for r in ratios}))
        names.append(f"stage{s}")
        cands.append(widths)
        for b in range(blocks_per_stage):
            names.append(f"stage{s}.block{b}")
            cands.append(widths)
    return tuple(names), tuple(cands)


def cnn_space(cfg, seed: int = 0) -> SearchSpace:
    """Digits ResNet space from ``cfg`` (``config.space``: blocks_per_stage, base_widths, ratios,
    val_fraction)."""
    from efficient_nlp.data import load_digits

    n = int(cfg.blocks_per_stage)
    names, cands = cnn_decisions(n, tuple(cfg.base_widths), tuple(cfg.ratios))
    digits = load_digits(seed=seed)
    train = digits["train"]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train["labels"]))
    n_val = int(round(float(cfg.val_fraction) * len(perm)))
    data = {"search_train": {k: v[perm[n_val:]] for k, v in train.items()},
            "val": {k: v[perm[:n_val]] for k, v in train.items()},
            "train": train, "test": digits["test"]}
    flops = resnet_flops_model(cands, blocks_per_stage=n, image_size=8, in_channels=1,
                               num_classes=10)

    def supernet(sharing, seed_):
        return ApsResNet(cands, blocks_per_stage=n, sharing=sharing, rngs=nnx.Rngs(seed_))

    def supernet_logits(model, batch, arch, train=False, rngs=None):
        return model(batch["images"], arch, batch.get("weight"))

    def child(arch, supernet_model=None, seed_=0):
        chosen = [(c[int(a)],) for c, a in zip(cands, arch)]
        return ApsResNet(chosen, blocks_per_stage=n, rngs=nnx.Rngs(seed_))

    def child_logits(model, batch, train=False, rngs=None):
        return model(batch["images"], None, batch.get("weight"))

    return SearchSpace("cnn", names, cands, flops, supernet, supernet_logits, child,
                       child_logits, data)


# ----------------------------------------------------------------------------- encoders
#: The searched matmul sites of an encoder layer (family roles) -> the `ApsEncoderLayer` attribute.
APS_SITES = {"q": "query", "k": "key", "v": "value", "o": "output", "ffn_in": "intermediate",
             "ffn_out": "ffn_output"}


class ApsEncoderLayer(nnx.Module):
    """A post-LayerNorm encoder layer whose head count and FFN width are chosen per call."""

    def __init__(self, hidden: int, heads: tuple, ffn: tuple, head_dim: int, *, sharing, act,
                 dropout: float, eps: float, rngs: nnx.Rngs):
        from efficient_nlp.models.dropout import Dropout
        init = jax.nn.initializers.normal(0.02)
        w = heads[-1] * head_dim
        hw = _multi(tuple(h * head_dim for h in heads))
        self.head_dim, self.act = head_dim, act
        self.query, self.key, self.value = (
            ApsDense(hidden, w, out_widths=hw, sharing=sharing, kernel_init=init, rngs=rngs)
            for _ in range(3))
        self.output = ApsDense(w, hidden, in_widths=hw, sharing=sharing, kernel_init=init, rngs=rngs)
        self.intermediate = ApsDense(hidden, ffn[-1], out_widths=_multi(ffn), sharing=sharing,
                                     kernel_init=init, rngs=rngs)
        self.ffn_output = ApsDense(ffn[-1], hidden, in_widths=_multi(ffn), sharing=sharing,
                                   kernel_init=init, rngs=rngs)
        self.attn_norm = nnx.LayerNorm(hidden, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(hidden, epsilon=eps, use_fast_variance=False, rngs=rngs)
        self.dropout = Dropout(dropout)

    def __call__(self, x, bias, h_idx, f_idx, *, deterministic=True, rngs=None):
        from efficient_nlp.models import activation
        b, t, _ = x.shape
        d = self.head_dim

        def heads(y):
            return y.reshape(b, t, y.shape[-1] // d, d).transpose(0, 2, 1, 3)

        q, k, v = (heads(m(x, None, h_idx)) for m in (self.query, self.key, self.value))
        logits = jnp.matmul(q, k.transpose(0, 1, 3, 2)) / np.sqrt(d) + bias
        probs = jax.nn.softmax(logits, axis=-1)
        ctx = jnp.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        out = self.dropout(self.output(ctx, h_idx, None), deterministic=deterministic, rngs=rngs)
        x = self.attn_norm(out + x)
        inner = activation(self.act)(self.intermediate(x, None, f_idx))
        out = self.dropout(self.ffn_output(inner, f_idx, None), deterministic=deterministic, rngs=rngs)
        return self.ffn_norm(out + x)


def _check_family(model):
    """The model's family, if its layers are what `ApsEncoderLayer` computes, else `FamilyError`."""
    fam = F.family_of(model)
    fam.require(*APS_SITES, what="the encoder width space")
    if "ffn_gate" in fam.layer_sites:
        raise F.FamilyError(f"the encoder width space searches a plain FFN; family {fam.name!r} has a "
                            "gated one (role 'ffn_gate')")
    return fam


def layer_norm_paths(model, i: int) -> tuple[str, str]:
    """Paths of layer ``i``'s LayerNorms after the attention block and after the FFN: the one
    beside the ``o`` site and the one beside the ``ffn_out`` site (post-LayerNorm layers)."""
    out = []
    for role in ("o", "ffn_out"):
        parent = F.site_path(model, i, role).rpartition(".")[0]
        norms = [f"{parent}.{name}" for name, m in vars(F.get_module(model, parent)).items()
                 if isinstance(m, nnx.LayerNorm)]
        if len(norms) != 1:
            raise F.FamilyError(f"the encoder width space needs post-LayerNorm layers (one LayerNorm beside "
                                f"the {role!r} site); {parent} of family {F.family_of(model).name!r} has "
                                f"{len(norms)}")
        out.append(norms[0])
    return tuple(out)


class ApsEncoder(nnx.Module):
    """A pretrained classifier's embeddings and head around APS layers holding its layer weights.

    ``model`` is a copy of ``pretrained`` without its layers (`efficient_nlp.models.family`
    finds the embeddings and runs the head, so any post-LayerNorm encoder family works);
    ``layers`` are `ApsEncoderLayer` whose meta weights are the pretrained site kernels.
    ``pretrained`` itself is left unchanged.
    """

    def __init__(self, pretrained, head_cands, ffn_cands, *, sharing: str = "ordinal"):
        fam = _check_family(pretrained)
        cfg = pretrained.config
        self.config = cfg
        self.head_cands, self.ffn_cands = tuple(head_cands), tuple(ffn_cands)
        self.model = nnx.clone(pretrained)
        layers = []
        for i in range(F.num_layers(self.model)):
            layer = ApsEncoderLayer(cfg.hidden_size, self.head_cands[i], self.ffn_cands[i],
                                    cfg.attention_head_dim, sharing=sharing, act=cfg.hidden_act,
                                    dropout=cfg.hidden_dropout_prob, eps=cfg.layer_norm_eps,
                                    rngs=nnx.Rngs(0))
            for role, attr in APS_SITES.items():
                src = F.get_module(self.model, F.site_path(self.model, i, role))
                getattr(layer, attr).kernel.set_value(src.kernel[...])
                getattr(layer, attr).bias.set_value(src.bias[...])
            layer.attn_norm, layer.ffn_norm = (F.get_module(self.model, p) for p in layer_norm_paths(self.model, i))
            layers.append(layer)
        F.set_module(self.model, fam.path(fam.layers), nnx.List([]))
        self.layers = nnx.List(layers)

    def __call__(self, input_ids, attention_mask, token_type_ids, arch, *, deterministic=True,
                 rngs=None):
        from efficient_nlp.models import attention_bias
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids}
        x = F.embed(self.model, batch, deterministic=deterministic, rngs=rngs)
        bias = attention_bias(attention_mask)
        for i, layer in enumerate(self.layers):
            h_idx = None if len(self.head_cands[i]) == 1 else arch[2 * i]
            f_idx = None if len(self.ffn_cands[i]) == 1 else arch[2 * i + 1]
            x = layer(x, bias, h_idx, f_idx, deterministic=deterministic, rngs=rngs)
        return F.head(self.model, x, deterministic=deterministic, rngs=rngs)


def encoder_child(supernet: ApsEncoder, arch, *, init: str = "inherit", seed: int = 0):
    """A physically smaller model of the pretrained model's class for ``arch`` (per-layer head
    counts and FFN widths); ``inherit`` copies the candidate kernels ``W^{i,o}`` of every site
    (and the embeddings, LayerNorms and head) from ``supernet``, ``scratch`` keeps a fresh init."""
    cfg = supernet.config
    n = cfg.num_hidden_layers
    heads = tuple(int(supernet.head_cands[i][arch[2 * i]]) for i in range(n))
    ffn = tuple(int(supernet.ffn_cands[i][arch[2 * i + 1]]) for i in range(n))
    new_cfg = cfg.replace(head_dim=cfg.attention_head_dim, layer_num_attention_heads=heads,
                          layer_intermediate_sizes=ffn)
    child = type(supernet.model)(new_cfg, rngs=nnx.Rngs(seed))
    if init == "scratch":
        return child
    if init != "inherit":
        raise ValueError(f"retrain.init must be 'inherit' or 'scratch', got {init!r}")
    for path in (F.embeddings_path(child), *F.head_paths(child)):
        F.set_module(child, path, F.get_module(supernet.model, path))
    for i, src in enumerate(supernet.layers):
        hi = None if len(supernet.head_cands[i]) == 1 else int(arch[2 * i])
        fi = None if len(supernet.ffn_cands[i]) == 1 else int(arch[2 * i + 1])
        for role, attr in APS_SITES.items():
            unit = hi if role in F.HEAD_ROLES else fi
            i_idx, o_idx = (None, unit) if role in F.OUTPUT_UNIT_ROLES else (unit, None)
            dst, aps = F.get_module(child, F.site_path(child, i, role)), getattr(src, attr)
            dst.kernel.set_value(aps.candidate_kernel(i_idx, o_idx))
            dst.bias.set_value(aps.candidate_bias(o_idx))
        for path, norm in zip(layer_norm_paths(child, i), (src.attn_norm, src.ffn_norm)):
            F.set_module(child, path, norm)
    return child


def encoder_space(cfg, seed: int = 0) -> SearchSpace:
    """Width space of a pretrained encoder classifier (``config.space``: kind, model_dir, task,
    max_length, max_train_examples, head_ratios, ffn_ratios, val_fraction, retrain_init); the
    space is named after ``kind`` (``encoder`` or ``bert``)."""
    from efficient_nlp import data as data_lib
    from efficient_nlp import models

    model_dir = cfg.model_dir or models.default_model_dir()
    td = data_lib.load_task_data(cfg.task, tokenizer_dir=model_dir, max_length=int(cfg.max_length),
                                 max_train_examples=int(cfg.max_train_examples) or None)
    mcfg = models.BertConfig.from_pretrained(model_dir)
    n_heads, inter = mcfg.num_attention_heads, mcfg.intermediate_size
    head_c = tuple(sorted({max(1, int(round(r * n_heads))) for r in cfg.head_ratios}))
    ffn_c = tuple(sorted({max(1, int(round(r * inter))) for r in cfg.ffn_ratios}))
    names, cands = [], []
    for i in range(mcfg.num_hidden_layers):
        names += [f"layer{i}.heads", f"layer{i}.ffn"]
        cands += [head_c, ffn_c]
    flops = encoder_flops_model(cands, mcfg, seq_len=int(cfg.max_length))
    train = td.train
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train["labels"]))
    n_val = int(round(float(cfg.val_fraction) * len(perm)))
    data = {"search_train": {k: v[perm[n_val:]] for k, v in train.items()},
            "val": {k: v[perm[:n_val]] for k, v in train.items()},
            "train": train, "test": td.dev}

    def supernet(sharing, seed_):
        pre = models.from_pretrained(model_dir, num_labels=td.spec.num_labels, seed=seed_)
        return ApsEncoder(pre, [head_c] * mcfg.num_hidden_layers, [ffn_c] * mcfg.num_hidden_layers,
                          sharing=sharing)

    def supernet_logits(model, batch, arch, train=False, rngs=None):
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], arch,
                     deterministic=not train, rngs=rngs)

    def child(arch, supernet_model=None, seed_=0):
        if supernet_model is None:
            supernet_model = supernet("ordinal", seed_)
        return encoder_child(supernet_model, arch, init=cfg.retrain_init, seed=seed_)

    def child_logits(model, batch, train=False, rngs=None):
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     deterministic=not train, rngs=rngs).logits

    return SearchSpace(str(cfg.get("kind", "encoder")), tuple(names), tuple(cands), flops, supernet,
                       supernet_logits, child, child_logits, data,
                       extra={"tokenizer": td.tokenizer, "spec": td.spec})


#: Earlier names of the encoder space's pieces.
ApsBertLayer, ApsBert, bert_child, bert_space = ApsEncoderLayer, ApsEncoder, encoder_child, encoder_space


#: Search spaces by ``config.space.kind``: name -> ``fn(space_config, seed) -> SearchSpace``.
SPACES: dict[str, Callable] = {"cnn": cnn_space, "encoder": encoder_space, "bert": encoder_space}


def register_space(name: str, fn: Callable) -> None:
    """Makes ``name`` a ``config.space.kind``: ``fn(space_config, seed) -> SearchSpace`` builds it
    from ``config.space`` (an ml_collections ConfigDict; every key but ``kind`` is the space's)
    and the run's seed.  Registration lasts for the process (a notebook cell works).  A taken
    name or a ``fn`` that cannot take two positional arguments raises ``ValueError``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"search space name must be an identifier string, got {name!r}")
    if name in SPACES:
        raise ValueError(f"search space {name!r} already exists; pick another name (taken: {sorted(SPACES)})")
    try:
        inspect.signature(fn).bind("space_config", "seed")
    except (TypeError, ValueError) as e:
        raise ValueError(f"register_space({name!r}): fn must be callable as fn(space_config, seed) -> "
                         f"SearchSpace ({e})") from None
    SPACES[name] = fn


def build_space(config) -> SearchSpace:
    """The space ``config.space.kind`` names in `SPACES` ("cnn", "encoder" / "bert" or a registered one)."""
    kind = config.space.kind
    if kind not in SPACES:
        raise ValueError(f"unknown config.space.kind {kind!r}; choose one of {sorted(SPACES)}")
    return SPACES[kind](config.space, int(config.seed))
