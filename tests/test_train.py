"""train.py and translate.py end to end on tiny pair sets, plus their schedules, augmentation and errors."""
import csv
import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import types

import pytest
import torch

import evaluate
import loader
import losses
import mnist
import net
import rules
import runs
import train
import translate
import utils
from conftest import ROOT, write_original, write_shards
from mixer import MLPMixer

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--num_layers', '1', '--c_dim', '16', '--hidden_s_dim', '16', '--hidden_c_dim', '16']


def train_argv(pair_sets, out, *extra):
    """Flags of a tiny run: 12 pairs in batches of 5 (3 steps per epoch), 3 val networks, 200 test images."""
    return ['--train_path', pair_sets['train'], '--val_path', pair_sets['val'], '--train_data_length', '12',
            '--val_data_length', '3', '--num_test_images', '200', '--batch_size', '5', '--num_epochs', '4',
            '--log_step', '2', '--device', 'cpu', '--ckpt_path', str(out / 'ckpts'), '--log_path', str(out / 'logs'),
            *TINY, *extra]


def run_dirs(argv):
    """(ckpt run dir, log run dir) of a run."""
    args = train.get_args(argv)
    name = runs.run_name(args, train.PARSER.get_default)
    return os.path.join(args.ckpt_path, name), os.path.join(args.log_path, name)


def read_metrics(log_dir):
    with open(os.path.join(log_dir, 'metrics.csv')) as f:
        return list(csv.DictReader(f))


