"""Text generation: the cached decode equals recomputing the prefix, greedy equals transformers'
``generate``, sampling follows the filtered softmax, the decode step compiles once, eos stops rows."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_nlp import models
from efficient_nlp.models.generate import generate, sample_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, EOS, PAD = 64, 5, 0
NEW = 10  # new tokens in most tests


def hf_model(kind):
    t = transformers
    special = dict(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
    if kind == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=48, **special)
        cls = t.GPT2LMHeadModel
    elif kind == "llama":  # grouped-query attention: 2 key/value heads for 4 query heads
        cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **special)
        cls = t.LlamaForCausalLM
    else:
        cfg = t.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, **special)
        cls = t.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # large matrices (norms kept at 1): varied text, greedy choices far from ties
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """kind -> (transformers model, our model loaded from its saved directory)."""
    out = {}
    for kind in ("gpt2", "llama", "qwen2"):
        hf = hf_model(kind)
        path = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(path)
        out[kind] = (hf, models.from_pretrained(str(path)))
    return out


def prompts(batch=2, length=7, seed=0):
    """Left-padded prompts: row r has ``length - 3 r`` tokens (ids above the special tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, VOCAB, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for r in range(1, batch):
        mask[r, :3 * r] = 0
        ids[r, :3 * r] = PAD
    return ids, mask


def recomputed_greedy(model, ids, mask, steps):
    """Greedy decoding without a cache: at every step the whole sequence goes through the model
    (one fixed length, so one compilation; slots after the current one are causally invisible)."""
    t = ids.shape[1]
    ids = np.concatenate([ids, np.full((len(ids), steps), PAD, ids.dtype)], axis=1)
    mask = np.concatenate([mask, np.ones((len(ids), steps), mask.dtype)], axis=1)
    positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0)
    forward = nnx.jit(lambda m, x: m(x, jnp.asarray(mask), position_ids=jnp.asarray(positions)).logits)
    logits_per_step = []
    for i in range(steps):
        logits = np.asarray(forward(model, jnp.asarray(ids)))[:, t + i - 1]
        logits_per_step.append(logits)
        ids[:, t + i] = logits.argmax(-1)
    return ids, np.stack(logits_per_step, axis=1)


def free_run(model, ids, mask):
    """Greedy, never stopping, with the logits of every step (one compilation shared by the tests)."""
    return generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=(), return_logits=True)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_greedy_equals_recomputing_the_prefix(pairs, kind):
    model = pairs[kind][1]
    ids, mask = prompts()
    tokens, logits = free_run(model, ids, mask)
    ref_tokens, ref_logits = recomputed_greedy(model, ids, mask, NEW)
    np.testing.assert_array_equal(tokens, ref_tokens)
    scale = np.abs(ref_logits).max()  # logits reach ~10^2 with these weights: float32 rounding is relative
    assert scale > 1.0 and np.abs(logits - ref_logits).max() <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_greedy_equals_transformers_generate(pairs, kind):
    hf, model = pairs[kind]
    ids, mask = prompts()
    free = free_run(model, ids, mask)[0]
    eos = int(free[0, ids.shape[1] + 3])  # row 0 stops at its 4th new token: both must stop alike
    ours = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                          do_sample=False, eos_token_id=eos, pad_token_id=PAD).numpy()
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == PAD).all()  # transformers drops the columns after every row stopped
    assert ours[0, ids.shape[1] + 4:].tolist() == [PAD] * (NEW - 4)


def test_top_k_1_is_greedy_and_sampling_is_seeded(pairs):
    model = pairs["llama"][1]
    ids, mask = prompts()
    greedy = free_run(model, ids, mask)[0]
    top1 = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=(), do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(top1, greedy)
    kw = dict(max_new_tokens=NEW, eos_token_id=(), do_sample=True, temperature=2.0)
    a, b, c = (generate(model, ids, mask, seed=s, **kw) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()


def filtered_softmax(logits, temperature, top_k, top_p):
    """Reference: softmax(logits / T) over the top_k, then the smallest top set with mass >= top_p."""
    order = np.argsort(-logits)
    keep = order[:top_k] if top_k else order
    p = np.exp(logits[keep] / temperature - np.max(logits[keep] / temperature))
    p /= p.sum()
    if top_p is not None:
        n = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # first index whose cumulative mass reaches top_p
        keep, p = keep[:n], p[:n] / p[:n].sum()
    out = np.zeros_like(logits)
    out[keep] = p
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, 0.8), (1.3, 3, None), (1.0, 5, 0.6),
                                                     (2.0, None, None)])
