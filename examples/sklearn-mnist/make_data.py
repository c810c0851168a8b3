"""Write a small MNIST-format data set: the four gzip'ed idx files of the real one, with synthetic digits.

Each of the 10 classes is a fixed 28x28 template (a few random strokes); every image is its class's template,
shifted by up to three pixels, dimmed, with strong noise. A linear model gets about 0.9 of it right, as on MNIST.

    python make_data.py /tmp/mnist [--train 3000] [--test 500] [--seed 0]

Write it outside the example folder: what is in the folder is the run's snapshot, and the data is a dataset.
"""

from __future__ import annotations

import argparse
import gzip
import struct
from pathlib import Path

import numpy as np

SIDE = 28
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _templates(rng: np.random.Generator) -> np.ndarray:
    """Ten distinct "digits": each a few thick strokes between random points of the inner 20x20 box."""
    templates = np.zeros((10, SIDE, SIDE))
    for template in templates:
        for _ in range(3):
            (r0, c0), (r1, c1) = rng.integers(4, SIDE - 4, size=(2, 2))
            for t in np.linspace(0.0, 1.0, 40):
                r, c = round(r0 + t * (r1 - r0)), round(c0 + t * (c1 - c0))
                template[r - 1 : r + 2, c - 1 : c + 2] = 255.0
    return templates


def _images(templates: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=count).astype(np.uint8)
    images = np.empty((count, SIDE, SIDE), dtype=np.uint8)
    for i, label in enumerate(labels):
        dr, dc = rng.integers(-3, 4, size=2)
        image = np.roll(templates[label], (dr, dc), axis=(0, 1)) * rng.uniform(0.5, 1.0)
        image += rng.normal(0.0, 100.0, size=image.shape)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
    return images, labels


def _write_idx(path: Path, magic: int, data: np.ndarray) -> None:
    # idx: a big-endian int32 magic number, one big-endian int32 per dimension, then the uint8 values.
    header = struct.pack(f">{1 + data.ndim}i", magic, *data.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + data.astype(np.uint8).tobytes())


def make_data(folder: str | Path, n_train: int = 3000, n_test: int = 500, seed: int = 0) -> Path:
    """Write the four idx files into ``folder`` (created if missing) and return it."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = _templates(rng)
    for split, count in (("train", n_train), ("test", n_test)):
        images, labels = _images(templates, count, rng)
        images_file, labels_file = FILES[split]
        _write_idx(root / images_file, IMAGES_MAGIC, images)
        _write_idx(root / labels_file, LABELS_MAGIC, labels)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write the four .gz files")
    parser.add_argument("--train", type=int, default=3000, help="training images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {make_data(args.folder, args.train, args.test, args.seed)}")


if __name__ == "__main__":
    main()
