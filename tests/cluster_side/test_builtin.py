"""The built-in model (rs_cluster/builtin_models/, issue 12): ``predict --model builtin`` gives a
usable, georeferenced mask of a real dev raster it was not trained on; ``train --init-model
builtin`` fine-tunes it; the package's wheel carries it; a wrong name is refused, listing the names.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rs_cluster import builtin
from rs_cluster.errors import ConfigError

from tests import devdata

REPO = Path(__file__).resolve().parents[2]
CARD = builtin.FOLDER / builtin.DEFAULT / "model.json"


def rs_cluster(*args: str, events: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "cluster_side")}
    extra = ["--events", str(events)] if events else []
    return subprocess.run([sys.executable, "-m", "rs_cluster", "--quiet", *extra, *args],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def held_out(subset: str) -> str:
    """A raster of ``subset`` in the built-in model's test split (never trained or validated on)."""
    card = json.loads(CARD.read_text())
    prefix = f"{subset}__"
    return next(r[len(prefix):] for r in card["builtin"]["splits"]["test"] if r.startswith(prefix))


def test_the_default_built_in_model_is_installed_with_its_card():
    assert builtin.DEFAULT in builtin.names()
    card = json.loads(CARD.read_text())
    assert card["arch"] == "effnet_lite0_unet" and card["model_file"] == "model.keras"
    facts = card["builtin"]
    assert facts["name"] == builtin.DEFAULT and 0 < facts["test_iou"] < 1
    assert facts["epochs_run"] >= 1 and facts["terms"]
    assert "path" not in card["dataset"]  # no local path of the training run
    trained = set(facts["splits"]["train"]) | set(facts["splits"]["val"])
    assert not trained & set(facts["splits"]["test"])


@pytest.mark.parametrize("ref, found", [("builtin", builtin.DEFAULT),
                                        (f"builtin:{builtin.DEFAULT}", builtin.DEFAULT),
                                        ("models/builtin", None), ("builtinx", None)])
def test_references_to_built_in_models(ref, found):
    assert builtin.name_of(ref) == found
    assert builtin.resolve(ref) == (ref if found is None else str(builtin.FOLDER / found))


@pytest.mark.parametrize("ref", ["builtin:nope", "builtin:../x", "builtin:Buildings-V1"])
def test_an_unknown_built_in_model_is_refused_listing_those_there_are(ref):
    with pytest.raises(ConfigError, match=rf"no such built-in model \(built in: builtin:{builtin.DEFAULT}"):
        builtin.name_of(ref)


@pytest.mark.spark
@pytest.mark.parametrize("subset", ["kampala_oam_fair", "inria_austin_chicago"])
def test_predict_with_the_built_in_model_finds_the_buildings_of_a_raster_it_never_saw(
        subset, tmp_path):
    """A georeferenced Kampala tile and a non-georeferenced Inria Chicago/Austin crop from the
    model's test split: the mask is on the input's grid and overlaps the reference buildings."""
    name = held_out(subset)
    image = devdata.subset(subset) / "images" / name
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / name).symlink_to(image)
    proc = rs_cluster("predict", "--model", "builtin", "--input", str(inputs),
                      "--output", str(tmp_path / "out"), "--master", "local[1]")
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(tmp_path / "out" / f"{Path(name).stem}_mask.tif") as mask, \
            rasterio.open(image) as src, \
            rasterio.open(devdata.subset(subset) / "gt" / name) as gt:
        assert (mask.crs, mask.transform, mask.shape) == (src.crs, src.transform, src.shape)
        predicted, truth = mask.read(1) > 0, gt.read(1) > 0
    iou = (predicted & truth).sum() / max(1, (predicted | truth).sum())
    assert iou > 0.3, f"{name}: IoU {iou:.3f}"


def test_an_unknown_built_in_model_stops_predict_before_spark(tmp_path):
    proc = rs_cluster("predict", "--model", "builtin:nope", "--input", str(tmp_path),
                      "--output", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "builtin:nope: no such built-in model" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.spark
@pytest.mark.horovod
def test_fine_tuning_starts_from_the_built_in_model(small_dataset, tmp_path):
    """One step at a vanishing learning rate: the card names the built-in model (not this host's
    path to it, which another host would not have) and the sha256 of its weights."""
    from rs_cluster.progress import JsonLinesReporter, parse_event
    from rs_cluster.train import TrainConfig, run_train

    stream = io.StringIO()
    run_train(TrainConfig(data=str(small_dataset), model_dir=str(tmp_path / "tuned"), epochs=1,
                          batch_size=2, steps_per_epoch=1, validation_steps=1, lr=1e-12,
                          init_model="builtin"), reporter=JsonLinesReporter(stream))
    card = json.loads((tmp_path / "tuned" / "model.json").read_text())
    shipped = json.loads(CARD.read_text())
    weights = (builtin.FOLDER / builtin.DEFAULT / "model.keras").read_bytes()
    assert card["init_model"]["location"] == f"builtin:{builtin.DEFAULT}"
    assert card["init_model"]["model_sha256"] == hashlib.sha256(weights).hexdigest()
    assert (card["arch"], card["base_filters"]) == (shipped["arch"], shipped["base_filters"])
    messages = [parse_event(x).get("message", "") for x in stream.getvalue().splitlines()]
    assert any(f"starting from the weights of builtin:{builtin.DEFAULT}" in m for m in messages)


def test_the_wheel_carries_the_built_in_model(tmp_path):
    """What a cluster installs with pip: the model's files, byte for byte, inside the wheel."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(REPO / "cluster_side")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("rs_cluster-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        for path in (builtin.FOLDER / builtin.DEFAULT).iterdir():
            member = f"rs_cluster/builtin_models/{builtin.DEFAULT}/{path.name}"
            assert z.read(member) == path.read_bytes(), member
        assert "rs_cluster/log4j2.properties" in z.namelist()


def test_the_built_in_models_threshold_and_size_are_what_predict_uses():
    from rs_cluster.predict import ModelCard

    card = ModelCard.load(builtin.resolve("builtin"))
    shipped = json.loads(CARD.read_text())
    assert card.threshold == pytest.approx(shipped["threshold"]) and card.tile_size == 256
    assert np.isclose(card.scale_value, 255.0)
