"""Cross distillation (docs/cross_distillation.md): losses, sparsifiers, the layer-wise algorithm, the recipe."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_nlp import data as data_lib
from efficient_nlp import models, prune
from efficient_nlp.models.cnn import SmallCNN
from efficient_nlp.prune import cross_distillation as cd
from efficient_nlp.prune import fewshot


def _dense_case(seed=0, n=12, d_in=6, d_out=5):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    w_t = {"kernel": f(d_in, d_out), "bias": f(d_out)}
    w_s = {"kernel": f(d_in, d_out), "bias": f(d_out)}
    return w_s, w_t, f(n, d_in), f(n, d_in)


def _np_dense(w, h):
    return np.asarray(h) @ np.asarray(w["kernel"]) + np.asarray(w["bias"])


def test_mu_one_is_the_correction_loss_and_mu_zero_the_imitation_loss():
    w_s, w_t, h_s, h_t = _dense_case()
    assert float(cd.cross_distillation_loss(w_s, w_t, h_s, h_t, 1.0, cd.dense_layer)) == pytest.approx(
        float(cd.correction_loss(w_s, w_t, h_t, cd.dense_layer)), rel=1e-6)
    assert float(cd.cross_distillation_loss(w_s, w_t, h_s, h_t, 0.0, cd.dense_layer)) == pytest.approx(
        float(cd.imitation_loss(w_s, w_t, h_s, cd.dense_layer)), rel=1e-6)


def test_losses_match_numpy_formulas_for_dense_and_conv():
    w_s, w_t, h_s, h_t = _dense_case(1)
    l_c = np.mean((_np_dense(w_t, h_t) - _np_dense(w_s, h_t)) ** 2)
    l_i = np.mean((_np_dense(w_t, h_s) - _np_dense(w_s, h_s)) ** 2)
    got = float(cd.cross_distillation_loss(w_s, w_t, h_s, h_t, 0.6, cd.dense_layer))
    assert got == pytest.approx(0.6 * l_c + 0.4 * l_i, rel=1e-5)
    a, b = 0.9, 0.3
    ht = a * np.asarray(h_t) + (1 - a) * np.asarray(h_s)
    hs = (1 - b) * np.asarray(h_t) + b * np.asarray(h_s)
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    want = np.mean((relu(_np_dense(w_t, ht)) - relu(_np_dense(w_s, hs))) ** 2)
    got = float(cd.soft_cross_distillation_loss(w_s, w_t, h_s, h_t, a, b, cd.dense_layer, jax.nn.relu))
    assert got == pytest.approx(want, rel=1e-5)
    # convolution: the layer function equals nnx.Conv (SAME, stride 1), so the loss is its MSE
    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 3)), jnp.float32)
    w = {"kernel": conv.kernel.get_value(), "bias": conv.bias.get_value()}
    np.testing.assert_allclose(np.asarray(cd.conv_layer(w, x)), np.asarray(conv(x)), rtol=1e-5, atol=1e-5)
    w0 = dict(w, kernel=w["kernel"] * 0.5)
    want = np.mean((np.asarray(conv(x)) - np.asarray(cd.conv_layer(w0, x))) ** 2)
    assert float(cd.correction_loss(w0, w, x, cd.conv_layer)) == pytest.approx(want, rel=1e-5)


def test_soft_cd_at_one_one_is_plain_layerwise_distillation():
    w_s, w_t, h_s, h_t = _dense_case(3)
    for act in (None, jax.nn.relu):
        soft = cd.soft_cross_distillation_loss(w_s, w_t, h_s, h_t, 1.0, 1.0, cd.dense_layer, act)
        plain = cd.layerwise_loss(w_s, w_t, h_s, h_t, cd.dense_layer, act)
        assert float(soft) == pytest.approx(float(plain), rel=1e-6)
    want = np.mean((_np_dense(w_t, h_t) - _np_dense(w_s, h_s)) ** 2)
    assert float(cd.layerwise_loss(w_s, w_t, h_s, h_t, cd.dense_layer)) == pytest.approx(want, rel=1e-5)


def test_gradients_flow_only_into_the_student_layer():
    w_s, w_t, h_s, h_t = _dense_case(4)
    for fn in (lambda *a: cd.cross_distillation_loss(*a, 0.6, cd.dense_layer),
               lambda *a: cd.soft_cross_distillation_loss(*a, 0.9, 0.3, cd.dense_layer, jax.nn.relu)):
        g_s, g_t, g_hs, g_ht = jax.grad(fn, argnums=(0, 1, 2, 3))(w_s, w_t, h_s, h_t)
        assert float(jnp.abs(g_s["kernel"]).sum()) > 0
        for g in jax.tree.leaves((g_t, g_hs, g_ht)):
            assert float(jnp.abs(g).sum()) == 0.0


def test_algorithm_changes_only_the_current_layer():
    model = SmallCNN((4, 4), (True, True), 8, rngs=nnx.Rngs(0))
    adapter = fewshot.cnn_adapter(model, fewshot.cnn_rules("unstructured", first_conv=True, dense=True))
    data = {"images": np.random.default_rng(0).random((6, 8, 8, 1)).astype(np.float32)}
    spec = adapter.layers[1]
    feats = fewshot.run_model(adapter.features, model, data)
    w_t = fewshot.get_layer(model, spec.name)
    w, _ = fewshot.optimize_layer(w_t, w_t, feats[spec.name], feats[spec.name], spec, loss="cd",
                                  sparsity=0.5, steps=5)
    student = fewshot.copy_model(model)
    fewshot.set_layer(student, spec.name, w)
    t_params, s_params = models.named_params(model), models.named_params(student)
    changed = {k for k in t_params if not np.array_equal(t_params[k].get_value(), s_params[k].get_value())}
    assert changed <= {f"{spec.name}.kernel", f"{spec.name}.bias"} and f"{spec.name}.kernel" in changed


@pytest.mark.parametrize("method", ["topk", "prox"])
@pytest.mark.parametrize("pattern", ["unstructured", "rows", "conv_channels"])
def test_sparsifier_hits_the_scheduled_sparsity(method, pattern):
    rng = np.random.default_rng(5)
    if pattern == "conv_channels":
        kernel, pat = jnp.asarray(rng.normal(size=(3, 3, 10, 4)), jnp.float32), prune.neurons(axis=2)
    else:
        kernel = jnp.asarray(rng.normal(size=(20, 10)), jnp.float32)
        pat = prune.unstructured() if pattern == "unstructured" else prune.rows()
    units = cd.unit_norms(kernel, pat).shape[0]
    ramp = 10
    for t in (0, 3, 10, 30):
        s_t = float(cd.linear_ramp(t, ramp, 0.7))
        out = jax.jit(lambda k, s: cd.sparsify(k, s, method=method, pattern=pat))(kernel, s_t)
        assert cd.unit_sparsity(out, pat) == pytest.approx(round(s_t * units) / units)
    if method == "prox":  # survivors shrink (soft threshold), they are not just kept
        out = cd.sparsify(kernel, 0.5, method="prox", pattern=pat)
        kept = np.asarray(out) != 0
        assert np.all(np.abs(np.asarray(out))[kept] <= np.abs(np.asarray(kernel))[kept] + 1e-7)


def test_heads_sparsifier_removes_whole_heads():
    kernel = jnp.asarray(np.random.default_rng(6).normal(size=(16, 8)), jnp.float32)  # 4 heads of 4 rows
    name = "bert.encoder.layers.0.attention.output.kernel"
    out = np.asarray(cd.sparsify(kernel, 0.5, method="prox", pattern=prune.heads(4), name=name))
    alive = [bool(np.any(out[4 * h:4 * h + 4])) for h in range(4)]
    assert sum(alive) == 2


def test_cnn_rules_follow_the_official_code_by_default():
    # Bai et al.'s code prunes every conv but the first and no dense layer; flags add them.
    model = SmallCNN((4, 4, 8), (True, False, True), 8, rngs=nnx.Rngs(0))
    names = lambda **kw: [s.name for s in fewshot.cnn_adapter(model, fewshot.cnn_rules(**kw)).layers]  # noqa: E731
    assert names() == ["convs.1", "convs.2"]
    assert names(first_conv=True, dense=True) == ["convs.0", "convs.1", "convs.2", "dense"]
    assert names(structure="structured", dense=True, classifier=True) == ["convs.1", "convs.2", "dense", "classifier"]
    with pytest.raises(ValueError, match="structure must be"):
        fewshot.cnn_rules("channels")


def test_k_shot_sampling_draws_exactly_k_per_class():
    labels = np.repeat(np.arange(4), [5, 7, 3, 9])
    for k in (1, 3):
        idx = data_lib.sample_k_per_class(labels, k, seed=1)
        assert np.bincount(labels[idx], minlength=4).tolist() == [k] * 4
        assert np.array_equal(idx, data_lib.sample_k_per_class(labels, k, seed=1))


def _tiny_cnn_config():
    from configs import cd_cnn
    config = cd_cnn.get_config()
    config.sparsities = (0.7,)
    config.shots = (1,)
    config.seeds = (0,)
    config.methods = ("bp", "wo_cd", "cd")
    config.error_examples = 32
    config.cnn.update(dict(channels=(4, 8), pools=(True, True), hidden=16, teacher_steps=30,
                           prune_first_conv=True, prune_dense=True))
    config.cd.update(dict(steps=12, finetune_steps=0))
    config.baselines.update(dict(bp_steps=3))
    return config


def test_recipe_smoke_cnn(tmp_path):
    from efficient_nlp.recipes import cross_distill
    results = cross_distill.run(_tiny_cnn_config(), str(tmp_path))
    assert results["layers"] == ["convs.0", "convs.1", "dense"]
    for r in results["runs"]:
        # every prunable layer is at exactly the target (round(0.7 * units) units removed)
        for layer, s in r["layer_sparsity"].items():
            n = {"convs.0": 9 * 1 * 4, "convs.1": 9 * 4 * 8, "dense": 2 * 2 * 8 * 16}[layer]
            assert s == pytest.approx(round(0.7 * n) / n)
        assert 0.0 <= r["accuracy"] <= 1.0
    assert set(results["tables"]["0.7"]) == {"bp", "wo_cd", "cd"}
    assert results["error_ratio"]["0.7"]["1"].keys() == {"convs.0", "convs.1", "dense"}
    assert (tmp_path / "error_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| CD |" in (tmp_path / "results.md").read_text()
    assert json.load(open(tmp_path / "results.json"))["tables"]["0.7"]["cd"]["1"]["n"] == 1


def test_bert_recipe_saves_each_pruned_student_as_it_was_evaluated(make_tiny_model_dir, tmp_path):
    from configs import cd_bert
    from efficient_nlp.recipes import cross_distill
    config = cd_bert.get_config()
    config.teacher_dir = make_tiny_model_dir("tiny_cd_save", model_cls=models.BertForSequenceClassification,
                                             hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=32, num_labels=9)
    config.data.update(dict(max_length=16, max_train_examples=64))
    config.update(dict(sparsities=(0.7,), shots=(1,), seeds=(0,), methods=("l1", "cd"), error_examples=8,
                       max_eval_examples=32, save_models=True))
    config.cd.steps = 3
    results = cross_distill.run(config, str(tmp_path))
    task = data_lib.load_task_data("builtin", tokenizer_dir=config.teacher_dir, max_length=16)
    dev = {k: v[:32] for k, v in task.dev.items()}
    for run in results["runs"]:
        assert run["model_dir"] == str(tmp_path / "models" / f"{run['method']}_sp0.7_k1_seed0")
        student = models.from_pretrained(run["model_dir"], num_labels=9)
        adapter = fewshot.encoder_adapter(student, fewshot.encoder_rules(student))
        assert fewshot.accuracy(adapter, student, dev) == run["accuracy"]
        assert fewshot.sparsity_per_layer(student, adapter) == run["layer_sparsity"]
    config = _tiny_cnn_config()
    config.save_models = True
    with pytest.raises(ValueError, match="only for model_kind='bert'"):
        cross_distill.run(config, str(tmp_path / "cnn"))


def test_structured_bert_layerwise_prunes_heads_and_neurons(make_tiny_model_dir):
    model_dir = make_tiny_model_dir("tiny_cd", model_cls=models.BertForSequenceClassification, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    max_position_embeddings=32, num_labels=3)
    teacher = models.from_pretrained(model_dir, num_labels=3)
    adapter = fewshot.encoder_adapter(teacher, fewshot.encoder_rules(teacher, "structured"))
    rng = np.random.default_rng(0)
    mask = np.ones((6, 10), np.int32)
    mask[:, 7:] = 0
    data = {"input_ids": rng.integers(1, 1000, (6, 10)).astype(np.int32), "attention_mask": mask,
            "token_type_ids": np.zeros((6, 10), np.int32), "labels": np.arange(6) % 3}
    student, info = fewshot.prune_layerwise(teacher, adapter, data, loss="cd", mu=0.9, sparsity=0.5, steps=5,
                                            sparsifier="prox")
    assert [lay["sparsity"] for lay in info["layers"]] == [0.5, 0.5]
    small, structure = prune.shrink(student)
    assert [len(h) for h in structure["heads"]] == [1] and [len(n) for n in structure["neurons"]] == [16]


def _cnn_teacher():
    # The regime of the paper's VGG-16 on CIFAR-10: the last convs run at 2x2 / 1x1 positions, so
    # with one image per class each output unit has more free weights (10% of 9 * C_in) than the
    # few-shot set has rows, and plain layer-wise regression on the student's inputs overfits.
    from efficient_nlp.models.cnn import fit_cnn
    split = data_lib.load_digits(seed=0)
    teacher = SmallCNN((32, 32, 64, 64), (False, True, True, True), 64, rngs=nnx.Rngs(0))
    fit_cnn(teacher, split["train"]["images"], split["train"]["labels"], steps=800, seed=0)
    return teacher, split


@pytest.mark.slow  # ~5 min on 2 CPU cores
def test_cd_beats_layerwise_at_high_sparsity_with_one_shot_cnn():
    # Measured with configs/cd_cnn.py's defaults (the official code's layers: convs 1..), 90%
    # unstructured, 1 image per class, seeds 0 / 1: w/o CD 0.942 / 0.933, CD 0.971 / 0.953
    # (teacher 0.982).  On the default 16-32 channel net with pools after convs 1 and 3 the
    # direction does not hold (docs/cross_distillation.md).
    teacher, split = _cnn_teacher()
    adapter = fewshot.cnn_adapter(teacher, fewshot.cnn_rules("unstructured"))
    test = split["test"]
    accs = {"wo_cd": [], "cd": []}
    for seed in (0, 1):
        idx = data_lib.sample_k_per_class(split["train"]["labels"], 1, seed=seed)
        shots = {k: v[idx] for k, v in split["train"].items()}
        for method, loss in (("wo_cd", "layerwise"), ("cd", "cd")):
            student, _ = fewshot.prune_layerwise(teacher, adapter, shots, loss=loss, mu=0.6, sparsity=0.9)
            accs[method].append(fewshot.accuracy(adapter, student, test))
    print("test accuracy per seed", accs)  # pytest -s shows the numbers
    assert all(c > w for c, w in zip(accs["cd"], accs["wo_cd"])), accs


@pytest.mark.slow
def test_cd_beats_layerwise_at_high_sparsity_with_one_shot_bert(make_tiny_model_dir, tmp_path):
    from configs import quickstart
    from efficient_nlp.recipes import finetune
    tiny = make_tiny_model_dir("tiny_cd_teacher", model_cls=models.BertForSequenceClassification,
                               hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64, num_labels=9)
    config = quickstart.get_config()
    config.model_dir = tiny
    config.data.max_length = 32
    config.train.update(dict(num_steps=300, batch_size=32, learning_rate=1e-3, eval_every=0, checkpoint_every=0,
                             async_checkpointing=False, tensorboard=False, progress_bar=False))
    finetune.run(config, str(tmp_path))
    teacher = models.from_pretrained(str(tmp_path / "model"), num_labels=9)
    task = data_lib.load_task_data("builtin", tokenizer_dir=str(tmp_path / "model"), max_length=32)
    adapter = fewshot.encoder_adapter(teacher, fewshot.encoder_rules(teacher))
    accs = {"wo_cd": [], "cd": []}
    for seed in (0, 1):
        idx = data_lib.sample_k_per_class(task.train["labels"], 1, seed=seed)
        shots = {k: v[idx] for k, v in task.train.items()}
        for method, loss in (("wo_cd", "layerwise"), ("cd", "cd")):
            student, _ = fewshot.prune_layerwise(teacher, adapter, shots, loss=loss, mu=0.9, sparsity=0.9, steps=200)
            accs[method].append(fewshot.accuracy(adapter, student, task.dev))
    print("test accuracy per seed", accs)  # pytest -s shows the numbers
    assert np.mean(accs["cd"]) > np.mean(accs["wo_cd"]), accs


# ----------------------------------------------------------------------------- convergence of one layer
def _augmented(h):
    return np.concatenate([np.asarray(h, np.float64), np.ones((len(h), 1))], 1)


def _cd_closed_form_on_mask(w_t, h_s, h_t, mu, mask):
    """Minimiser of ``mu L_c + (1 - mu) L_i`` for a dense layer whose kernel is restricted to
    ``mask`` (bias free): weighted least squares, one output column at a time."""
    kt, bt = np.asarray(w_t["kernel"], np.float64), np.asarray(w_t["bias"], np.float64)
    x_t, x_s = np.asarray(h_t, np.float64), np.asarray(h_s, np.float64)
    kernel, bias = np.zeros_like(kt), np.zeros_like(bt)
    for j in range(kt.shape[1]):
        sup = np.flatnonzero(mask[:, j])
        x = np.concatenate([np.sqrt(mu) * _augmented(x_t[:, sup]), np.sqrt(1 - mu) * _augmented(x_s[:, sup])])
        y = np.concatenate([np.sqrt(mu) * (x_t @ kt[:, j] + bt[j]), np.sqrt(1 - mu) * (x_s @ kt[:, j] + bt[j])])
        sol = np.linalg.lstsq(x, y, rcond=None)[0]
        kernel[sup, j], bias[j] = sol[:-1], sol[-1]
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def _trained_like_layer(seed=0, n=256, d_in=64, d_out=16, correlated=True):
    """A dense layer at a trained net's scale (LeCun-normal kernel) with ReLU inputs; the
    student's input is the teacher's, perturbed and attenuated (upstream pruning)."""
    rng = np.random.default_rng(seed)
    w_t = {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), jnp.float32),
           "bias": jnp.asarray(0.1 * rng.normal(size=d_out), jnp.float32)}
    mix = rng.normal(size=(8, d_in))  # correlated features, as in a real net: a refit can re-route
    h_t = np.maximum(rng.normal(size=(n, 8)) @ mix + 0.5 if correlated else rng.normal(size=(n, d_in)), 0)
    h_s = np.maximum(0.7 * h_t + 0.3 * rng.normal(size=(n, d_in)), 0)
    return w_t, jnp.asarray(h_s, jnp.float32), jnp.asarray(h_t, jnp.float32)


def test_dense_optimum_matches_least_squares_without_sparsity():
    """mu in {0, 1}: the CD optimum is the teacher layer itself (for any full-rank input), whatever the
    start; plain layer-wise regression ("w/o CD", no activation) is the least-squares map from the
    student's input to the teacher's output."""
    w_t, h_s, h_t = _trained_like_layer(1, n=128, d_in=16, d_out=8, correlated=False)  # well conditioned
    spec = fewshot.LayerSpec("x", cd.dense_layer, prune.unstructured(), None)
    w0 = {"kernel": jnp.zeros_like(w_t["kernel"]), "bias": jnp.zeros_like(w_t["bias"])}
    for mu in (0.0, 1.0):
        w, _ = fewshot.optimize_layer(w0, w_t, h_s, h_t, spec, loss="cd", mu=mu, sparsity=0.0)
        for k in w:
            np.testing.assert_allclose(np.asarray(w[k]), np.asarray(w_t[k]), atol=2e-3)
    w, _ = fewshot.optimize_layer(w_t, w_t, h_s, h_t, spec, loss="layerwise", sparsity=0.0)
    sol = np.linalg.lstsq(_augmented(h_s), _np_dense(w_t, h_t), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(w["kernel"]), sol[:-1], atol=2e-3)
    np.testing.assert_allclose(np.asarray(w["bias"]), sol[-1], atol=2e-3)


def test_default_layer_optimisation_reaches_the_optimum_on_its_mask():
    """With the default steps / learning rate, the sparse layer found from the teacher's weights
    is (nearly) the exact minimiser of the CD loss on its final mask.  The former defaults (300
    Adam steps at 1e-3) stopped at 2-9x the optimal loss on the digits CNN's layers, leaving each
    layer close to its magnitude-pruned (attenuated) start: CD then fell to ~0.2 accuracy."""
    w_t, h_s, h_t = _trained_like_layer(2)
    spec = fewshot.LayerSpec("x", cd.dense_layer, prune.unstructured(), None)
    w, _ = fewshot.optimize_layer(w_t, w_t, h_s, h_t, spec, loss="cd", mu=0.6, sparsity=0.9)
    mask = np.asarray(w["kernel"]) != 0
    assert mask.mean() == pytest.approx(0.1, abs=1 / mask.size)
    best = _cd_closed_form_on_mask(w_t, h_s, h_t, 0.6, mask)
    got = float(cd.cross_distillation_loss(w, w_t, h_s, h_t, 0.6, cd.dense_layer))
    opt = float(cd.cross_distillation_loss(best, w_t, h_s, h_t, 0.6, cd.dense_layer))
    start = float(cd.cross_distillation_loss(dict(w_t, kernel=jnp.where(mask, w_t["kernel"], 0.0)), w_t, h_s, h_t,
                                             0.6, cd.dense_layer))
    assert opt < 0.5 * start  # the refit matters here
    assert got <= 1.02 * opt, (got, opt, start)
