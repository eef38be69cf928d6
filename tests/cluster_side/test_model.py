"""The U-Net, its loss, metrics and augmentation (TensorFlow on the CPU, real dev imagery), and
which model folders predict agrees to load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import devdata

tf = pytest.importorskip("tensorflow")
unet = pytest.importorskip("rs_cluster.model")


def _layers(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_unet_has_the_2019_shape():
    model = unet.build_unet(128, base_filters=64)
    assert model.input_shape == (None, 128, 128, 3)
    assert model.output_shape == (None, 128, 128, 1)
    k = tf.keras.layers
    assert len(_layers(model, k.MaxPooling2D)) == 4
    assert len(_layers(model, k.UpSampling2D)) == 4
    assert len(_layers(model, k.Concatenate)) == 4
    widths = [layer.filters for layer in _layers(model, k.Conv2D)]
    # two 3x3 convs per level down, the bottom, and per level up (after a 2x2 up-conv)
    assert widths[:10] == [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024]
    assert widths[10:] == [512, 512, 512, 256, 256, 256, 128, 128, 128, 64, 64, 64, 1]
    drops = _layers(model, k.Dropout)
    assert [d.rate for d in drops] == [0.5, 0.5]
    # dropout right after the 4th down block and the bottom block
    assert drops[0].input.node.layer.name == "down4_conv2"
    assert drops[1].input.node.layer.name == "bottom_conv2"
    last = model.layers[-1]
    assert last.kernel_size == (1, 1) and last.activation.__name__ == "sigmoid"
    assert 31_000_000 < model.count_params() < 31_100_000


def test_unet_width_is_configurable_and_tile_must_halve_four_times():
    small = unet.build_unet(64, base_filters=4)
    assert small.count_params() < 130_000  # 16x narrower: ~256x fewer weights than 31M
    with pytest.raises(ValueError, match="multiple of 16"):
        unet.build_unet(120, base_filters=4)


def test_saved_model_loads_without_custom_objects(tmp_path):
    model = unet.build_unet(128, base_filters=4)
    x = np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32)
    model.save(tmp_path / "model.keras")
    loaded = tf.keras.models.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-6)
    out = loaded.predict(x, verbose=0)
    assert out.min() >= 0 and out.max() <= 1


def test_dice_loss_and_iou_metric():
    truth = np.zeros((1, 8, 8, 1), np.float32)
    truth[0, :4] = 1  # half the tile is building
    assert float(unet.dice_loss(truth, truth)[0]) == pytest.approx(0, abs=1e-6)
    assert float(unet.dice_loss(truth, 1 - truth)[0]) == pytest.approx(1, abs=0.02)
    pred = np.zeros_like(truth)
    pred[0, 2:6] = 0.9  # overlaps 2 of the 4 building rows, 2 false rows: IoU 16 / 48
    iou = unet.make_metrics()[1]
    iou.update_state(truth, pred)
    assert float(iou.result()) == pytest.approx(16 / 48)
    loss = unet.bce_dice_loss(truth, pred)
    assert loss.shape == (1,) and float(loss[0]) > 0


def test_augmentation_moves_image_and_mask_together():
    """A real Xiamen tile whose mask is drawn from the image stays aligned after flips/rotations."""
    image = _xiamen_tile()
    mask = (image[..., :1] > 128).astype(np.uint8)  # a mask that is a function of the pixels
    x, y = unet.to_model_input(image, mask)
    assert float(tf.reduce_max(x)) <= 1.0
    tf.random.set_seed(1)
    seen = set()
    for _ in range(12):
        ax, ay = unet.augment(x, y)
        np.testing.assert_array_equal(ay.numpy(), (ax.numpy()[..., :1] > 128 / 255).astype(np.float32))
        seen.add(ax.numpy().tobytes())
    assert len(seen) > 2  # it does change the tile


def _xiamen_tile() -> np.ndarray:
    import rasterio

    name = devdata.first_files("xiamen_robosat_z18", 1)[0]
    with rasterio.open(devdata.subset("xiamen_robosat_z18") / "images" / name) as src:
        return np.moveaxis(src.read((1, 2, 3)), 0, -1)[:128, :128]


def test_colour_augmentation_changes_the_image_within_range_and_never_the_mask():
    x, y = unet.to_model_input(_xiamen_tile(), np.ones((128, 128, 1), np.uint8))
    tf.random.set_seed(2)
    means = set()
    for _ in range(8):
        ax, ay = unet.augment_tile(x, y)
        assert 0.0 <= float(tf.reduce_min(ax)) and float(tf.reduce_max(ax)) <= 1.0
        np.testing.assert_array_equal(ay.numpy(), np.ones((128, 128, 1), np.float32))
        means.add(round(float(tf.reduce_mean(ax)), 4))
    assert len(means) == 8  # brightness and contrast differ from draw to draw
    assert abs(float(tf.reduce_mean(unet.augment_photometric(x))) - float(tf.reduce_mean(x))) <= 0.2


def test_zoom_keeps_the_mask_binary_and_on_its_buildings():
    """The mask is drawn from the image; after a zoom (bilinear image, nearest mask) the two still
    agree, the mask has only 0 and 1, and the tile is magnified (its top-left pixel moves)."""
    image = _xiamen_tile()
    mask = (image[..., :1] > 128).astype(np.uint8)
    x, y = unet.to_model_input(image, mask)
    tf.random.set_seed(3)
    moved = 0
    for _ in range(8):
        ax, ay = unet.augment_zoom(x, y)
        assert ax.shape == x.shape and ay.shape == y.shape
        assert set(np.unique(ay.numpy())) <= {0.0, 1.0}
        redrawn = ax.numpy()[..., :1] > 128 / 255
        agree = np.mean(redrawn == (ay.numpy() > 0.5))
        assert agree > 0.95, agree
        moved += not np.array_equal(ax.numpy(), x.numpy())
    assert moved >= 6


# -- loading a model folder safely ----------------------------------------------------------------

PAYLOAD_MARKER: dict[str, Path] = {}


def lambda_payload(x):
    """What a hostile model's Lambda layer runs: here it only leaves a marker file."""
    PAYLOAD_MARKER["path"].write_text("the model's code ran")
    return x


