"""Scoring val networks: time to get the MNIST test accuracy of N networks Begin -> SimpleBlock_NoBn -> Last,
(a) one network at a time as the original did vs (b) all at once with net.stacked_accuracy (grouped convs).

(a) per network: build nn.Sequential(BeginBlock, SimpleBlock_NoBn, LastBlock), load its three state dicts,
    move it to the device, eval mode, loop over the test images in batches of 128 (the original's test
    DataLoader batch size; here slices of the in-memory images, so no per-item transform cost: this favours
    (a)), counting correct predictions with .item() per batch as the original did. File reads not counted.
(b) net.stacked_accuracy with its default chunks, then a sweep of chunk_images x chunk_nets.
Both paths must give identical accuracies (up to --tolerance_images per network on CUDA, since the two paths
run different conv algorithms and a near-tie prediction can flip), so the benchmark also checks their
equivalence; the logits of a few networks are compared too. On CUDA, TF32 is turned off for this, and a
disagreement is printed and recorded in the JSON rather than fatal; on a CPU it stops the benchmark.
Networks are freshly initialised (net.fresh_states); their accuracies are ~10% and do not matter.
Rows are timed interleaved, repeat by repeat; each reports the median.

    python bench/bench_eval.py             # 100 networks, 10,000 test images
    python bench/bench_eval.py --quick     # 10 networks, 2,000 images
"""
import argparse
import os
import time

import torch
import torch.nn as nn

import common
import evaluate
from common import default_device, machine, median, print_table, set_threads, sync, timed, write_json
import mnist
import net
import utils


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true',
                   help='10 networks, 2,000 images, a small chunk sweep (chunk_images 250 x chunk_nets all, 1)')
    utils.add_shared_flags(p, 'device', device=default_device())
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU); default: torch\'s')
    p.add_argument('--num_nets', type=int, default=None, help='networks scored (default 100; quick 10)')
    p.add_argument('--num_images', type=int, default=None, help='test images (default 10,000; quick 2,000)')
    p.add_argument('--batch', type=int, default=128, help='test batch of the one-at-a-time path (a)')
    p.add_argument('--repeats', type=int, default=3, help='timed repeats per row; the median is reported')
    p.add_argument('--chunk_images', type=int, nargs='+', default=None,
                   help='chunk_images values of the sweep (default CPU 250 1000 2500, CUDA 1000 2500 10000)')
    p.add_argument('--chunk_nets', type=int, nargs='+', default=None,
                   help='chunk_nets values of the sweep, 0 = all networks at once (default CPU 0 1 10, CUDA 0 50)')
    p.add_argument('--tolerance_images', type=int, default=None,
                   help='correct-count difference per network allowed between paths (float rounding can flip a '
                        'near-tie prediction on a GPU, where the two paths run different conv algorithms); '
                        'default 0 on CPU, 2 on CUDA')
    p.add_argument('--no_sweep', action='store_true', help='time only (a) and (b) with net.py\'s defaults')
    utils.add_shared_flags(p, 'mnist_root', mnist_root=os.path.join(common.REPO, 'data'))
    p.add_argument('--out', default=os.path.join(common.REPO, 'bench', 'results', 'eval.json'))
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == 'cuda'
    if args.tolerance_images is None:
        args.tolerance_images = 2 if cuda else 0
    args.num_nets = args.num_nets or (10 if args.quick else 100)
    args.num_images = args.num_images or (2000 if args.quick else 10000)
    if args.chunk_images is None:
        args.chunk_images = [250] if args.quick else ([1000, 2500, 10000] if cuda else [250, 1000, 2500])
    if args.chunk_nets is None:
        args.chunk_nets = [0, 1] if args.quick else ([0, 50] if cuda else [0, 1, 10])
    return args


def one_at_a_time(images, labels, begin, simple, last, device, batch):
    """Accuracies in % of each network, scored one by one as nn.Modules (the original's loop)."""
    accs = []
    for j in range(begin['conv.weight'].shape[0]):
        model = nn.Sequential(net.BeginBlock(), net.SimpleBlock_NoBn(), net.LastBlock())
        for module, state in zip(model, (begin, simple, last)):
            module.load_state_dict(net.unstack_state(state, j), strict=True)
        model.to(device).eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = net.to_float(images[i:i + batch]).unsqueeze(1)
                correct += (model(x).argmax(1) == labels[i:i + batch]).sum().item()
        accs.append(correct * 100.0 / len(images))
    return torch.tensor(accs, dtype=torch.float64)


