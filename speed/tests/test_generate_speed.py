"""speed/'s generation paths against the plain one: torch.compile, channels-last, bf16 autocast, the Triton flags'
checks and CUDA graphs."""
import json
import os
import subprocess
import sys

# Triton reads TRITON_INTERPRET when first imported: the kernels run in its interpreter on a CPU unless it is set
# (speed/gpu_check.sh sets 0)
os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest
import torch

SPEED = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, SPEED)
import construct  # noqa: E402
import construct_train  # noqa: E402
import fast_paths_agreement  # noqa: E402  (the step variants' runner, shared with the figures it prints)
import generate  # noqa: E402  (speed/generate.py)
import generation  # noqa: E402
import net  # noqa: E402
import utils  # noqa: E402

TINY = ['--num_epochs', '1', '--num_train_images', '300', '--num_test_images', '200', '--device', 'cpu']
STATES = ('begin', 'basic', 'last', 'simple')
CPU = torch.device('cpu')


@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Single-threaded, so that sums run in one fixed order."""


@pytest.fixture(scope='module')
def mnist():
    return generation.load_mnist_to(CPU, construct_train.get_args('train', TINY))


def tiny_args(*extra):
    return generate.get_args(TINY + list(extra))


def fast_pairs(indices, args, mnist, device=CPU, **kw):
    """make_pairs with the speed flags of args (speed/generate.py's)."""
    return construct.make_pairs(indices, args.recipe, mnist, device, steps=generate.FastSteps(args, device), **kw)


def max_diff(a, b):
    """Largest absolute difference between two shards' float tensors."""
    return max((a[s][n] - b[s][n]).abs().max().item() for s in STATES for n in a[s] if a[s][n].is_floating_point())


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch's own, on importing torch.compile's stack
def test_compiled_step_equals_eager_step():
    # Random images: MNIST's flat background makes exact ties in the max-pool windows, which the compiled
    # kernel breaks differently (the runs then drift apart by 2e-5 in four steps: fast_paths_agreement.py).
    images = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1))
    eager = fast_paths_agreement.large_steps([], images, labels)
    compiled = fast_paths_agreement.large_steps(['--compile'], images, labels)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    three = fast_paths_agreement.large_steps([], images, labels, steps=3)
    assert not all(torch.equal(a, b) for a, b in zip(eager, three))


