"""bench/bench_generate.py with the rows of speed/generate.py's flags: the same measurement, the same table.

    python speed/bench_generate.py --device cuda --skip_original --k 128 --rows 128:fused_begin+fused_basic+fused_small
"""
import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
sys.path.insert(1, BENCH)  # its common.py
# bench/bench_generate.py by its path: this file's own name comes first on sys.path
_spec = importlib.util.spec_from_file_location('plain_bench_generate', os.path.join(BENCH, 'bench_generate.py'))
bench_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_generate)
import generate  # noqa: E402  (speed/generate.py)

# speed/generate.py's options, by the names --rows uses (with bench_generate's Begin-cache rows)
VARIANTS = {**bench_generate.VARIANTS, 'channels_last': ['--channels_last'], 'compile': ['--compile'],
            'cuda_graphs': ['--compile', 'reduce-overhead'], 'graphed': ['--cuda_graph'], 'bf16': ['--amp', 'bf16'],
            'triton': ['--conv', 'triton'], 'fused_begin': ['--fused_begin'], 'fused_basic': ['--fused_basic'],
            'fused_small': ['--fused_small']}


def fast_steps(argv, device):
    """(speed/generate.py's parsed flags argv, their FastSteps)."""
    args = generate.get_args(argv)
    return args, generate.FastSteps(args, device)


if __name__ == '__main__':
    bench_generate.main(VARIANTS, fast_steps, out='speed/results/generate.json')
