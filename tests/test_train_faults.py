"""Faults and console progress of train.fit: SIGINT / SIGTERM save a checkpoint and resume
exactly, a corrupt newest checkpoint is set aside for the previous one, progress lines
appear without a terminal and the progress bar shows current values.

Same tiny classifier and synthetic data as tests/test_train.py (tests/_train_worker.py).
"""
import glob
import json
import logging
import os
import shutil
import signal
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _train_worker as w  # noqa: E402
from test_train import copy_run, run_fit, train_records  # noqa: E402
from efficient_nlp import train  # noqa: E402
from efficient_nlp.train import progress  # noqa: E402

# The uninterrupted reference: 8 updates, checkpoints at 4 and 8, a record every step.
REFERENCE = dict(num_steps=8, checkpoint_every=4)
SIGNAL_BATCH = 5  # the signal arrives while batch 5 (of update 6) is produced


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``(params, per-step losses)`` of the uninterrupted run."""
    model, history = run_fit(tmp_path_factory.mktemp("reference") / "run", **REFERENCE)
    return w.flat_params(model), {r["step"]: r["loss"] for r in train_records(history)}


@pytest.fixture
def handlers():
    """Recording handlers for SIGINT / SIGTERM around the test: a signal fit did not
    catch is recorded here instead of ending the test session."""
    received = []
    record = lambda signum, frame: received.append(signum)  # noqa: E731
    originals = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    yield record, received
    for s, handler in originals.items():
        signal.signal(s, handler)


def signalling_batches(signums, at=SIGNAL_BATCH):
    """``w.make_batches(8)`` that raises ``signums`` (in this thread, so the handler runs
    before the batch is returned) while producing batch ``at``."""
    base = w.make_batches(8)

    def batches(start):
        for k, batch in enumerate(base(start), start):
            if k == at:
                for signum in signums:
                    signal.raise_signal(signum)
            yield batch
    return batches


# ---------------------------------------------------------------------------------------
# SIGINT / SIGTERM
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_checkpoint_and_resume_is_exact(tmp_path, reference, handlers, signum):
    record, received = handlers
    with pytest.raises(train.TrainingInterrupted) as info:
        run_fit(tmp_path, batches=signalling_batches([signum]), **REFERENCE)
    step_dir = str(tmp_path / "checkpoints" / "6")
    assert isinstance(info.value, KeyboardInterrupt)
    assert (info.value.step, info.value.checkpoint) == (6, step_dir)
    assert str(info.value) == (f"Interrupted at step 6; saved {step_dir}. Run the same command "
                               "again (same workdir) to resume.")
    assert train.Checkpointer(tmp_path / "checkpoints").all_steps() == [4, 6]
    # fit caught the signal and put the previous handlers back.
    assert received == []
    assert signal.getsignal(signal.SIGINT) is record and signal.getsignal(signal.SIGTERM) is record

    model, history = run_fit(tmp_path, **REFERENCE)
    assert train_records(history)[0]["step"] == 7
    assert_same_params(w.flat_params(model), reference[0])
    assert [r["step"] for r in train.read_metrics(str(tmp_path))] == list(range(1, 9))


def test_second_signal_while_saving_is_ignored(tmp_path, reference, handlers, monkeypatch,
                                               caplog):
    save = train.Checkpointer.save

    def save_with_signal(self, step, tree):
        if step == 6:  # the checkpoint written because of the first signal
            signal.raise_signal(signal.SIGTERM)
        return save(self, step, tree)

    monkeypatch.setattr(train.Checkpointer, "save", save_with_signal)
    with caplog.at_level(logging.WARNING, logger="efficient_nlp.train.loop"), \
            pytest.raises(train.TrainingInterrupted) as info:
        run_fit(tmp_path, batches=signalling_batches([signal.SIGINT]), **REFERENCE)
    assert info.value.step == 6
    assert any("SIGTERM received while a checkpoint is being written; ignored" in r.getMessage()
               for r in caplog.records)
    assert handlers[1] == []
    monkeypatch.setattr(train.Checkpointer, "save", save)
    model, _ = run_fit(tmp_path, **REFERENCE)  # the checkpoint of step 6 is intact
    assert_same_params(w.flat_params(model), reference[0])


def test_second_signal_outside_a_save_stops_at_once(tmp_path, handlers):
    record, received = handlers
    with pytest.raises(KeyboardInterrupt, match="SIGINT received twice") as info:
        run_fit(tmp_path, batches=signalling_batches([signal.SIGINT, signal.SIGINT]),
                **REFERENCE)
    assert not isinstance(info.value, train.TrainingInterrupted)
    assert train.Checkpointer(tmp_path / "checkpoints").all_steps() == [4]  # nothing new
    assert received == [] and signal.getsignal(signal.SIGINT) is record


# ---------------------------------------------------------------------------------------
# Corrupt checkpoints
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A workdir with checkpoints 2 and 4 (kept unmodified; tests copy it)."""
    workdir = tmp_path_factory.mktemp("ckpt") / "run"
    run_fit(workdir, num_steps=4, checkpoint_every=2)
    return workdir


