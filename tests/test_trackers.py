"""Experiment trackers (``run.report_to``): each writes its local files inside the run folder, and the tests read a
logged value back from those files, under tokenmdp's name and TRL's."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tokenmdp.errors import TokenMDPError
from tokenmdp.train.config import load_config
from tokenmdp.train.trackers import TRL_NAMES, requested, with_trl_names


def test_report_to_takes_one_tracker_or_a_list(monkeypatch):
    monkeypatch.setattr("tokenmdp.train.checks.check_installed", lambda names: None)  # the types alone
    assert requested(load_config(None, []).run.report_to) == []
    assert requested(load_config(None, ["run.report_to=wandb"]).run.report_to) == ["wandb"]
    cfg = load_config(None, ["run.report_to=[tensorboard, mlflow, tensorboard]"])
    assert requested(cfg.run.report_to) == ["tensorboard", "mlflow"]
    with pytest.raises(TokenMDPError, match=r"'run.report_to\[1\]' in --set is 'comet'"):
        load_config(None, ["run.report_to=[tensorboard, comet]"])


def test_a_tracker_not_installed_is_one_error_with_its_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TokenMDPError, match=r"run.report_to.*'wandb'.*not installed.*pip install wandb"):
        load_config(None, ["run.report_to=[tensorboard, wandb]"])  # checked with the config, before any work


def test_trl_names_go_out_beside_tokenmdps():
    values = {"reward/mean": 0.5, "reward/std": 0.25, "reward/frac_zero_std": 0.125, "length/mean": 12.0,
              "length/truncated": 0.0, "reward/correctness": 0.75, "reward/accuracy": 0.5, "time/step": 1.0}
    out = with_trl_names(values)
    assert out["reward"] == 0.5 and out["reward_std"] == 0.25 and out["frac_reward_zero_std"] == 0.125
    assert out["completions/mean_length"] == 12.0 and out["completions/clipped_ratio"] == 0.0
    assert out["rewards/correctness/mean"] == 0.75  # a reward function's part, as TRL names it
    assert "rewards/accuracy/mean" not in out and "time/step" in out
    assert {k: out[k] for k in values} == values  # tokenmdp's own names untouched
    assert len(set(TRL_NAMES.values())) == len(TRL_NAMES)


ALL = ["tensorboard", "trackio", "wandb", "mlflow"]


@pytest.fixture(scope="module")
def tracked_run(tiny_random_dir, tmp_path_factory):
    """Three GRPO steps on a tiny local model, logged to all four trackers at once."""
    import importlib.util

    for name in ALL:  # not imported here: trackio reads TRACKIO_DIR when first imported
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (make test-integrations installs the trackers)")
    from tokenmdp.train.trainer import train

    out = tmp_path_factory.mktemp("tracked") / "grpo-seed0"
    cfg = load_config(None, [f"model.path={tiny_random_dir}", "task.name=countdown", "task.template=compact",
                             "task.options={num_count: 3, high: 20}", "rollout.prompts_per_step=2",
                             "rollout.group_size=4", "rollout.max_new_tokens=8", "run.steps=3", "run.save_every=0",
                             f"run.out={out}", f"run.report_to=[{', '.join(ALL)}]", "run.threads=1"])
    train(cfg, progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics


@pytest.mark.integrations
def test_tensorboard_event_files_hold_the_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, metrics = tracked_run
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents*")).parent))
    events.Reload()
    for key in ("length/mean", "completions/mean_length"):  # tokenmdp's name and TRL's
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == {m["step"]: pytest.approx(m["length/mean"], rel=1e-6) for m in metrics}


@pytest.mark.integrations
def test_trackio_sqlite_store_holds_the_metrics_and_a_completions_table(tracked_run):
    out, metrics = tracked_run
    db = sqlite3.connect(out / "trackio" / "tokenmdp.db")
    rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
    by_step: dict[int, dict] = {}  # a step's metrics and its completions table are separate rows
    for run, step, blob in rows:
        assert run == "grpo-seed0"
        by_step.setdefault(step, {}).update(json.loads(blob))
    for m in metrics:
        assert by_step[m["step"]]["length/mean"] == pytest.approx(m["length/mean"])
        assert by_step[m["step"]]["completions/mean_length"] == pytest.approx(m["length/mean"])
    table = by_step[len(metrics)]["completions"]
    assert table["_type"] == "trackio.table" and len(table["_value"]) == 2 * 4  # the step's 8 completions
    assert set(table["_value"][0]) == {"step", "prompt", "completion", "reward", "correct"}


def _wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file: a LevelDB-style log of 32 KiB blocks after a
    7-byte file header, each record chunk behind a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last); wandb's own reader now lives in its Go core."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunks = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


@pytest.mark.integrations
def test_wandb_offline_run_holds_the_history_and_completion_tables(tracked_run):
    out, metrics = tracked_run
    history = {}
    for record in _wandb_records(next(out.glob("wandb/offline-run-*/run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for m in metrics:
        assert history[m["step"]]["length/mean"] == pytest.approx(m["length/mean"])
        assert history[m["step"]]["completions/mean_length"] == pytest.approx(m["length/mean"])
    tables = sorted(out.glob("wandb/offline-run-*/files/media/table/completions_*.table.json"))
    assert len(tables) == len(metrics)  # 3 steps: a table every step (steps // 10 rounds up to 1)
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward", "correct"] and len(table["data"]) == 8


@pytest.mark.integrations
def test_mlflow_sqlite_store_holds_the_metric_history_and_tables(tracked_run):
    from mlflow.tracking import MlflowClient

    out, metrics = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tokenmdp")
    (run,) = client.search_runs([exp.experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "length/mean")}
    assert history == {m["step"]: pytest.approx(m["length/mean"]) for m in metrics}
    assert run.data.params["algo.name"] == "grpo"
    tables = list(out.rglob("completions/step-*.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "completion", "reward", "correct"]
