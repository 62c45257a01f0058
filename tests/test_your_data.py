"""Fine-tuning on your own files: num_labels inferred from the labels, the data settings saved next
to the model (and the class names in its config.json), and errors that name the --config.data flag.

All files are written to tmp_path; the tokenizer is the embedded MiniLM's.
"""

import csv
import json
import os

import numpy as np
import pytest

from efficient_nlp import data, models

from _tiny import tiny_bert
from test_data import MINILM_DIR, tokenizer  # noqa: F401  (the MiniLM tokenizer fixture)


def _write(path, header, rows):
    """``rows`` under ``header`` in the format of ``path``'s extension."""
    path = str(path)
    ext = os.path.splitext(path)[1]
    if ext == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    elif ext == ".tsv":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines("\t".join(str(x) for x in r) + "\n" for r in [header, *rows])
    elif ext == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(zip(header, r))) + "\n" for r in rows)
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
    return path


REVIEWS = [("a fine film", "pos"), ("dull and long", "neg"), ("so so", "mixed"), ("loved it", "pos"),
           ("hated it", "neg")]


def _files(tokenizer, train, dev=None, **kw):
    return data.load_task_data("files", tokenizer_dir=tokenizer, train_file=train, dev_file=dev,
                               max_length=12, **kw)


# ----------------------------------------------------------------------------- num_labels


def test_num_labels_is_max_class_id_plus_one(tmp_path, tokenizer):
    rows = [("one", 0), ("two", 2), ("three", 1), ("four", 2)]
    train = _write(tmp_path / "train.csv", ["text", "label"], rows)
    dev = _write(tmp_path / "dev.csv", ["text", "label"], rows[:2])
    td = _files(tokenizer, train, dev, text_a="text")
    assert td.spec.num_labels == 3 and td.spec.label_names is None
    assert td.spec.metrics == ("accuracy",)
    np.testing.assert_array_equal(td.train["labels"], [0, 2, 1, 2])
    # A dev id beyond the train ids is reported with its row and the flag to set.
    bad_dev = _write(tmp_path / "bad_dev.csv", ["text", "label"], [("x", 1), ("y", 3)])
    with pytest.raises(ValueError, match=r"row 1 .*label '3' is out of range.*\[0, 3\).*--config\.data\.num_labels"):
        _files(tokenizer, train, bad_dev, text_a="text")
    # An explicit num_labels wins over the inferred one.
    assert _files(tokenizer, train, dev, text_a="text", num_labels=5).spec.num_labels == 5


def test_num_labels_is_the_number_of_string_labels(tmp_path, tokenizer):
    train = _write(tmp_path / "train.csv", ["review", "label"], REVIEWS)
    td = _files(tokenizer, train, text_a="review")
    assert td.spec.num_labels == 3 and td.spec.label_names == ("mixed", "neg", "pos")
    np.testing.assert_array_equal(td.train["labels"], [2, 1, 0, 2, 1])


@pytest.mark.parametrize("labels", [(0.5, 1.0), ("0.25", "3")])
def test_non_integer_labels_without_num_labels_ask_for_regression(tmp_path, tokenizer, labels):
    path = tmp_path / ("a.jsonl" if isinstance(labels[0], float) else "a.csv")
    train = _write(path, ["text", "score"], [("x y", labels[0]), ("z", labels[1])])
    with pytest.raises(ValueError, match=r"row 0 .*looks like regression: set --config\.data\.num_labels=1"):
        _files(tokenizer, train, text_a="text", label="score")
    td = _files(tokenizer, train, text_a="text", label="score", num_labels=1)
    assert td.train["labels"].dtype == np.float32 and td.spec.metrics == ("pearson", "spearman")
    np.testing.assert_allclose(td.train["labels"], [float(v) for v in labels])


@pytest.mark.parametrize("rows, message", [
    ([("a", 0), ("b", 0)], "every label in column 'label' is 0"),
    ([("a", "pos"), ("b", "pos")], "single class 'pos'"),
    ([("a", 1), ("b", -1)], r"row 1 .*'-1' is negative"),
])
def test_labels_that_give_no_classifier_are_rejected(tmp_path, tokenizer, rows, message):
    train = _write(tmp_path / "a.csv", ["text", "label"], rows)
    with pytest.raises(ValueError, match=message):
        _files(tokenizer, train, text_a="text")


# ----------------------------------------------------------------------------- formats