def run_cli(code, *argv):
    """Run a repository module's main under utils.run_main in a fresh interpreter."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, code, *argv], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)


def expect_user_error(capsys, main, argv, message):
    """main(argv) under utils.run_main exits with status 2 and prints `message` on stderr."""
    with pytest.raises(SystemExit) as exc:
        utils.run_main(lambda: main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the log goes to stderr too
    assert err.startswith('error: ') and message in err, err


@pytest.fixture(scope='module')
def finished_run(pair_sets, tmp_path_factory):
    """One complete tiny run: 4 epochs, evaluated at epochs 2 and 3."""
    argv = train_argv(pair_sets, tmp_path_factory.mktemp('run'))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main(argv)
    torch.set_num_threads(n)
    return argv


def test_end_to_end_outputs(finished_run, pair_sets):
    ckpt_dir, log_dir = run_dirs(finished_run)
    assert ckpt_dir.endswith(os.path.join('adam_lr0.001_bs5_wd0_clip-1_cos_wu0_cyc1_ep4', 'L1_S72_C16_hs16_hc16_do0',
                                          'mask-t0_noise-t0_n12_seed0_val3_test200'))
    log_text = open(os.path.join(log_dir, 'train.log')).read()
    for row in ('Random Init', 'Mean target', 'Weight selection', 'Retrained', 'counts per 5% bin', 'flags:',
                'Begin outputs on the test images cached in'):
        assert row in log_text
    assert json.load(open(os.path.join(log_dir, 'args.json')))['num_epochs'] == 4
    metrics = read_metrics(log_dir)
    assert [m['epoch'] for m in metrics] == ['0', '1', '2', '3']
    assert [m['mean'] != '' for m in metrics] == [False, False, True, True]  # epoch % log_step == 0, and the last
    assert float(metrics[3]['loss']) < float(metrics[0]['loss'])
    summary = json.load(open(os.path.join(ckpt_dir, 'summary.json')))
    assert set(summary['rows']) == {'Large (BasicBlock)', 'Random Init', 'Identity (block skipped)', 'Mean target',
                                    'Weight selection',
                                    'Weight selection (folded)', 'Weight selection (folded, refit)',
                                    'Retrained', 'KT (best)', 'KT (last)'}
    for row in summary['rows'].values():
        assert len(row['histogram']) == 20 and sum(row['histogram']) == 3 and len(row['accs']) == 3
        assert row['min'] <= row['mean'] <= row['max']
    best = summary['rows']['KT (best)']
    assert best['mean'] == max(float(m['mean']) for m in metrics if m['mean'])
    # the original's name and form: str(round(mean, 2)) + '.pth', a plain state dict; our metadata beside it
    assert os.path.basename(summary['checkpoint']) == str(round(best['mean'], 2)) + '.pth'
    meta = runs.read_meta(summary['checkpoint'])
    assert meta['config'] == summary['config'] and meta['epoch'] == summary['best_epoch']
    assert summary['checkpoint'].endswith('.pth') and os.path.exists(summary['checkpoint'][:-4] + '.json')
    # the saved translator reproduces the logged accuracies of every val network
    model = MLPMixer(**meta['config'])
    model.load_state_dict(torch.load(summary['checkpoint'], weights_only=True))  # as the original loads it
    val = loader.ValDataset(pair_sets['val'], 3)
    images, labels = mnist.load_mnist('data', train=False)
    middle = evaluate.translate(model, val.basic['conv1.weight'], val.basic['conv2.weight'])
    accs = net.stacked_accuracy(images[:200], labels[:200], val.begin, middle, val.last, 'simple')
    assert [round(a, 4) for a in accs.tolist()] == best['accs']
    # reference rows are what they claim to be, each built here from its definition
    train_simple = loader.TrainDataset(pair_sets['train'], 12).simple
    c1, c2 = val.basic['conv1.weight'], val.basic['conv2.weight']
    with torch.random.fork_rng(devices=[]):  # Random Init: a default SimpleBlock_NoBn per network, seeded
        random_init = []
        for i in range(3):
            torch.manual_seed(utils.seed_for(0, 'random_init', i))
            random_init.append(net.SimpleBlock_NoBn().state_dict())
    rows = {'Large (BasicBlock)': (val.basic, 'basic'), 'Retrained': (val.simple, 'simple'),
            'Mean target': ({k: t.mean(0, keepdim=True).expand(3, *t.shape[1:]) for k, t in train_simple.items()},
                            'simple'),
            'Weight selection': ({'conv1.weight': c1[:, :3], 'conv2.weight': c2[:, :, :3]}, 'simple'),
            'Weight selection (folded)': (rules.folded_selection(val.basic), 'simple'),
            'Weight selection (folded, refit)': (rules.refit_selection(val.basic), 'simple'),
            'Random Init': ({k: torch.stack([sd[k] for sd in random_init]) for k in random_init[0]}, 'simple'),
            # the block skipped: a zero SimpleBlock_NoBn is the identity on Begin's (non-negative) outputs
            'Identity (block skipped)': ({'conv1.weight': torch.zeros_like(c1[:, :3]),
                                          'conv2.weight': torch.zeros_like(c2[:, :, :3])}, 'simple')}
    for name, (middle, kind) in rows.items():
        accs = net.stacked_accuracy(images[:200], labels[:200], val.begin, middle, val.last, kind)
        assert [round(a, 4) for a in accs.tolist()] == summary['rows'][name]['accs'], name


def test_tensorboard_scalars_are_the_logged_ones(pair_sets, tmp_path):
    """Where tensorboard is installed (never a dependency), a run's events hold the original's scalars, each epoch
    once, also after a rerun of the same flags in the same folder and a resumed run."""
    accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    argv = train_argv(pair_sets, tmp_path)
    # TensorBoard reads a folder's event files in name order: whole seconds first, so each run in a second of its own
    for extra in ([], ['--stop_after_epoch', '1'], ['--resume']):  # a run, a rerun stopped after epoch 1, its resume
        time.sleep(1.01 - time.time() % 1)
        train.main(argv + extra)
    log_dir = run_dirs(argv)[1]
    events = accumulator.EventAccumulator(log_dir)
    events.Reload()
    scalars = {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
               for tag in ('Loss', 'Lr', 'Mean_Accuracy')}
    metrics = read_metrics(log_dir)
    assert scalars['Loss'][0] == [0, 1, 2, 3]
    assert scalars['Loss'][1] == pytest.approx([float(m['loss']) for m in metrics])
    assert scalars['Mean_Accuracy'][0] == [2, 3]  # epoch % log_step == 0, and the last
    assert scalars['Mean_Accuracy'][1] == pytest.approx([float(m['mean']) for m in metrics[2:]])
    # Lr after the epoch's scheduler step: the next epoch's lr, and 0 at the cosine's end
    assert scalars['Lr'][0] == [0, 1, 2, 3]
    assert scalars['Lr'][1] == pytest.approx([float(m['lr']) for m in metrics[1:]] + [0], abs=1e-9)


def read_scalars(log_dir, event_pb2):
    """{tag: [(step, value)]} of a folder's event files as TensorBoard shows them: files in name order, each a
    series of records (8-byte length, 4-byte CRC, an Event, 4-byte CRC); a SessionLog START at step s (purge_step)
    drops the steps from s on that earlier events hold."""
    scalars = {}
    for path in sorted(glob.glob(os.path.join(log_dir, 'events.out.tfevents.*'))):
        data, at = open(path, 'rb').read(), 0
        while at < len(data):
            size = struct.unpack('<Q', data[at:at + 8])[0]
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])
            at += 12 + size + 4
            if event.HasField('session_log') and event.session_log.status == event.session_log.START:
                scalars = {tag: [(s, v) for s, v in kept if s < event.step] for tag, kept in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.mark.parametrize('writer, proto', [('torch.utils.tensorboard', 'tensorboard.compat.proto.event_pb2'),
                                           ('tensorboardX', 'tensorboardX.proto.event_pb2')])
def test_tensorboard_events_through_each_installed_writer(writer, proto, pair_sets, tmp_path, monkeypatch):
    """torch.utils.tensorboard (it needs tensorboard) is used when it imports, else tensorboardX, the original's
    writer: either writes the original's tags, each epoch once after a rerun and a resume (purge_step)."""
    pytest.importorskip(writer)
    event_pb2 = pytest.importorskip(proto)
    if writer == 'tensorboardX':
        monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as where tensorboard is not installed
    probe = runs.tensorboard_writer(str(tmp_path / 'probe'), 0)
    assert type(probe).__module__.startswith(writer)
    probe.close()
    argv = train_argv(pair_sets, tmp_path)
    for extra in ([], ['--stop_after_epoch', '1'], ['--resume']):  # a run, a rerun stopped after epoch 1, its resume
        time.sleep(1.01 - time.time() % 1)  # event files are named by the second they start in
        train.main(argv + extra)
    log_dir = run_dirs(argv)[1]
    scalars, metrics = read_scalars(log_dir, event_pb2), read_metrics(log_dir)
    assert sorted(scalars) == ['Loss', 'Lr', 'Mean_Accuracy']
    assert [s for s, _ in scalars['Loss']] == [s for s, _ in scalars['Lr']] == [0, 1, 2, 3]
    assert [v for _, v in scalars['Loss']] == pytest.approx([float(m['loss']) for m in metrics])
    assert [s for s, _ in scalars['Mean_Accuracy']] == [2, 3]  # epoch % log_step == 0, and the last
    assert [v for _, v in scalars['Mean_Accuracy']] == pytest.approx([float(m['mean']) for m in metrics[2:]])
    assert [v for _, v in scalars['Lr']] == pytest.approx([float(m['lr']) for m in metrics[1:]] + [0], abs=1e-9)


