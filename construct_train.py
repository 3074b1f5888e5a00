"""Make the translator's training pairs: (trained BasicBlock, SimpleBlock_NoBn trained in its place).

For each pair index i, with every random choice derived only from (--seed, i):
  1. train a fresh large network Begin -> BasicBlock -> Last on MNIST (SGD, momentum 0.9,
     batch 128, random horizontal flips, --num_epochs epochs);
  2. freeze its Begin and Last in eval mode and train a fresh SimpleBlock_NoBn between them
     with the same optimiser and data pipeline;
  3. record the test accuracy of the large network, of the small one at init and after training.
Many pairs train side by side in one process (--models_per_step) with grouped convolutions;
MNIST stays on the device. Pairs are written as shards, or with --layout original as the per-file
state dicts the original train.py reads (see loader.py); re-running the same command resumes and
skips finished indices.

    python construct_train.py --num_data 100 --start_index 0 --data_root ./data/train
"""
import argparse
import concurrent.futures
import logging
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import loader
from mnist import load_mnist
import net
import utils

MOMENTUM = 0.9
NUM_CLASSES = 10


def get_args(kind='train', argv=None):
    """Flags; names and defaults follow the original generation scripts."""
    p = argparse.ArgumentParser(description=f'Generate {kind} networks for Knowledge Translation.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--batch_size', type=int, default=128, help='SGD batch size of both phases')
    p.add_argument('--gpu_id', type=int, default=0, metavar='K',
                   help='GPU to use: with CUDA_VISIBLE_DEVICES unset, sets it to K and uses cuda:0 (as the '
                        'original); when it is already set (SLURM, ...), the K-th GPU it makes visible (cuda:K)')
    p.add_argument('--num_epochs', type=int, default=10, help='epochs of each phase (large net, small block)')
    p.add_argument('--lr', type=float, default=0.01, help='SGD learning rate (momentum 0.9, no weight decay)')
    p.add_argument('--num_data', type=int, default=1, help='number of networks this process makes')
    p.add_argument('--start_index', type=int, default=0, help='index of its first network')
    p.add_argument('--data_root', type=str, default=f'./data/{kind}', help='folder of the pairs (see --layout)')
    p.add_argument('--layout', choices=('shards', 'original'), default='shards',
                   help='shards: shard_<start>_<stop>.pt files; original: the per-file {i}.pth state dicts the '
                        'original train.py reads (' + original_layout_help(kind) + ')')
    p.add_argument('--seed', type=int, default=0, help='dataset seed: network i depends only on (seed, i)')
    p.add_argument('--device', type=str, default='', help="'cpu', 'cuda', 'cuda:1', ...; default: CUDA if present")
    p.add_argument('--mnist_root', type=str, default='data', help='folder holding MNIST/raw/')
    p.add_argument('--models_per_step', type=int, default=0,
                   help='networks trained side by side (one shard each group); 0 = chosen from the device '
                        '(its memory share, see --processes_per_gpu)')
    p.add_argument('--processes_per_gpu', type=int, default=1, metavar='N',
                   help='generation processes sharing this GPU (generate_sh.py passes it): --models_per_step 0 and '
                        'the frozen-Begin cache are sized from this process\'s share, free memory at start / N - 1 GiB')
    p.add_argument('--num_threads', type=int, default=0, help='CPU threads of this process; 0 = torch default')
    p.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE',
                   choices=('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                   help='torch.compile the whole SGD step (forward, backward, update); MODE reduce-overhead adds '
                        'CUDA graphs (GPU; the first steps compile: a minute)')
    p.add_argument('--cuda_graph', action='store_true',
                   help='replay each phase\'s whole SGD step (forward, backward, update, the Triton kernels included) '
                        'from a CUDA graph, captured at its second batch of a shape: the same steps without their '
                        'launches from Python (GPU)')
    p.add_argument('--channels_last', action='store_true',
                   help='channels-last activations (NHWC: other cuDNN kernels for the grouped convolutions)')
    p.add_argument('--amp', default='none', choices=('none', 'bf16'),
                   help='bf16 autocast of the forward (weights, updates and BN statistics stay fp32); not the '
                        'recipe: recorded in recipe.json, so such networks never mix with fp32 ones')
    p.add_argument('--conv', default='cudnn', choices=('cudnn', 'triton'),
                   help='the 3x3 convolutions: torch\'s (cuDNN on a GPU), or triton_conv.py\'s kernels (GPU, float32; '
                        'on a CPU only under TRITON_INTERPRET=1, for tests)')
    p.add_argument('--fused_begin', action='store_true',
                   help='the Begin block (convolution, BatchNorm, ReLU, max-pool; forward and backward) by '
                        'triton_conv.py\'s kernels, which recompute its 28x28 activations instead of storing them '
                        '(GPU, float32; on a CPU only under TRITON_INTERPRET=1, for tests)')
    p.add_argument('--fused_basic', action='store_true',
                   help='the first phase\'s Basic block (both convolutions, training BatchNorms, ReLUs, residual) and '
                        'Last\'s 1x1 convolution, forward and backward, in five triton_conv.py kernels that keep '
                        'only the convolutions\' outputs (GPU, float32; on a CPU only under TRITON_INTERPRET=1, for '
                        'tests)')
    p.add_argument('--fused_small', action='store_true',
                   help='the small-block phase\'s step (SimpleBlock_NoBn, the frozen Last, the loss and the gradient '
                        'of the small block) in one triton_conv.py kernel, reading the Begin cache in place (GPU, '
                        'float32; on a CPU only under TRITON_INTERPRET=1, for tests)')
    p.add_argument('--begin_cache', default='auto', choices=('auto', 'on', 'off'),
                   help="small-block phase: keep the frozen Begin's outputs for every image (538 MiB a network at "
                        '60,000 images) instead of recomputing them each step; auto: when it fits')
    p.add_argument('--num_train_images', type=int, default=60000,
                   help='use the first N training images (quick runs and tests; the recipe uses 60000)')
    p.add_argument('--num_test_images', type=int, default=10000,
                   help='score on the first N test images (quick runs and tests; the recipe uses 10000)')
    if kind == 'train':
        p.add_argument('--skip_simple', action='store_true',
                       help='skip the small-block phase (pairs usable only by the functional loss)')
    else:
        p.add_argument('--train_simple', action='store_true',
                       help='also retrain a SimpleBlock_NoBn in each network (the "Retrained" reference)')
    args = p.parse_args(argv)
    for flag in ('batch_size', 'num_epochs', 'num_data', 'num_train_images', 'num_test_images', 'processes_per_gpu'):
        if getattr(args, flag) <= 0:
            raise utils.UserError(f'--{flag} must be > 0 (got {getattr(args, flag)})')
    if args.start_index < 0:
        raise utils.UserError(f'--start_index must be >= 0 (got {args.start_index})')
    if args.lr <= 0:
        raise utils.UserError(f'--lr must be > 0 (got {args.lr})')
    if args.models_per_step < 0 or args.num_threads < 0:
        raise utils.UserError('--models_per_step and --num_threads must be >= 0')
    if args.cuda_graph and args.compile:
        raise utils.UserError('--cuda_graph and --compile: one or the other (--compile reduce-overhead makes its own '
                              'CUDA graphs, of the compiled parts only)')
    kernels = triton_flags(args)
    if args.amp == 'bf16' and kernels:
        raise utils.UserError(f'{kernels}: float32 only; drop --amp bf16 or {kernels}')
    if args.num_train_images > 60000 or args.num_test_images > 10000:
        raise utils.UserError('MNIST has 60000 training and 10000 test images')
    args.kind = kind
    args.train_small = (not args.skip_simple) if kind == 'train' else args.train_simple
    return args


