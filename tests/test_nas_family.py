"""The encoder width space reads the model family: on BERT the supernet and the child hold
exactly the weights the BERT-only code put there; on RoBERTa / DistilBERT the child of an
architecture computes what the supernet computes on that architecture."""
import jax
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import models, nas
from efficient_nlp.models import family as F
from efficient_nlp.nas import flops as flops_lib
from efficient_nlp.nas import spaces

BERT = models.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=32, num_labels=3)
FAMILIES = {
    "roberta": BERT.replace(model_type="roberta", pad_token_id=1, max_position_embeddings=40, type_vocab_size=1),
    "distilbert": BERT.replace(model_type="distilbert", type_vocab_size=0),
}
HEADS, FFN = [(1, 2)] * 2, [(12, 24)] * 2
#: The former supernet <- pretrained pairs, spelled out for BERT (APS attribute, BERT layer module).
FORMER_PAIRS = {"query": "attention.query", "key": "attention.key", "value": "attention.value",
                "output": "attention.output", "intermediate": "ffn.intermediate", "ffn_output": "ffn.output"}


def args(b=3, t=9, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), np.int32)
    mask[1, 5:] = 0
    return rng.integers(2, 60, (b, t)).astype(np.int32), mask, np.zeros((b, t), np.int32)


def _params(module):
    return jax.tree.map(np.asarray, nnx.state(module, nnx.Param))


def test_bert_supernet_and_child_hold_the_former_weights():
    pre = models.BertForSequenceClassification(BERT, rngs=nnx.Rngs(0))
    sup = nas.ApsEncoder(pre, HEADS, FFN)
    assert nas.ApsBert is nas.ApsEncoder and nas.bert_child is nas.encoder_child
    for i, layer in enumerate(sup.layers):
        src = pre.bert.encoder.layers[i]
        for attr, sub in FORMER_PAIRS.items():
            np.testing.assert_array_equal(getattr(layer, attr).kernel[...], F.get_module(src, sub).kernel[...])
            np.testing.assert_array_equal(getattr(layer, attr).bias[...], F.get_module(src, sub).bias[...])
        jax.tree.map(np.testing.assert_array_equal, _params(layer.attn_norm), _params(src.attention.layer_norm))
        jax.tree.map(np.testing.assert_array_equal, _params(layer.ffn_norm), _params(src.ffn.layer_norm))
    for ours, theirs in ((sup.model.bert.embeddings, pre.bert.embeddings), (sup.model.bert.pooler, pre.bert.pooler),
                         (sup.model.classifier, pre.classifier)):
        jax.tree.map(np.testing.assert_array_equal, _params(ours), _params(theirs))
    assert len(pre.bert.encoder.layers) == 2          # the pretrained model is left whole
    np.testing.assert_array_equal(sup(*args(), np.array([1, 1, 1, 1])), pre(*args()).logits)

    arch = np.array([0, 1, 1, 0])
    child = nas.encoder_child(sup, arch)
    assert type(child) is models.BertForSequenceClassification
    assert child.config.layer_num_attention_heads == (1, 2) and child.config.layer_intermediate_sizes == (24, 12)
    for i, (dst, src) in enumerate(zip(child.bert.encoder.layers, sup.layers)):   # the former copy
        hi, fi = int(arch[2 * i]), int(arch[2 * i + 1])
        for attr, i_idx, o_idx in (("query", None, hi), ("key", None, hi), ("value", None, hi),
                                   ("output", hi, None), ("intermediate", None, fi), ("ffn_output", fi, None)):
            d, s = F.get_module(dst, FORMER_PAIRS[attr]), getattr(src, attr)
            np.testing.assert_array_equal(d.kernel[...], s.candidate_kernel(i_idx, o_idx))
            np.testing.assert_array_equal(d.bias[...], s.candidate_bias(o_idx))
        assert dst.attention.layer_norm is src.attn_norm and dst.ffn.layer_norm is src.ffn_norm
    assert child.bert.embeddings is sup.model.bert.embeddings and child.bert.pooler is sup.model.bert.pooler
    assert child.classifier is sup.model.classifier
    np.testing.assert_allclose(child(*args()).logits, sup(*args(), arch), atol=1e-6)


