"""The accidents of a multi-day generation job, with real processes: two generators on one root, a full disk,
preemption (SIGTERM), --status and --dedupe; and what K changes in a network (float rounding only)."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import claims
import construct
import generation
import shards
import train
import utils
from conftest import make_pairs, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--num_epochs', '1', '--num_train_images', '300', '--num_test_images', '200', '--device', 'cpu',
        '--num_threads', '1']

# Runs a script with a full disk after some files: the n-th file whose name ends in KT_FULL_SUFFIX stops taking
# bytes after 100 (OSError ENOSPC from the real write path: the buffered file, torch.save, utils.atomic_write).
FULL_DISK = '''
import errno, io, os, runpy, sys
suffix, nth, count = os.environ['KT_FULL_SUFFIX'], int(os.environ['KT_FULL_NTH']), [0]
real_fdopen = os.fdopen

class Full(io.FileIO):
    def write(self, b):
        if self.tell() + len(b) > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(b)

def fdopen(fd, mode='r', *args, **kwargs):
    if mode == 'wb' and os.readlink(f'/proc/self/fd/{fd}').endswith(suffix):
        count[0] += 1
        if count[0] == nth:
            return io.BufferedWriter(Full(fd, 'wb'))
    return real_fdopen(fd, mode, *args, **kwargs)

os.fdopen = fdopen
sys.path.insert(0, os.getcwd())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def cli(script, *argv, env=None, prelude=None):
    """Run a script of the repository (through `prelude`, a wrapper's source, if given)."""
    cmd = [sys.executable] + (['-c', prelude] if prelude else []) + [script, *argv]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))


def start(script, *argv):
    """Start a script of the repository without waiting for it."""
    return subprocess.Popen([sys.executable, script, *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))


def leftovers(root):
    """Temporary files and claims under root."""
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if n.startswith('.tmp_') or n.endswith('.claim')] + \
        ([claims.claims_dir(root)] if os.path.exists(claims.claims_dir(root)) else [])