def model_folder(folder: Path, model_file: str = "model.keras", **card: object) -> Path:
    """A model folder with a tiny real model and its card naming ``model_file``."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    inputs = tf.keras.Input((None, None, 3))
    tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)).save(
        folder / "model.keras")
    (folder / "model.json").write_text(json.dumps({
        "format": "rs-cluster-model", "format_version": 1, "model_file": model_file,
        "architecture": "unet", "tile_size": 128, "bands": ["red", "green", "blue"],
        "input_scaling": {"method": "divide", "value": 255.0}, "threshold": 0.5, **card}))
    return folder


def load_and_predict(folder: Path) -> np.ndarray:
    from rs_cluster.predict import ModelCard, load_predict_fn

    predict = load_predict_fn(ModelCard.load(folder))
    return predict(np.zeros((1, 128, 128, 3), np.uint8))


def test_a_model_folder_with_built_in_layers_loads_and_predicts(tmp_path):
    model = unet.build_unet(128, base_filters=2)
    folder = model_folder(tmp_path / "unet")
    model.save(folder / "model.keras")
    assert load_and_predict(folder).shape[:3] == (1, 128, 128)


@pytest.mark.parametrize("name, problem", [
    ("../../x.keras", "a file name inside the model folder"),
    ("/tmp/x.keras", "a file name inside the model folder"),
    ("sub/x.keras", "a file name inside the model folder"),
    ("link.keras", "leads outside the model folder"),
])
def test_a_model_file_outside_the_model_folder_is_refused(tmp_path, name, problem):
    from rs_cluster.errors import ConfigError

    elsewhere = model_folder(tmp_path / "elsewhere")
    (tmp_path / "x.keras").write_bytes((elsewhere / "model.keras").read_bytes())
    folder = model_folder(tmp_path / "a" / "model", model_file=name)
    (folder / "link.keras").symlink_to(elsewhere / "model.keras")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.keras").write_bytes((elsewhere / "model.keras").read_bytes())
    with pytest.raises(ConfigError) as e:
        load_and_predict(folder)
    assert f"model.json: 'model_file' {name!r}" in str(e.value) and problem in str(e.value)


def test_a_model_with_a_lambda_layer_is_refused_without_running_its_code(tmp_path):
    """Keras's safe mode refuses Python bytecode in a Lambda layer, yet rebuilds one that names an
    importable function, and runs it while loading: the model is refused before Keras sees it."""
    import json
    import zipfile

    from rs_cluster.errors import ConfigError

    PAYLOAD_MARKER["path"] = tmp_path / "built"
    inputs = tf.keras.Input((None, None, 3))
    hostile = tf.keras.layers.Lambda(lambda_payload, name="innocent")(inputs)
    folder = model_folder(tmp_path / "model")
    tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1)(hostile)).save(tmp_path / "built.keras")
    with zipfile.ZipFile(tmp_path / "built.keras") as z:
        files = {name: z.read(name) for name in z.namelist()}
    config = json.loads(files["config.json"])
    layer = next(lay for lay in config["config"]["layers"] if lay["class_name"] == "Lambda")
    layer["config"].update(function_type="function", module=__name__, function={
        "module": __name__, "class_name": "function", "config": "lambda_payload",
        "registered_name": None})
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(folder / "model.keras", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)

    PAYLOAD_MARKER["path"] = tmp_path / "loaded"
    with pytest.raises(ConfigError) as e:
        load_and_predict(folder)
    assert "model.keras" in str(e.value) and "Lambda layer 'innocent'" in str(e.value)
    assert not (tmp_path / "loaded").exists()


def test_a_model_in_another_keras_format_is_refused_with_what_to_do(tmp_path):
    from rs_cluster.errors import ConfigError

    folder = model_folder(tmp_path / "model", model_file="model.h5")
    inputs = tf.keras.Input((None, None, 3))
    tf.keras.Model(inputs, tf.keras.layers.Conv2D(1, 1)(inputs)).save(folder / "model.h5")
    with pytest.raises(ConfigError, match=r"model\.h5: .*only the Keras v3 format \(\.keras\)"):
        load_and_predict(folder)