def test_tsv_sentence_pairs(tmp_path, tokenizer):
    rows = [("A man plays.", "Someone plays.", "yes"), ("A cat sleeps.", "A dog runs.", "no"),
            ('He said "hi".', "He spoke.", "yes")]
    train = _write(tmp_path / "pairs.tsv", ["premise", "hypothesis", "entails"], rows)
    td = _files(tokenizer, train, text_a="premise", text_b="hypothesis", label="entails")
    assert td.spec.is_pair and td.spec.label_names == ("no", "yes")
    np.testing.assert_array_equal(td.train["labels"], [1, 0, 1])
    expected = tokenizer('He said "hi".', "He spoke.", max_length=12, truncation=True, padding="max_length")
    np.testing.assert_array_equal(td.train["input_ids"][2], expected["input_ids"])
    np.testing.assert_array_equal(td.train["token_type_ids"][2], expected["token_type_ids"])
    assert td.train["token_type_ids"][2].max() == 1


@pytest.mark.parametrize("ext", [".jsonl", ".parquet"])
@pytest.mark.parametrize("rows", [REVIEWS, [(t, i % 3) for i, (t, _) in enumerate(REVIEWS)]])
def test_jsonl_and_parquet_read_as_csv(tmp_path, tokenizer, ext, rows):
    ref = _files(tokenizer, _write(tmp_path / "ref.csv", ["review", "label"], rows), text_a="review")
    got = _files(tokenizer, _write(tmp_path / f"got{ext}", ["review", "label"], rows), text_a="review")
    assert (got.spec.num_labels, got.spec.label_names) == (ref.spec.num_labels, ref.spec.label_names)
    assert sorted(got.train) == sorted(ref.train)
    for k, v in ref.train.items():
        np.testing.assert_array_equal(got.train[k], v, err_msg=k)


# ----------------------------------------------------------------------------- saved settings


def test_string_labels_round_trip_through_saved_settings(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write("train.csv", ["review", "label"], REVIEWS)
    _write("dev.csv", ["review", "label"], REVIEWS[:3])
    section = dict(task="files", data_dir="", train_file="train.csv", dev_file="dev.csv", text_a="review",
                   text_b="", label="", num_labels=0, max_length=12, max_train_examples=0)
    td = _files(tokenizer, "train.csv", "dev.csv", text_a="review")
    model_dir = tmp_path / "model"
    models.save_hf_checkpoint(tiny_bert(labels=3), str(model_dir))
    written = data.save_data_settings(model_dir, section, td.spec)
    assert written == str(model_dir / "efficient_nlp_data.json")

    saved = data.load_data_settings(model_dir)
    assert saved["label_names"] == td.spec.label_names == ("mixed", "neg", "pos")
    assert saved["num_labels"] == 3 and saved["label"] == "label" and saved["max_length"] == 12
    assert saved["train_file"] == str(tmp_path / "train.csv") and saved["dev_file"] == str(tmp_path / "dev.csv")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "mixed", "1": "neg", "2": "pos"}
    assert config["label2id"] == {"mixed": 0, "neg": 1, "pos": 2}
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoConfig.from_pretrained(str(model_dir)).id2label == {0: "mixed", 1: "neg", 2: "pos"}
    assert models.from_pretrained(str(model_dir), head="classification").config.num_labels == 3

    # From another directory, the saved settings alone load the same data with the same class ids.
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    again = data.load_task_data(
        saved["task"], tokenizer_dir=tokenizer, max_length=saved["max_length"], train_file=saved["train_file"],
        dev_file=saved["dev_file"], text_a=saved["text_a"], label=saved["label"], num_labels=saved["num_labels"],
        label_names=saved["label_names"])
    for split in ("train", "dev"):
        for k, v in getattr(td, split).items():
            np.testing.assert_array_equal(getattr(again, split)[k], v)


def test_save_data_settings_needs_the_saved_model_for_names(tmp_path):
    spec = data.TaskSpec("files", "text", None, "label", 2, ("accuracy",), label_names=("a", "b"))
    with pytest.raises(FileNotFoundError, match="config.json not found: save the model first"):
        data.save_data_settings(tmp_path, {"task": "files", "max_length": 8}, spec)
    models.save_hf_checkpoint(tiny_bert(labels=3), str(tmp_path))
    with pytest.raises(ValueError, match="head with 3 labels but the data has 2 classes"):
        data.save_data_settings(tmp_path, {"task": "files", "max_length": 8}, spec)
    assert not (tmp_path / "efficient_nlp_data.json").exists()