@pytest.fixture(scope="module")
def resumed_from_2(checkpointed, tmp_path_factory):
    """Parameters after resuming to step 6 from checkpoint 2 (checkpoint 4 deleted)."""
    workdir = copy_run(checkpointed, tmp_path_factory.mktemp("from2") / "run")
    shutil.rmtree(workdir / "checkpoints" / "4")
    model, _ = run_fit(workdir, num_steps=6, checkpoint_every=2)
    return w.flat_params(model)


def corrupt(step_dir, how):
    """Damages a step directory: a wrong checksum in its manifest, flipped bytes in its array
    data, a truncated manifest, or a copy of checkpoint 2 (valid, but of another step)."""
    if how == "checksum":
        path = os.path.join(step_dir, "manifest", "metadata")
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        manifest["leaves"]["params/classifier/kernel"]["checksum"] ^= 1
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
    elif how == "data":
        files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                      recursive=True) if os.path.isfile(p)]
        assert files
        for path in files:
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                mid = len(data) // 2
                data[mid - 8: mid + 8] = bytes(b ^ 0x5A for b in data[mid - 8: mid + 8])
                f.seek(0)
                f.write(bytes(data))
    elif how == "manifest":
        for path in glob.glob(os.path.join(step_dir, "manifest", "*")):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    else:
        shutil.rmtree(step_dir)
        shutil.copytree(os.path.join(os.path.dirname(step_dir), "2"), step_dir)


def listing(directory):
    return sorted(os.path.relpath(p, directory)
                  for p in glob.glob(os.path.join(directory, "**"), recursive=True))


REASONS = {
    "checksum": "restored arrays do not match the manifest: params/classifier/kernel: checksum "
                "mismatch",
    "data": "reading the arrays failed",
    "manifest": "the manifest is missing or unreadable",
    "wrong_step": "it holds the state of step 2",
}


# orbax's restore can leave an asyncio callback behind when tensorstore fails mid-read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", list(REASONS))
def test_corrupt_newest_checkpoint_falls_back_to_previous(checkpointed, resumed_from_2,
                                                          tmp_path, caplog, how):
    workdir = copy_run(checkpointed, tmp_path / "run")
    step_dir = str(workdir / "checkpoints" / "4")
    corrupt(step_dir, how)
    kept = listing(step_dir)
    with caplog.at_level(logging.WARNING, logger="efficient_nlp.train.loop"):
        model, history = run_fit(workdir, num_steps=6, checkpoint_every=2)
    aside = str(workdir / "checkpoints_corrupt" / "4")
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "efficient_nlp.train.loop" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"Checkpoint {step_dir} is corrupt (")
    assert REASONS[how] in warnings[0] and f"moved it to {aside}" in warnings[0]
    # Resumed from 2: same result as with checkpoint 4 deleted.
    assert train_records(history)[0]["step"] == 3
    assert_same_params(w.flat_params(model), resumed_from_2)
    # The bad one is kept whole, outside the listing; new saves and garbage collection
    # (keep 2: checkpoint 2 was deleted) did not touch it.
    assert listing(aside) == kept
    assert train.Checkpointer(workdir / "checkpoints").all_steps() == [4, 6]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_all_checkpoints_corrupt_raises_clear_error(checkpointed, tmp_path):
    workdir = copy_run(checkpointed, tmp_path / "run")
    for step in ("2", "4"):
        corrupt(str(workdir / "checkpoints" / step), "checksum")
    with pytest.raises(train.CorruptCheckpointError) as info:
        run_fit(workdir, num_steps=6)
    message = str(info.value)
    aside = workdir / "checkpoints_corrupt"
    assert info.value.step_dir == str(workdir / "checkpoints")
    assert f"{aside / '4'} (restored arrays do not match the manifest" in message
    assert f"{aside / '2'} (restored arrays do not match the manifest" in message
    assert message.index(str(aside / "4")) < message.index(str(aside / "2"))  # newest first
    assert message.endswith("To start over, train in a new workdir.")
    assert sorted(os.listdir(aside)) == ["2", "4"]
    assert train.Checkpointer(workdir / "checkpoints").all_steps() == []
    # Nothing was trained and the old records were left alone.
    assert [r["step"] for r in train.read_metrics(str(workdir))] == [1, 2, 3, 4]


