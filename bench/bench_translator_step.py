"""Translator training step: samples/s and achieved FLOP/s of the MLP-Mixer, as a fraction of the device's
dense-matmul FLOP/s measured in the same run.

A step is exactly the body of train.py's loop: losses.Objective.batch (the index lookup of a batch of pairs)
and train.train_step (forward of the translator as distributed.Context.wrap wraps it for --amp / --compile,
the faithful MSE loss, backward, optimizer step) on random pairs held on the device. FLOPs are counted
analytically (mixer.mixer_flops: every Linear, forward + backward = 3x forward). Rows (variants) are timed
interleaved, repeat by repeat, so that their ratios hold even on a noisy shared machine; each row reports the
median of the repeats.

Variants: batch sizes with plain Adam (the original's optimizer, default settings); at the main batch
Adam(foreach=True), Adam(fused=True); with --compile torch.compile(model); on CUDA also TF32 matmuls,
bf16 autocast, and bf16 at twice the main batch. A variant that fails (out of memory, compile error or
compile past --compile_timeout) is reported as skipped with the reason.

    python bench/bench_translator_step.py                 # README config; CUDA if present
    python bench/bench_translator_step.py --quick         # short run (on CPU: 4 layers, small batches)
    python bench/bench_translator_step.py --device cpu --compile on --threads 2
"""
import argparse
import contextlib
import os
import signal
import time

from types import SimpleNamespace

import torch

import common  # noqa: F401  (puts the repository on sys.path)
import distributed
import losses
import net
import train
import utils
from common import (default_device, machine, matmul_flops_per_s, median, print_table, set_threads, sync,
                    timed, write_json)
from mixer import MLPMixer, mixer_flops

# the original README's translator command: --num_layers 24 --c_dim 128 ... --dropout 0.1 --batch_size 4096
README_CONFIG = dict(num_layers=24, S_dim=72, C_dim=128, hidden_S_dim=256, hidden_C_dim=512, dropout=0.1)
README_PAIRS, README_EPOCHS, README_BATCH = 300_000, 1000, 4096
ORIGINAL_CLAIM = 'roughly a day on one A800 (original README)'


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true',
                   help='short run: fewer repeats; on CPU also 4 layers (unless --num_layers) and batches 16, 64')
    utils.add_shared_flags(p, 'device', device=default_device())
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU); default: torch\'s')
    p.add_argument('--batches', type=int, nargs='+', default=None,
                   help='batch sizes of the plain-Adam rows (default: CUDA 1024 4096; CPU 256 1024 4096, '
                        'those whose estimated memory does not fit are skipped)')
    p.add_argument('--main_batch', type=int, default=None,
                   help='batch of the optimizer / precision / compile rows (default: 4096 if it runs, '
                        'else the largest batch that fits)')
    p.add_argument('--compile', choices=('auto', 'on', 'off'), default='auto',
                   help='torch.compile rows: auto = on for CUDA (off with --quick), off for CPU (slow to '
                        'compile there)')
    p.add_argument('--compile_timeout', type=float, default=600,
                   help='seconds allowed for compiling (first steps) before the row is skipped')
    p.add_argument('--warmup', type=int, default=None, help='untimed steps per row (default CUDA 3, CPU 1)')
    p.add_argument('--repeats', type=int, default=None, help='timed repeats per row; the median is reported')
    p.add_argument('--iters', type=int, default=None, help='steps per timed repeat (default CUDA 5, CPU 1)')
    p.add_argument('--matmul_n', type=int, default=None, help='size of the square reference matmul '
                                                             '(default CUDA 4096, CPU 2048, quick CPU 1024)')
    for k, v in README_CONFIG.items():
        p.add_argument(f'--{k}', type=type(v), default=None, help=f'translator config (README: {v})')
    p.add_argument('--out', default=os.path.join(common.REPO, 'bench', 'results', 'translator_step.json'))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    quick_cpu = args.quick and not cuda
    args.config = {k: getattr(args, k) if getattr(args, k) is not None else
                   (4 if k == 'num_layers' and quick_cpu else v) for k, v in README_CONFIG.items()}
    if args.batches is None:
        args.batches = [1024, 4096] if cuda else ([16, 64] if args.quick else [256, 1024, 4096])
    defaults = dict(warmup=(2 if args.quick else 3) if cuda else 1,
                    repeats=3 if args.quick else 5,
                    iters=(3 if args.quick else 5) if cuda else 1,
                    matmul_n=4096 if cuda else (1024 if args.quick else 2048))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.compile = args.compile == 'on' or (args.compile == 'auto' and cuda and not args.quick)
    return args