def test_trains_on_the_original_layout(tmp_path):
    write_original(tmp_path / 'train', 6, 'train', seed=7)
    write_original(tmp_path / 'val', 2, 'val', seed=8)
    argv = train_argv({'train': str(tmp_path / 'train'), 'val': str(tmp_path / 'val')}, tmp_path,
                      '--train_data_length', '6', '--val_data_length', '2', '--num_epochs', '2')
    train.main(argv)
    summary = json.load(open(os.path.join(run_dirs(argv)[0], 'summary.json')))
    assert 'Retrained' not in summary['rows'] and len(summary['rows']['KT (best)']['accs']) == 2


def test_resume_equals_uninterrupted(pair_sets, tmp_path, capsys):
    # dropout, masking and noise all draw random numbers: resuming must restore every generator
    extra = ['--dropout', '0.1', '--prob', '0.2', '--mask_target', 'both', '--noise', '0.01', '--log_step', '1']
    straight = train_argv(pair_sets, tmp_path / 'a', *extra)
    train.main(straight)
    broken = train_argv(pair_sets, tmp_path / 'b', *extra)
    train.main(broken + ['--stop_after_epoch', '1'])
    ckpt_b, log_b = run_dirs(broken)
    assert torch.load(os.path.join(ckpt_b, 'last.pth'), weights_only=True)['epoch'] == 2
    assert not os.path.exists(os.path.join(ckpt_b, 'summary.json'))
    train.main(broken + ['--resume'])
    ckpt_a, log_a = run_dirs(straight)
    assert open(os.path.join(log_a, 'metrics.csv')).read() == open(os.path.join(log_b, 'metrics.csv')).read()
    assert 'resumed from' in open(os.path.join(log_b, 'train.log')).read()
    best_a, best_b = (glob.glob(os.path.join(d, '[0-9]*.pth')) for d in (ckpt_a, ckpt_b))
    assert [os.path.basename(p) for p in best_a] == [os.path.basename(p) for p in best_b]
    last_a, last_b = (torch.load(os.path.join(d, 'last.pth'), weights_only=True)['model'] for d in (ckpt_a, ckpt_b))
    for a, b in ((torch.load(best_a[0], weights_only=True), torch.load(best_b[0], weights_only=True)), (last_a, last_b)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.load(open(os.path.join(d, 'summary.json'))) for d in (ckpt_a, ckpt_b))
    assert sa['rows'] == sb['rows']
    # resuming with flags that change the results is refused
    capsys.readouterr()
    expect_user_error(capsys, train.main, broken + ['--resume', '--log_step', '3'], 'other flags')


