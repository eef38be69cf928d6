"""Stage configs built from dicts (job specs) refuse unknown keys, naming them."""

from __future__ import annotations

import pytest

from rs_cluster.errors import ConfigError
from rs_cluster.evaluate import EvaluateConfig
from rs_cluster.predict import PredictConfig
from rs_cluster.prepare import PrepareConfig
from rs_cluster.train import TrainConfig


@pytest.mark.parametrize("cls,stage,required", [
    (PrepareConfig, "prepare", {"images": "i", "masks": "m", "output": "o"}),
    (TrainConfig, "train", {"data": "d", "model_dir": "m"}),
    (PredictConfig, "predict", {"model": "m", "input": "i", "output": "o"}),
    (EvaluateConfig, "evaluate", {"pred": "p", "truth": "t"}),
])
def test_unknown_keys_are_refused_by_name(cls, stage, required):
    with pytest.raises(ConfigError, match=rf"^{stage}: unknown setting\(s\) colour, tilesize; known: "):
        cls.from_dict({**required, "tilesize": 64, "colour": "red"})
    assert isinstance(cls.from_dict(required), cls)


def test_prepare_split_from_a_list():
    cfg = PrepareConfig.from_dict({"images": "i", "masks": "m", "output": "o", "split": [0.5, 0.5, 0]})
    assert cfg.split == (0.5, 0.5, 0.0)
    with pytest.raises(ConfigError, match="adding up to 1"):
        PrepareConfig.from_dict({"images": "i", "masks": "m", "output": "o", "split": [0.5, 0.2, 0]})