def recipe_of(args):
    """Everything that decides a dataset's contents; a data root holds one recipe only."""
    return {'kind': args.kind, 'seed': args.seed, 'num_epochs': args.num_epochs, 'lr': args.lr,
            'batch_size': args.batch_size, 'momentum': MOMENTUM, 'train_small': args.train_small,
            'num_train_images': args.num_train_images, 'num_test_images': args.num_test_images,
            **({'amp': args.amp} if args.amp != 'none' else {})}  # fp32 recipes keep the original keys


# ----------------------------------------------------------------------------------------
# The recipe, for K networks at once.

PAIR_BLOCKS = ('begin', 'basic', 'last', 'simple')  # init_pair's order


def init_pair(seed):
    """Default-initialised state dicts (begin, basic, last, simple) of one pair, from its seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        begin, basic, last = net.large_network()
        simple = net.SimpleBlock_NoBn()
    return [m.state_dict() for m in (begin, basic, last, simple)]


def data_generator(seed):
    """The generator of one network's shuffles and flips (separate from its initialisation)."""
    return torch.Generator().manual_seed(seed ^ 0x5DEECE66D)


def draw_epoch(gens, n, device):
    """Each network's shuffled order (K, n) and flip decisions (K, n) for one epoch."""
    perms, flips = [], []
    for g in gens:
        perms.append(torch.randperm(n, generator=g))
        flips.append(torch.rand(n, generator=g) < 0.5)
    return torch.stack(perms).to(device), torch.stack(flips).to(device)