def test_channels_last_forward_and_backward_are_the_same_function():
    # float64, so the comparison is not hidden by the CPU's less precise channels-last BatchNorm
    k = 3
    begin, basic, last = ({n: (t.double() if t.is_floating_point() else t)
                           for n, t in net.fresh_states(b, range(k)).items()}
                          for b in ('begin', 'basic', 'last'))
    x = torch.rand(8, k, 28, 28, dtype=torch.float64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        states = [{n: t.clone() for n, t in s.items()} for s in (begin, basic, last)]
        params = [t.requires_grad_() for s in states for n, t in s.items() if 'running' not in n and 'num_b' not in n]
        h = net.begin_forward(x.contiguous(memory_format=layout), states[0], training=True)
        logits = net.last_forward(net.basic_forward(h, states[1], training=True), states[2], training=True)
        logits.square().sum().backward()
        assert h.is_contiguous(memory_format=layout)
        stats = [t for s in states for n, t in s.items() if 'running' in n]
        results.append([logits.detach()] + [p.grad for p in params] + stats)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_fast_flags_make_close_networks(mnist):
    plain = construct.make_pairs(range(2), tiny_args('--num_epochs', '2').recipe, mnist, CPU, True)
    last = fast_pairs(range(2), tiny_args('--num_epochs', '2', '--channels_last'), mnist, cache_begin=True)
    bf16 = fast_pairs(range(2), tiny_args('--num_epochs', '2', '--amp', 'bf16'), mnist, cache_begin=True)
    assert 0 < max_diff(plain, last) < 1e-2  # the CPU's channels-last BatchNorm sums in another order
    assert 1e-4 < max_diff(plain, bf16) < 0.1  # bf16 really ran, and trained the same networks
    for shard in (last, bf16):
        assert (shard['acc_large'] - plain['acc_large']).abs().max() <= 2.0  # of 200 test images
    assert bf16['recipe']['amp'] == 'bf16' and 'amp' not in plain['recipe']


def test_flags_reach_the_log_and_the_recipe(tmp_path):
    root = tmp_path / 'pairs'
    argv = TINY + ['--data_root', str(root), '--num_data', '2', '--models_per_step', '2', '--channels_last',
                   '--amp', 'bf16', '--begin_cache', 'off']
    generate.main(argv)
    with open(root / 'recipe.json') as f:
        assert json.load(f)['amp'] == 'bf16'
    with open(root / 'logs' / 'train_0.log') as f:
        log = f.read()
    assert 'step eager, channels-last, bf16 autocast' in log
    with pytest.raises(utils.UserError, match='recipe'):  # an fp32 run may not add to these bf16 networks
        generate.main(argv[:-5] + ['--num_data', '4'])


@pytest.mark.parametrize('flags', [['--conv', 'triton'], ['--fused_begin'], ['--fused_basic'], ['--fused_small'],
                                   ['--conv', 'triton', '--fused_begin', '--fused_basic', '--fused_small']])
def test_triton_kernels_are_refused_where_they_cannot_run(monkeypatch, flags):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(utils.UserError, match='TRITON_INTERPRET=1'):
        generate.FastSteps(tiny_args(*flags), CPU)
    with pytest.raises(utils.UserError, match='float32 only'):
        tiny_args(*flags, '--amp', 'bf16')
    assert not hasattr(net, 'set_kernels')  # kernels are passed in, never set process-wide


def test_cuda_graph_is_refused_where_it_cannot_run(mnist):
    with pytest.raises(utils.UserError, match='one or the other'):
        tiny_args('--cuda_graph', '--compile')
    with pytest.raises(utils.UserError, match='CUDA graphs need a CUDA GPU'):
        fast_pairs(range(1), tiny_args('--cuda_graph'), mnist)


def test_cuda_graph_runs_every_step_once(monkeypatch, mnist):
    # on the CPU, with stand-ins: a "capture" that records without running (as CUDA's does) and a replay that runs.
    # Each step must then run exactly once, on its own batch, whether it meets the warm-up, the capture or a replay.
    captures = []
    monkeypatch.setattr(generate, 'on_side_stream', lambda fn: fn())
    monkeypatch.setattr(generate, 'captured', lambda fn: captures.append(fn) or fn)
    args = tiny_args('--num_epochs', '2')  # batches of 128, 128, 44: each shape warmed up, captured, replayed
    plain = construct.make_pairs(range(2), args.recipe, mnist, CPU)

    class Graphed(construct.Steps):  # --cuda_graph's wrapping, without its check for a CUDA device
        def build(self, params, loss_fn, recipe):
            step, reset = super().build(params, loss_fn, recipe)
            return generate.cuda_graphed(step), reset
    graphed = construct.make_pairs(range(2), args.recipe, mnist, CPU, steps=Graphed())
    assert len(captures) == 4  # 2 shapes x 2 phases
    assert max_diff(plain, graphed) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU (speed/gpu_check.sh)')
@pytest.mark.parametrize('flags', [[], ['--amp', 'bf16'], ['--fused_begin', '--fused_basic', '--fused_small']])
def test_cuda_graph_replays_the_same_steps(flags):
    if '--fused_begin' in flags:
        pytest.importorskip('triton')
        if os.environ.get('TRITON_INTERPRET') == '1':
            pytest.skip('the Triton kernels compiled for the GPU: set TRITON_INTERPRET=0')
    # 2 epochs of batches 128, 128, 44: every shape warms up, is captured and is replayed; two step groups of the
    # same workspace: the second replays the graphs on new networks
    argv = ['--num_epochs', '2', '--num_train_images', '300', '--num_test_images', '200', '--device', 'cuda', *flags]
    device = torch.device('cuda')
    plain_args, graph_args = (generate.get_args(argv + extra) for extra in ([], ['--cuda_graph']))
    mnist = generation.load_mnist_to(device, plain_args)
    shards = {}
    for name, args in (('plain', plain_args), ('graph', graph_args)):
        workspaces = {}
        shards[name] = [fast_pairs(range(a, a + 2), args, mnist, device, workspaces=workspaces) for a in (0, 2)]
    for plain, graph in zip(shards['plain'], shards['graph']):
        assert max_diff(plain, graph) < 1e-5
        assert torch.equal(plain['acc_large'], graph['acc_large'])


def test_speed_bench_generate_runs_a_speed_row(tmp_path):
    # speed/bench_generate.py is bench/bench_generate.py with speed/generate.py's rows: one tiny row of each kind
    out = tmp_path / 'generate.json'
    r = subprocess.run([sys.executable, os.path.join(SPEED, 'bench_generate.py'), '--skip_original', '--k', '1',
                        '--num_images', '256', '--rows', '1:channels_last', '--out', str(out)],
                       cwd=os.path.dirname(SPEED), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '| (c) ours, batched K=1, channels_last |' in r.stdout
    assert json.load(open(out))['rows']['(c) ours, batched K=1, channels_last']['flags'] == ['--channels_last']