def test_resume_refuses_other_data_and_another_device_kind(pair_sets, tmp_path, capsys):
    argv = train_argv(pair_sets, tmp_path, '--num_epochs', '2')
    train.main(argv + ['--stop_after_epoch', '0'])
    capsys.readouterr()
    # the same flags on other validation networks (a system flag may change, the data may not)
    write_shards(tmp_path / 'other_val', 3, shard_size=3, seed=3)
    other = train_argv({**pair_sets, 'val': str(tmp_path / 'other_val')}, tmp_path, '--num_epochs', '2')
    expect_user_error(capsys, train.main, other + ['--resume'], 'the run was started on other val networks')
    # the same data moved to another folder resumes
    shutil.copytree(pair_sets['train'], tmp_path / 'moved_train')
    moved = train_argv({**pair_sets, 'train': str(tmp_path / 'moved_train')}, tmp_path, '--num_epochs', '2')
    last = os.path.join(run_dirs(argv)[0], 'last.pth')
    state = torch.load(last, weights_only=True)
    state['rng']['gen_device'] = 'cuda'  # as if written on a GPU: its batch generator's state is CUDA's
    torch.save(state, last)
    expect_user_error(capsys, train.main, moved + ['--resume'], 'resume with --device cuda')
    state['rng']['gen_device'] = 'cpu'
    torch.save(state, last)
    train.main(moved + ['--resume'])
    assert 'resumed from' in open(os.path.join(run_dirs(argv)[1], 'train.log')).read()
    assert os.path.exists(os.path.join(run_dirs(argv)[0], 'summary.json'))


def lrs_of(pair_sets, out, *extra):
    """The per-epoch lr column of a tiny run (evaluated only at the last epoch)."""
    argv = train_argv(pair_sets, out, '--log_step', '100', *extra)
    train.main(argv)
    return [float(m['lr']) for m in read_metrics(run_dirs(argv)[1])]