def augment(images, idx, flip):
    """Images idx (K, B) of uint8 MNIST, each flipped horizontally where flip, as floats (B, K, 28, 28)."""
    x = images[idx]
    x = torch.where(flip[..., None, None], x.flip(-1), x)
    return net.to_float(x).transpose(0, 1)


def sgd_update(params, grads, bufs, lr):
    """torch.optim.SGD's update (momentum 0.9, no dampening, Nesterov or weight decay) on buffers that start at
    zero: 0.9 * 0 + grad is exactly the copy of grad that SGD's first step makes."""
    with torch.no_grad():
        torch._foreach_mul_(bufs, MOMENTUM)
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-lr)


def cross_entropy(logits_fn, labels, args):
    """loss_fn(idx, flip): the sum of the K networks' mean cross-entropies on images idx (K, B) (labels: all
    the images' labels), from logits_fn(idx, flip), their logits (K, B, 10), with --amp's autocast."""
    def loss_fn(idx, flip):
        with torch.autocast(labels.device.type, torch.bfloat16, enabled=args.amp == 'bf16'):
            logits = logits_fn(idx, flip)
        # sum of the K networks' mean losses: each network gets exactly its own gradient
        return F.cross_entropy(logits.float().reshape(-1, NUM_CLASSES), labels[idx].reshape(-1),
                               reduction='sum') / idx.shape[1]
    return loss_fn


def make_step(params, loss_fn, args):
    """(step, reset): step(idx, flip) is one SGD step (forward, backward, update) of the K networks whose
    trainable tensors are `params`, loss_fn(idx, flip) their loss (cross_entropy); reset() zeroes the momentum
    for new networks in the same tensors. With --compile the forward + backward and the update are compiled;
    with --cuda_graph the whole step is replayed from a CUDA graph."""
    bufs = [torch.zeros_like(p) for p in params]
    update = sgd_update
    if args.compile:
        mark_static(bufs)
        loss_fn, update = (torch.compile(f, mode=args.compile) for f in (loss_fn, sgd_update))

    def step(idx, flip):
        loss_fn(idx, flip).backward()
        update(params, [p.grad for p in params], bufs, args.lr)
        for p in params:
            p.grad = None

    def reset():
        for b in bufs:
            b.zero_()
    if args.cuda_graph:
        if params[0].device.type != 'cuda':
            raise utils.UserError(f'--cuda_graph: CUDA graphs need a CUDA GPU (device here: {params[0].device})')
        step = cuda_graphed(step)
    return step, reset


