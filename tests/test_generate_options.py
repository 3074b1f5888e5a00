"""Generation on shared machines and in the original layout: --gpu_id under a scheduler, the memory share of
--processes_per_gpu, and --layout original (round trip against the shards, resume, refusals)."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import construct_train
import generate_sh
import generation
import loader
import net
import original_layout
import shards
import sizing
import utils
from conftest import TINY, tiny_args, write_original

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30



@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Generation tests run single-threaded, like the subprocesses they compare with."""


# ----------------------------------------------------------------------------------------
# 5. --gpu_id: the original's pinning when nothing is set, an index into a scheduler's GPUs otherwise.

def test_gpu_choice_as_a_function_of_the_environment():
    # nothing set: as the original, pin the process to GPU k, which it then sees as cuda:0
    assert utils.gpu_pin(3, {}) == '3'
    assert utils.choose_gpu(3, {}, 1) == 'cuda:0'
    assert utils.choose_gpu(3, {}, 0) == 'cpu'  # no CUDA (or no GPU 3): CPU, as the original
    # a scheduler set it: --gpu_id k is the k-th GPU it makes visible, the variable stays
    slurm = {'CUDA_VISIBLE_DEVICES': '2,5,7'}
    assert utils.gpu_pin(1, slurm) is None
    assert [utils.choose_gpu(k, slurm, 3) for k in range(3)] == ['cuda:0', 'cuda:1', 'cuda:2']
    for k in (3, -1):
        with pytest.raises(utils.UserError, match=rf'--gpu_id {k}: CUDA_VISIBLE_DEVICES=2,5,7 makes 3 GPU\(s\) '
                                                  r'visible, .*k-th of them \(0..2\)'):
            utils.choose_gpu(k, slurm, 3)
    assert utils.choose_gpu(0, {'CUDA_VISIBLE_DEVICES': ''}, 0) == 'cpu'  # every GPU hidden on purpose


