"""Tests of the causal-LM data layer: built-in corpus, BPE tokenizer, reading, packing,
batching and sliding-window perplexity. Fixture files are written to tmp_path; nothing is
downloaded."""

import hashlib
import json

import numpy as np
import pytest

from efficient_nlp import data
from efficient_nlp.data import corpus, lm
from efficient_nlp.data.lm_tokenizer import ENDOFTEXT, train_tokenizer


@pytest.fixture(scope="module")
def splits():
    return {s: data.builtin_corpus(s) for s in corpus.SPLITS}


@pytest.fixture(scope="module")
def tokenizer(splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    tok = train_tokenizer(splits["train"][:300], 512, out)
    return tok, str(out)


# ----------------------------------------------------------------------------- corpus


def test_corpus_split_and_order_are_hash_based_and_disjoint(splits):
    train, val = splits["train"], splits["validation"]
    assert not set(train) & set(val)
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    for name, docs in splits.items():
        hashes = [hashlib.sha256(d.encode("utf-8")).hexdigest() for d in docs]
        assert hashes == sorted(hashes)  # ordered by hash within the split
        expected = ["validation" if int(h[:8], 16) < 0.05 * 16**8 else "train" for h in hashes]
        assert set(expected) == {name}
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.07
    assert data.builtin_corpus("train") == train  # a fresh list, same documents


def test_corpus_documents_are_clean_and_sized(splits):
    stats = data.corpus_stats()
    for name, docs in splits.items():
        assert stats[name] == {"documents": len(docs), "characters": sum(map(len, docs))}
        for d in docs:
            assert d == d.strip("\n") and "\n\n" not in d and len(d.split()) >= corpus.MIN_WORDS
            assert all(line == line.rstrip() and "\t" not in line for line in d.split("\n"))
    assert stats["missing_modules"] == 0 and stats["topics"] > 50
    assert stats["train"]["characters"] + stats["validation"]["characters"] > 1_000_000
    with pytest.raises(ValueError, match="validation"):
        data.builtin_corpus("dev")


def test_clean_document_reflows_prose_and_keeps_code():
    doc = "Title\n=====\n\nSome   prose\nwrapped here.\n\n\n   >>> f(1)\n   2\n\n  grammar ::= x\t|  y  \n"
    want = "Title\nSome prose wrapped here.\n   >>> f(1)\n   2\n  grammar ::= x |  y"  # tab stop at column 16
    assert corpus.clean_document(doc) == want


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_saves_and_is_deterministic(tokenizer, splits):
    from transformers import AutoTokenizer

    tok, out = tokenizer
    assert len(tok) == 512
    assert tok.convert_tokens_to_ids(ENDOFTEXT) == 0
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == 0
    texts = ["Hello, world!  Two  spaces,\ttab and\nnewline.", "x=1; y = [2, 3]  # c", *splits["validation"][:50]]
    loaded = AutoTokenizer.from_pretrained(out)
    via_pipeline = data.load_tokenizer(out)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert 0 not in ids
        assert tok.decode(ids) == text
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert via_pipeline(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.eos_token_id == 0
    again = train_tokenizer(splits["train"][:300], 512)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="257"):
        train_tokenizer(["abc"], 100)


def test_tokenize_texts_matches_single_calls_without_length_warning(tokenizer):
    import logging

    tok, out = tokenizer
    tok = data.load_tokenizer(out)  # a private copy: model_max_length is changed below
    tok.model_max_length = 8
    texts = ["word " * 50, "short", "", "tail text " * 20]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        ids = lm.tokenize_texts(tok, texts, chunk_size=3)
        assert not any("longer than the specified maximum" in r.getMessage() for r in records)
        tok(texts[0])  # the warning the helper avoids does exist
        assert any("longer than the specified maximum" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
    assert ids == [tok.encode(t, add_special_tokens=False, verbose=False) for t in texts]
    assert len(ids[0]) > 8 and ids[2] == []


# ----------------------------------------------------------------------------- packing


def test_pack_is_an_exact_prefix_of_the_eos_joined_stream():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 100, size=n)) for n in (5, 0, 17, 1, 9, 30)]
    stream = []
    for d in docs:
        stream += [int(x) for x in d] + [0]
    for block_size in (1, 4, 7, 16, len(stream)):
        blocks = lm.pack(docs, block_size, eos_id=0)
        assert blocks.dtype == np.int32 and blocks.shape == (len(stream) // block_size, block_size)
        assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert lm.pack(docs, len(stream) + 1, eos_id=0).shape == (0, len(stream) + 1)
    assert lm.join_documents(docs, eos_id=0).tolist() == stream


def test_lm_blocks_reads_tokenizes_and_packs(tokenizer, tmp_path):
    tok, out = tokenizer
    texts = ["first document", "second one, a bit longer than the first", "third"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    blocks = lm.lm_blocks(out, str(path), "train", 4)
    assert np.array_equal(blocks, lm.pack(lm.tokenize_texts(tok, texts), 4, eos_id=0))
    assert np.array_equal(lm.lm_blocks(tok, path, "train", 4, max_documents=1),
                          lm.pack(lm.tokenize_texts(tok, texts[:1]), 4, eos_id=0))
    with pytest.raises(ValueError, match="fewer than block_size"):
        lm.lm_blocks(tok, path, "train", 10_000)


# ----------------------------------------------------------------------------- batches


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_lm_batches_resume_and_shards():
    blocks = np.arange(23 * 6, dtype=np.int32).reshape(23, 6)
    full = _take(lm.lm_batches(blocks, 4, seed=3, process_index=0, process_count=1), 12)
    for b in full:
        assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (4, 6)
        assert b["attention_mask"].dtype == np.int32 and (b["attention_mask"] == 1).all()
    epoch = np.concatenate([b["input_ids"][:, 0] for b in full[:5]])  # 23 // 4 = 5 steps per epoch
    assert len(set(epoch.tolist())) == 20
    resumed = _take(lm.lm_batches(blocks, 4, seed=3, start_step=7, process_index=0, process_count=1), 5)
    for a, b in zip(full[7:], resumed):
        assert np.array_equal(a["input_ids"], b["input_ids"])
    other_seed = _take(lm.lm_batches(blocks, 4, seed=4, process_index=0, process_count=1), 1)
    assert not np.array_equal(other_seed[0]["input_ids"], full[0]["input_ids"])
    for count in (2, 4):
        hosts = [_take(lm.lm_batches(blocks, 4, seed=3, process_index=p, process_count=count), 6) for p in range(count)]
        for k in range(6):
            parts = [h[k]["input_ids"] for h in hosts]
            assert all(len(p) == 4 // count for p in parts)
            assert np.array_equal(np.concatenate(parts), full[k]["input_ids"])


# ----------------------------------------------------------------------------- perplexity


V = 11


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def models():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(V, V)).astype(np.float32)
    pos = rng.normal(size=(64, V)).astype(np.float32)
    calls = []

    def bigram(ids):
        calls.append(ids.shape)
        return table[ids]

    def positional(ids):  # depends on the position in the window: checks which context is used
        calls.append(ids.shape)
        return table[ids] + pos[: ids.shape[1]]

    return table, bigram, positional, calls


def _reference(fn, ids, block_size, stride):
    """Hugging Face's strided loop, one unpadded window per call; (nll list, hit list)."""
    nll, hit, prev_end = [], [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + block_size, len(ids))
        window = ids[begin:end]
        logp = _log_softmax(fn(window[None])[0])
        for j in range(max(1, len(window) - (end - prev_end)), len(window)):
            nll.append(-logp[j - 1, window[j]])
            hit.append(np.argmax(logp[j - 1]) == window[j])
        prev_end = end
        if end == len(ids):
            break
    return np.array(nll), np.array(hit)


@pytest.mark.parametrize("length,block_size,stride,batch_size", [
    (203, 16, None, 4), (203, 16, 5, 3), (16, 16, 4, 8), (10, 16, None, 2), (57, 8, 1, 5),
])
def test_perplexity_matches_direct_computation(models, length, block_size, stride, batch_size):
    table, bigram, positional, calls = models
    ids = np.random.default_rng(length).integers(0, V, size=length)
    s = stride or block_size
    num_windows = 1 + max(0, -(-(length - block_size) // s))
    calls.clear()
    out = lm.perplexity(bigram, ids, block_size=block_size, stride=stride, batch_size=batch_size)
    assert set(calls) == {(batch_size, block_size)} and len(calls) == -(-num_windows // batch_size)
    # bigram: the NLL of token t only depends on token t-1; which tokens are scored is the question
    scored = np.arange(1, length)
    if s == block_size:
        scored = scored[scored % block_size != 0]  # disjoint windows: window starts have no context
    logp = _log_softmax(table[ids[scored - 1]])
    nll = -logp[np.arange(len(scored)), ids[scored]]
    assert out["tokens"] == len(scored) == (length - 1 if s < block_size else length - num_windows)
    assert out["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert out["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert out["token_accuracy"] == pytest.approx(np.mean(logp.argmax(-1) == ids[scored]))
    assert (out["block_size"], out["stride"]) == (block_size, s)
    ref_nll, ref_hit = _reference(positional, ids, block_size, s)
    got = lm.perplexity(positional, ids, block_size=block_size, stride=stride, batch_size=batch_size)
    assert got["tokens"] == len(ref_nll)
    assert got["nll"] == pytest.approx(ref_nll.mean(), rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(ref_hit.mean())


def test_blocks_perplexity_and_errors(models):
    table, bigram, _, calls = models
    blocks = np.random.default_rng(1).integers(0, V, size=(7, 9))
    calls.clear()
    out = lm.blocks_perplexity(bigram, blocks, batch_size=3)
    assert calls == [(3, 9)] * 3
    logp = _log_softmax(table[blocks[:, :-1]])
    nll = -np.take_along_axis(logp, blocks[:, 1:, None], -1)[..., 0]
    assert out["tokens"] == 7 * 8
    assert out["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert out["token_accuracy"] == pytest.approx(np.mean(logp.argmax(-1) == blocks[:, 1:]))
    stream = blocks.reshape(-1)
    assert lm.perplexity(bigram, stream, block_size=9, batch_size=3)["nll"] == pytest.approx(out["nll"], rel=1e-6)
    with pytest.raises(ValueError, match="stride"):
        lm.perplexity(bigram, stream, block_size=9, stride=10)
    with pytest.raises(ValueError, match="logits_fn returned shape"):
        lm.perplexity(lambda ids: table[ids][:, :-1], stream, block_size=9)
    with pytest.raises(ValueError, match="1-D integer"):
        lm.perplexity(bigram, blocks, block_size=9)


# ----------------------------------------------------------------------------- reading


def test_read_texts_local_formats(tmp_path, splits):
    txt = tmp_path / "docs.txt"
    txt.write_bytes(b"\xef\xbb\xbfFirst line\r\n  indented second\r\n\r\n \t \nSecond doc\n\n\n\nThird\n")
    assert lm.read_texts(str(txt)) == ["First line\n  indented second", "Second doc", "Third"]
    round_trip = tmp_path / "val.txt"
    round_trip.write_text("\n\n".join(splits["validation"]) + "\n", encoding="utf-8")
    assert lm.read_texts(round_trip) == splits["validation"] == lm.read_texts("builtin", "validation")

    rows = [{"text": "a b", "n": 1}, {"text": "", "n": 2}, {"text": "c\nd", "n": 3}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lm.read_texts(str(jsonl)) == ["a b", "c\nd"]
    as_array = tmp_path / "docs.json"
    as_array.write_text(json.dumps([{"body": "x y"}, {"body": None}, {"body": "z"}]))
    assert lm.read_texts(str(as_array), text_column="body") == ["x y", "z"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["p q", "r"], "text": ["t1", "t2"]}), parquet)
    assert lm.read_texts(str(parquet), text_column="content") == ["p q", "r"]
    assert lm.read_texts(str(parquet)) == ["t1", "t2"]


def test_read_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        lm.read_texts(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file extension '\.csv'.*\.txt"):
        lm.read_texts(str(csv))
    with pytest.raises(IsADirectoryError, match="pass one file"):
        lm.read_texts(tmp_path)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"'text' not found.*\['body'\].*text_column"):
        lm.read_texts(str(jsonl))
    jsonl.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(ValueError, match="row 0.*int"):
        lm.read_texts(str(jsonl))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="could not read .*bad.jsonl"):
        lm.read_texts(str(bad))
    with pytest.raises(ValueError, match="validation"):
        lm.read_texts("builtin", "test")


def test_read_texts_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    seen = []

    def fake_load(name, config=None, split=None, **kwargs):
        seen.append((name, config, split))
        if name == "offline/corpus":
            raise ConnectionError("no network")
        return datasets.Dataset.from_dict({"text": ["hub doc", " "], "label": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert lm.read_texts("org/corpus", "validation", config="v1") == ["hub doc"]
    assert seen == [("org/corpus", "v1", "validation")]
    with pytest.raises(RuntimeError, match=r"'offline/corpus'.*ConnectionError.*'builtin'"):
        lm.read_texts("offline/corpus")