def cuda_graphed(step):
    """step(idx, flip) replayed from a CUDA graph, one per shape of idx: the first step of a shape runs eagerly on a
    side stream (the warm-up a capture needs: Triton's compilation, cuDNN's choice of algorithms, autograd's
    buffers), the second is captured and then replayed, every later one replayed, its idx and flip copied into the
    graph's own tensors. The same steps in the same order, so the same networks. The step's tensors must keep their
    addresses (the Workspace's do), and it must not synchronise with the CPU."""
    graphs = {}  # idx's shape -> None after the warm-up, then (the graph's replay, its idx, its flip)

    def run(idx, flip):
        shape = tuple(idx.shape)
        if shape not in graphs:
            graphs[shape] = None
            return on_side_stream(lambda: step(idx, flip))
        if graphs[shape] is None:
            inputs = idx.clone(), flip.clone()
            graphs[shape] = (captured(lambda: step(*inputs)), *inputs)  # recorded, not run: replayed below
        replay, graph_idx, graph_flip = graphs[shape]
        graph_idx.copy_(idx)
        graph_flip.copy_(flip)
        replay()
    return run


def on_side_stream(fn):
    """Run fn on a new CUDA stream, ordered after and before the current one's work."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)


def captured(fn):
    """fn's GPU work recorded in a CUDA graph, not run: the graph's replay."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the thread that draws the next epoch's orders may copy them to the GPU during the capture
    with torch.cuda.graph(graph, capture_error_mode='thread_local'):
        fn()
    return graph.replay


def mark_static(tensors):
    """Tell torch.compile these tensors keep their address for the whole run (CUDA graphs read them in place
    instead of copying them in at every replay)."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)


class Workspace:
    """The device tensors of K networks trained side by side, kept for a whole run: their stacked states
    (block -> stacked state), the frozen-Begin cache and each phase's step built on them. Every step group
    loads its networks into the same tensors, so a compiled step (and its CUDA graphs) is built only once."""

    def __init__(self, states, args, mnist):
        self.states, self.args, self.mnist = states, args, mnist
        self.k = states['last']['fc.weight'].shape[0]
        self.cache, self.steps = None, {}
        if args.compile:
            mark_static([t for s in states.values() for t in s.values()] + list(mnist))

    def load(self, states):
        """Copy the stacked states of new networks into the workspace's tensors."""
        with torch.no_grad():
            for block, state in states.items():
                for name, t in state.items():
                    self.states[block][name].copy_(t)

    def begin_cache(self, images, begin):
        """Frozen Begin's output for every image, unflipped and flipped: (K, 2, N, 6, 14, 14), in the same tensor
        for every group."""
        if self.cache is None:
            self.cache = torch.empty(self.k, 2, len(images), *net.FEATURE, device=images.device)
            if self.args.compile:
                mark_static([self.cache])
        for flipped in (0, 1):
            net.begin_outputs(images.flip(-1) if flipped else images, begin, out=self.cache[:, flipped])
        return self.cache

    def step(self, phase, params, loss_fn):
        """The phase's step, built (and compiled) at its first use, its momentum zeroed."""
        if phase not in self.steps:
            self.steps[phase] = make_step(params, loss_fn, self.args)
        step, reset = self.steps[phase]
        reset()
        return step


def train_phase(step, gens, n, device, args):
    """--num_epochs epochs of SGD steps over n images, every network in its own order with its own flips.

    The next epoch's orders are drawn in a second thread while this epoch trains (the generators are
    still drawn from one epoch after another, so the streams are unchanged): drawing them takes about
    20 ms a pair on one CPU core, which would otherwise leave a GPU idle."""
    with concurrent.futures.ThreadPoolExecutor(1) as drawer:
        drawn = drawer.submit(draw_epoch, gens, n, device)
        for epoch in range(args.num_epochs):
            perm, flip = drawn.result()
            if epoch + 1 < args.num_epochs:
                drawn = drawer.submit(draw_epoch, gens, n, device)
            for b0 in range(0, n, args.batch_size):  # the last partial batch is kept
                step(perm[:, b0:b0 + args.batch_size], flip[:, b0:b0 + args.batch_size])


def trainable(state):
    """The float parameters of a stacked state (not BN statistics), set to require grad."""
    return [t.requires_grad_() for name, t in state.items() if 'running' not in name and 'num_batches' not in name]


def freeze(*states):
    """Stop tracking gradients of the stacked states' tensors."""
    for state in states:
        for t in state.values():
            t.requires_grad_(False)


