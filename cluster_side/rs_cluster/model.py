"""The U-Net of the original 2019 pipeline, its losses and metrics, and the tile input pipeline.

The network takes tiles already scaled to [0, 1] (uint8 / 255, see ``INPUT_SCALE``) and returns a
per-pixel building probability. It holds built-in Keras layers only, so a saved model loads
without custom objects, and passes predict's check of what it loads (:mod:`rs_cluster.keras_file`:
the ``.keras`` format, no Lambda layers, Keras's safe mode); the losses and metrics here are
needed for training only.

Importing this module imports TensorFlow: only training workers (and tests) import it.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

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
    layers = tf.keras.layers

    def conv_block(x: Any, filters: int, name: str) -> Any:
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                              kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
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
        x = layers.Conv2D(filters, 2, padding="same", activation="relu",
                          kernel_initializer="he_normal", name=f"up{level}_conv")(x)
        x = layers.Concatenate(axis=3, name=f"up{level}_skip")([skip, x])
        x = conv_block(x, filters, f"up{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="building")(x)
    return tf.keras.Model(inputs, outputs, name="unet")


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


def augment(image: Any, mask: Any) -> tuple[Any, Any]:
    """Random flips and 90-degree rotations, the same for a tile and its mask."""
    bands = image.shape[-1]
    both = tf.concat([image, mask], axis=-1)
    both = tf.image.random_flip_left_right(both)
    both = tf.image.random_flip_up_down(both)
    both = tf.image.rot90(both, k=tf.random.uniform((), 0, 4, dtype=tf.int32))
    return both[..., :bands], both[..., bands:]


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
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=train).prefetch(tf.data.AUTOTUNE)


def weights_digest(model: tf.keras.Model) -> str:
    """sha256 of every weight, in order: equal digests mean bit-identical models."""
    import hashlib

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(w.tobytes())
    return h.hexdigest()