def test_sampling_distribution_matches_filtered_softmax(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0.0, 1.5, 8).astype(np.float32)
    draws = 6000
    tokens = np.asarray(sample_logits(jnp.tile(logits, (draws, 1)), jax.random.key(0), temperature, top_k=top_k,
                                      top_p=top_p))
    freq = np.bincount(tokens, minlength=8) / draws
    expected = filtered_softmax(logits, temperature, top_k, top_p)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    np.testing.assert_allclose(freq, expected, atol=0.025)  # about 4 standard deviations


def test_decode_step_compiles_once(pairs, monkeypatch):
    model = pairs["llama"][1]
    calls = []
    original = models.DecoderForCausalLM.__call__

    def counting(self, *args, **kwargs):  # runs at trace time only, inside the jitted functions
        calls.append(kwargs["cache"].max_len)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(models.DecoderForCausalLM, "__call__", counting)
    ids, mask = prompts(batch=3, length=9)  # shapes no other test uses
    generate(model, ids, mask, max_new_tokens=11, eos_token_id=())
    assert calls == [20, 20]  # one prefill trace and one decode-step trace for 11 tokens
    traces = []
    listener = lambda name, *_, **__: traces.append(name) if "jaxpr_trace" in name else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for seed in (1, 2):  # other prompts of the same shapes
            generate(model, *prompts(batch=3, length=9, seed=seed), max_new_tokens=11, eos_token_id=())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert calls == [20, 20] and traces == []


def test_eos_rows_are_padded_and_generation_stops_early(pairs):
    model = pairs["llama"][1]
    ids, mask = prompts()
    t = ids.shape[1]
    free = free_run(model, ids, mask)[0][:, t:]
    eos = (int(free[0, 2]), int(free[1, 4]))  # several eos ids: row 0 stops by its 3rd token, row 1 by its 5th
    stops = [int(np.flatnonzero(np.isin(row, eos))[0]) for row in free]
    assert stops[0] <= 2 and stops[1] <= 4
    for pad, kwargs in ((7, dict(pad_token_id=7)), (PAD, {})):  # default: the config's pad id
        tokens, logits = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, return_logits=True,
                                  **kwargs)
        expected = free.copy()
        for r, stop in enumerate(stops):
            expected[r, stop + 1:] = pad
        np.testing.assert_array_equal(tokens, np.concatenate([ids, expected], axis=1))
        ran = np.abs(logits).sum(axis=(0, 2)) > 0
        assert ran.tolist() == [i <= max(stops) for i in range(NEW)]  # no step after every row stopped


def test_one_new_token(pairs):
    model = pairs["qwen2"][1]
    ids, mask = prompts()
    one = generate(model, ids, mask, max_new_tokens=1, eos_token_id=())
    np.testing.assert_array_equal(one, free_run(model, ids, mask)[0][:, :8])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=2, do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(max_new_tokens=2, do_sample=True, top_p=0.0), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, top_p=1.5), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=2, do_sample=True, top_k=0), "top_k must be None or an int >= 1"),
    (dict(max_new_tokens=42), "exceeds the model's max_position_embeddings=48"),
    (dict(max_new_tokens=2, right_pad=True), "LEFT-padded"),
    (dict(max_new_tokens=2, empty_row=True), "no token"),
    (dict(max_new_tokens=2, one_d=True), r"input_ids\[None\]"),
])
def test_clear_errors(pairs, kwargs, match):
    model = pairs["gpt2"][1]
    ids, mask = prompts()
    if kwargs.pop("right_pad", False):
        mask = mask[:, ::-1].copy()
    if kwargs.pop("empty_row", False):
        mask[1] = 0
    if kwargs.pop("one_d", False):
        ids, mask = ids[0], None
    with pytest.raises(ValueError, match=match):
        generate(model, ids, mask, **kwargs)


def test_bare_decoder_is_refused():
    cfg = models.DecoderConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8)
    with pytest.raises(TypeError, match="DecoderForCausalLM"):
        generate(models.DecoderModel(cfg, rngs=nnx.Rngs(0)), np.ones((1, 2), np.int32), max_new_tokens=1)