@pytest.mark.parametrize('scheduler, warmup, want', [
    ('cos', 0, [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]),
    ('linear', 0, [1e-3 * (1 - e / 4) for e in range(4)]),
    ('constant', 0, [1e-3] * 4),
    # warm-up of 2 epochs x 3 steps: step j runs at lr x j / 6; the lr logged is that of each epoch's last
    # step (2/6, 5/6), then epoch 2 runs at lr and cos over 2 epochs takes over
    ('cos', 2, [1e-3 / 3, 1e-3 * 5 / 6, 1e-3, 0.5e-3]),
])
def test_lr_schedules(pair_sets, tmp_path, scheduler, warmup, want):
    got = lrs_of(pair_sets, tmp_path, '--scheduler', scheduler, '--warmup', str(warmup))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_cos_cycles_and_warmup_steps():
    args = train.get_args(['--num_epochs', '5', '--warmup', '1', '--num_cycles', '2', '--lr', '0.1'])
    assert [train.warmup_lr(args, j, 4) for j in range(6)] == pytest.approx([0, 0.025, 0.05, 0.075, 0.1, 0.1])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = train.make_scheduler(opt, args)  # T_max = (5 - 1) // 2 = 2: down to 0 in 2 epochs, then back up
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]['lr'])
        opt.step()
        train.step_scheduler(sched, 1.0)
    assert lrs == pytest.approx([0.1, 0.05, 0.0, 0.05], abs=1e-12)


def test_reduce_on_plateau():
    args = train.get_args(['--scheduler', 'reduce_0.5', '--lr', '0.1'])
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = train.make_scheduler(opt, args)
    lrs = []
    for loss in [5, 4, 4, 4, 4, 4, 4, 4, 3]:  # patience 2: the third epoch without improvement halves the lr
        opt.step()
        train.step_scheduler(sched, loss)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])


@pytest.mark.parametrize('target, hit_t, hit_s', [('t', True, False), ('s', False, True), ('both', True, True)])
def test_mask_and_noise_targets(target, hit_t, hit_s):
    gen = torch.Generator().manual_seed(0)
    t, s = [torch.ones(400, 6, 6, 3, 3)] * 2, [torch.ones(400, 3, 6, 3, 3)] * 2
    args = train.get_args(['--mask_target', target, '--prob', '0.3'])
    ti, si = losses.augment(t, s, args, gen)
    for got, hit in ((ti, hit_t), (si, hit_s)):
        zeros = (got[0] == 0).double().mean().item()
        assert (abs(zeros - 0.3) < 0.01) if hit else zeros == 0
        assert set(got[1].unique().tolist()) <= {0.0, 1.0}
    args = train.get_args(['--noise_target', target, '--noise', '0.5'])
    ti, si = losses.augment(t, s, args, gen)
    for got, hit in ((ti, hit_t), (si, hit_s)):
        std = (got[1] - 1).std().item()
        assert (abs(std - 0.5) < 0.01) if hit else std == 0


def test_optimizers_and_gradient_clipping():
    """The original's --optimizer sgd (momentum 0.9), --wd and --grad_clip, against torch itself."""
    model = torch.nn.Linear(4, 3)
    sgd = train.make_optimizer(model, train.get_args(['--optimizer', 'sgd', '--lr', '0.5', '--wd', '0.01']))
    assert isinstance(sgd, torch.optim.SGD) and (sgd.defaults['lr'], sgd.defaults['momentum'],
                                                 sgd.defaults['weight_decay']) == (0.5, 0.9, 0.01)
    adam = train.make_optimizer(model, train.get_args(['--wd', '0.02']))
    assert isinstance(adam, torch.optim.Adam) and (adam.defaults['lr'], adam.defaults['weight_decay']) == (1e-3, 0.02)

    class Objective:
        def loss(self, out, batch, gen):
            return (100 * out).sum()

    batch = types.SimpleNamespace(inputs=torch.randn(5, 4, generator=torch.Generator().manual_seed(0)))
    for clip in (0.25, -1.):  # plain SGD at lr 1: the first step moves the parameters by the (clipped) gradient
        before = [p.detach().clone() for p in model.parameters()]
        train.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), Objective(), batch, None, grad_clip=clip)
        moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]).norm().item()
        assert moved == pytest.approx(0.25, rel=1e-5) if clip > 0 else moved > 100


def test_augmentation_is_fresh_per_batch_and_free_when_off():
    gen = torch.Generator().manual_seed(0)
    x = [torch.ones(10, 6, 6, 3, 3)]
    a, b = losses.perturb(x, 0.5, 0.1, gen), losses.perturb(x, 0.5, 0.1, gen)
    assert not torch.equal(a[0], b[0])
    state = gen.get_state()
    assert losses.perturb(x, 0., 0., gen)[0] is x[0] and torch.equal(gen.get_state(), state)