def cpu_fits(config, batch):
    """Whether a CPU training step at `batch` plausibly fits in the available memory (estimate with 1.5x margin:
    per layer and block the autograd graph keeps about 5 S*C + 2 C*hS + 2 S*hC floats)."""
    s, c, hs, hc = config['S_dim'], config['C_dim'], config['hidden_S_dim'], config['hidden_C_dim']
    need = 1.5 * 4 * batch * config['num_layers'] * (5 * s * c + 2 * c * hs + 2 * s * hc)
    try:
        with open('/proc/meminfo') as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable'))
    except (OSError, StopIteration):
        return True, need
    return need < 0.8 * avail, need


def saved_activation_bytes(config, bf16, batch=8):
    """Bytes per sample that a training forward keeps for backward (parameters excluded), counted with
    saved_tensors_hooks on the CPU, with each dropout mask counted as 1 byte: CUDA's fused dropout keeps a bool
    mask (the CPU keeps a float one). On a GPU the step's peak memory is this times the batch, plus little
    (checked on an H200: 66.0 GiB counted, 66.7 GiB peak, fp32 at batch 4096 without dropout)."""
    torch.manual_seed(0)
    model = MLPMixer(**dict(config, dropout=0.)).train()  # the dropout modules are there, at p = 0
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, mask_bytes = {}, []

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):  # with dropout, each call keeps a bool mask of its output's size
            m.register_forward_hook(lambda m, args, out: mask_bytes.append(out.numel()))
    x = [torch.randn(batch, *net.BASIC_SHAPES[k]) for k in ('conv1.weight', 'conv2.weight')]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast('cpu', torch.bfloat16,
                                                                                     enabled=bf16):
        out = model(x)
    del out
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    return (saved + (sum(mask_bytes) if config['dropout'] > 0 else 0)) / batch


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise Timeout in the main thread after `seconds` (SIGALRM; no limit where that is unavailable)."""
    if not hasattr(signal, 'SIGALRM') or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise Timeout(f'took over {seconds:.0f} s')
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Variant:
    """One row: a model, its optimizer and a fixed batch of random inputs and targets on the device."""

    def __init__(self, name, batch, device, config, optimizer='default', precision='fp32', compile=False):
        self.name, self.batch, self.device = name, batch, device
        self.optimizer, self.precision, self.compile = optimizer, precision, compile
        self.times, self.skipped, self.compile_s, self.peak_mem, self.first_s = [], None, None, None, None
        self.config = config

    def setup(self):
        torch.manual_seed(0)
        args = train.get_args(['--amp', 'bf16' if self.precision == 'bf16' else 'none']
                              + (['--compile', self.compile] if self.compile else []))
        self.model = MLPMixer(**self.config).to(self.device)
        if self.optimizer == 'default':
            self.opt = train.make_optimizer(self.model, args)  # what train.py uses: Adam with torch's defaults
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr, **{self.optimizer: True})
        self.fn = distributed.Context(device=self.device).wrap(self.model, args.amp, args.compile)
        b, d = self.batch, self.device
        convs = ('conv1.weight', 'conv2.weight')
        pairs = SimpleNamespace(basic={k: torch.randn(b, *net.BASIC_SHAPES[k]) for k in convs},
                                simple={k: torch.randn(b, *net.SIMPLE_SHAPES[k]) for k in convs})
        self.objective = losses.Objective(args, pairs, d)
        self.idx = torch.randperm(b, device=d)
        self.gen = torch.Generator(device=d).manual_seed(0)

    def release(self):
        for name in ('model', 'opt', 'fn', 'objective', 'idx'):
            self.__dict__.pop(name, None)

    def step(self):
        batch = self.objective.batch(self.idx, self.gen)
        train.train_step(self.fn, self.opt, self.objective, batch, self.gen)

    def run(self, n):
        torch.set_float32_matmul_precision('high' if self.precision == 'tf32' else 'highest')
        for _ in range(n):
            self.step()


def describe_failure(e):
    """'out of memory', or the exception's type and first line."""
    text = str(e).lower()
    if isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in text or "can't allocate memory" in text:
        return 'out of memory'
    first = str(e).splitlines()[0][:200] if str(e).strip() else ''
    return f'{type(e).__name__}: {first}' if first else type(e).__name__


def record(v):
    """A row's measurements so far, as the JSON holds them."""
    return {'name': v.name, 'batch': v.batch, 'optimizer': v.optimizer, 'precision': v.precision,
            'compile': v.compile, 'skipped': v.skipped, 'step_s_all': v.times, 'first_step_s': v.first_s,
            'compile_s': v.compile_s, 'peak_mem_gib': v.peak_mem / 2**30 if v.peak_mem else None}