def test_get_device_sets_or_keeps_the_variable(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(utils, '_own_pin', None)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert utils.get_device(3) == torch.device('cuda:0') and os.environ['CUDA_VISIBLE_DEVICES'] == '3'
    # its own pin is not mistaken for a scheduler's on a second call (else --gpu_id 3 would be out of range)
    assert utils.get_device(3) == torch.device('cuda:0')
    monkeypatch.setattr(utils, '_own_pin', None)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,6')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert utils.get_device(1) == torch.device('cuda:1') and os.environ['CUDA_VISIBLE_DEVICES'] == '4,6'
    with pytest.raises(utils.UserError, match='--gpu_id 2: CUDA_VISIBLE_DEVICES=4,6'):
        utils.get_device(2)
    assert utils.get_device(5, 'cpu') == torch.device('cpu')  # --device wins
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert utils.get_device(1) == torch.device('cpu')


# ----------------------------------------------------------------------------------------
# 6. Several processes per GPU: each sizes its steps from its share of the memory.

def test_memory_share_with_fake_figures():
    share = sizing.memory_share
    # the original's set-up: 5 processes on an 11 GiB card, 10.5 GiB free
    assert share(11 * GiB, int(10.5 * GiB), 5) == int(1.1 * GiB)
    assert sizing.models_per_step_for(share(11 * GiB, int(10.5 * GiB), 5)) == 1
    # one process on an H200: the measured best, 128
    assert sizing.models_per_step_for(share(int(139.8 * GiB), int(139.3 * GiB), 1)) == 128
    assert sizing.models_per_step_for(share(int(139.8 * GiB), int(139.3 * GiB), 4)) == 57
    # too little memory: share 0, still one network per step
    assert share(8 * GiB, GiB // 2, 4) == 0 and sizing.models_per_step_for(0) == 1
    for total, free, n in [(11, 10.5, 5), (80, 40, 4), (140, 139, 8), (24, 3, 2), (16, 16, 1)]:
        total, free = int(total * GiB), int(free * GiB)
        claim = share(total, free, n) + sizing.PROCESS_BYTES  # a process's networks and its own overhead
        assert share(total, free, n) <= total / n
        # n processes starting together all see `free`: together they claim no more than it
        assert n * claim <= free or share(total, free, n) == 0
        # starting one after another, each sees what the earlier ones took gone
        left = free
        for _ in range(n):
            left -= share(total, left, n) + sizing.PROCESS_BYTES
        assert left >= 0 or share(total, free, n) == 0


def test_models_per_step_and_begin_cache_follow_the_share(monkeypatch):
    gpu = torch.device('cuda:0')
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (int(10.5 * GiB), 11 * GiB))
    assert sizing.gpu_share(gpu, 5) == int(1.1 * GiB)
    assert sizing.gpu_share(torch.device('cpu'), 5) is None
    assert sizing.default_models_per_step(gpu, sizing.gpu_share(gpu, 1)) == 16
    assert sizing.default_models_per_step(torch.device('cpu'), None) == 1
    full = construct_train.get_args('train', ['--num_train_images', '60000'])
    assert sizing.begin_cache_bytes(1, 60000) == 564_480_000  # 538 MiB a network
    assert sizing.use_begin_cache(full, 1, int(1.1 * GiB))  # 538 MiB <= half of 1.1 GiB
    assert not sizing.use_begin_cache(full, 2, int(1.1 * GiB))
    assert sizing.use_begin_cache(full, 1, None) is None  # off the GPU make_pairs weighs the free RAM
    one_epoch = construct_train.get_args('train', ['--num_epochs', '1'])
    assert not sizing.use_begin_cache(one_epoch, 1, 100 * GiB)  # one pass: nothing to reuse
    forced = {flag: construct_train.get_args('train', ['--begin_cache', flag]) for flag in ('on', 'off')}
    assert sizing.use_begin_cache(forced['on'], 2, int(1.1 * GiB)) is True  # the flag wins over the share
    assert sizing.use_begin_cache(forced['on'], 1, None) is True
    assert sizing.use_begin_cache(forced['off'], 1, 100 * GiB) is False


def test_run_sh_passes_the_share_and_it_parses():
    args = generate_sh.get_args(['--num_gpus', '2', '--num_processes_each_gpu', '5', '--val'])
    procs = [line for line in generate_sh.run_sh(args).splitlines() if line.startswith('python')]
    assert len(procs) == 10 and all(p.endswith(' --processes_per_gpu 5 &') for p in procs)
    parsed = construct_train.get_args('val', shlex.split(procs[7])[2:-1])
    assert parsed.processes_per_gpu == 5 and parsed.gpu_id == '1'  # the original's string form
    with pytest.raises(utils.UserError, match='--processes_per_gpu must be > 0'):
        construct_train.get_args('train', ['--processes_per_gpu', '0'])


# ----------------------------------------------------------------------------------------
# 7. --layout original: the per-file layout of the original code, resumable and atomic.

def _assert_same_sets(a, b, blocks):
    for block in blocks:
        got, want = getattr(a, block), getattr(b, block)
        assert set(got) == set(want), block
        for key, t in want.items():
            assert torch.equal(got[key], t), (block, key)


def test_original_layout_round_trip_equals_shards(tmp_path):
    orig, sharded = tmp_path / 'orig', tmp_path / 'shards'
    generation.generate(tiny_args(orig, '--num_data', '3', '--models_per_step', '3', '--layout', 'original'))
    generation.generate(tiny_args(sharded, '--num_data', '3', '--models_per_step', '3'))
    assert sorted(os.listdir(orig / 'inputs')) == ['0.pth', '1.pth', '2.pth'] and not shards.list_shards(orig)
    assert shards.read_recipe(orig) == shards.read_recipe(sharded)
    a = loader.TrainDataset(str(orig), 3, with_networks=True)
    b = loader.TrainDataset(str(sharded), 3, with_networks=True)
    assert a.layout == 'original' and b.layout == 'shards'
    _assert_same_sets(a, b, ('basic', 'simple', 'begin', 'last'))
    # the layout has no place for the test accuracies: the log has them, a line per network
    log = open(orig / 'logs' / 'train_0.log').read()
    for i in range(3):
        assert (f'network {i}: test accuracy large {b.acc_large[i]:.2f}%, small at init {b.acc_small_init[i]:.2f}%, '
                f'small trained {b.acc_small[i]:.2f}%') in log
    # plain state dicts, each file holding only its own network (not a view of the stacked storage)
    for folder, block in (('inputs', net.BasicBlock), ('labels', net.SimpleBlock_NoBn),
                          ('backup_begin', net.BeginBlock), ('backup_last', net.LastBlock)):
        sd = torch.load(orig / folder / '1.pth', weights_only=True)
        block().load_state_dict(sd, strict=True)
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in sd.values())