def channels_last(x, args):
    """x in channels-last memory format with --channels_last (the same values)."""
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def large_phase(images, labels, begin, basic, last, args):
    """(params, loss_fn) of the recipe's first phase, for make_step: every float tensor of the large networks
    trained, their training forward on `images`."""
    def logits(idx, flip):
        h = net.begin_forward(channels_last(augment(images, idx, flip), args), begin, training=True)
        if args.fused_basic:
            return net.last_head(triton_conv.basic_block_train(h, basic, last), last, training=True)
        return net.last_forward(net.basic_forward(h, basic, training=True), last, training=True)

    if args.fused_basic:
        import triton_conv  # not a dependency: use_kernels has checked that it imports
    return trainable(begin) + trainable(basic) + trainable(last), cross_entropy(logits, labels, args)


def small_phase(begin, last, simple, gens, args, mnist, cache_begin=None, ws=None):
    """Train the stacked small blocks `simple` in place between the frozen, eval-mode Begin and Last of
    their networks (the recipe's second phase); return their test accuracy (K,) before and after.
    ws: the Workspace holding these states (make_pairs); by default one made for this call."""
    train_x, train_y, test_x, test_y = mnist
    k, device = begin['conv.weight'].shape[0], begin['conv.weight'].device
    ws = ws or Workspace({'begin': begin, 'last': last, 'simple': simple}, args, mnist)
    frozen = [t.clone() for t in (*begin.values(), *last.values())]
    acc_init = net.stacked_accuracy(test_x, test_y, begin, simple, last, 'simple')
    if cache_begin is None:
        cache_begin = args.num_epochs > 1 and utils.fits_in_memory(begin_cache_bytes(k, len(train_x)), device, 0.5)
    cache = ws.begin_cache(train_x, begin) if cache_begin else None
    knets = torch.arange(k, device=device)[:, None]

    def begin_out(idx, flip):
        """The frozen Begin's output (B, K*6, 14, 14) on images idx (K, B), flipped where flip."""
        if cache is not None:  # Begin is frozen: its output only depends on (image, flipped)
            h = cache[knets, flip.long(), idx].transpose(0, 1).reshape(idx.shape[1], k * net.PLANES, *net.FEATURE[1:])
            return channels_last(h, args)
        with torch.no_grad():
            return net.begin_forward(channels_last(augment(train_x, idx, flip), args), begin)

    def small_logits(idx, flip):
        return net.last_forward(net.simple_forward(begin_out(idx, flip), simple), last)

    def fused_loss(idx, flip):
        """The loss by triton_conv's one-kernel step, reading the Begin cache in place when there is one."""
        if cache is not None:
            h, offsets = cache, ((knets * 2 + flip.long()) * len(train_x) + idx).T * net.FEATURE_NUMEL
        else:
            h = begin_out(idx, flip).contiguous()
            offsets = torch.arange(h.shape[0] * k, device=device).view(-1, k) * net.FEATURE_NUMEL
        return triton_conv.small_step_loss(h, offsets, train_y[idx].T, simple, last)

    if args.fused_small:
        import triton_conv  # not a dependency: use_kernels has checked that it imports
    loss_fn = fused_loss if args.fused_small else cross_entropy(small_logits, train_y, args)
    step = ws.step(('small', cache is not None), trainable(simple), loss_fn)
    train_phase(step, gens, len(train_x), device, args)
    freeze(simple)
    if not all(torch.equal(a, b) for a, b in zip((*begin.values(), *last.values()), frozen)):
        raise RuntimeError('the frozen Begin/Last changed during the small-block phase')
    return acc_init, net.stacked_accuracy(test_x, test_y, begin, simple, last, 'simple')