def test_loss_is_mean_of_the_two_mses():
    out, tgt = [torch.zeros(2, 3, 6, 3, 3), torch.zeros(2, 6, 3, 3, 3)], [torch.ones(2, 3, 6, 3, 3),
                                                                          2 * torch.ones(2, 6, 3, 3, 3)]
    assert losses.mse_loss(out, tgt).item() == pytest.approx((1 + 4) / 2)


def test_original_readme_command_parses():
    args = train.get_args('--gpu_id 0 --num_epochs 1000 --batch_size 4096 --lr 1e-3 --optimizer adam '
                          '--log_step 10 --train_data_length 300000 --num_layers 24 --scheduler cos '
                          '--mask_target t --prob 0.'.split())
    train.check_args(args)
    assert train.translator_config(args) == dict(num_layers=24, S_dim=72, C_dim=128, hidden_S_dim=256,
                                                 hidden_C_dim=512, dropout=0.)
    d = train.get_args([])
    assert (d.num_epochs, d.log_step, d.batch_size, d.lr, d.scheduler, d.ckpt_path, d.train_path, d.val_path,
            d.val_data_length, d.seed) == (300, 25, 4096, 1e-3, 'cos', './ckpts/nobn', './data/train', './data/val',
                                           100, 0)


def test_translate_round_trip(finished_run, pair_sets, tmp_path, capsys):
    summary = json.load(open(os.path.join(run_dirs(finished_run)[0], 'summary.json')))
    val = loader.ValDataset(pair_sets['val'], 3)
    k = 1
    for name in ('begin', 'basic', 'last'):
        torch.save(net.unstack_state(getattr(val, name), k), tmp_path / f'{name}.pth')
    out = tmp_path / 'simple.pth'
    translate.main(['--ckpt', summary['checkpoint'], '--complex', str(tmp_path / 'basic.pth'), '--out', str(out),
                    '--begin', str(tmp_path / 'begin.pth'), '--last', str(tmp_path / 'last.pth'),
                    '--num_test_images', '200', '--device', 'cpu'])
    simple = torch.load(out, weights_only=True)
    net.SimpleBlock_NoBn().load_state_dict(simple, strict=True)
    model = MLPMixer(**runs.read_meta(summary['checkpoint'])['config']).eval()
    model.load_state_dict(torch.load(summary['checkpoint'], weights_only=True))
    with torch.no_grad():
        c1, c2 = model([val.basic['conv1.weight'][k:k + 1], val.basic['conv2.weight'][k:k + 1]])
    assert torch.equal(simple['conv1.weight'], c1[0]) and torch.equal(simple['conv2.weight'], c2[0])
    printed = capsys.readouterr().out
    want = summary['rows']['KT (best)']['accs'][k]
    assert f'compressed (translated SimpleBlock_NoBn) {want:.2f}%' in printed
    assert f'large (BasicBlock) {summary["rows"]["Large (BasicBlock)"]["accs"][k]:.2f}%' in printed


