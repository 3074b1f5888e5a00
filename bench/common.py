"""Helpers shared by the benchmark scripts: device sync, timing, machine description, tables, JSON."""
import json
import os
import platform
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # the repository's modules are top-level files
    sys.path.insert(0, REPO)

import utils  # noqa: E402


def sync(device):
    """Wait for queued work on a CUDA device (no-op on the CPU)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of fn() takes, with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs):
    """Median of a list of numbers."""
    return statistics.median(xs)


def set_threads(threads):
    """torch.set_num_threads(threads) if given; returns the number of threads in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine(device):
    """One line naming the device (GPU name, or CPU model, cores and torch threads)."""
    device = torch.device(device)
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}'


def matmul_flops_per_s(device, n, dtype=torch.float32, repeats=5, tf32=False):
    """FLOP/s of a dense square (n x n) @ (n x n) matmul on device, median of `repeats` timings.

    tf32: on CUDA, let float32 matmuls use TF32 tensor cores (torch.set_float32_matmul_precision('high'))."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('high' if tf32 else 'highest')
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        inner = max(1, int(2e12 // (2 * n ** 3))) if torch.device(device).type == 'cuda' else 1
        for _ in range(2):  # warm-up (library init, clocks)
            torch.mm(a, b, out=out)

        def run():
            for _ in range(inner):
                torch.mm(a, b, out=out)
        times = [timed(run, device) / inner for _ in range(repeats)]
        return 2 * n ** 3 / median(times)
    finally:
        torch.set_float32_matmul_precision(prev)


def print_table(headers, rows):
    """Print a markdown table (rows: lists of already-formatted cells)."""
    print('| ' + ' | '.join(headers) + ' |')
    print('|' + ' --- |' * len(headers))
    for row in rows:
        print('| ' + ' | '.join(str(c) for c in row) + ' |')


def write_json(path, obj):
    """Write obj as indented JSON to path, creating the folder, whole or not at all (a benchmark killed at its time
    limit leaves its last complete write); prints where it went."""
    utils.atomic_write(path, json.dumps(obj, indent=1, default=str) + '\n')
    print(f'\nwrote {path}')


def default_device():
    """'cuda' when a GPU is present, else 'cpu'."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'