def make_pairs(indices, args, mnist, device, cache_begin=None, workspaces=None):
    """Train the networks `indices` side by side; return their shard (CPU tensors).

    workspaces: a dict (K -> Workspace) kept across calls, so that groups of the same size reuse one
    workspace and its (compiled) steps; it holds one K at a time (each workspace holds a Begin cache)."""
    train_x, train_y, test_x, test_y = mnist
    k = len(indices)
    seeds = [utils.seed_for(args.seed, args.kind, i) for i in indices]
    sds = [init_pair(s) for s in seeds]
    states = {block: net.stack_states([sd[j] for sd in sds]) for j, block in enumerate(PAIR_BLOCKS)}
    workspaces = {} if workspaces is None else workspaces  # None: a workspace for this call only
    ws = workspaces.get(k)
    if ws is None or ws.mnist is not mnist:
        workspaces.clear()  # free the previous K's workspace before this one is allocated
        ws = workspaces[k] = Workspace({b: {n: t.to(device) for n, t in s.items()} for b, s in states.items()},
                                       args, mnist)
    else:
        ws.load(states)
    begin, basic, last, simple = (ws.states[b] for b in PAIR_BLOCKS)
    gens = [data_generator(s) for s in seeds]

    # 1. the large network, all of it trained
    step = ws.step('large', *large_phase(train_x, train_y, begin, basic, last, args))
    train_phase(step, gens, len(train_x), device, args)
    freeze(begin, basic, last)
    acc = {'acc_large': net.stacked_accuracy(test_x, test_y, begin, basic, last, 'basic')}
    nan = torch.full((k,), float('nan'), dtype=torch.float64)
    acc['acc_small_init'], acc['acc_small'] = nan, nan.clone()

    # 2. the small block between the frozen (eval-mode) Begin and Last
    if args.train_small:
        acc['acc_small_init'], acc['acc_small'] = small_phase(begin, last, simple, gens, args, mnist, cache_begin, ws)

    shard = {'recipe': recipe_of(args), 'index': torch.tensor(list(indices), dtype=torch.long),
             'seed': torch.tensor(seeds, dtype=torch.long),
             'begin': begin, 'basic': basic, 'last': last, **acc}
    if args.train_small:
        shard['simple'] = simple
    # copies: the workspace's tensors are overwritten by the next group
    return {key: ({n: t.detach().to('cpu', copy=True) for n, t in v.items()} if isinstance(v, dict) and key != 'recipe'
                  else v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in shard.items()}


# ----------------------------------------------------------------------------------------
# Driver: resumable, sharded, with a progress bar.

NET_BYTES = 600 * 2 ** 20  # GPU memory of one network of a step, mostly its Begin cache (538 MiB at 60,000 images)
PROCESS_BYTES = 2 ** 30  # GPU memory of a process beyond its networks: CUDA context, MNIST, cuDNN workspaces
MAX_MODELS_PER_STEP = 128  # the fastest on an H200 (BENCHMARKS.md)


def memory_share(total, free, processes):
    """Bytes one of `processes` processes sharing a GPU may fill: min(free, total) / processes - 1 GiB.

    Processes starting together see the same free memory and so claim at most all of it together; one
    starting later sees the others' memory gone; a share never exceeds total / processes."""
    return max(0, min(free, total) // processes - PROCESS_BYTES)


def models_per_step_for(share):
    """Networks per step that fit in a share of GPU memory (600 MiB each), at least 1, at most 128."""
    return int(max(1, min(MAX_MODELS_PER_STEP, share // NET_BYTES)))


def gpu_share(device, processes):
    """This process's memory_share of its GPU, from the memory free now; None off CUDA."""
    if device.type != 'cuda':
        return None
    free, total = torch.cuda.mem_get_info(device)
    return memory_share(total, free, processes)


def default_models_per_step(device, share):
    """Networks per step: one on a CPU (grouped convolutions are slower there), up to 128 on a GPU
    (measured on an H200: BENCHMARKS.md), fewer when this process's memory share is short."""
    return 1 if device.type != 'cuda' else models_per_step_for(share)


def begin_cache_bytes(k, num_images):
    """Memory of the small-block phase's frozen-Begin cache of k networks (float32, both flips)."""
    return k * 2 * num_images * net.FEATURE_NUMEL * 4


def use_begin_cache(args, k, share):
    """--begin_cache on / off; auto: on a GPU, cache Begin's outputs when they fit in half this process's share
    (the rule make_pairs applies to the whole free memory, which processes starting together would all
    claim), None elsewhere."""
    if args.begin_cache != 'auto':
        return args.begin_cache == 'on'
    if share is None:
        return None
    return args.num_epochs > 1 and begin_cache_bytes(k, args.num_train_images) <= share // 2


def original_layout_help(kind):
    """The folders of --layout original, for --help."""
    dirs = loader.ORIGINAL_DIRS[kind]
    when = 'without --skip_simple' if kind == 'train' else 'with --train_simple'
    return ', '.join(f'{d}/' for b, d in dirs.items() if b != 'simple') + f', and {dirs["simple"]}/ {when}'


def original_dirs(args):
    """Block -> folder that --layout original writes for this recipe (small blocks only when trained)."""
    return {b: d for b, d in loader.ORIGINAL_DIRS[args.kind].items() if b != 'simple' or args.train_small}


def check_layout(args):
    """Refuse a data root holding the other layout, or original-layout folders this script did not make."""
    root = args.data_root
    folders = [d + '/' for d in loader.ORIGINAL_DIRS[args.kind].values() if os.path.isdir(os.path.join(root, d))]
    if args.layout == 'original' and loader.list_shards(root):
        raise utils.UserError(f'--data_root {root} holds shards (shard_*.pt): --layout original needs a folder of its '
                              f'own, or pass --layout shards to resume them')
    if args.layout == 'original' and folders and loader.read_recipe(root) is None:
        # recipe.json is written before any pair: without it these files come from elsewhere
        raise utils.UserError(f'--data_root {root} holds {", ".join(folders)} but no recipe.json (not made by '
                              f'construct_train.py); choose another folder')
    if args.layout == 'shards' and folders:
        raise utils.UserError(f'--data_root {root} holds the original layout ({", ".join(folders)}): pass '
                              f'--layout original to resume it, or choose another folder')


def made_indices(args):
    """Indices already complete in args.data_root, in its layout."""
    if args.layout == 'original':
        return loader.original_made(args.data_root, original_dirs(args))
    loader.check_shard_ranges(loader.list_shards(args.data_root))
    return loader.covered_indices(args.data_root)


def accuracy_text(acc, train_small):
    """'large …%' and, when small blocks are trained, the small block's at init and trained: acc maps the shard's
    acc_* keys to numbers."""
    small = (f', small at init {acc["acc_small_init"]:.2f}%, small trained {acc["acc_small"]:.2f}%'
             if train_small else '')
    return f'large {acc["acc_large"]:.2f}%{small}'


def save_pairs(args, shard):
    """Write one step group's networks in args.layout, every file atomically (the original layout has no
    place for the test accuracies: they go to the log, a line per network)."""
    if args.layout == 'original':
        loader.write_original(args.data_root, shard, original_dirs(args))
        for j, i in enumerate(shard['index'].tolist()):
            acc = {key: shard[key][j].item() for key in ('acc_large', 'acc_small_init', 'acc_small')}
            logging.info(f'network {i}: test accuracy {accuracy_text(acc, args.train_small)}')
    else:
        loader.write_shard(args.data_root, shard)


def check_writable(root):
    """Create root if needed and make sure files can be written there."""
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f'.write_test_{os.getpid()}')
        open(probe, 'wb').close()
        os.remove(probe)
    except OSError as e:
        raise utils.UserError(f'--data_root {root} is not writable ({e.strerror}); choose another folder') from None


def triton_flags(args):
    """The flags that ask for triton_conv.py's kernels, as text ('' when none does)."""
    return ' and '.join(['--conv triton'] * (args.conv == 'triton') + ['--fused_begin'] * args.fused_begin
                        + ['--fused_basic'] * args.fused_basic + ['--fused_small'] * args.fused_small)


def use_kernels(args, device):
    """Route the stacked 3x3 convolutions and the Begin block to the kernels --conv and --fused_begin choose (and
    check that --fused_basic's and --fused_small's kernels can run)."""
    flags = triton_flags(args)
    if not flags:
        return net.set_kernels()
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
        raise utils.UserError(f'{flags}: Triton kernels, which run on a CUDA GPU (device here: {device}); on a CPU '
                              f'only in Triton\'s interpreter, TRITON_INTERPRET=1 (slow: for tests)')
    try:
        import triton_conv
    except ImportError as e:
        raise utils.UserError(f'{flags}: Triton kernels, which need the triton package (it comes with CUDA builds '
                              f'of torch): {e}') from None
    net.set_kernels(triton_conv.grouped_conv3x3 if args.conv == 'triton' else None,
                    triton_conv.begin_block if args.fused_begin else None)


def load_mnist_to(device, args):
    """(train images, train labels, test images, test labels) on the device, subsampled as asked."""
    train_x, train_y = load_mnist(args.mnist_root, train=True)
    test_x, test_y = load_mnist(args.mnist_root, train=False)
    return (train_x[:args.num_train_images].to(device), train_y[:args.num_train_images].to(device),
            test_x[:args.num_test_images].to(device), test_y[:args.num_test_images].to(device))


def generate(args):
    """Make the missing networks of [start_index, start_index + num_data) in args.data_root."""
    device = utils.get_device(args.gpu_id, args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest grouped convolutions
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    use_kernels(args, device)
    check_writable(args.data_root)
    utils.set_logger(os.path.join(args.data_root, 'logs', f'{args.kind}_{args.start_index}.log'))
    check_layout(args)
    share = gpu_share(device, args.processes_per_gpu)
    k = args.models_per_step or default_models_per_step(device, share)
    cache_begin = use_begin_cache(args, k, share)
    mnist = load_mnist_to(device, args)  # before the root is claimed: bad input leaves no recipe.json behind
    loader.claim_root(args.data_root, recipe_of(args))
    stop = args.start_index + args.num_data
    todo = loader.missing_ranges(made_indices(args), args.start_index, stop)
    groups = [(a, min(a + k, b)) for lo, b in todo for a in range(lo, b, k)]
    groups.sort(key=lambda g: g[0] - g[1])  # full groups first: one workspace per K (their networks stay the same)
    total = sum(b - a for a, b in groups)
    memory = '' if share is None else (f', memory share {share / 2 ** 30:.1f} GiB (1/{args.processes_per_gpu} of the '
                                       f'free memory less 1 GiB), Begin cache {"on" if cache_begin else "off"}')
    logging.info(f'{args.kind} networks [{args.start_index}, {stop}) in {args.data_root} ({args.layout} layout): '
                 f'{args.num_data - total} already made, {total} to make; device {device}, {k} per step{memory}, '
                 f'step {"compiled (" + args.compile + ")" if args.compile else "eager"}'
                 f'{", CUDA graph" if args.cuda_graph else ""}'
                 f'{", channels-last" if args.channels_last else ""}{", bf16 autocast" if args.amp == "bf16" else ""}'
                 f'{", Triton convolutions" if args.conv == "triton" else ""}'
                 f'{", fused Begin" if args.fused_begin else ""}{", fused Basic" if args.fused_basic else ""}'
                 f'{", fused small step" if args.fused_small else ""}, '
                 f'recipe {recipe_of(args)}')
    made, workspaces, t0 = [], {}, time.time()
    with tqdm(total=total, unit='net', desc=f'{args.kind} networks', dynamic_ncols=True) as bar:
        for a, b in groups:
            shard = make_pairs(range(a, b), args, mnist, device, cache_begin, workspaces)
            save_pairs(args, shard)
            made.append(shard)
            bar.update(b - a)
            bar.set_postfix(large=f"{shard['acc_large'].mean():.1f}%",
                            small=f"{shard['acc_small'].mean():.1f}%" if args.train_small else '-')
    if made:
        hours = (time.time() - t0) / 3600
        means = {key: torch.cat([s[key] for s in made]).mean().item()
                 for key in ('acc_large', 'acc_small_init', 'acc_small')}
        logging.info(f'made {total} networks in {hours * 3600:.1f} s ({total / hours:.1f} per hour); mean test '
                     f'accuracy: {accuracy_text(means, args.train_small)}')
    else:
        logging.info('nothing to do: every index of the range exists')
    return made


def main(kind='train'):
    """Parse the flags and generate."""
    generate(get_args(kind))


if __name__ == '__main__':
    utils.run_main(main)