def test_original_val_layout_and_skip_simple(tmp_path):
    orig, sharded = tmp_path / 'val_orig', tmp_path / 'val_shards'
    extra = ('--num_data', '2', '--models_per_step', '2', '--train_simple')
    generation.generate(tiny_args(orig, *extra, '--layout', 'original', kind='val'))
    generation.generate(tiny_args(sharded, *extra, kind='val'))
    assert sorted(os.listdir(orig)) == ['begin', 'complex', 'last', 'logs', 'recipe.json', 'simple']
    a, b = loader.ValDataset(str(orig), 2), loader.ValDataset(str(sharded), 2)
    _assert_same_sets(a, b, ('begin', 'basic', 'last', 'simple'))  # simple/: the Retrained row
    plain = tmp_path / 'val_plain'
    generation.generate(tiny_args(plain, '--num_data', '1', '--layout', 'original', kind='val'))
    assert loader.ValDataset(str(plain), 1).simple is None and not (plain / 'simple').exists()
    skip = tmp_path / 'skip'
    generation.generate(tiny_args(skip, '--num_data', '1', '--skip_simple', '--layout', 'original'))
    assert not (skip / 'labels').exists() and loader.TrainDataset(str(skip), 1).simple is None
    log = open(skip / 'logs' / 'train_0.log').read()
    assert 'network 0: test accuracy large ' in log and 'small' not in log.split('network 0:')[1].splitlines()[0]
    assert 'nan' not in log


def test_partial_original_root_resumes(tmp_path):
    root, ref = tmp_path / 'partial', tmp_path / 'ref'
    args = tiny_args(root, '--num_data', '4', '--models_per_step', '1', '--layout', 'original')
    generation.generate(args)
    # what a kill leaves: index 2 half written (its labels/ file missing), index 3 gone, a temporary file
    os.remove(root / 'labels' / '2.pth')
    for folder in ('inputs', 'labels', 'backup_begin', 'backup_last'):
        os.remove(root / folder / '3.pth')
    (root / 'inputs' / '.tmp_x.pth').write_bytes(b'half a file')
    assert original_layout.original_made(str(root), original_layout.original_dirs(args.kind, args.train_small)) == {0, 1}
    kept = os.stat(root / 'inputs' / '0.pth').st_mtime_ns
    made = generation.generate(args)
    assert [s['index'].tolist() for s in made] == [[2], [3]]
    assert os.stat(root / 'inputs' / '0.pth').st_mtime_ns == kept  # finished indices are not redone
    generation.generate(tiny_args(ref, '--num_data', '4', '--models_per_step', '1'))
    _assert_same_sets(loader.TrainDataset(str(root), 4, with_networks=True),
                      loader.TrainDataset(str(ref), 4, with_networks=True), ('basic', 'simple', 'begin', 'last'))