def cpu_fits(chunk_images, chunk_nets):
    """Whether a stacked chunk plausibly fits in 50% of the available memory: the Begin conv output,
    (chunk_images, chunk_nets * 6, 28, 28) float32, and a few tensors of its size."""
    need = 3 * chunk_images * chunk_nets * 6 * 28 * 28 * 4
    try:
        with open('/proc/meminfo') as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable'))
    except (OSError, StopIteration):
        return True, need
    return need < 0.5 * avail, need


def main(argv=None):
    args = get_args(argv)
    device = torch.device(args.device)
    threads = set_threads(args.threads)
    cuda = device.type == 'cuda'
    if cuda:
        torch.backends.cudnn.benchmark = True
        # full float32 convolutions in both paths, so that their predictions can be compared
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision('highest')
    images, labels = mnist.load_mnist(args.mnist_root, train=False)
    images, labels = images[:args.num_images].to(device), labels[:args.num_images].to(device)
    seeds = range(10_000, 10_000 + args.num_nets)
    begin, simple, last = (net.fresh_states(b, seeds, device) for b in ('begin', 'simple', 'last'))
    k = args.num_nets
    print(f'{machine(device)}\nscoring {k} networks on {len(images)} test images; {args.repeats} repeats, '
          f'interleaved')

    # rows: name -> (settings, function)
    rows = {'(a) one network at a time, batch %d' % args.batch:
            ({'path': 'a', 'batch': args.batch}, lambda: one_at_a_time(images, labels, begin, simple, last,
                                                                         device, args.batch))}
    default_name = '(b) net.stacked_accuracy, defaults'
    rows[default_name] = ({'path': 'b', 'chunk_images': 'default', 'chunk_nets': 'default'},
                          lambda: net.stacked_accuracy(images, labels, begin, simple, last, 'simple'))
    # (c) what train.py does (evaluate.Scorer): Begin's output on the test images computed once per run,
    # then every evaluation scores only middle + Last
    t0 = time.perf_counter()
    score = evaluate.Scorer(images, labels, begin, last)
    sync(device)
    build_s = time.perf_counter() - t0
    chunks = (score.chunk_images, score.chunk_nets)
    rows[f'(c) train.py: evaluate.Scorer, cached Begin outputs, chunks {chunks}'] = (
        {'path': 'c', 'chunk_images': chunks[0], 'chunk_nets': chunks[1], 'begin_cache_build_s': build_s,
         'begin_cached': score.begin_out is not None}, lambda: score(simple))
    notes = [f'(c) builds its Begin-output cache once per run in {build_s:.2f} s (not in its row)']
    if not args.no_sweep:
        for ci in args.chunk_images:
            for cn in args.chunk_nets:
                cn_eff = min(cn or k, k)
                if ci > len(images) and ci != args.chunk_images[0]:
                    continue
                ok, need = (True, 0) if cuda else cpu_fits(min(ci, len(images)), cn_eff)
                name = f'(b) chunk_images {ci}, chunk_nets {cn or "all"}'
                if not ok:
                    notes.append(f'{name} skipped: needs about {need / 2**30:.0f} GiB')
                    continue
                rows[name] = ({'path': 'b', 'chunk_images': ci, 'chunk_nets': cn or None},
                              lambda ci=ci, cn=cn: net.stacked_accuracy(images, labels, begin, simple, last,
                                                                        'simple', ci, cn or None))

    # warm-up, and the equivalence check: every row must give exactly the accuracies of (a)
    results, times, skipped = {}, {name: [] for name in rows}, {}
    for name, (_, fn) in rows.items():
        try:
            results[name] = fn().cpu()
        except Exception as e:
            if not (isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e).lower()):
                raise
            skipped[name] = 'out of memory'
            if cuda:
                torch.cuda.empty_cache()
    reference = results[next(iter(rows))]
    correct_ref = (reference * len(images) / 100).round().long()
    max_diff, disagreements = 0, []
    for name, acc in results.items():
        diff = ((acc * len(images) / 100).round().long() - correct_ref).abs()
        max_diff = max(max_diff, int(diff.max()))
        if int(diff.max()) > args.tolerance_images:
            disagreements.append(f'{name} disagrees with the one-at-a-time path on {int((diff > 0).sum())} networks '
                                 f'(up to {int(diff.max())} images; --tolerance_images {args.tolerance_images})')
    # fresh networks mostly predict one class, so also compare the logits themselves on a few networks
    with torch.no_grad():
        x = net.to_float(images[:256]).unsqueeze(1)
        stacked = net.stacked_logits(x, begin, simple, last, 'simple')
        for j in range(min(k, 3)):
            model = nn.Sequential(net.BeginBlock(), net.SimpleBlock_NoBn(), net.LastBlock())
            for module, state in zip(model, (begin, simple, last)):
                module.load_state_dict(net.unstack_state(state, j))
            try:
                torch.testing.assert_close(stacked[j], model.to(device).eval()(x), rtol=1e-4, atol=1e-5)
            except AssertionError as e:
                disagreements.append(f'logits of network {j}: {e}')
    # on a CPU the paths must agree; on a GPU their conv algorithms differ, so a disagreement is reported and
    # recorded, and the timing goes on (the one GPU run of a session must not lose this row to it)
    if disagreements and not cuda:
        raise AssertionError('\n'.join(disagreements))
    for d in disagreements:
        print(f'WARNING: {d}')
    print(f'accuracies {"identical" if max_diff == 0 else f"within {max_diff} image(s)"} on all {len(results)} '
          f'rows (mean {reference.mean():.2f}%), logits of networks 0-{min(k, 3) - 1} '
          f'{"checked: see the warnings above" if disagreements else "match"}')

    for r in range(args.repeats):
        for name, (_, fn) in rows.items():
            if name not in skipped:
                times[name].append(timed(fn, device))
        print(f'  repeat {r + 1}/{args.repeats} done', flush=True)

    base = median(times[next(iter(rows))])
    out_rows = []
    for name, (settings, _) in rows.items():
        row = {'name': name, **settings, 'skipped': skipped.get(name), 'seconds_all': times[name]}
        if times[name]:
            s = median(times[name])
            row.update(seconds=s, nets_per_s=k / s, speedup_vs_a=base / s)
        out_rows.append(row)
    timed_b = [r for r in out_rows if r['path'] == 'b' and 'seconds' in r]
    best = min(timed_b, key=lambda r: r['seconds'])
    default = next(r for r in out_rows if r['name'] == default_name)

    print(f'\n{machine(device)}; {k} networks x {len(images)} test images\n')
    print_table(['path', 'seconds', 'networks / s', 'vs (a)'],
                [[r['name'], f"{r['seconds']:.3f}", f"{r['nets_per_s']:.1f}", f"{r['speedup_vs_a']:.1f}x"]
                 if 'seconds' in r else [r['name'], '-', '-', f"skipped: {r['skipped']}"] for r in out_rows])
    print(f'\nprojected to 100 networks x 10,000 images: (a) {base * 100 / k * 10000 / len(images):.1f} s, '
          f'(b) defaults {default["seconds"] * 100 / k * 10000 / len(images):.2f} s (linear scaling)')
    print(f'fastest (b): {best["name"]} ({default["seconds"] / best["seconds"]:.2f}x the defaults)')
    for n in notes:
        print(f'note: {n}')
    write_json(args.out, {
        'script': 'bench_eval', 'machine': machine(device), 'device': str(device), 'threads': threads,
        'args': vars(args), 'num_nets': k, 'num_images': len(images), 'accuracies_identical': max_diff == 0,
        'max_diff_images': max_diff, 'disagreements': disagreements,
        'acc_mean': float(reference.mean()), 'rows': out_rows, 'default_row': default_name,
        'best_row': best['name'], 'notes': notes})


if __name__ == '__main__':
    main()