@pytest.mark.parametrize("family, sharing", [("roberta", "ordinal"), ("distilbert", "ordinal"),
                                             ("distilbert", "independent")])
def test_child_computes_the_supernet_path_on_other_families(family, sharing):
    pre = models.BertForSequenceClassification(FAMILIES[family], rngs=nnx.Rngs(0))
    sup = nas.ApsEncoder(pre, HEADS, FFN, sharing=sharing)
    if sharing == "ordinal":   # the widest ordinal candidate is the pretrained model
        np.testing.assert_allclose(sup(*args(), np.array([1, 1, 1, 1])), pre(*args()).logits, atol=1e-6)
    for arch in (np.array([0, 1, 1, 0]), np.array([0, 0, 0, 0])):
        child = nas.encoder_child(sup, arch)
        assert [F.head_layout(child, i).num_heads for i in range(2)] == [HEADS[i][arch[2 * i]] for i in range(2)]
        assert [F.num_neurons(child, i) for i in range(2)] == [FFN[i][arch[2 * i + 1]] for i in range(2)]
        np.testing.assert_allclose(child(*args()).logits, sup(*args(), arch), atol=1e-5)


def test_a_model_without_a_family_is_refused():
    cnn = spaces.ApsResNet(spaces.cnn_decisions(1)[1], blocks_per_stage=1, rngs=nnx.Rngs(0))
    with pytest.raises(F.FamilyError, match="no family describes it"):
        nas.ApsEncoder(cnn, HEADS, FFN)


def test_encoder_space_names_and_flops_from_the_config():
    assert spaces.SPACES["encoder"] is spaces.SPACES["bert"] is spaces.encoder_space
    cfg = FAMILIES["distilbert"].replace(head_dim=8, layer_num_attention_heads=(1, 2), layer_intermediate_sizes=(24, 12))
    from efficient_nlp.prune.shrink import flops as shrink_flops
    fm = flops_lib.encoder_flops_model([(1, 2), (12, 24)] * 2, FAMILIES["distilbert"], seq_len=9)
    assert fm(np.asarray([0, 1, 1, 0])) == shrink_flops(cfg, 9)


def test_encoder_space_end_to_end_on_a_tiny_distilbert(make_tiny_model_dir):
    import ml_collections
    model_dir = make_tiny_model_dir("tiny_distilbert_nas", hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                    max_position_embeddings=32, model_type="distilbert", type_vocab_size=0)
    space = nas.build_space(ml_collections.ConfigDict(dict(seed=0, space=dict(
        kind="encoder", model_dir=model_dir, task="builtin", max_length=12, max_train_examples=8,
        head_ratios=(0.5, 1.0), ffn_ratios=(0.5, 1.0), val_fraction=0.25, retrain_init="inherit"))))
    assert space.name == "encoder" and space.decisions == ("layer0.heads", "layer0.ffn", "layer1.heads", "layer1.ffn")
    assert space.candidates == ((1, 2), (12, 24)) * 2
    sup = space.supernet("ordinal", 0)
    arch = np.array([1, 0, 0, 1])
    child = space.child(arch, sup, 0)
    batch = {k: v[:4] for k, v in space.data["val"].items()}
    np.testing.assert_allclose(space.child_logits(child, batch), space.supernet_logits(sup, batch, arch), atol=1e-5)
    assert space.flops(arch) < space.flops.max()


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "electra"])
def test_encoder_flops_model_equals_forward_flops_of_the_resized_config(kind):
    from efficient_nlp.models.flops import forward_flops
    base = {"bert": BERT, "electra": BERT.replace(model_type="electra", embedding_size=8), **FAMILIES}[kind]
    fm = flops_lib.encoder_flops_model(HEADS[:1] + FFN[:1] + HEADS[1:] + FFN[1:], base, seq_len=9)
    for arch in ([0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]):
        widths = fm.widths(arch)
        heads, neurons = [list(range(widths[0])), list(range(widths[2]))], [list(range(widths[1])),
                                                                             list(range(widths[3]))]
        cfg = F.resized_config(base, [0, 1], heads, neurons)
        assert fm(np.asarray(arch)) == forward_flops(cfg, 9)
