"""Input augmentation for distillation, chosen per input from its type alone (modality-aware).

- image-like (float, rank 4): each sample is shifted by up to `max_shift` pixels along both spatial
  axes (zero-filled), then Gaussian noise of 2% of the batch's standard deviation is added. The
  channel axis is axis 1 (NCHW) unless axis 3 is smaller (NHWC, as Keras exports);
- other float inputs (sequences, tabular features): Gaussian noise of 1% of the batch's standard
  deviation;
- integer inputs (token ids, attention masks, positions): unchanged — a shifted or noisy id is a
  different token, not a similar one.

Token inputs have their own opt-in (`swap_tokens`, `--token-swap P`): a share of the token ids is
replaced by ids drawn from elsewhere in the same batch. That needs no vocabulary, and a small
training set of sentences then yields new ones every epoch.

Teacher and student see the same augmented batch (the teacher's targets are computed on it), so
augmentation only widens the inputs the student learns to imitate the teacher on; it never
changes what is right. Everything is drawn from the `numpy.random.Generator` passed in, so a run
is reproducible from its seed.
"""

from __future__ import annotations

import numpy as np

IMAGE_NOISE = 0.02
OTHER_NOISE = 0.01


def modality(array: np.ndarray) -> str:
    """'image', 'float' or 'none' (integers, booleans, strings): which augmentation applies."""
    if not np.issubdtype(array.dtype, np.floating):
        return "none"
    return "image" if array.ndim == 4 else "float"


def augment_batch(batch: dict[str, np.ndarray], names: "list[str]", rng: np.random.Generator,
                  max_shift: int = 1) -> dict[str, np.ndarray]:
    """A new batch with the inputs in `names` augmented by modality; other arrays (labels) as given."""
    out = dict(batch)
    for name in names:
        array = batch[name]
        kind = modality(array)
        if kind == "image":
            out[name] = _noisy(_shifted(array, rng, max_shift), rng, IMAGE_NOISE)
        elif kind == "float":
            out[name] = _noisy(array, rng, OTHER_NOISE)
    return out


def spatial_axes(shape: tuple[int, ...]) -> tuple[int, int]:
    """The two spatial axes of a rank-4 batch: (2, 3) for NCHW, (1, 2) when axis 3 is the smaller
    of axes 1 and 3 (NHWC)."""
    return (1, 2) if shape[3] < shape[1] else (2, 3)


def _shifted(images: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    axes = spatial_axes(images.shape)
    out = np.zeros_like(images)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(images.shape[0], 2))
    for i, (dy, dx) in enumerate(shifts):
        out[i] = _shift_one(images[i], dy, dx, (axes[0] - 1, axes[1] - 1))
    return out


def _shift_one(image: np.ndarray, dy: int, dx: int, axes: tuple[int, int]) -> np.ndarray:
    """`image` moved by (dy, dx) along `axes`, zeros where nothing moved in."""
    out = np.zeros_like(image)
    src, dst = [slice(None)] * image.ndim, [slice(None)] * image.ndim
    for axis, d in zip(axes, (dy, dx)):
        n = image.shape[axis]
        if abs(d) >= n:
            return out
        src[axis] = slice(max(0, -d), n - max(0, d))
        dst[axis] = slice(max(0, d), n - max(0, -d))
    out[tuple(dst)] = image[tuple(src)]
    return out


def _noisy(array: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    std = float(np.std(array)) if array.size else 0.0
    if std == 0.0:
        return array.copy()
    noise = rng.standard_normal(array.shape).astype(array.dtype) * (scale * std)
    return (array + noise).astype(array.dtype)


def swap_tokens(batch: dict[str, np.ndarray], names: "list[str]", rng: np.random.Generator,
                share: float) -> dict[str, np.ndarray]:
    """A new batch where `share` of the positions of every token-id input hold an id drawn from the
    batch's other tokens. Padding (the id that fills the rows' ends) is neither replaced nor drawn;
    masks, token types and position ids are left alone (see `is_token_ids`)."""
    out = dict(batch)
    for name in names:
        ids = batch[name]
        if share <= 0 or not is_token_ids(ids):
            continue
        pad = _padding_id(ids)
        content = np.ones(ids.shape, bool) if pad is None else ids != pad
        pool = ids[content]
        if not pool.size:
            continue
        chosen = content & (rng.random(ids.shape) < share)
        swapped = ids.copy()
        swapped[chosen] = rng.choice(pool, size=int(chosen.sum()))
        out[name] = swapped
    return out


def is_token_ids(array: np.ndarray) -> bool:
    """Integer rows of ids: not 0/1 (attention masks, token types) and not counting up by one
    (position ids)."""
    if not np.issubdtype(array.dtype, np.integer) or array.ndim != 2 or array.shape[1] < 2:
        return False
    if np.isin(array, (0, 1)).all():
        return False
    return float(np.mean(np.diff(array, axis=1) == 1)) < 0.9


def _padding_id(ids: np.ndarray) -> "int | None":
    """The id that ends more than one row, if one does (padding); None otherwise."""
    values, counts = np.unique(ids[:, -1], return_counts=True)
    return int(values[counts.argmax()]) if counts.max() > 1 else None