def test_set_aside_keeps_earlier_corrupt_copies(checkpointed, tmp_path):
    workdir = copy_run(checkpointed, tmp_path / "run")
    ckpt = train.Checkpointer(workdir / "checkpoints")
    first = ckpt.set_aside(4)
    shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "4")
    ckpt.close()
    ckpt = train.Checkpointer(workdir / "checkpoints")
    assert ckpt.all_steps() == [2, 4]
    second = ckpt.set_aside(4)
    ckpt.close()
    assert (first, second) == (str(workdir / "checkpoints_corrupt" / "4"),
                               str(workdir / "checkpoints_corrupt" / "4.1"))
    assert sorted(os.listdir(workdir / "checkpoints_corrupt")) == ["4", "4.1"]


def test_incompatible_checkpoint_still_raises_at_once(checkpointed, tmp_path):
    workdir = copy_run(checkpointed, tmp_path / "run")
    with pytest.raises(train.IncompatibleCheckpointError) as info:
        run_fit(workdir, model=w.make_model(dim=24), num_steps=6)
    assert info.value.step_dir == str(workdir / "checkpoints" / "4")
    assert not os.path.exists(workdir / "checkpoints_corrupt")
    assert train.Checkpointer(workdir / "checkpoints").all_steps() == [2, 4]


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------
def test_progress_lines_without_a_terminal(tmp_path, reference, caplog):
    schedule = train.make_lr_schedule(w.make_config(**REFERENCE), REFERENCE["num_steps"])
    with caplog.at_level(logging.INFO, logger="efficient_nlp.train.progress"):
        run_fit(tmp_path, log_every=1000, progress_seconds=1e-9, **REFERENCE)
    lines = [r.getMessage() for r in caplog.records if r.name == "efficient_nlp.train.progress"]
    losses = reference[1]
    assert lines[0].startswith(f"step 1/8 loss={losses[1]:.4g} lr=0 first step took ")
    assert lines[0].endswith("s (includes compilation)")
    # Then one line per update (the interval is ~0), each with the values of the update
    # before the one just dispatched; the last is the log record of step 8.
    for line, step in zip(lines[1:-1], range(2, 8), strict=True):
        lr = float(schedule(step - 1))
        assert line.startswith(f"step {step}/8 loss={losses[step]:.4g} lr={lr:.3g} "), line
        assert " steps/s eta " in line
    mean = float(np.mean([losses[t] for t in range(1, 9)]))  # the record: mean of steps 1-8
    assert lines[-1].startswith("step 8/8 ") and f" loss={mean:.4g} " in lines[-1]


def test_progress_bar_postfix_shows_latest_values(tmp_path, reference, monkeypatch):
    class Bar:
        def __init__(self, start, num_steps):
            self.n, self.postfixes = start, []

        def update(self, n):
            self.n += n

        def set_postfix(self, values, refresh=True):
            self.postfixes.append((self.n, dict(values)))

        def close(self):
            pass

    bars = []
    monkeypatch.setattr(progress, "interactive", lambda: True)
    monkeypatch.setattr(progress, "make_bar", lambda *a: bars.append(Bar(*a)) or bars[-1])
    monkeypatch.setattr(progress, "POSTFIX_SECONDS", 0.0)
    run_fit(tmp_path, log_every=1000, progress_bar=True, **REFERENCE)
    (bar,) = bars
    losses = reference[1]
    shown = [(n, float(v["loss"])) for n, v in bar.postfixes]
    # After update 1 its own loss; after dispatching update n >= 3, the loss of n - 1; at the
    # end the record of step 8 (the mean of steps 1-8).
    mean = float(np.mean([losses[t] for t in range(1, 9)]))
    expected = [(1, losses[1])] + [(n, losses[n - 1]) for n in range(3, 9)] + [(8, mean)]
    assert [n for n, _ in shown] == [n for n, _ in expected]
    np.testing.assert_allclose([v for _, v in shown], [v for _, v in expected], rtol=1e-3)


def test_format_duration():
    assert [progress.format_duration(s) for s in (0.04, 3.21, 45.4, 140, 3900)] == [
        "0.0s", "3.2s", "45s", "2m20s", "1h05m"]
