"""train.py under torchrun (CPU, gloo, 2 processes): the same loss curve and accuracies as one process,
resume across launches, the global-batch split, and the --amp / --compile wrappers."""
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed
import train
import utils
from conftest import ROOT, write_shards
from mixer import MLPMixer
from test_train import TINY, run_dirs

pytestmark = pytest.mark.usefixtures('one_thread')


def dist_argv(data, out, *extra):
    """A tiny run: 11 pairs in global batches of 5 (5, 5, 1: uneven shares of 2 + 3, and one rank without a
    pair in the last batch), masking and noise on both sides (shared randomness), 5 val networks (3 + 2)."""
    return ['--train_path', data['train'], '--val_path', data['val'], '--train_data_length', '11',
            '--val_data_length', '5', '--num_test_images', '200', '--batch_size', '5', '--num_epochs', '3',
            '--log_step', '1', '--prob', '0.2', '--mask_target', 'both', '--noise', '0.01', '--device', 'cpu',
            '--ckpt_path', str(out / 'ckpts'), '--log_path', str(out / 'logs'), *TINY, *extra]


def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def torchrun(nproc, argv, timeout=180):
    """`python -m torch.distributed.run --nproc_per_node nproc train.py argv` on loopback; asserts success."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MASTER_ADDR='127.0.0.1')
    if any(name == 'lo' for _, name in socket.if_nameindex()):
        env['GLOO_SOCKET_IFNAME'] = 'lo'  # offline machines: keep gloo off other interfaces
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                             '--master_addr', '127.0.0.1', '--master_port', str(free_port()),
                             '--monitor_interval', '0.1', 'train.py', *argv],  # the default 5 s polls end late
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, which torchrun passes on to its workers (they run in sessions of their own, so a SIGKILL
        # of the launcher would leave them running); the output so far says where it hung
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f'torchrun did not end within {timeout} s; its output:\n{out[-6000:]}')
    assert proc.returncode == 0, out[-6000:]


def read_rows(log_dir):
    with open(os.path.join(log_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The same tiny run in one process (in this interpreter) and in 2 processes, the latter stopped
    after epoch 0 and resumed by a second torchrun launch."""
    base = tmp_path_factory.mktemp('dist')
    write_shards(base / 'train', 11, shard_size=4, seed=1)
    write_shards(base / 'val', 5, shard_size=5, seed=2)
    data = {'train': str(base / 'train'), 'val': str(base / 'val')}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    one = dist_argv(data, base / 'one')
    train.main(one)
    torch.set_num_threads(n)
    two = dist_argv(data, base / 'two')
    torchrun(2, two + ['--stop_after_epoch', '0'])
    ckpt_two = run_dirs(two)[0]
    first = {'epoch': torch.load(os.path.join(ckpt_two, 'last.pth'), weights_only=True)['epoch'],
             'summary': os.path.exists(os.path.join(ckpt_two, 'summary.json'))}
    torchrun(2, two + ['--resume'])
    return {'one': one, 'two': two, 'first': first}


def test_two_processes_give_the_one_process_curve_and_accuracies(runs):
    (ckpt1, log1), (ckpt2, log2) = run_dirs(runs['one']), run_dirs(runs['two'])
    rows1, rows2 = read_rows(log1), read_rows(log2)
    assert [r['epoch'] for r in rows2] == ['0', '1', '2']
    # the epoch loss is the mean over global batches in both: equal up to float summation order
    assert [float(r['loss']) for r in rows2] == pytest.approx([float(r['loss']) for r in rows1], rel=1e-4)
    for col in ('lr', 'mean', 'min', 'max'):
        assert [r[col] for r in rows2] == [r[col] for r in rows1]
    s1, s2 = (json.load(open(os.path.join(d, 'summary.json'))) for d in (ckpt1, ckpt2))
    assert s2['rows'] == s1['rows'] and s2['best_epoch'] == s1['best_epoch']
    # rank 0 saved a plain translator state dict (no 'module.' prefix), close to the 1-process one: Adam
    # moves a parameter by about lr per step whatever its gradient's size, so where a gradient is ~0 the
    # float noise of the split batch can show up to ~lr (1e-3) per step
    a, b = (torch.load(s['checkpoint'], weights_only=True) for s in (s1, s2))
    assert list(b) == list(a) == list(MLPMixer(**s1['config']).state_dict())
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-3)
    assert max((b[k] - a[k]).abs().max().item() for k in a) < 1e-3


def test_resume_under_torchrun(runs):
    assert runs['first'] == {'epoch': 1, 'summary': False}  # the first launch stopped after epoch 0
    log2 = run_dirs(runs['two'])[1]
    text = open(os.path.join(log2, 'train.log')).read()
    assert 'resumed from' in text and 'torchrun: 2 processes (gloo)' in text
    assert text.count('epoch 0/3: loss') == 1  # logged once (rank 0 only), and not redone after resuming
    state = torch.load(os.path.join(run_dirs(runs['two'])[0], 'last.pth'), weights_only=True)
    assert len(state['rng']['ranks']) == 2 and state['epoch'] == 3


