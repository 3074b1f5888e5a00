"""MNIST start-up: reading both sets from the .gz files (first use) vs from the decompressed cache.

    python bench/bench_mnist_load.py
"""
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnist  # noqa: E402

src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'data', 'MNIST', 'raw')
with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, 'MNIST', 'raw')
    os.makedirs(raw)
    for name in mnist.MNIST_FILES:
        shutil.copy(os.path.join(src, name + '.gz'), raw)
    for label in ('first load (gunzip, md5, cache written)', 'later load (cache, md5)'):
        mnist.load_mnist.cache_clear()
        t0 = time.perf_counter()
        mnist.load_mnist(tmp, train=True)
        mnist.load_mnist(tmp, train=False)
        print(f'{label}: {time.perf_counter() - t0:.2f} s for both sets')
