"""What a training run shows of itself besides numbers: preview images and a verdict.

An analyst who starts a run from QGIS cannot read a val IoU of 0.08 as "this model is useless".
So rank 0 keeps a few validation tiles fixed for the whole run (the first rows of the val split in
its stored order: the same tiles every epoch and after a resume) and every ``--preview-every``
epochs draws them as one PNG, a row per tile: the image, the reference mask, the predicted
probability. At the end the best epoch's model is judged on a few more of those tiles: a model
that marks (almost) no buildings where the reference has some, or whose val IoU is near zero, is
called "weak", with the reason and what to try.

Rank 0 writes ``previews/epoch-NNNN.png`` into the run's work folder (uploaded by the work
mirror before the event names it); the driver copies it into the job's ``previews/`` folder
(:func:`copy_preview`). The module imports NumPy only; TensorFlow where a PNG is encoded.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rs_cluster import storage
from rs_cluster.errors import StorageError

PREVIEWS_DIR = "previews"
PREVIEW_TILES = 4  # rows of a preview
VERDICT_TILES = 32  # tiles the final model is judged on, and its threshold tuned on (preview tiles first)
MAX_CELL_PX = 256  # larger tiles are shown downscaled
GAP_PX, GAP_GREY = 4, 64
MAX_PNG_BYTES = 2 * 1024 * 1024
KEEP_IN_WORK = 3  # previews left in the work folder, for a driver that polls late
KEEP_COPIES = 20  # previews kept in the --previews folder (the latest)
THRESHOLD = 0.5  # as rs_cluster.model.THRESHOLD
INPUT_SCALE = 255.0  # as rs_cluster.model.INPUT_SCALE
# Verdict: what "learned almost nothing" means.
MIN_VAL_IOU = 0.05
MIN_TRUTH_FRACTION = 0.02  # below this the tiles hold too few buildings to judge by fraction
MIN_FOUND_RATIO = 0.10  # predicted building fraction / reference's
# The other collapse: far more pixels marked than the reference has, at least this share of all
# pixels more (so at least that many false buildings). Such a model scores an IoU near the
# reference's building share (0.45 on dense tiles) without having learned a thing.
MAX_EXCESS_FRACTION = 0.4
# The threshold written to the card: the candidate with the highest IoU on the checked tiles, when
# it beats 0.5 by at least MIN_THRESHOLD_GAIN (else 0.5: a tie is no reason to move).
THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))  # 0.2 ... 0.8
MIN_THRESHOLD_GAIN = 0.005
ADVICE = ("try more epochs, more image pairs, or fine-tuning a model that already finds buildings "
          "(Fine-tune in QGIS, --init-model on the command line)")
_NAME = re.compile(rf"{PREVIEWS_DIR}/epoch-\d{{4}}\.png")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def preview_name(epoch: int) -> str:
    """The preview's path inside the work folder (and its name in ``--previews``)."""
    return f"{PREVIEWS_DIR}/epoch-{epoch:04d}.png"


def preview_due(epoch: int, every: int, epochs: int, last: bool) -> bool:
    """Whether epoch ``epoch`` (1-based) gets a preview: every ``every``-th one and the last
    (the planned last, or an early stop); none at all with ``every`` 0."""
    return every > 0 and (epoch % every == 0 or epoch >= epochs or last)


