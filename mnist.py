"""MNIST from its four IDX files (torchvision's layout: <root>/MNIST/raw/), checked and cached; no torchvision."""
import functools
import gzip
import hashlib
import os

import numpy as np
import torch

from utils import UserError, atomic_write

MNIST_FILES = {  # name -> (md5 of the decompressed bytes, IDX magic number, count)
    'train-images-idx3-ubyte': ('6bbc9ace898e44ae57da46a324031adb', 2051, 60000),
    'train-labels-idx1-ubyte': ('a25bea736e30d166cdddb491f175f624', 2049, 60000),
    't10k-images-idx3-ubyte': ('2646ac647ad5339dbf082846283269ea', 2051, 10000),
    't10k-labels-idx1-ubyte': ('27ae3e4e09519cfbb04c329615203637', 2049, 10000),
}
MNIST_HELP = ('put the four MNIST IDX files (.gz or uncompressed) in <mnist_root>/MNIST/raw/; '
              'this repository ships them in data/MNIST/raw/ (git checkout -- data/MNIST/raw restores them)')


def mnist_raw_dir(root):
    """The folder holding the IDX files: <root>/MNIST/raw, or root itself if the files are there."""
    raw = os.path.join(root, 'MNIST', 'raw')
    if not os.path.isdir(raw) and any(os.path.exists(os.path.join(root, n + ext))
                                      for n in MNIST_FILES for ext in ('.gz', '')):
        return root
    return raw


def _read_idx_bytes(raw, name):
    """Decompressed bytes of one IDX file, md5-checked; decompresses .gz once beside it as a cache."""
    md5, _, _ = MNIST_FILES[name]
    plain, packed = os.path.join(raw, name), os.path.join(raw, name + '.gz')
    if os.path.exists(plain):
        with open(plain, 'rb') as f:
            data = f.read()
        if hashlib.md5(data).hexdigest() == md5:
            return data
        if not os.path.exists(packed):
            raise UserError(f'{plain}: md5 mismatch (corrupt or not MNIST); {MNIST_HELP}')
    if not os.path.exists(packed):
        raise UserError(f'MNIST file missing: {plain}(.gz); {MNIST_HELP}')
    try:
        with gzip.open(packed, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f'{packed}: cannot decompress ({e}): truncated or corrupt; {MNIST_HELP}') from None
    if hashlib.md5(data).hexdigest() != md5:
        raise UserError(f'{packed}: md5 of the decompressed bytes is not the MNIST one '
                        f'(corrupt or not MNIST); {MNIST_HELP}')
    try:  # cache the decompressed file so later start-ups skip gunzip; a read-only folder is fine
        atomic_write(plain, data)
    except OSError:
        pass
    return data


def _parse_idx(data, name):
    """Check an IDX file's header and return its payload as a numpy uint8 array."""
    _, magic, count = MNIST_FILES[name]
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], 'big') != magic:
        raise UserError(f'{name}: wrong IDX magic number (expected {magic}); {MNIST_HELP}')
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    expected = [count] + ([28, 28] if ndim == 3 else [])
    if dims != expected or len(data) != header + int(np.prod(dims)):
        raise UserError(f'{name}: dimensions {dims} / size {len(data)} do not match MNIST {expected}; {MNIST_HELP}')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=4)
def load_mnist(root='data', train=True):
    """MNIST as (images uint8 (N, 28, 28), labels int64 (N,)); N = 60000 train, 10000 test.

    The returned tensors are cached per process and shared: do not modify them in place."""
    raw = mnist_raw_dir(root)
    prefix = 'train' if train else 't10k'
    images = _parse_idx(_read_idx_bytes(raw, f'{prefix}-images-idx3-ubyte'), f'{prefix}-images-idx3-ubyte')
    labels = _parse_idx(_read_idx_bytes(raw, f'{prefix}-labels-idx1-ubyte'), f'{prefix}-labels-idx1-ubyte')
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