def test_killed_original_layout_process_resumes(tmp_path):
    root = tmp_path / 'pairs'
    cmd = [sys.executable, 'construct_train.py', '--data_root', str(root), '--num_data', '6', '--models_per_step',
           '1', '--num_threads', '1', '--layout', 'original', *TINY]
    dirs = original_layout.original_dirs('train', True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(original_layout.original_made(str(root), dirs)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = original_layout.original_made(str(root), dirs)
    assert 2 <= len(done) < 6, 'kill the process mid-run'
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f'{6 - len(done)} to make' in r.stderr
    assert original_layout.original_made(str(root), dirs) == set(range(6))
    assert len(loader.TrainDataset(str(root), 6)) == 6


def test_layouts_do_not_mix(tmp_path):
    generation.generate(tiny_args(tmp_path / 's', '--num_data', '1'))
    with pytest.raises(utils.UserError, match='holds shards .*--layout original needs a folder of its own'):
        generation.generate(tiny_args(tmp_path / 's', '--num_data', '1', '--layout', 'original'))
    generation.generate(tiny_args(tmp_path / 'o', '--num_data', '1', '--layout', 'original'))
    with pytest.raises(utils.UserError, match=r'holds the original layout \(inputs/, .*pass --layout original'):
        generation.generate(tiny_args(tmp_path / 'o', '--num_data', '1'))
    with pytest.raises(utils.UserError, match='another recipe.*seed'):
        generation.generate(tiny_args(tmp_path / 'o', '--num_data', '1', '--layout', 'original', '--seed', '1'))


def test_original_layout_continues_the_original_codes_folder(tmp_path):
    theirs = tmp_path / 'theirs'
    write_original(theirs, 2, 'train')  # the original code's own files: no recipe.json
    kept = os.stat(theirs / 'inputs' / '0.pth').st_mtime_ns
    argv = [sys.executable, 'construct_train.py', '--data_root', str(theirs), '--layout', 'original', *TINY]
    r = subprocess.run(argv + ['--num_data', '3'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'their recipe cannot be checked' in r.stderr and '2 already made, 1 to make' in r.stderr
    assert original_layout.original_made(str(theirs), original_layout.original_dirs('train', True)) == {0, 1, 2}
    assert os.stat(theirs / 'inputs' / '0.pth').st_mtime_ns == kept and not (theirs / 'recipe.json').exists()
    torch.save({'conv1.weight': torch.zeros(3, 6, 3, 3)}, theirs / 'labels' / '1.pth')  # conv2 missing
    r = subprocess.run(argv + ['--num_data', '5'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert f'{theirs / "labels" / "1.pth"}: not a SimpleBlock_NoBn state dict' in r.stderr
    assert original_layout.original_made(str(theirs), original_layout.original_dirs('train', True)) == {0, 1, 2}


@pytest.mark.parametrize('kind', ['train', 'val'])
def test_original_log_lines_and_the_same_networks(tmp_path, kind):
    extra = ('--num_data', '2', '--models_per_step', '2', '--num_epochs', '2') + (('--train_simple',) * (kind == 'val'))
    plain, logged = tmp_path / 'plain', tmp_path / 'logged'
    generation.generate(tiny_args(plain, *extra, kind=kind))
    generation.generate(tiny_args(logged, *extra, '--original_log', kind=kind))
    a, b = shards.read_pairs(str(plain), 2), shards.read_pairs(str(logged), 2)
    for block in ('begin', 'basic', 'last', 'simple'):
        assert all(torch.equal(a[block][n], t) for n, t in b[block].items())
    log = open(logged / 'logs' / f'{kind}_0.log').read()
    large = 'Complex Test Accuracy' if kind == 'train' else 'Test Accuracy'
    for i in range(2):
        lines = [f'Data index: {i}', f'Epoch 1, {large} {b["acc_large"][i].item()}%', '-' * 50,
                 f'Before Train, Test Accuracy {b["acc_small_init"][i].item()}%',
                 f'Epoch 1, Simple Test Accuracy {b["acc_small"][i].item()}%']
        assert all(line in log for line in lines), lines
    assert log.count(f'Epoch 0, {large} ') == 2 and 'Data index' not in open(plain / 'logs' / f'{kind}_0.log').read()