def test_translate_takes_a_network_from_a_dataset(finished_run, pair_sets, tmp_path, capsys):
    summary = json.load(open(os.path.join(run_dirs(finished_run)[0], 'summary.json')))
    common = ['--ckpt', summary['checkpoint'], '--num_test_images', '200', '--device', 'cpu']
    k = 2
    translate.main(common + ['--data_root', pair_sets['val'], '--index', str(k), '--out', str(tmp_path / 'k.pth')])
    printed = capsys.readouterr().out
    rows = summary['rows']
    assert (f'large (BasicBlock) {rows["Large (BasicBlock)"]["accs"][k]:.2f}%, compressed (translated '
            f'SimpleBlock_NoBn) {rows["KT (best)"]["accs"][k]:.2f}%, the dataset\'s own SimpleBlock_NoBn '
            f'{rows["Retrained"]["accs"][k]:.2f}%') in printed
    # the original layouts: train (the pair's small block is scored too) and val (it has none)
    pairs = {split: write_original(tmp_path / split, 3, split, seed=5) for split in ('train', 'val')}
    model = MLPMixer(**runs.read_meta(summary['checkpoint'])['config']).eval()
    model.load_state_dict(torch.load(summary['checkpoint'], weights_only=True))
    for split, own in (('train', True), ('val', False)):
        out = tmp_path / f'{split}.pth'
        translate.main(common + ['--data_root', str(tmp_path / split), '--index', '1', '--out', str(out)])
        want = evaluate.translate(model, pairs[split]['basic']['conv1.weight'][1:2],
                                  pairs[split]['basic']['conv2.weight'][1:2])
        assert torch.equal(torch.load(out, weights_only=True)['conv2.weight'], want['conv2.weight'][0])
        assert ('dataset\'s own' in capsys.readouterr().out) == own
    shutil.rmtree(tmp_path / 'train' / 'backup_begin')  # optional in a training set, needed to score one
    expect_user_error(capsys, translate.main, common + ['--data_root', str(tmp_path / 'train'), '--index', '1',
                                                        '--out', str(tmp_path / 'x.pth')], 'holds no Begin blocks')
    for flags, message in ((['--data_root', pair_sets['val']], '--data_root takes --index I'),
                           (['--data_root', pair_sets['val'], '--index', '3'], 'missing indices: 3'),
                           (['--index', '0'], 'either as --complex FILE or as --data_root DIR --index I'),
                           (['--data_root', pair_sets['val'], '--index', '0', '--device', 'foo'], '--device foo')):
        expect_user_error(capsys, translate.main, common + flags + ['--out', str(tmp_path / 'x.pth')], message)
    assert not os.path.exists(tmp_path / 'x.pth')


def test_translate_reads_original_state_dicts(tmp_path, capsys):
    case = torch.load('tests/fixtures/original_mixer.pt', weights_only=True)['L2_C16']
    torch.save(case['state_dict'], tmp_path / 'orig.pth')
    basic = net.BasicBlock().state_dict()
    basic['conv1.weight'], basic['conv2.weight'] = case['inputs'][0][2], case['inputs'][1][2]
    torch.save(basic, tmp_path / 'basic.pth')
    sizes = ['--num_layers', '2', '--c_dim', '16', '--hidden_s_dim', '32', '--hidden_c_dim', '64']
    translate.main(['--ckpt', str(tmp_path / 'orig.pth'), '--complex', str(tmp_path / 'basic.pth'),
                    '--out', str(tmp_path / 'out.pth'), *sizes])
    simple = torch.load(tmp_path / 'out.pth', weights_only=True)
    torch.testing.assert_close(simple['conv1.weight'], case['outputs'][0][2], atol=1e-6, rtol=0)
    torch.testing.assert_close(simple['conv2.weight'], case['outputs'][1][2], atol=1e-6, rtol=0)
    # without the size flags the defaults (24 layers, C 128) do not fit: the error says what would
    expect_user_error(capsys, translate.main, ['--ckpt', str(tmp_path / 'orig.pth'), '--complex',
                                               str(tmp_path / 'basic.pth'), '--out', str(tmp_path / 'x.pth')],
                      'its shapes say --num_layers 2 --s_dim 72 --c_dim 16 --hidden_s_dim 32 --hidden_c_dim 64')


@pytest.mark.parametrize('flags, message', [
    (['--prob', '1.5'], '--prob 1.5 must be in [0, 1]'),
    (['--noise', '-1'], '--noise -1.0 must be >= 0'),
    (['--lr', '0'], '--lr 0.0 must be > 0'),
    (['--scheduler', 'step'], '--scheduler step: unknown'),
    (['--scheduler', 'reduce_'], 'reduce_<factor> needs a factor in (0, 1)'),
    (['--scheduler', 'reduce_2'], 'reduce_<factor> needs a factor in (0, 1)'),
    (['--batch_size', '0'], '--batch_size 0 must be > 0'),
    (['--log_step', '0'], '--log_step 0 must be > 0'),
    (['--num_epochs', '0'], '--num_epochs 0 must be > 0'),
    (['--s_dim', '64'], '--s_dim 64 must be 72'),
    (['--train_data_length', '13'], 'asked for 13 pairs (0..12) but 12 exist'),
    (['--val_data_length', '4'], 'asked for 4 pairs (0..3) but 3 exist'),
])
def test_bad_train_flags(pair_sets, tmp_path, capsys, flags, message):
    expect_user_error(capsys, train.main, train_argv(pair_sets, tmp_path, *flags), message)


