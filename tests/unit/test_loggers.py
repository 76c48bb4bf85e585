"""`report_to`: TensorBoard event files that TensorBoard's own reader reads back, wandb offline and mlflow to a local
folder (where installed), beside the metrics.jsonl and training_loss.png every run writes."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import logged_losses
from tests.unit.test_train import train
from tunesmith.config import load_config
from tunesmith.errors import ConfigError

TRACKERS = ["tensorboard", *(name for name in ("wandb", "mlflow") if importlib.util.find_spec(name))]


def tensorboard_scalars(folder, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_every_installed_tracker_receives_the_losses(tmp_path, tiny_model_dir, identity_data, monkeypatch, capsys):
    print(f"trackers under test: {', '.join(TRACKERS)}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow 3 keeps a local store in one SQLite file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    output = train(tmp_path, tiny_model_dir, identity_data, f"report_to={','.join(TRACKERS)}", "run_name=tiny-run")
    losses = logged_losses(output)  # metrics.jsonl, written whatever report_to says
    assert len(losses) == 4 and (output / "training_loss.png").is_file()
    assert f"TensorBoard: tensorboard --logdir {output / 'runs'}" in capsys.readouterr().out

    (events,) = (output / "runs").iterdir()  # Trainer's default folder: runs/<date>_<host>
    logged = tensorboard_scalars(events, "train/loss")
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [value for _, value in logged] == pytest.approx(losses, rel=1e-6)

    if "wandb" in TRACKERS:
        import wandb

        # wandb 0.31 keeps an offline run in one binary log (run-*.wandb), with no reader in its Python package:
        # the run that Trainer leaves open for the process holds the summary that log is made from.
        summary = dict(wandb.run.summary)
        wandb.finish()
        assert summary["train/loss"] == pytest.approx(losses[-1], rel=1e-6)
        assert summary["train/global_step"] == 4
        (run,) = (tmp_path / "wandb").glob("offline-run-*")
        assert next(run.glob("run-*.wandb")).stat().st_size > 0
    if "mlflow" in TRACKERS:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
        history = sorted((metric.step, metric.value) for metric in client.get_metric_history(run.info.run_id, "loss"))
        assert [step for step, _ in history] == [1, 2, 3, 4]
        assert [value for _, value in history] == pytest.approx(losses, rel=1e-6)


def test_logging_dir_is_where_tensorboard_writes(tmp_path, tiny_model_dir, identity_data):
    folder = tmp_path / "tensorboard"
    output = train(
        tmp_path, tiny_model_dir, identity_data, "max_steps=2", "report_to=tensorboard", f"logging_dir={folder}"
    )
    assert [step for step, _ in tensorboard_scalars(folder, "train/loss")] == [1, 2]
    assert not (output / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["report_to=tensorbord"], "unknown logger 'tensorbord'; use none or one of tensorboard, wandb, mlflow"),
        (["report_to=none,tensorboard"], "none and all stand alone"),
        (["logging_dir=tb"], "`logging_dir: tb` is where TensorBoard's event files go, but report_to is none"),
    ],
)
def test_a_logger_setting_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["dataset=x", *overrides])
    assert message in str(error.value)