def wait_for(condition, timeout=60):
    """Poll until condition() holds."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


def one_line_error(stderr):
    """The last line of stderr, after checking that no traceback came with it."""
    assert 'Traceback' not in stderr and 'Logging error' not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_two_generators_on_overlapping_ranges(tmp_path):
    root = str(tmp_path / 'pairs')
    a = start('construct_train.py', '--data_root', root, '--num_data', '4', '--models_per_step', '2', *TINY)
    b = start('construct_train.py', '--data_root', root, '--num_data', '4', '--start_index', '2',
              '--models_per_step', '1', *TINY)
    for p in (a, b):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    files = shards.list_shards(root)
    assert shards.covered_indices(root) == set(range(6)) and shards.duplicates(files) == ([], [])
    assert shards.read_pairs(root, 6)['index'].tolist() == list(range(6))
    assert leftovers(root) == []  # every claim removed, and the claims folder with them


def test_stale_claim_is_taken_over_and_live_one_waited_for(tmp_path, caplog, one_thread):
    root = tmp_path / 'pairs'
    dead = subprocess.Popen(['true'])
    dead.wait()
    os.makedirs(claims.claims_dir(root))
    with open(os.path.join(claims.claims_dir(root), '0_1.claim'), 'w') as f:
        json.dump({'host': claims.HOST, 'pid': dead.pid, 'started': time.time()}, f)
    far = os.path.join(claims.claims_dir(root), '1_2.claim')  # another host's, untouched for 3 hours
    with open(far, 'w') as f:
        json.dump({'host': 'elsewhere', 'pid': 1, 'started': time.time() - 3 * 3600}, f)
    os.utime(far, (time.time() - 3 * 3600,) * 2)
    caplog.set_level(logging.INFO)
    generation.generate(generation_args(root, '--num_data', '2', '--models_per_step', '1'))
    taken = [r.getMessage() for r in caplog.records if 'taking over' in r.getMessage()]
    assert len(taken) == 2 and 'process gone' in taken[0] and 'untouched for 3.00 h' in taken[1]
    assert shards.covered_indices(root) == {0, 1} and leftovers(root) == []
    # a live claim (this process's parent's: alive, on this host) is waited for until its group is made
    live = claims.Claim(2, 3, os.path.join(claims.claims_dir(root), '2_3.claim'), claims.HOST, os.getppid())
    holder = claims.Claims(str(root), 1.0)
    assert holder.create(live)
    waiting = claims.Claims(str(root), 1.0)
    assert waiting.try_claim(2, 3).pid == os.getppid()  # blocked
    shards.write_shard(str(root), make_pairs(1, 2))  # the holder finishes its group...
    claims.remove(live.path)
    assert waiting.try_claim(2, 3) is None  # ...and the group is free again (generation then finds it made)
    waiting.release_all()
    assert leftovers(root) == []


def test_overlapping_shards_dedupe(tmp_path):
    root = tmp_path / 's'
    write_shards(root, 8, shard_size=4)
    shards.write_shard(str(root), make_pairs(2, 2, seed=5))  # 2..3 again: fully redundant
    shards.write_shard(str(root), make_pairs(4, 6, seed=6))  # 6..9: 6..7 redundant, 8..9 new
    before = shards.read_pairs(str(root), 10)
    r = cli('construct_train.py', '--data_root', str(root), '--dedupe')
    assert r.returncode == 0, r.stderr
    assert 'shard_00000002_00000004.pt' in r.stdout and '1 redundant shard(s) deleted' in r.stdout
    assert [s[:2] for s in shards.list_shards(root)] == [(0, 4), (4, 8), (6, 10)]  # partly redundant: kept
    after = shards.read_pairs(str(root), 10)
    assert all(torch.equal(before['basic'][n], t) for n, t in after['basic'].items())
    assert torch.equal(after['basic']['conv1.weight'][8:], make_pairs(4, 6, seed=6)['basic']['conv1.weight'][2:])


@pytest.mark.parametrize('suffix, nth, name', [('.pt', 3, 'shard_00000002_00000003.pt'), ('.json', 1, 'recipe.json')])
def test_disk_full_while_generating(tmp_path, suffix, nth, name):
    root = tmp_path / 'pairs'
    argv = ['--data_root', str(root), '--num_data', '4', '--models_per_step', '1', *TINY]
    r = cli('construct_train.py', *argv, env={'KT_FULL_SUFFIX': suffix, 'KT_FULL_NTH': str(nth)}, prelude=FULL_DISK)
    line = one_line_error(r.stderr)
    assert r.returncode == 1
    assert line.startswith(f'error: cannot write {root / name}: No space left on device; safe on disk: {nth - 1} of '
                           f'the 4 networks') and 'resume with: python construct_train.py --data_root' in line
    assert leftovers(root) == [] and len(shards.list_shards(root)) == (nth - 1 if suffix == '.pt' else 0)
    for _, _, path in shards.list_shards(root):
        shards.load_shard(path)
    r = cli('construct_train.py', *argv)  # space freed: the same command finishes the job
    assert r.returncode == 0, r.stderr
    assert shards.covered_indices(root) == set(range(4))


def test_disk_full_while_checkpointing(pair_sets, tmp_path):
    argv = tiny_train(pair_sets, tmp_path)
    r = cli('train.py', *argv, env={'KT_FULL_SUFFIX': '.pth', 'KT_FULL_NTH': '2'}, prelude=FULL_DISK)
    line = one_line_error(r.stderr)
    assert r.returncode == 1 and line.startswith('error: cannot write ') and 'last.pth: No space left' in line
    assert 'last.pth with 1 of 4 epochs done' in line and line.endswith(' --resume')
    last = [os.path.join(d, 'last.pth') for d, _, names in os.walk(tmp_path) if 'last.pth' in names]
    assert torch.load(last[0], weights_only=True)['epoch'] == 1 and leftovers(tmp_path / 'ckpts') == []
    r = cli('train.py', *argv, '--resume')
    assert r.returncode == 0 and 'resumed from' in r.stderr, r.stderr


def test_failed_log_line_is_one_error(tmp_path, capsys):
    path = str(tmp_path / 'logs' / 'x.log')
    utils.set_logger(path)
    handler = next(h for h in logging.getLogger().handlers if getattr(h, '_kt', False) and hasattr(h, 'baseFilename'))

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        flush = close = lambda self: None
    handler.stream = Full()
    with pytest.raises(SystemExit) as ended:
        utils.run_main(lambda: logging.info('a line'))
    assert ended.value.code == 1
    err = capsys.readouterr().err
    assert one_line_error(err) == f'error: cannot write {path}: No space left on device'
    logging.getLogger().removeHandler(handler)


def test_sigterm_mid_generation_then_rerun(tmp_path, one_thread):
    root = tmp_path / 'pairs'
    argv = ['--data_root', str(root), '--num_data', '6', '--models_per_step', '1', *TINY]
    p = start('construct_train.py', *argv)
    wait_for(lambda: len(shards.list_shards(root)) >= 2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    line = one_line_error(err)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert line.startswith('stopped by SIGTERM; safe on disk: ') and 'resume with: python construct_train.py' in line
    assert leftovers(root) == [] and len(shards.list_shards(root)) < 6
    r = cli('construct_train.py', *argv)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / 'ref'
    generation.generate(generation_args(ref, '--num_data', '6', '--models_per_step', '1'))
    a, b = shards.read_pairs(str(root), 6), shards.read_pairs(str(ref), 6)
    for block in construct.PAIR_BLOCKS:  # bit-identical: the same K
        assert all(torch.equal(a[block][n], t) for n, t in b[block].items())


def test_sigterm_mid_training_then_resume(pair_sets, tmp_path, one_thread):
    argv = tiny_train(pair_sets, tmp_path / 'b', '--num_epochs', '40')
    p = start('train.py', *argv)
    ckpt = os.path.join(tmp_path, 'b', 'ckpts', train.runs.run_name(train.get_args(argv), train.PARSER.get_default))
    wait_for(lambda: os.path.exists(os.path.join(ckpt, 'last.pth')))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    line = one_line_error(err)
    assert p.returncode == 128 + signal.SIGTERM and line.startswith('stopped by SIGTERM; safe on disk: '), err
    assert 'epochs done' in line and line.endswith('--resume') and leftovers(ckpt) == []
    assert not os.path.exists(os.path.join(ckpt, 'summary.json'))
    train.main(argv + ['--resume'])
    straight = tiny_train(pair_sets, tmp_path / 'a', '--num_epochs', '40')
    train.main(straight)
    metrics = [open(os.path.join(d, 'logs', os.path.relpath(ckpt, os.path.join(tmp_path, 'b', 'ckpts')),
                                 'metrics.csv')).read() for d in (tmp_path / 'a', tmp_path / 'b')]
    assert metrics[0] == metrics[1]


def test_status_reads_without_writing(tmp_path):
    root = tmp_path / 'pairs'
    write_shards(root, 8, shard_size=4)  # 0..7
    shards.write_shard(str(root), make_pairs(4, 12))  # 12..15: 8..11 is a gap
    shards.write_shard(str(root), make_pairs(2, 2, seed=3))  # 2..3 again
    truncated = shards.shard_path(str(root), 16, 18)
    shards.write_shard(str(root), make_pairs(2, 16))
    with open(truncated, 'r+b') as f:
        f.truncate(1000)
    dead = subprocess.Popen(['true'])
    dead.wait()
    os.makedirs(claims.claims_dir(root))
    for (a, b), pid in (((18, 20), dead.pid), ((20, 22), os.getpid())):
        with open(os.path.join(claims.claims_dir(root), f'{a}_{b}.claim'), 'w') as f:
            json.dump({'host': claims.HOST, 'pid': pid, 'started': time.time()}, f)
    snapshot = lambda: sorted((d, n, os.stat(os.path.join(d, n)).st_mtime_ns, os.stat(os.path.join(d, n)).st_size)
                              for d, _, names in os.walk(root) for n in names)
    before = snapshot()
    r = cli('construct_train.py', '--data_root', str(root), '--status', '--num_data', '24')
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'made: 12 networks in 4 shards, indices 0-7, 12-15' in out  # the truncated shard counts as missing
    assert 'range [0, 24): missing 12: 8-11, 16-23' in out
    assert 'duplicates: indices 2-3' in out and 'shard_00000002_00000004.pt' in out
    assert f'claim [18, 20) by {claims.HOST} pid {dead.pid}' in out and 'stale (process gone)' in out
    assert f'claim [20, 22) by {claims.HOST} pid {os.getpid()}' in out and ': live' in out
    assert 'unreadable: shard_00000016_00000018.pt' in out and 'rate: ' in out
    assert snapshot() == before  # nothing written, not even a log
    r = cli('construct_val.py', '--data_root', str(tmp_path / 'none'), '--status')
    assert r.returncode == 2 and 'does not exist' in r.stderr


def test_other_k_agrees_within_rounding(one_thread):
    """Network i at K = 4 and at K = 1: the same up to float rounding (grouped convolutions sum in another order).
    Measured on CPU, torch 2.13, one thread: at most 2.1e-7 apart on this recipe (1 epoch, 300 images); the
    tolerance is 1e-5, and the test accuracies agree within one test image."""
    args = generation_args('unused')
    mnist = generation.load_mnist_to(torch.device('cpu'), args)
    four = construct.make_pairs(range(4), args.recipe, mnist, torch.device('cpu'))
    for i in range(4):
        one = construct.make_pairs(range(i, i + 1), args.recipe, mnist, torch.device('cpu'))
        for block in construct.PAIR_BLOCKS:
            for name, t in one[block].items():
                torch.testing.assert_close(four[block][name][i], t[0], atol=1e-5, rtol=0, msg=f'{i} {block}.{name}')
        for key in shards.ACC_KEYS:
            assert abs(four[key][i].item() - one[key][0].item()) <= 100 / 200


def generation_args(root, *extra):
    """construct_train.py's checked flags of a tiny recipe."""
    import construct_train
    return construct_train.get_args('train', ['--data_root', str(root), *TINY, *extra])


def tiny_train(pair_sets, out, *extra):
    """train.py flags of a tiny run (4 epochs of 3 steps) on the session's pair sets."""
    argv = ['--train_path', pair_sets['train'], '--val_path', pair_sets['val'], '--train_data_length', '12',
            '--val_data_length', '3', '--num_test_images', '200', '--batch_size', '5', '--num_epochs', '4',
            '--log_step', '2', '--device', 'cpu', '--ckpt_path', str(out / 'ckpts'), '--log_path', str(out / 'logs'),
            '--num_layers', '1', '--c_dim', '16', '--hidden_s_dim', '16', '--hidden_c_dim', '16']
    for flag, value in zip(extra[::2], extra[1::2]):  # a later value of a flag replaces the earlier one
        argv[argv.index(flag) + 1] = value
    return argv
