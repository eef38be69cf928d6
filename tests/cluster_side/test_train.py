"""``rs-cluster train`` on real tiles: a narrow U-Net learns, two Horovod workers on a real Spark
standalone cluster stay in step, a killed run resumes, and bad input is refused with a clear error.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rs_cluster.errors import ClusterError, ConfigError, InputError, OutputExistsError
from rs_cluster.progress import JsonLinesReporter, parse_event
from rs_cluster.train import MODEL_FORMAT, TrainConfig, run_train

REPO = Path(__file__).resolve().parents[2]
CARD_KEYS = {"format", "format_version", "model_file", "architecture", "tile_size", "bands",
             "input_scaling", "threshold", "base_filters", "output", "dataset", "epochs",
             "best_epoch", "world_size", "wall_time_s", "created", "rs_cluster_version"}
EPOCH_KEYS = {"epoch", "loss", "accuracy", "iou", "val_loss", "val_accuracy", "val_iou", "seconds"}
# A narrow, quick model: a handful of steps per epoch on the CPU.
QUICK = ["--base-filters", "4", "--batch-size", "4", "--steps-per-epoch", "2", "--lr", "1e-3"]


def rs_cluster(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rs_cluster", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


def work_dir(model_dir: Path) -> Path:
    return model_dir.parent / f".{model_dir.name}.training"


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory):
    """A narrow U-Net trained in this process (one Horovod worker) on the real small dataset."""
    model_dir = tmp_path_factory.mktemp("trained") / "model"
    stream = io.StringIO()
    cfg = TrainConfig(data=str(small_dataset), model_dir=str(model_dir), epochs=4, batch_size=4,
                      steps_per_epoch=5, validation_steps=3, base_filters=8, lr=1e-3, patience=10)
    result = run_train(cfg, reporter=JsonLinesReporter(stream))
    events = [parse_event(line) for line in stream.getvalue().splitlines()]
    return model_dir, result, events


@pytest.mark.spark
@pytest.mark.horovod
def test_narrow_unet_learns_and_writes_a_complete_model(trained, small_dataset):
    model_dir, result, events = trained
    losses = [e["loss"] for e in result.epochs]
    assert losses[-1] < losses[0], losses

    assert sorted(p.name for p in model_dir.iterdir()) == ["logs", "metrics.jsonl", "model.json",
                                                            "model.keras"]
    assert not work_dir(model_dir).exists()
    card = json.loads((model_dir / "model.json").read_text())
    assert CARD_KEYS <= set(card)
    assert card["format"] == MODEL_FORMAT and card["format_version"] == 1
    assert (card["model_file"], card["architecture"], card["tile_size"]) == ("model.keras", "unet", 128)
    assert card["bands"] == ["red", "green", "blue"]
    assert card["input_scaling"] == {"method": "divide", "value": 255.0}
    assert (card["threshold"], card["base_filters"], card["world_size"]) == (0.5, 8, 1)
    assert [e["epoch"] for e in card["epochs"]] == [1, 2, 3, 4]
    assert all(EPOCH_KEYS <= set(e) for e in card["epochs"])
    best = min(card["epochs"], key=lambda e: e["val_loss"])
    assert card["best_epoch"] == best["epoch"]
    dataset = json.loads((small_dataset / "dataset.json").read_text())
    assert card["dataset"]["tile_size"] == 128 and card["dataset"]["stride"] == dataset["stride"]
    assert card["dataset"]["splits"]["train"]["tiles"] == dataset["splits"]["train"]["tiles"]

    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert list((model_dir / "logs" / "train").glob("events.out.tfevents.*"))

    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert [e["epoch"] for e in events if e["event"] == "metrics"] == [1, 2, 3, 4]
    steps = [e["done"] for e in events if e["event"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 20


@pytest.mark.spark
@pytest.mark.horovod
def test_model_loads_without_custom_objects_and_predicts_masks(trained, small_dataset):
    import numpy as np
    import tensorflow as tf

    from rs_cluster.dataset import load_dataset, make_tile_reader

    model_dir, _, _ = trained
    model = tf.keras.models.load_model(model_dir / "model.keras", compile=False)
    with make_tile_reader(load_dataset(str(small_dataset)).split_url("test"), fields=["image"]) as reader:
        tiles = np.stack([row.image for row, _ in zip(reader, range(4))])
    probs = model.predict(tiles / 255.0, verbose=0)
    assert probs.shape == (len(tiles), 128, 128, 1)
    assert 0.0 <= probs.min() and probs.max() <= 1.0


@pytest.mark.spark
@pytest.mark.horovod
def test_existing_model_is_refused_kept_on_resume_and_replaced_on_overwrite(trained, small_dataset):
    model_dir, result, _ = trained
    before = (model_dir / "model.json").read_bytes()
    with pytest.raises(OutputExistsError, match="already holds a trained model.*--overwrite"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(model_dir), base_filters=4))
    again = run_train(TrainConfig(data=str(small_dataset), model_dir=str(model_dir), base_filters=8,
                                  resume=True))
    assert again.epochs == result.epochs and (model_dir / "model.json").read_bytes() == before

    copy = model_dir.parent / "replaced"
    shutil.copytree(model_dir, copy)
    replaced = run_train(TrainConfig(data=str(small_dataset), model_dir=str(copy), base_filters=4,
                                     epochs=1, batch_size=4, steps_per_epoch=1, validation_steps=1,
                                     overwrite=True))
    assert json.loads((copy / "model.json").read_text())["base_filters"] == 4
    assert len(replaced.epochs) == 1


@pytest.mark.spark
@pytest.mark.horovod
def test_training_stops_early_when_val_loss_stops_improving(small_dataset, tmp_path):
    """With a vanishing learning rate the model stands still: the whole val split scores the same
    every epoch, so patience 1 stops after epoch 2 and the model of epoch 1 is kept."""
    result = run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), epochs=6,
                                   batch_size=4, steps_per_epoch=1, base_filters=4, lr=1e-12,
                                   patience=1, min_delta=1e-4))
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert result.stopped_early and result.best_epoch == 1
    assert result.epochs[0]["val_loss"] == pytest.approx(result.epochs[1]["val_loss"], abs=1e-4)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["training"]["stopped_early"] and card["best_epoch"] == 1


@pytest.mark.spark
@pytest.mark.horovod
@pytest.mark.slow
def test_two_horovod_workers_on_a_standalone_cluster_stay_in_step(standalone_cluster, small_dataset,
                                                                   tmp_path):
    """Two workers as Spark tasks of a real master + worker on 127.0.0.1 train one epoch (each
    validates on its own row groups of the val split, which hold different numbers of tiles)."""
    model_dir = tmp_path / "model"
    done = rs_cluster("--quiet", "--events", str(tmp_path / "events.jsonl"), "train",
                      "--data", str(small_dataset), "--model-dir", str(model_dir), "--epochs", "1",
                      "--num-proc", "2", "--master", standalone_cluster.master_url, *QUICK, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    workers = sorted(result["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["pid"] != workers[1]["pid"]
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]

    card = json.loads((model_dir / "model.json").read_text())
    assert card["world_size"] == 2 and card["training"]["lr_scaled"] == pytest.approx(2e-3)
    # Only rank 0 wrote: every TensorBoard file carries its pid, none rank 1's.
    event_files = list((model_dir / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    # events.out.tfevents.<time>.<host>.<pid>.<n>.v2
    assert {re.search(r"\.(\d+)\.\d+\.v2$", f.name).group(1) for f in event_files} \
        == {str(workers[0]["pid"])}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "model"]
    events = [parse_event(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "metrics"] == [1]


@pytest.mark.horovod
@pytest.mark.slow
def test_killed_run_resumes_to_a_complete_model(small_dataset, tmp_path):
    model_dir = tmp_path / "model"
    events = tmp_path / "events.jsonl"
    args = ["train", "--data", str(small_dataset), "--model-dir", str(model_dir), "--epochs", "12",
            "--patience", "0", "--validation-steps", "2", *QUICK]
    proc = subprocess.Popen([sys.executable, "-m", "rs_cluster", "-q", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = work_dir(model_dir) / "state.json"
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.exists(), "no checkpoint was written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = json.loads(state.read_text())["epochs_done"]
    assert killed_after < 12, "the run finished before it could be killed"
    assert not model_dir.exists()  # a half-trained run does not look like a model

    refused = rs_cluster("-q", *args)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = rs_cluster("-q", "--events", str(events), *args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["resumed_from"] >= killed_after
    card = json.loads((model_dir / "model.json").read_text())
    assert [e["epoch"] for e in card["epochs"]] == list(range(1, 13))
    assert card["training"]["resumed_from_epoch"] >= killed_after
    assert [json.loads(x)["epoch"] for x in (model_dir / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, 13))
    assert not work_dir(model_dir).exists()
    messages = [parse_event(x).get("message", "") for x in events.read_text().splitlines()]
    assert any("resuming" in m for m in messages)


# -- bad input ---------------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        TrainConfig.from_dict({"data": "d", "model_dir": "m", "learning_rate": 0.1})
    for bad in ({"epochs": 0}, {"num_proc": 0}, {"lr": 0.0}, {"batch_size": -1}, {"tile_size": 100},
                {"resume": True, "overwrite": True}):
        with pytest.raises(ConfigError):
            TrainConfig.from_dict({"data": "d", "model_dir": "m", **bad})
    cfg = TrainConfig.from_dict({"data": "d", "model_dir": "m", "nics": ["lo"], "num_proc": 2})
    assert cfg.nics == ("lo",)


def test_cli_help_imports_nothing_heavy():
    code = ("import sys, contextlib, io\n"
            "from rs_cluster.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['train', '--help'])\n"
            "    except SystemExit: pass\n"
            "assert '--num-proc' in out.getvalue() and '--resume' in out.getvalue()\n"
            "print(sorted(m for m in ('tensorflow', 'horovod', 'pyspark', 'petastorm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_folder_that_is_not_a_prepared_dataset_is_refused(tmp_path):
    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "a.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a prepared dataset"):
        run_train(TrainConfig(data=str(tmp_path / "tiles"), model_dir=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


@pytest.mark.spark
def test_tile_sizes_that_do_not_fit_the_model_are_refused(small_dataset, tmp_path):
    with pytest.raises(InputError, match="has 128 px tiles but the model is for 256 px"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), tile_size=256))
    # A dataset whose dataset.json disagrees with its tiles, or whose tiles the U-Net cannot halve.
    for claimed, message in ((64, "holds 128x128 px tiles but dataset.json says 64"),
                             (100, "multiple of 16")):
        fake = tmp_path / f"tiles{claimed}"
        fake.mkdir()
        for split in ("train", "val", "test"):
            (fake / split).symlink_to(small_dataset / split)
        meta = json.loads((small_dataset / "dataset.json").read_text())
        (fake / "dataset.json").write_text(json.dumps({**meta, "tile_size": claimed}))
        with pytest.raises(InputError, match=message):
            run_train(TrainConfig(data=str(fake), model_dir=str(tmp_path / "m")))
    assert not any(p.name.startswith(".m") for p in tmp_path.iterdir())


@pytest.mark.spark
def test_a_dataset_with_an_empty_split_is_refused(spark, small_pairs, tmp_path):
    """A real prepare output whose val fraction is 0."""
    from tests import devdata
    from rs_cluster.prepare import PrepareConfig, run_prepare

    images, masks = devdata.link_pairs(tmp_path / "pairs", {
        "xiamen_robosat_z18": devdata.first_files("xiamen_robosat_z18", 2)})
    run_prepare(PrepareConfig(images=str(images), masks=str(masks), output=str(tmp_path / "tiles"),
                              split=(1.0, 0.0, 0.0)), spark=spark)
    with pytest.raises(InputError, match="'val' split has no tiles"):
        run_train(TrainConfig(data=str(tmp_path / "tiles"), model_dir=str(tmp_path / "m")))


@pytest.mark.spark
def test_more_workers_than_spark_slots_fails_fast(spark, small_dataset, tmp_path):
    started = time.monotonic()
    with pytest.raises(ClusterError, match="--num-proc 3 needs 3 task slots.*offers 2"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), num_proc=3),
                  spark=spark)
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-made model or run folder


@pytest.mark.spark
def test_model_dir_holding_something_else_or_an_unfinished_run_is_refused(small_dataset, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds no rs-cluster model"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(other)))
    assert (other / "notes.txt").read_text() == "mine"

    unfinished = tmp_path / "unfinished"
    work_dir(unfinished).mkdir()
    (work_dir(unfinished) / "state.json").write_text(json.dumps({
        "epochs_done": 2, "fingerprint": {"data": "elsewhere"}, "history": [], "wall_time_s": 1}))
    with pytest.raises(OutputExistsError, match="unfinished training run.*--resume"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(unfinished)))
    with pytest.raises(ConfigError, match="cannot resume.*data="):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(unfinished), resume=True))


@pytest.mark.spark
def test_more_workers_than_row_groups_fall_back_to_sharding_by_row(small_dataset, tmp_path):
    """Three workers over the val split's two row groups: each reads all, keeps every third tile."""
    pytest.importorskip("tensorflow")
    from rs_cluster import model as unet
    from rs_cluster.dataset import load_dataset
    from rs_cluster.train import _EventLog, _open_reader

    info = load_dataset(str(small_dataset))
    url, tiles = info.split_url("val"), info.split_tiles("val")
    log = _EventLog(tmp_path / "events.jsonl")
    seen: list[set[bytes]] = []
    for rank in range(3):
        reader, shard = _open_reader(url, rank, 3, 0, False, log, "val")
        try:
            assert shard == (rank, 3)
            batches = unet.tile_batches(reader, 1, shard=shard).take(tiles // 3)
            seen.append({x.numpy().tobytes() for x, _ in batches})
        finally:
            reader.stop()
            reader.join()
    log.close()
    assert all(len(s) == tiles // 3 for s in seen)
    assert len(seen[0] | seen[1] | seen[2]) == 3 * (tiles // 3)  # disjoint shards
    assert "fewer Parquet row groups" in (tmp_path / "events.jsonl").read_text()