def test_load_data_settings_absent_foreign_and_malformed(tmp_path):
    assert data.load_data_settings(tmp_path) is None
    path = tmp_path / "efficient_nlp_data.json"
    path.write_text('{"task": "files", "max_length": 8')
    with pytest.raises(ValueError, match=r"efficient_nlp_data\.json is not valid JSON"):
        data.load_data_settings(tmp_path)
    path.write_text('{"task": "files", "num_labels": 0, "max_length": 8, "label_names": ["a"]}')
    with pytest.raises(ValueError) as e:
        data.load_data_settings(tmp_path)
    assert str(path) in str(e.value) and "num_labels must be an integer >= 1, got 0" in str(e.value)


DEFAULTS = dict(task="builtin", data_dir="", train_file="", dev_file="", text_a="", text_b="", label="",
                num_labels=0, max_length=64, max_train_examples=0)
SAVED = dict(task="files", data_dir="", train_file="/d/train.csv", dev_file="/d/dev.csv", text_a="review",
             text_b="", label="label", num_labels=3, label_names=("mixed", "neg", "pos"), max_length=128,
             max_train_examples=0)


def test_merge_data_settings_reuses_the_teachers_data_unless_the_section_names_its_own():
    assert data.merge_data_settings(DEFAULTS, DEFAULTS, SAVED) == SAVED
    assert data.merge_data_settings(DEFAULTS, DEFAULTS, None) == {**DEFAULTS, "label_names": None}
    # max_length / max_train_examples given by the user win; the task is still the teacher's.
    mine = {**DEFAULTS, "max_length": 32, "max_train_examples": 100}
    assert data.merge_data_settings(mine, DEFAULTS, SAVED) == {**SAVED, "max_length": 32, "max_train_examples": 100}
    # A section that names its own data is kept whole.
    sst2 = {**DEFAULTS, "task": "sst2"}
    assert data.merge_data_settings(sst2, DEFAULTS, SAVED) == {**sst2, "label_names": None}


# ----------------------------------------------------------------------------- errors name the flag


def test_errors_name_the_config_flag(tmp_path, tokenizer):
    train = _write(tmp_path / "train.csv", ["sentence", "target"], [("hi there", 1), ("bye", 0)])
    with pytest.raises(ValueError) as e:
        _files(tokenizer, train)
    assert "set text_a (--config.data.text_a=<column>" in str(e.value)
    assert "columns in " + train + ": ['sentence', 'target']" in str(e.value)
    with pytest.raises(ValueError, match=r"label column 'label' not found: set label \(--config\.data\.label="):
        _files(tokenizer, train, text_a="sentence")
    with pytest.raises(ValueError, match=r"text_b column 'other' not found: set text_b \(--config\.data\.text_b="):
        _files(tokenizer, train, text_a="sentence", text_b="other", label="target", num_labels=2)
    with pytest.raises(ValueError, match=r"set train_file \(--config\.data\.train_file=<path>"):
        data.load_task_data("files", tokenizer_dir=tokenizer, text_a="sentence")
    with pytest.raises(FileNotFoundError, match=r"train file not found: .*nope\.csv.*--config\.data\.train_file"):
        _files(tokenizer, str(tmp_path / "nope.csv"), text_a="sentence")
    with pytest.raises(FileNotFoundError, match=r"dev file not found: .*nope\.csv.*--config\.data\.dev_file"):
        _files(tokenizer, train, str(tmp_path / "nope.csv"), text_a="sentence", label="target")
    with pytest.raises(FileNotFoundError, match=r"sst2 train file not found.*--config\.data\.data_dir"):
        data.load_task_data("sst2", tokenizer_dir=tokenizer, data_dir=str(tmp_path / "glue"))
    with pytest.raises(ValueError, match=r"unknown task 'sst9' \(--config\.data\.task\)"):
        data.load_task_data("sst9", tokenizer_dir=tokenizer)
    with pytest.raises(ValueError, match=r"found 2 string labels .* set --config\.data\.num_labels=2"):
        _files(tokenizer, _write(tmp_path / "s.csv", ["t", "label"], [("a", "x"), ("b", "y")]), text_a="t",
               num_labels=3)


def test_missing_model_directory_and_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_tokenizer(tmp_path / "nonexist")
    msg = str(e.value)
    assert msg.startswith(f"model directory not found: {tmp_path / 'nonexist'} (")
    assert "--config.model_dir" in msg and "--config.teacher_dir" in msg and "embedded MiniLM" in msg
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        data.load_tokenizer(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"no tokenizer files in model directory {tmp_path} (it holds: config.json;")
    assert "vocab.txt" in msg and "save_pretrained" in msg
