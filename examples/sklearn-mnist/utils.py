"""Read the MNIST idx files (gzip'ed), as the tutorial's utils.py does."""

import gzip
import struct

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def load_data(filename, label=False):
    """Images as an (n, rows * cols) uint8 array, or labels as an (n, 1) one."""
    with gzip.open(filename) as gz:
        magic, count = struct.unpack(">ii", gz.read(8))
        if magic != (LABELS_MAGIC if label else IMAGES_MAGIC):
            raise ValueError(
                f"{filename}: magic number {magic} is not that of an idx {'label' if label else 'image'} file"
            )
        if label:
            return np.frombuffer(gz.read(count), dtype=np.uint8).reshape(count, 1)
        rows, cols = struct.unpack(">ii", gz.read(8))
        return np.frombuffer(gz.read(count * rows * cols), dtype=np.uint8).reshape(count, rows * cols)
