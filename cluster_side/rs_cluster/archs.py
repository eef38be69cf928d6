"""The networks :func:`rs_cluster.model.build_model` builds, by name, without TensorFlow.

The CLI, the job spec and the driver of ``rs-cluster train`` check a network's name and the tile
size it needs before any worker imports TensorFlow; :mod:`rs_cluster.model` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rs_cluster.errors import ConfigError

# Four 2x2 poolings: a U-Net tile side must divide by 2**4.
UNET_DOWNSAMPLING = 16
# EfficientNet-Lite0's deepest features are at stride 32 (rs_cluster.encoders.efficientnet_lite
# DOWNSAMPLING, which imports TensorFlow; a test keeps the two equal).
EFFNET_DOWNSAMPLING = 32


@dataclass(frozen=True)
class Arch:
    """A network :func:`rs_cluster.model.build_model` builds: what it is and what tiles it takes."""

    name: str
    summary: str
    # A tile side must be a multiple of this, for the skips to line up with the decoder.
    downsampling: int
    # The ImageNet-pretrained encoder it starts from; None: every weight starts random.
    encoder: str | None = None
    # The number of bands it needs; None: any.
    bands: int | None = None


ARCHS: Mapping[str, Arch] = {
    "unet2019": Arch("unet2019", "the 2019 U-Net, no normalisation (reproduces the thesis)",
                     UNET_DOWNSAMPLING),
    "unet_bn": Arch("unet_bn", "the 2019 U-Net shape with batch normalisation, from scratch",
                    UNET_DOWNSAMPLING),
    "effnet_lite0_unet": Arch("effnet_lite0_unet", "a U-Net decoder with batch normalisation over "
                              "an ImageNet-pretrained EfficientNet-Lite0 encoder",
                              EFFNET_DOWNSAMPLING, encoder="efficientnet_lite0", bands=3),
}
DEFAULT_ARCH = "effnet_lite0_unet"
# What a caller that allows it gets when the default's weights package is not installed.
FALLBACK_ARCH = "unet_bn"
# What a model card without an "arch" means: every model before networks were a choice.
LEGACY_ARCH = "unet2019"


def get_arch(arch: str) -> Arch:
    """The :class:`Arch` named ``arch``; a :class:`ConfigError` naming the choices otherwise."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown network {arch!r}: choose one of {', '.join(ARCHS)} "
                          f"(the default is {DEFAULT_ARCH})")
    return ARCHS[arch]


def tile_problem(arch: str, tile_size: int, bands: int | None = None) -> str | None:
    """Why the network ``arch`` cannot take ``tile_size`` px tiles of ``bands`` bands, naming
    the numbers and what would fit; None when it can."""
    spec = get_arch(arch)
    d = spec.downsampling
    if tile_size < d or tile_size % d:
        below = tile_size // d * d
        fits = f"{d}" if below < d else f"{below} or {below + d}"
        return (f"{arch} needs a tile size that is a multiple of {d} (it halves the tile "
                f"{d.bit_length() - 1} times); {tile_size} px is not: prepare tiles of {fits} px")
    if bands is not None and spec.bands is not None and bands != spec.bands:
        return (f"{arch} needs {spec.bands} bands (RGB, as its ImageNet encoder was trained on), "
                f"the tiles have {bands}; choose --arch {FALLBACK_ARCH} for other band counts")
    return None


def check_input(arch: str, tile_size: int, bands: int) -> None:
    """Refuses tiles the network ``arch`` cannot take, naming the numbers and what would fit."""
    problem = tile_problem(arch, tile_size, bands)
    if problem:
        raise ConfigError(problem)


AUGMENTATION = ("flip_left_right", "flip_up_down", "rot90", "brightness 0.1", "contrast 0.8-1.2",
                "saturation 0.8-1.2", "zoom 1-1.25x")
"""What training does to each tile (``rs_cluster.model.augment_tile``), as the model card lists it."""
