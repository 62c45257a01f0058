"""The Colab notebooks (colab/*.ipynb): generated from colab/build_notebooks.py, one tagged parameter
cell of plain assignments first, code that compiles (fast); every notebook executed headless on CPU
with tiny settings on a tiny model (slow, nbclient)."""
import ast
import importlib.util
import os

import pytest

from efficient_nlp import models

nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("quickstart", "qat", "ptq", "binarybert", "pruning", "cross_distillation", "aps")


def read(name):
    return nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)


def parameter_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def defaults(nb) -> dict:
    """The parameter cell's values (it holds only ``name = literal`` lines)."""
    values = {}
    for node in ast.parse(parameter_cell(nb).source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.dump(node)
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def with_parameters(nb, **overrides):
    """``nb`` with its parameter cell rewritten: defaults, then ``overrides`` (known names only)."""
    values = defaults(nb)
    unknown = set(overrides) - set(values)
    assert not unknown, f"not parameters of this notebook: {sorted(unknown)}"
    values.update(overrides)
    parameter_cell(nb).source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_a_parameter_cell_first_and_its_code_compiles(name):
    nb = read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is parameter_cell(nb)
    values = defaults(nb)
    assert {"repo_url", "workdir", "steps"} <= set(values) and ("model_dir" in values or "teacher_dir" in values)
    for i, cell in enumerate(code):
        compile(cell.source, f"{name}.ipynb cell {i}", "exec")
    sources = "\n".join(c.source for c in code)
    assert '"google.colab" in sys.modules' in sources and "run_recipe(" in sources and "make_mesh()" in sources


def test_committed_notebooks_are_what_the_build_script_writes():
    spec = importlib.util.spec_from_file_location("build_notebooks", os.path.join(COLAB, "build_notebooks.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert set(build.NOTEBOOKS) == set(NOTEBOOKS)
    for name, nb in build.NOTEBOOKS.items():
        assert [c.source for c in read(name).cells] == [c.source for c in nb.cells], \
            f"colab/{name}.ipynb is stale: run python colab/build_notebooks.py"


# ----------------------------------------------------------------------------- execution (slow)
def tiny_parameters(name, tiny, workdir):
    common = dict(max_length=16, max_train_examples=96, batch_size=8, workdir=workdir, steps=2)
    teacher = dict(model_dir=tiny, teacher_dir=tiny, teacher_steps=2)
    return {
        "quickstart": dict(common, model_dir=tiny),
        "qat": dict(common, **teacher),
        "ptq": dict(common, **teacher, calibration_size=16, rem_steps=2),
        "binarybert": dict(common, **teacher, finetune_steps=2),
        "pruning": dict(common, model_dir=tiny, steps=4),
        "cross_distillation": dict(common, **teacher, max_eval_examples=64),
        "aps": dict(common, model_dir=tiny, steps=6, retrain_steps=2),
    }[name]


@pytest.fixture(scope="module")
def tiny_dir(make_tiny_model_dir):
    return make_tiny_model_dir("tiny_notebooks", models.BertForSequenceClassification, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=64, num_labels=9)


@pytest.mark.slow  # 1-3 min per notebook on 2 CPU cores (a kernel start and a few recipe compiles)
@pytest.mark.tiny_e2e
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless_with_tiny_settings(name, tiny_dir, tmp_path):
    nbclient = pytest.importorskip("nbclient")
    from efficient_nlp.recipes import RECIPES
    if name == "binarybert" and "binarybert" not in RECIPES:
        pytest.skip("recipe binarybert is not in this checkout")
    nb = with_parameters(read(name), **tiny_parameters(name, tiny_dir, str(tmp_path / "run")))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": COLAB}})
    client.execute()  # raises CellExecutionError naming the cell and the traceback on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("device(s)" in o.get("text", "") for o in outputs)      # the device cell ran
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was shown"