# -- rank 0 -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FixedTiles:
    """Validation tiles fixed for the whole run: uint8 images (n, h, w, bands), masks (n, h, w)."""

    images: np.ndarray
    masks: np.ndarray

    @classmethod
    def read(cls, url: str, count: int = VERDICT_TILES) -> "FixedTiles | None":
        """The first ``count`` tiles of the split at ``url`` in its stored order (one reader
        thread, row groups in order: the same tiles every time), those holding buildings first
        so that the preview rows show some; None when the split is empty."""
        from rs_cluster.dataset import make_tile_reader

        images, masks = [], []
        with make_tile_reader(url, num_epochs=1, fields=["image", "mask"], reader_pool_type="dummy",
                              shuffle_row_groups=False) as reader:
            for row in reader:
                images.append(np.asarray(row.image))
                masks.append(np.asarray(row.mask).reshape(row.mask.shape[:2]))
                if len(images) >= count:
                    break
        if not images:
            return None
        order = sorted(range(len(images)), key=lambda i: not np.any(masks[i]))  # stable
        return cls(np.stack([images[i] for i in order]), np.stack([masks[i] for i in order]))

    def write_preview(self, model: Any, epoch: int, work: Path) -> str:
        """Draws the first :data:`PREVIEW_TILES` tiles with ``model``'s predictions into
        ``work/previews/epoch-NNNN.png`` (atomically) and drops older previews there but the
        latest :data:`KEEP_IN_WORK`; returns the path relative to ``work``."""
        k = min(PREVIEW_TILES, len(self.images))
        probs = predict(model, self.images[:k])
        name = preview_name(epoch)
        _write_bytes_atomic(work / name, preview_png(self.images[:k], self.masks[:k], probs))
        for old in sorted((work / PREVIEWS_DIR).glob("epoch-*.png"))[:-KEEP_IN_WORK]:
            old.unlink(missing_ok=True)
        return name

    def assess(self, model: Any, best_val_iou: float | None) -> dict[str, Any]:
        """The verdict on ``model`` (the best epoch's) from its val IoU and these tiles, and the
        threshold tuned on them (:func:`tune_threshold`); the building share it finds is counted
        at that threshold, the one predict will use."""
        probs = predict(model, self.images)
        tuned = tune_threshold(probs, self.masks)
        truth = float(np.mean(self.masks > 0))
        found = float(np.mean(probs >= tuned["threshold"]))
        return {**judge(best_val_iou, truth, found, len(self.images)), **tuned}


def predict(model: Any, images: np.ndarray, batch: int = 4) -> np.ndarray:
    """Building probabilities (n, h, w) of uint8 ``images``, a few tiles at a time (a wide
    network on large tiles would not fit 16 at once on a small host)."""
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].astype(np.float32) / INPUT_SCALE
        out.append(np.asarray(model(x, training=False), dtype=np.float32)[..., 0])
    return np.concatenate(out)


def _cell(a: np.ndarray) -> np.ndarray:
    """``a`` (h, w[, c]) downscaled by a whole factor to at most :data:`MAX_CELL_PX` a side."""
    step = max(1, math.ceil(max(a.shape[:2]) / MAX_CELL_PX))
    return a[::step, ::step]


def _rgb(image: np.ndarray) -> np.ndarray:
    bands = image[..., :3] if image.ndim == 3 else image[..., None]
    if bands.shape[-1] < 3:  # one or two bands: shown as grey from the first
        bands = np.repeat(bands[..., :1], 3, axis=-1)
    return np.clip(bands, 0, 255).astype(np.uint8)


def preview_png(images: np.ndarray, masks: np.ndarray, probs: np.ndarray) -> bytes:
    """One PNG, a row per tile: image (RGB of its first 3 bands), reference mask (white on
    black), predicted probability (grey 0..255); cells :data:`GAP_PX` apart on grey(64)."""
    import tensorflow as tf

    rows = []
    for image, mask, prob in zip(images, masks, probs):
        truth = np.where(mask > 0, 255, 0).astype(np.uint8)
        grey = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
        rows.append([_cell(_rgb(image)), _cell(np.repeat(truth[..., None], 3, axis=-1)),
                     _cell(np.repeat(grey[..., None], 3, axis=-1))])
    h, w = rows[0][0].shape[:2]
    canvas = np.full((len(rows) * h + (len(rows) - 1) * GAP_PX, 3 * w + 2 * GAP_PX, 3), GAP_GREY,
                     np.uint8)
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            y, x = r * (h + GAP_PX), c * (w + GAP_PX)
            canvas[y:y + h, x:x + w] = cell
    return bytes(tf.io.encode_png(canvas, compression=9).numpy())


# -- the verdict --------------------------------------------------------------------------------------

def tune_threshold(probs: np.ndarray, masks: np.ndarray) -> dict[str, Any]:
    """The probability cut-off with the highest building IoU (pooled over the tiles) among
    :data:`THRESHOLDS`, with that IoU and the IoU at 0.5. It stays 0.5 unless another beats it by
    :data:`MIN_THRESHOLD_GAIN`, and when the tiles hold too few building pixels to say."""
    truth = masks > 0
    if truth.mean() < MIN_TRUTH_FRACTION:
        return {"threshold": THRESHOLD, "threshold_note": "kept at 0.5: too few building pixels "
                f"on the {len(masks)} checked tiles to tune it"}

    def iou(t: float) -> float:
        marked = probs >= t
        union = np.count_nonzero(marked | truth)
        return np.count_nonzero(marked & truth) / union if union else 0.0

    scores = {t: iou(t) for t in THRESHOLDS}
    best = max(THRESHOLDS, key=lambda t: (scores[t], -abs(t - THRESHOLD)))
    if scores[best] < scores[THRESHOLD] + MIN_THRESHOLD_GAIN:
        best = THRESHOLD
    return {"threshold": best, "threshold_iou": round(scores[best], 5),
            "iou_at_0_5": round(scores[THRESHOLD], 5),
            "threshold_note": f"highest IoU on {len(masks)} validation tiles"}


