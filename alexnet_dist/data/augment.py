"""Constants and small helpers of the 2012 augmentation, shared by both loaders."""

import numpy as np

# The colour noise of section 4.1, Krizhevsky's ILSVRC-2012 values on the 0-255 scale
# (cuda-convnet2 make-data/input_meta): standard deviations along the RGB principal axes, and
# the axes as columns.
PCA_STD = np.array([19.7208, 37.0939, 121.7801], np.float32)
PCA_VECTORS = np.array(
    [[0.41796, -0.71258, -0.56351], [-0.81698, -0.02354, -0.57618], [0.39731, 0.70120, -0.59200]], np.float32
)

# The ten test views (section 4.1): four corners and the centre as (x, y) fractions of the free
# space, then the same five mirrored.
TEN_VIEWS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)]


def colour_shift(z, strength: float, std=PCA_STD, vectors=PCA_VECTORS) -> np.ndarray:
    """The RGB shift added to every pixel of one image: strength * V (z * s), z ~ N(0, I3)."""
    return np.asarray(vectors, np.float32) @ (np.asarray(z, np.float32) * np.asarray(std, np.float32) * strength)


def place(fraction: float, free: int) -> int:
    """The whole-pixel start of a crop at `fraction` of the `free` pixels, rounded half up as
    DALI rounds its crop positions, so both loaders cut the same window."""
    return int(fraction * free + 0.5)


def noise_at(strength: float, until: int | None, epoch: int) -> float:
    """The colour noise's strength in `epoch`: off from epoch `until` on (the 2012 run: 67)."""
    return strength if until is None or epoch < until else 0.0
