"""Generation with the faster paths that no GPU log has yet shown faster than the plain step (speed/README.md).

construct_train.py's flags, and these: --compile (the whole SGD step), --cuda_graph (each step replayed from a
CUDA graph), --channels_last, --amp bf16, --conv triton, --fused_begin, --fused_basic, --fused_small (Triton
kernels of triton_conv.py). --val makes validation networks (construct_val.py's flags). They plug into
generation.generate and construct.make_pairs through their one interface, a Steps object (FastSteps below).

    python speed/generate.py --num_data 128 --data_root ./data/train --fused_begin --fused_basic --fused_small
    python speed/generate.py --val --num_data 100 --data_root ./data/val --cuda_graph
"""
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the top-level modules
import construct  # noqa: E402
import construct_train  # noqa: E402
import generation  # noqa: E402
import net  # noqa: E402
import utils  # noqa: E402


def get_args(argv=None):
    """construct_train.py's flags (construct_val.py's with --val) and the speed flags, checked."""
    argv = sys.argv[1:] if argv is None else list(argv)
    kind = 'val' if '--val' in argv else 'train'
    p = construct_train.get_parser(kind)
    p.add_argument('--val', action='store_true', help="validation networks (construct_val.py's flags)")
    p.add_argument('--compile', nargs='?', const='default', default=None, metavar='MODE',
                   choices=('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                   help='torch.compile the whole SGD step (forward, backward, update); MODE reduce-overhead adds '
                        'CUDA graphs (GPU; the first steps compile: a minute)')
    p.add_argument('--cuda_graph', action='store_true',
                   help="replay each phase's whole SGD step (forward, backward, update, the Triton kernels included) "
                        'from a CUDA graph, captured at its second batch of a shape (GPU)')
    p.add_argument('--channels_last', action='store_true',
                   help='channels-last activations (NHWC: other cuDNN kernels for the grouped convolutions)')
    p.add_argument('--amp', default='none', choices=('none', 'bf16'),
                   help='bf16 autocast of the forward (weights, updates and BN statistics stay fp32); not the '
                        'recipe: recorded in recipe.json, so such networks never mix with fp32 ones')
    p.add_argument('--conv', default='cudnn', choices=('cudnn', 'triton'),
                   help="the stacked 3x3 convolutions of training: torch's, or triton_conv.py's kernel (GPU, float32; "
                        'on a CPU only under TRITON_INTERPRET=1, for tests)')
    p.add_argument('--fused_begin', action='store_true',
                   help="the Begin block (convolution, BatchNorm, ReLU, max-pool; forward and backward) by "
                        "triton_conv.py's kernels, which recompute its 28x28 activations instead of storing them")
    p.add_argument('--fused_basic', action='store_true',
                   help="the first phase's Basic block and Last's 1x1 convolution, forward and backward, in five "
                        "triton_conv.py kernels that keep only the convolutions' outputs")
    p.add_argument('--fused_small', action='store_true',
                   help="the small-block phase's step (SimpleBlock_NoBn, the frozen Last, the loss and the gradient "
                        'of the small block) in one triton_conv.py kernel, reading the Begin cache in place')
    args = construct_train.check_args(p.parse_args(argv), kind)
    if args.cuda_graph and args.compile:
        raise utils.UserError('--cuda_graph and --compile: one or the other (--compile reduce-overhead makes its own '
                              'CUDA graphs, of the compiled parts only)')
    if args.small_block != net.DEFAULT_SMALL:  # FastSteps writes the SimpleBlock_NoBn's step only
        raise utils.UserError(f'--small_block {args.small_block}: speed/generate.py trains SimpleBlock_NoBn only; '
                              f'use construct_train.py / construct_val.py for other small blocks')
    kernels = triton_flags(args)
    if args.amp == 'bf16' and kernels:
        raise utils.UserError(f'{kernels}: float32 only; drop --amp bf16 or {kernels}')
    args.recipe = FastRecipe(**dataclasses.asdict(args.recipe), amp=args.amp)
    return args


@dataclasses.dataclass(frozen=True)
class FastRecipe(construct.Recipe):
    """The recipe with --amp: bf16 networks are another recipe, recorded so that they never mix with fp32 ones."""
    amp: str = 'none'

    def as_json(self):
        """recipe.json's dict; an fp32 recipe keeps the original keys (no 'amp')."""
        return {k: v for k, v in super().as_json().items() if k != 'amp' or v != 'none'}


def conv3x3(x, w, conv):
    """net's stacked 3x3 convolution (stride 1, padding 1) of x (B, K*Cin, H, W) by w (K, Cout, Cin, 3, 3), run by
    conv(x, weights, groups) (triton_conv.grouped_conv3x3) when given, else by torch."""
    if conv is None:
        return F.conv2d(x, w.reshape(-1, *w.shape[2:]), groups=w.shape[0], padding=1)
    return conv(x, w.reshape(-1, *w.shape[2:]), w.shape[0])


def begin_forward(x, s, training, conv):
    """net.begin_forward with conv3x3's convolution."""
    if x.shape[1] == 1 and s['conv.weight'].shape[0] > 1:  # same images for every network: net's own way
        return net.begin_forward(x, s, training)
    x = F.relu(net.batch_norm(conv3x3(x, s['conv.weight'], conv), s, 'bn.', training))
    return F.max_pool2d(x, 3, 2, 1)


def basic_forward(x, s, training, conv):
    """net.basic_forward with conv3x3's convolutions."""
    out = F.relu(net.batch_norm(conv3x3(x, s['conv1.weight'], conv), s, 'bn1.', training))
    return F.relu(net.batch_norm(conv3x3(out, s['conv2.weight'], conv), s, 'bn2.', training) + x)


def simple_forward(x, s, conv):
    """net.simple_forward with conv3x3's convolutions."""
    return F.relu(conv3x3(F.relu(conv3x3(x, s['conv1.weight'], conv)), s['conv2.weight'], conv) + x)


def triton_flags(args):
    """The flags that ask for triton_conv.py's kernels, as text ('' when none does)."""
    return ' and '.join(['--conv triton'] * (args.conv == 'triton') + ['--fused_begin'] * args.fused_begin
                        + ['--fused_basic'] * args.fused_basic + ['--fused_small'] * args.fused_small)


def load_kernels(args, device):
    """triton_conv, when a flag asks for its kernels and they can run on the device; else None."""
    flags = triton_flags(args)
    if not flags:
        return None
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
        raise utils.UserError(f'{flags}: Triton kernels, which run on a CUDA GPU (device here: {device}); on a CPU '
                              f'only in Triton\'s interpreter, TRITON_INTERPRET=1 (slow: for tests)')
    try:
        import triton_conv
    except ImportError as e:
        raise utils.UserError(f'{flags}: Triton kernels, which need the triton package (it comes with CUDA builds '
                              f'of torch): {e}') from None
    return triton_conv


class FastSteps(construct.Steps):
    """The plain steps with the speed flags of args: other kernels, layouts, precision, compilation, graphs."""

    def __init__(self, args, device):
        self.args, self.tc = args, load_kernels(args, device)
        self.conv = self.tc.grouped_conv3x3 if args.conv == 'triton' else None

    def describe(self):
        a = self.args
        return (f'{"compiled (" + a.compile + ")" if a.compile else "eager"}{", CUDA graph" if a.cuda_graph else ""}'
                f'{", channels-last" if a.channels_last else ""}{", bf16 autocast" if a.amp == "bf16" else ""}'
                f'{", Triton convolutions" if a.conv == "triton" else ""}{", fused Begin" if a.fused_begin else ""}'
                f'{", fused Basic" if a.fused_basic else ""}{", fused small step" if a.fused_small else ""}')

    def keep_addresses(self, *tensors):
        """With --compile: the tensors a workspace keeps for the whole run, read in place by compiled steps."""
        if self.args.compile:
            mark_static([t for x in tensors for t in (x.values() if isinstance(x, dict) else [x])
                         if isinstance(t, torch.Tensor)])

    def layout(self, x):
        """x in channels-last memory format with --channels_last (the same values)."""
        return x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x

    def begin(self, x, begin, training=False):
        """Begin's forward by the fused kernels (--fused_begin) or torch's with --conv's convolution."""
        x = self.layout(x)
        return self.tc.begin_block(x, begin, training) if self.args.fused_begin else \
            begin_forward(x, begin, training, self.conv)

    def cross_entropy(self, logits_fn, labels):
        """construct.cross_entropy, the logits under --amp's autocast."""
        def logits(idx, flip):
            with torch.autocast(labels.device.type, torch.bfloat16, enabled=self.args.amp == 'bf16'):
                return logits_fn(idx, flip).float()
        return construct.cross_entropy(logits, labels)

    def large_loss(self, images, labels, begin, basic, last):
        self.keep_addresses(images, labels, begin, basic, last)

        def logits(idx, flip):
            h = self.begin(construct.augment(images, idx, flip), begin, training=True)
            if self.args.fused_basic:
                return net.last_head(self.tc.basic_block_train(h, basic, last), last, training=True)
            return net.last_forward(basic_forward(h, basic, True, self.conv), last, training=True)
        return self.cross_entropy(logits, labels)

    def small_loss(self, images, labels, begin, last, simple, cache):
        self.keep_addresses(images, labels, begin, last, simple, *([] if cache is None else [cache]))
        k, device = begin['conv.weight'].shape[0], images.device
        knets = torch.arange(k, device=device)[:, None]

        def begin_out(idx, flip):
            """The frozen Begin's output (B, K*6, 14, 14) on images idx (K, B), flipped where flip."""
            if cache is not None:
                h = cache[knets, flip.long(), idx].transpose(0, 1).reshape(idx.shape[1], k * net.PLANES,
                                                                          *net.FEATURE[1:])
                return self.layout(h)
            with torch.no_grad():
                return self.begin(construct.augment(images, idx, flip), begin)

        def fused_loss(idx, flip):
            """The loss by triton_conv's one-kernel step, reading the Begin cache in place when there is one."""
            if cache is not None:
                h, offsets = cache, ((knets * 2 + flip.long()) * len(images) + idx).T * net.FEATURE_NUMEL
            else:
                h = begin_out(idx, flip).contiguous()
                offsets = torch.arange(h.shape[0] * k, device=device).view(-1, k) * net.FEATURE_NUMEL
            return self.tc.small_step_loss(h, offsets, labels[idx].T, simple, last)

        if self.args.fused_small:
            return fused_loss
        return self.cross_entropy(lambda idx, flip: net.last_forward(
            simple_forward(begin_out(idx, flip), simple, self.conv), last), labels)

    def build(self, params, loss_fn, recipe):
        if self.args.compile:
            step, reset = self.compiled_step(params, torch.compile(loss_fn, mode=self.args.compile), recipe)
        else:
            step, reset = super().build(params, loss_fn, recipe)
        if self.args.cuda_graph:
            if params[0].device.type != 'cuda':
                raise utils.UserError(f'--cuda_graph: CUDA graphs need a CUDA GPU (device here: {params[0].device})')
            step = cuda_graphed(step)
        return step, reset


    def compiled_step(self, params, loss_fn, recipe):
        """construct.Steps.build with the SGD update compiled too, its momentum buffers static."""
        bufs = [torch.zeros_like(p) for p in params]
        mark_static(bufs)
        return construct.sgd_steps(params, loss_fn, recipe, bufs, torch.compile(construct.sgd_update,
                                                                                 mode=self.args.compile))


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


def main(argv=None):
    """Parse the flags and generate with the faster steps."""
    args = get_args(argv)
    generation.generate(args, FastSteps(args, utils.get_device(args.gpu_id, args.device)))


if __name__ == '__main__':
    utils.run_main(main)