def test_a_rerun_of_the_same_flags_replaces_the_earlier_best_translator(finished_run, pair_sets, tmp_path):
    argv = list(finished_run)
    ckpt_dir, log_dir = run_dirs(argv)
    stale = os.path.join(ckpt_dir, '99.99.pth')
    shutil.copy(os.path.join(ckpt_dir, 'last.pth'), stale)
    keep = os.path.join(ckpt_dir, '99.99.pth.bak')  # not a best checkpoint's name: left alone
    shutil.copy(stale, keep)
    train.main(argv)
    summary = json.load(open(os.path.join(ckpt_dir, 'summary.json')))
    assert not os.path.exists(stale) and os.path.exists(keep) and os.path.exists(summary['checkpoint'])
    assert 'removed 99.99.pth, the best translator of an earlier run' in open(os.path.join(log_dir, 'train.log')).read()
    # the flagfile repeats the run from its start: it never holds --resume or --stop_after_epoch
    train.main(argv + ['--resume', '--stop_after_epoch', '9'])
    flags = open(os.path.join(log_dir, 'flagfile.txt')).read().splitlines()
    assert '--num_epochs=4' in flags and not any(f.startswith(('--resume', '--stop_after_epoch')) for f in flags)


def test_train_and_val_sets_are_not_swapped(pair_sets, tmp_path, capsys, monkeypatch):
    import conftest
    monkeypatch.setattr(conftest, 'TEST_RECIPE', dict(conftest.TEST_RECIPE, kind='val'))
    write_shards(tmp_path / 'val_kind', 12, seed=1)
    monkeypatch.setattr(conftest, 'TEST_RECIPE', dict(conftest.TEST_RECIPE, kind='train'))
    write_shards(tmp_path / 'train_kind', 3, seed=2)
    expect_user_error(capsys, train.main, train_argv(pair_sets, tmp_path, '--train_path', str(tmp_path / 'val_kind')),
                      'holds val networks (construct_val.py); it takes train networks from construct_train.py')
    expect_user_error(capsys, train.main, train_argv(pair_sets, tmp_path, '--val_path', str(tmp_path / 'train_kind')),
                      'holds train networks (construct_train.py); it takes val networks from construct_val.py')


def test_bad_train_data(pair_sets, tmp_path, capsys):
    write_shards(tmp_path / 'nosimple', 12, simple=False)
    expect_user_error(capsys, train.main, train_argv(pair_sets, tmp_path, '--train_path', str(tmp_path / 'nosimple')),
                      'holds no small blocks (SimpleBlock_NoBn), needed for the MSE targets')
    os.makedirs(tmp_path / 'empty')
    expect_user_error(capsys, train.main, train_argv(pair_sets, tmp_path, '--val_path', str(tmp_path / 'empty')),
                      'no pairs there')


def test_cli_exit_status(finished_run, pair_sets, tmp_path):
    """The real command lines: a bad flag and a checkpoint of another configuration exit 2 with a message."""
    r = run_cli('train.py', *train_argv(pair_sets, tmp_path, '--prob', '-0.1'))
    assert r.returncode == 2 and 'error: --prob -0.1 must be in [0, 1]' in r.stderr and 'Traceback' not in r.stderr
    summary = json.load(open(os.path.join(run_dirs(finished_run)[0], 'summary.json')))
    torch.save(net.BasicBlock().state_dict(), tmp_path / 'basic.pth')
    r = run_cli('translate.py', '--ckpt', summary['checkpoint'], '--complex', str(tmp_path / 'basic.pth'),
                '--out', str(tmp_path / 'o.pth'), '--num_layers', '3')
    assert r.returncode == 2 and 'is a translator with --num_layers 1' in r.stderr and 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'o.pth')
