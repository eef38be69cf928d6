"""The U-Net, its loss, metrics and augmentation (TensorFlow on the CPU, real dev imagery)."""

from __future__ import annotations

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
    import rasterio

    name = devdata.first_files("xiamen_robosat_z18", 1)[0]
    with rasterio.open(devdata.subset("xiamen_robosat_z18") / "images" / name) as src:
        image = np.moveaxis(src.read((1, 2, 3)), 0, -1)[:128, :128]
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