@pytest.mark.parametrize('total, world', [(5, 2), (4, 2), (1, 2), (7, 3), (2, 4), (9, 1)])
def test_rank_batch_covers_the_global_batch_once(total, world):
    shares = [distributed.rank_batch(total, r, world) for r in range(world)]
    real = [(s, w) for s, w in shares if w > 0]
    assert [i for s, _ in real for i in range(total)[s]] == list(range(total))  # contiguous, in order
    assert max(s.stop - s.start for s, _ in real) - min(s.stop - s.start for s, _ in real) <= 1
    # DDP averages the ranks' gradients: sum_r weight_r * mean_r / world = the global batch mean
    vals = torch.arange(total, dtype=torch.float64) ** 2
    assert sum(w * vals[s].mean().item() for s, w in shares if w > 0) / world == pytest.approx(vals.mean().item())
    assert all(s == slice(0, 1) for s, w in shares if w == 0)  # a rank without a pair runs pair 0 at weight 0
    got = distributed.take_share(slice(1, 3), [vals, vals], vals, None)
    assert torch.equal(got[0][1], vals[1:3]) and torch.equal(got[1], vals[1:3]) and got[2] is None


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    ctx = distributed.setup('cpu')
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.is_main) == (0, 1, 0, True)
    t = torch.tensor(3.0)
    assert ctx.mean(t) is t and t.item() == 3.0
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(utils.UserError, match='launch with torchrun'):
        distributed.setup('cpu')


def test_one_process_under_torchrun_joins_a_process_group(monkeypatch):
    # torchrun --nproc_per_node 1 is the one way to run the NCCL path on a single GPU: it must join a group
    for name, value in (('WORLD_SIZE', '1'), ('RANK', '0'), ('LOCAL_RANK', '0'), ('MASTER_ADDR', '127.0.0.1'),
                        ('MASTER_PORT', str(free_port()))):
        monkeypatch.setenv(name, value)
    ctx = distributed.setup('cpu')
    try:
        assert ctx.distributed and torch.distributed.get_backend() == 'gloo' and ctx.world == 1
        t = torch.tensor([3.0])
        assert ctx.mean(t).item() == 3.0
        assert isinstance(ctx.wrap(torch.nn.Linear(2, 2)), torch.nn.parallel.DistributedDataParallel)
        assert len(ctx.rng_states()['ranks']) == 1
    finally:
        ctx.close()
    assert not torch.distributed.is_initialized()


def test_amp_bf16_runs_on_cpu_close_to_float32(tmp_path):
    data = {'train': str(tmp_path / 'train'), 'val': str(tmp_path / 'val')}
    write_shards(tmp_path / 'train', 11, shard_size=11, seed=1)
    write_shards(tmp_path / 'val', 2, shard_size=2, seed=2)
    fp32 = dist_argv(data, tmp_path / 'fp32', '--num_epochs', '2', '--val_data_length', '2')
    bf16 = dist_argv(data, tmp_path / 'bf16', '--num_epochs', '2', '--val_data_length', '2', '--amp', 'bf16')
    train.main(fp32)
    train.main(bf16)
    l32, l16 = ([float(r['loss']) for r in read_rows(run_dirs(a)[1])] for a in (fp32, bf16))
    assert l16 != l32 and l16 == pytest.approx(l32, rel=0.05)
    summary = json.load(open(os.path.join(run_dirs(bf16)[0], 'summary.json')))
    ckpt = torch.load(summary['checkpoint'], weights_only=True)
    assert all(t.dtype == torch.float32 for t in ckpt.values())  # autocast keeps float32 weights


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch's own, on importing torch.compile's stack
def test_wrapped_translator_saves_the_plain_state_dict():
    """--compile and --amp wrap the translator for training only. (Compiling for real takes about a
    minute on a CPU, too slow for this suite; the wrapping is lazy and checked here.)"""
    model = MLPMixer(num_layers=1, C_dim=16, hidden_S_dim=16, hidden_C_dim=16)
    args = train.get_args(['--compile', '--amp', 'bf16'])
    wrapped = distributed.Context().wrap(model, args.amp, args.compile)
    assert wrapped is not model and distributed.unwrap(wrapped) is model
    assert any(k.startswith('_orig_mod.module.') for k in wrapped.state_dict())  # what must not be saved
    assert list(distributed.unwrap(wrapped).state_dict()) == list(MLPMixer(**model.config).state_dict())
    assert distributed.Context().wrap(model) is model  # the default: untouched
    assert 'compile' in train.RESUME_FREE_ARGS and 'amp' not in train.RESUME_FREE_ARGS


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch's own, on importing torch.compile's stack
def test_compiled_blocks_compute_the_same_translator(one_thread):
    torch.manual_seed(0)
    model = MLPMixer(num_layers=2, C_dim=16, hidden_S_dim=16, hidden_C_dim=16)
    x = (torch.randn(4, 6, 6, 3, 3), torch.randn(4, 6, 6, 3, 3))
    eager = model(x)
    keys = list(model.state_dict())
    assert train.get_args(['--compile']).compile == 'model'  # the bare flag keeps its meaning
    wrapped = distributed.Context().wrap(model, 'none', train.get_args(['--compile', 'blocks']).compile)
    assert wrapped is model and list(model.state_dict()) == keys  # compiled in place, saved as ever
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    compiled = model(x)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > graphs  # it did compile
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