def judge(best_val_iou: float | None, truth_fraction: float | None = None,
          predicted_fraction: float | None = None, tiles: int = 0) -> dict[str, Any]:
    """"ok" or "weak", with the reason and advice ("" when ok).

    Weak when the best val IoU is under :data:`MIN_VAL_IOU` (or was never measured), or when the
    checked tiles hold buildings (at least :data:`MIN_TRUTH_FRACTION` of their pixels) and the
    model marks under :data:`MIN_FOUND_RATIO` of that much: the all-background collapse of a
    model trained too briefly or on too little; or when the share it marks exceeds the
    reference's by :data:`MAX_EXCESS_FRACTION` of all pixels or more: the all-building collapse,
    whose IoU alone can look fair.
    """
    # Rounded as the model card stores it, so judging the raw value (rank 0) and the card's
    # value (the driver, a reader) gives the same words even at a rounding edge.
    iou = round(float(best_val_iou), 5) \
        if best_val_iou is not None and math.isfinite(best_val_iou) else None
    reason = ""
    if iou is None:
        reason = "no validation IoU was measured: the model could not be judged"
    elif iou < MIN_VAL_IOU:
        reason = (f"validation IoU {iou:.3f} is under {MIN_VAL_IOU}: the model learned almost "
                  "nothing")
    elif tiles and truth_fraction is not None and predicted_fraction is not None and \
            truth_fraction >= MIN_TRUTH_FRACTION and predicted_fraction < MIN_FOUND_RATIO * truth_fraction:
        reason = (f"on {tiles} validation tiles the model marks {predicted_fraction:.1%} of pixels "
                  f"as building where the reference has {truth_fraction:.1%}")
    elif tiles and truth_fraction is not None and predicted_fraction is not None and \
            predicted_fraction - truth_fraction >= MAX_EXCESS_FRACTION:
        reason = (f"on {tiles} validation tiles the model marks {predicted_fraction:.1%} of pixels "
                  f"as building where the reference has {truth_fraction:.1%}: it calls nearly "
                  "everything a building")
    out: dict[str, Any] = {"verdict": "weak" if reason else "ok", "verdict_reason": reason,
                           "advice": ADVICE if reason else ""}
    if tiles:
        out.update(checked_tiles=tiles, building_fraction_reference=round(truth_fraction or 0.0, 5),
                   building_fraction_predicted=round(predicted_fraction or 0.0, 5))
    return out


# -- driver side --------------------------------------------------------------------------------------

def copy_preview(work: str, name: Any, folder: Path) -> str | None:
    """Copies the preview ``name`` (as rank 0's event names it) from the work folder (a path or
    a store URL) into ``folder``, atomically, keeping the latest :data:`KEEP_COPIES` there.

    Returns the copy's path as events carry it: relative to the working directory when under it
    (a job's ``previews/epoch-0003.png``), else absolute; None when it could not be copied (a
    store that hiccups, a full disk): only a preview is lost, the next one comes.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return None  # only previews/epoch-NNNN.png: a name never leads out of the folder
    try:
        src = storage.join(work, name)
        local = storage.local_path(src)
        data = Path(local).read_bytes() if local is not None else storage.read_bytes(src)
        if not data.startswith(_PNG_MAGIC) or len(data) > MAX_PNG_BYTES:
            return None
        target = folder.absolute() / os.path.basename(name)
        _write_bytes_atomic(target, data)
        for old in sorted(target.parent.glob("epoch-*.png"))[:-KEEP_COPIES]:
            old.unlink(missing_ok=True)
    except (OSError, StorageError):
        return None
    # Resolved both: the runner's job folder may be named through a link the cwd is not.
    real, cwd = target.resolve(), Path.cwd().resolve()
    return real.relative_to(cwd).as_posix() if real.is_relative_to(cwd) else str(target)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
