"""The ``peft``, ``lowrank`` and ``sharing`` recipes end to end on tiny models: what they save
reloads into the model they measured, the accounting orders the methods as it must, and bad
settings fail before anything runs."""
import importlib
import os

import pytest

from efficient_nlp import data as data_lib
from efficient_nlp import lowrank, models, peft, sharing
from efficient_nlp import train
from efficient_nlp.recipes import lowrank as lowrank_recipe
from efficient_nlp.recipes import peft as peft_recipe
from efficient_nlp.recipes import run_recipe
from efficient_nlp.recipes.common import load_data


def _tiny(config, **data):
    config.data.update(dict(max_length=16, max_train_examples=64, **data))
    config.train.update(dict(num_steps=3, batch_size=8, eval_batch_size=32, eval_every=0, checkpoint_every=0,
                             progress_bar=False, tensorboard=False))
    return config


def _dev_metrics(config, model_dir, model):
    task = load_data(config, model_dir)
    logits = train.predict(model, task.dev, 32)
    return data_lib.compute_metrics(task.spec, logits, task.dev["labels"], None)


@pytest.fixture(scope="module")
def tiny_classifier_dir(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_peft", model_cls=models.BertForSequenceClassification, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=32, num_labels=9)


def test_peft_recipe_accounts_each_method_and_its_saved_adapters_reload_exactly(tiny_classifier_dir, tmp_path):
    config = _tiny(importlib.import_module("configs.peft").get_config(), num_labels=9)
    config.model_dir = tiny_classifier_dir
    config.peft.update(dict(methods="full,lora,qlora", block_size=32, dropout=0.1, save_merged=True))
    results = run_recipe(config, str(tmp_path))
    rows = results["methods"]
    assert rows["full"]["trainable_params"] == results["base_params"]
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["lora"]["memory"]["optimizer_bytes"] < rows["full"]["memory"]["optimizer_bytes"]
    # the packed 4-bit base is the frozen state that shrinks
    assert rows["qlora"]["memory"]["frozen_bytes"] < rows["lora"]["memory"]["frozen_bytes"]

    base = models.from_pretrained(tiny_classifier_dir, num_labels=9)
    lora = peft.load_peft_dir(base, os.path.join(tmp_path, "lora", "adapter"))
    assert _dev_metrics(config, tiny_classifier_dir, lora) == pytest.approx(rows["lora"]["dev_after"], abs=1e-6)
    packed, _ = peft.qlora.quantize_base(base, grid="nf4", block_size=32)
    qlora = peft.load_peft_dir(packed, os.path.join(tmp_path, "qlora", "adapter"))
    assert _dev_metrics(config, tiny_classifier_dir, qlora) == pytest.approx(rows["qlora"]["dev_after"], abs=1e-6)
    merged = models.from_pretrained(os.path.join(tmp_path, "lora", "merged"), num_labels=9)
    assert _dev_metrics(config, tiny_classifier_dir, merged)["accuracy"] == pytest.approx(
        rows["lora"]["dev_after"]["accuracy"], abs=1 / 300)


@pytest.mark.parametrize("key,value,match", [("methods", "lora,dora", "unknown"), ("methods", "", "empty"),
                                             ("rank", 0, ">= 1")])
def test_bad_peft_settings_fail_before_anything_runs(key, value, match):
    config = importlib.import_module("configs.peft").get_config()
    config.peft[key] = value
    with pytest.raises(ValueError, match=match):
        peft_recipe.check_config(config)


@pytest.mark.parametrize("text,parsed", [("r64", ("rank", 64)), ("e0.9", ("energy", 0.9)), ("p0.5", ("params", 0.5)),
                                         ("f1", ("flops", 1.0))])
def test_lowrank_settings_parse(text, parsed):
    assert lowrank_recipe.parse_setting(text) == parsed


@pytest.mark.parametrize("text", ["r0", "r6.5", "e1.5", "p0", "x3", "r"])
def test_bad_lowrank_settings_name_the_grammar(text):
    with pytest.raises(ValueError, match="r<rank>"):
        lowrank_recipe.parse_setting(text)


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_lowrank_recipe_students_reload_with_the_reported_accuracy(tiny_classifier_dir, tmp_path):
    from configs.sharing import recovery_stages
    config = _tiny(importlib.import_module("configs.lowrank").get_config(), num_labels=9)
    config.teacher_dir = tiny_classifier_dir
    config.lowrank.update(dict(settings="r4,p0.5", method="fwsvd", fisher_batches=2))
    config.distill.stages = recovery_stages(2, steps=(2, 2))
    results = run_recipe(config, str(tmp_path))
    for name, row in results["settings"].items():
        student = lowrank.load(os.path.join(tmp_path, name, "student"), num_labels=9)
        assert row["params"] < results["teacher_params"]
        assert _dev_metrics(config, tiny_classifier_dir, student) == pytest.approx(
            {k: row["student"][k] for k in ("accuracy",)}, abs=1e-6)


@pytest.mark.slow
@pytest.mark.tiny_e2e
def test_sharing_recipe_stores_unique_layers_and_reloads_tied(tiny_classifier_dir, tmp_path):
    from configs.sharing import recovery_stages
    config = _tiny(importlib.import_module("configs.sharing").get_config(), num_labels=9)
    config.teacher_dir = tiny_classifier_dir
    config.sharing.update(dict(num_unique=1, mode="all"))
    config.distill.stages = recovery_stages(2, steps=(2, 2))
    results = run_recipe(config, str(tmp_path))
    z = results["size"]
    assert z["student_unique_params"] < z["student_params"] == z["teacher_params"]
    student = sharing.load(os.path.join(tmp_path, "student"), num_labels=9)
    layers = models.family.layer_stack(student)
    assert layers[0] is layers[1]
    assert _dev_metrics(config, tiny_classifier_dir, student)["accuracy"] == pytest.approx(
        results["student"]["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_lm_peft_keeps_the_decoder_head_frozen(tiny_decoder_dir, tmp_path):
    config = importlib.import_module("configs.lm_peft").get_config()
    config.model_dir = tiny_decoder_dir
    config.data.update(max_length=32, max_documents=200, eval_blocks=8)
    config.train.update(dict(num_steps=3, batch_size=4, eval_batch_size=8, eval_every=0, checkpoint_every=0,
                             progress_bar=False, tensorboard=False))
    config.peft.update(dict(methods="lora,qlora", block_size=16))
    results = run_recipe(config, str(tmp_path))
    for row in results["methods"].values():
        assert row["dev_after"]["perplexity"] > 1
    base = models.from_pretrained(tiny_decoder_dir)
    trained_params = results["methods"]["lora"]["trainable_params"]
    model, _ = peft.add_lora(base, roles=tuple(config.peft.roles.split(",")), rank=8)
    assert trained_params == train.count_params(model, peft.trainable(model, head=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lm_lowrank", "lm_sharing"])
def test_decoder_configs_recover_a_factorised_or_shared_decoder(name, tiny_decoder_dir, tmp_path):
    from configs.lm_lowrank import lm_recovery_stages
    config = importlib.import_module(f"configs.{name}").get_config()
    config.teacher_dir = tiny_decoder_dir
    config.data.update(max_length=32, max_documents=200, eval_blocks=8)
    config.train.update(dict(batch_size=4, eval_batch_size=8, eval_every=0, checkpoint_every=0,
                             progress_bar=False, tensorboard=False))
    config.distill.stages = lm_recovery_stages(2, steps=(2, 2))
    if name == "lm_lowrank":
        config.lowrank.settings = "r4"
    else:
        config.sharing.num_unique = 1
    results = run_recipe(config, str(tmp_path))
    if name == "lm_lowrank":
        reported = results["settings"]["r4"]["student"]
        model = lowrank.load(os.path.join(tmp_path, "r4", "student"))
    else:
        reported = results["student"]
        model = sharing.load(os.path.join(tmp_path, "student"))
    assert _dev_metrics(config, tiny_decoder_dir, model)["perplexity"] == pytest.approx(reported["perplexity"],
                                                                                        rel=1e-5)


@pytest.mark.parametrize("module,key,value", [("peft", "roles", "q,value"), ("peft", "adapter_roles", "ffn"),
                                              ("peft", "grid", "lsq"), ("lowrank", "roles", "attention")])
def test_bad_roles_and_grids_fail_at_config_time(module, key, value):
    config = importlib.import_module(f"configs.{module}").get_config()
    config[module][key] = value
    recipe = peft_recipe if module == "peft" else lowrank_recipe
    with pytest.raises(ValueError, match="role|grid"):
        recipe.check_config(config)
