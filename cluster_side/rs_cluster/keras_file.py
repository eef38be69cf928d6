"""Which model files predict agrees to load, and how it loads them.

A model folder may come from anyone (the plugin uploads what the analyst picked), and loading a
Keras model can run code: a Lambda layer carries Python, and Keras 2.15's ``safe_mode`` refuses
only the Lambda that carries bytecode, not one that names a function of an importable module.
So only the Keras v3 format (``.keras``, a zip whose ``config.json`` describes every layer) is
loaded, and its config is read before Keras deserialises anything: every object must be one of
Keras's own, and no layer may be a Lambda. H5 and SavedModel files are refused, since their code
cannot be checked the same way. ``rs-cluster train`` writes ``model.keras`` with built-in layers
only (see :mod:`rs_cluster.model`).

Imports no TensorFlow until :func:`load_model` runs.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Iterator

from rs_cluster.errors import ConfigError

KERAS_SUFFIX = ".keras"
CONFIG_ENTRY = "config.json"
# Layers that run Python or TensorFlow functions named in the file.
CODE_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
_MAX_CONFIG_BYTES = 64 * 1024 * 1024


def confined_model_file(model_dir: str, name: Any, card_path: str) -> str:
    """The path of the model file ``name`` given in the card ``card_path``: a plain file name,
    resolving (symlinks followed) to a file inside ``model_dir``."""
    what = f"{card_path}: 'model_file' {name!r}"
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\x00" in name):
        raise ConfigError(f"{what} must be a file name inside the model folder {model_dir}, "
                          "such as 'model.keras'")
    path = os.path.join(model_dir, name)
    real, root = os.path.realpath(path), os.path.realpath(model_dir)
    if not real.startswith(root.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{what} leads outside the model folder {model_dir} (through a "
                          f"symlink to {real}); copy the model file into the folder")
    if not os.path.isfile(real):
        raise ConfigError(f"{path}: model file named in {card_path} not found")
    return path


def check_model_file(path: str) -> None:
    """Refuses a model file predict will not load, naming the file and the reason: not the
    Keras v3 format, or holding a Lambda layer or an object that is not Keras's own."""
    if not path.endswith(KERAS_SUFFIX) or not zipfile.is_zipfile(path):
        raise ConfigError(f"{path}: only the Keras v3 format (.keras) is loaded, since H5 and "
                          "SavedModel files can run code that cannot be checked first; save the "
                          "model with model.save('model.keras') and name that in model.json")
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(CONFIG_ENTRY)
            if info.file_size > _MAX_CONFIG_BYTES:
                raise ConfigError(f"{path}: its {CONFIG_ENTRY} is {info.file_size} bytes; "
                                  "not a model rs-cluster loads")
            config = json.loads(z.read(info).decode("utf-8"))
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: not a readable Keras v3 model ({e})") from None
    if isinstance(config, dict):
        # The training configuration (loss, metrics) is never read: models load without it.
        config = {k: v for k, v in config.items() if k != "compile_config"}
    for obj in _objects(config):
        module, class_name = obj.get("module"), obj.get("class_name")
        if class_name in CODE_LAYERS:
            layer = obj.get("config")
            name = layer.get("name") if isinstance(layer, dict) else None
            raise ConfigError(f"{path}: its {class_name} layer {name!r} calls a function that the "
                              "model file names, which could run any code; rs-cluster loads models "
                              "of built-in Keras layers only (no Lambda layers): rebuild the model "
                              "without it")
        if isinstance(module, str) and module != "keras" and not module.startswith("keras."):
            raise ConfigError(f"{path}: it uses {class_name!r} from the module {module!r}, which "
                              "is not part of Keras; rs-cluster loads models of built-in Keras "
                              "objects only")


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every serialised object (a dict with a ``class_name``) in a Keras config."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_model(path: str) -> Any:
    """The Keras model in ``path``, checked first (:func:`check_model_file`), loaded in Keras's
    safe mode and without its training configuration."""
    check_model_file(path)
    import tensorflow as tf

    return tf.keras.models.load_model(path, compile=False, safe_mode=True)