def build_variants(args, device):
    """The rows to time, and notes on batches left out."""
    cuda = device.type == 'cuda'
    notes, batches = [], []
    for b in args.batches:
        ok, need = (True, 0) if cuda else cpu_fits(args.config, b)
        if ok:
            batches.append(b)
        else:
            notes.append(f'batch {b} skipped: the CPU step needs about {need / 2**30:.0f} GiB, more than 80% '
                         f'of the available memory')
    if not batches:
        raise SystemExit('no batch size fits; pass smaller --batches')
    main = args.main_batch or (README_BATCH if README_BATCH in batches else max(batches))
    v = [Variant(f'Adam(), fp32, batch {b}', b, device, args.config) for b in batches]
    if main not in batches:
        v.append(Variant(f'Adam(), fp32, batch {main}', main, device, args.config))
    v += [Variant(f'Adam(foreach=True), fp32, batch {main}', main, device, args.config, 'foreach'),
          Variant(f'Adam(fused=True), fp32, batch {main}', main, device, args.config, 'fused')]
    if cuda:
        v += [Variant(f'Adam(fused), TF32, batch {main}', main, device, args.config, 'fused', 'tf32'),
              Variant(f'Adam(fused), bf16 autocast, batch {main}', main, device, args.config, 'fused', 'bf16'),
              Variant(f'Adam(fused), bf16 autocast, batch {2 * main}', 2 * main, device, args.config, 'fused',
                      'bf16')]
    if args.compile:  # bf16 and the whole model first: a run cut short has set up the rows that matter most
        for precision in (('bf16', 'fp32') if cuda else ('fp32',)):
            for how in ('model', 'blocks'):  # --compile (model), --compile blocks
                v.append(Variant(f'compile {how}, Adam(fused), {"bf16 autocast" if precision == "bf16" else "fp32"}, '
                                 f'batch {main}', main, device, args.config, 'fused', precision, compile=how))
    else:
        notes.append('torch.compile rows not run (off by default on CPU and with --quick; '
                     'pass --compile on to try them)')
    return v, main, notes


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    threads = set_threads(args.threads)
    cuda = device.type == 'cuda'
    variants, main_batch, notes = build_variants(args, device)
    print(f'{machine(device)}\nconfig {args.config}; warm-up {args.warmup}, {args.repeats} repeats of '
          f'{args.iters} step(s), interleaved')

    # reference dense matmul FLOP/s of this device, measured now
    peaks = {'fp32': matmul_flops_per_s(device, args.matmul_n, torch.float32, args.repeats)}
    if cuda:
        peaks['tf32'] = matmul_flops_per_s(device, args.matmul_n, torch.float32, args.repeats, tf32=True)
        peaks['bf16'] = matmul_flops_per_s(device, args.matmul_n, torch.bfloat16, args.repeats)
    print('dense matmul ' + ', '.join(f'{k} {v / 1e12:.3g} TFLOP/s' for k, v in peaks.items()) +
          f' (square {args.matmul_n})')

    # set-up and warm-up (compilation happens here), one row at a time, and a first timing printed and written at
    # once: a run cut short (a time limit) still shows every row it reached
    step_flops_per_sample = mixer_flops(**args.config, backward=True)
    started = {'script': 'bench_translator_step', 'machine': machine(device), 'device': str(device), 'threads': threads,
               'args': {k: v for k, v in vars(args).items() if k not in README_CONFIG}, 'config': args.config,
               'flops_per_sample_step': step_flops_per_sample, 'matmul_flops_per_s': peaks, 'matmul_n': args.matmul_n,
               'main_batch': main_batch, 'complete': False}
    for i, v in enumerate(variants):
        try:
            v.setup()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with time_limit(args.compile_timeout if v.compile else 0):
                v.run(max(args.warmup, 2 if v.compile else 1))
            sync(device)
            if v.compile:
                v.compile_s = time.perf_counter() - t0
            if cuda:
                v.peak_mem = torch.cuda.max_memory_allocated(device)
            v.first_s = timed(lambda: v.run(args.iters), device) / args.iters
        except Exception as e:  # a row that cannot run is reported, not fatal
            v.skipped = describe_failure(e)
        if v.skipped:  # outside the except block, so that the traceback's tensors are freed too
            v.release()
            if cuda:
                torch.cuda.empty_cache()
        first = ''
        if v.first_s:
            fraction = step_flops_per_sample * v.batch / v.first_s / peaks[v.precision]
            first = f', first timing {v.first_s * 1e3:.1f} ms a step ({fraction:.1%} of the {v.precision} matmul peak)'
        if v.peak_mem:
            first += f', peak memory {v.peak_mem / 2**30:.1f} GiB'
        print(f'  ready: {v.name}' + (f' (skipped: {v.skipped})' if v.skipped else '') +
              (f' (compiled in {v.compile_s:.0f} s)' if v.compile_s else '') + first, flush=True)
        write_json(args.out, {**started, 'rows': [record(u) for u in variants[:i + 1]]})

    # timing, interleaved
    for r in range(args.repeats):
        for v in variants:
            if v.skipped:
                continue
            try:
                v.times.append(timed(lambda: v.run(args.iters), device) / args.iters)
            except Exception as e:
                v.skipped, v.times = describe_failure(e), []
            if v.skipped:
                v.release()
                if cuda:
                    torch.cuda.empty_cache()
        print(f'  repeat {r + 1}/{args.repeats} done', flush=True)
        write_json(args.out, {**started, 'rows': [record(v) for v in variants]})
    torch.set_float32_matmul_precision('highest')

    rows = []
    for v in variants:
        row = record(v)
        if v.times:
            step = median(v.times)
            sps = v.batch / step
            flops = step_flops_per_sample * sps
            peak = peaks[v.precision]
            row.update(step_s=step, samples_per_s=sps, flops_per_s=flops,
                       peak_used=v.precision, fraction_of_matmul_peak=flops / peak,
                       projected_hours=README_PAIRS * README_EPOCHS / sps / 3600)
        rows.append(row)
    base = next((r for r in rows if r['batch'] == main_batch and r['optimizer'] == 'default' and r.get('step_s')),
                next((r for r in rows if r.get('step_s')), None))
    for r in rows:
        if r.get('step_s') and base:
            r['speedup_vs_base'] = r['samples_per_s'] / base['samples_per_s']

    is_readme = args.config == README_CONFIG
    print(f'\n{machine(device)}; FLOPs per sample per step {step_flops_per_sample / 1e9:.3f} G '
          f'(forward {mixer_flops(**args.config) / 1e9:.3f} G x 3)'
          + ('' if is_readme else f'; NOT the README config: {args.config}') + '\n')
    table = []
    for r in rows:
        if r.get('step_s'):
            table.append([r['name'], f"{r['step_s'] * 1e3:.1f}", f"{r['samples_per_s']:,.0f}",
                          f"{r['flops_per_s'] / 1e12:.3g}", f"{r['fraction_of_matmul_peak']:.1%} ({r['peak_used']})",
                          f"{r['speedup_vs_base']:.2f}x", f"{r['projected_hours']:,.1f}"])
        else:
            table.append([r['name'], '-', '-', '-', '-', '-', f"skipped: {r['skipped']}"])
    print_table(['variant', 'ms / step', 'samples/s', 'TFLOP/s', 'fraction of matmul peak', 'vs base',
                 'README run, hours'], table)
    print(f'\nvs base: samples/s relative to "{base["name"] if base else "-"}". README run = '
          f'{README_PAIRS:,} pairs x {README_EPOCHS} epochs / samples/s (at that row\'s batch; the README uses '
          f'{README_BATCH}); {ORIGINAL_CLAIM}.' + ('' if is_readme else ' Projection meaningless here: not the '
                                                    'README config.'))
    for n in notes + [f'{r["name"]}: compiled in {r["compile_s"]:.0f} s' for r in rows if r['compile_s']]:
        print(f'note: {n}')
    memory = {p: saved_activation_bytes(args.config, p == 'bf16') for p in ('fp32', 'bf16')}
    print('saved activations (eager, counted on the CPU; CUDA dropout masks at 1 byte): ' + ', '.join(
        f'{p} {b / 1e6:.2f} MB a pair, {b * README_BATCH / 2**30:.1f} GiB at batch {README_BATCH}'
        for p, b in memory.items()))
    write_json(args.out, {
        **started, 'readme_config': is_readme, 'flops_per_sample_forward': mixer_flops(**args.config),
        'base': base['name'] if base else None, 'rows': rows, 'notes': notes, 'saved_activation_bytes_per_pair': memory,
        'projection': {'pairs': README_PAIRS, 'epochs': README_EPOCHS, 'batch': README_BATCH,
                       'original_claim': ORIGINAL_CLAIM}, 'complete': True})


if __name__ == '__main__':
    main()
