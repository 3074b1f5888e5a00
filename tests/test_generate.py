"""Pair generation: the recipe, batched equals one-by-one, determinism, shards, resume, run.sh."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import construct
import generate_sh
import generation
import shards
import utils
from conftest import TINY, tiny_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(autouse=True)
def single_thread(one_thread):
    """Generation tests run single-threaded, like the subprocesses they compare with."""


@pytest.fixture
def mnist(tiny_mnist):
    return tiny_mnist


def test_batched_equals_one_by_one_modules(mnist):
    """make_pairs (K at a time, stacked) against train_one, the recipe's definition (nn.Modules, one network)."""
    recipe = tiny_args('unused').recipe
    shard = construct.make_pairs(range(3), recipe, mnist, torch.device('cpu'))
    for j in range(3):
        ref = construct.train_one(recipe, j, mnist)
        for key in construct.PAIR_BLOCKS:
            for name, t in ref[key].items():
                torch.testing.assert_close(shard[key][name][j], t, atol=2e-5, rtol=1e-4, msg=f'{key}.{name}')
        for key in shards.ACC_KEYS:
            assert abs(shard[key][j].item() - ref[key]) <= 1.0  # at most 2 of 200 images flip
    assert tiny_args('unused', '--skip_simple').recipe.as_json() == {**recipe.as_json(), 'train_small': False}
    plain = construct.train_one(tiny_args('unused', '--skip_simple').recipe, 0, mnist)
    assert 'simple' not in plain and all(torch.equal(plain['basic'][n], t) for n, t in
                                         construct.train_one(recipe, 0, mnist)['basic'].items())


def test_recipe_pieces(mnist):
    args = tiny_args('unused', '--batch_size', '128')
    shard = construct.make_pairs(range(2), args.recipe, mnist, torch.device('cpu'))
    steps = -(-300 // 128)  # the last partial batch is kept
    assert shard['basic']['bn1.num_batches_tracked'].tolist() == [steps, steps]
    assert shard['begin']['bn.num_batches_tracked'].tolist() == [steps, steps]  # untouched in the small phase
    assert set(shard['simple']) == {'conv1.weight', 'conv2.weight'}
    assert shard['simple']['conv1.weight'].shape == (2, 3, 6, 3, 3)
    for key in ('acc_large', 'acc_small_init', 'acc_small'):
        assert shard[key].shape == (2,) and ((shard[key] >= 0) & (shard[key] <= 100)).all()
    assert shard['seed'].tolist() == [utils.seed_for(0, 'train', i) for i in range(2)]


def test_begin_cache_trains_the_same_small_blocks(mnist):
    args = tiny_args('unused', '--num_epochs', '2')
    a = construct.make_pairs(range(2), args.recipe, mnist, torch.device('cpu'), cache_begin=True)
    b = construct.make_pairs(range(2), args.recipe, mnist, torch.device('cpu'), cache_begin=False)
    for name in a['simple']:  # up to float rounding: the cache runs Begin on other batch shapes
        torch.testing.assert_close(a['simple'][name], b['simple'][name], atol=1e-5, rtol=1e-4)


def test_one_workspace_at_a_time(mnist):
    """Each workspace holds a Begin cache sized for its K: a new K replaces the old one."""
    args, workspaces = tiny_args('unused'), {}
    for indices in (range(2), range(2, 4), range(4, 5)):
        construct.make_pairs(indices, args.recipe, mnist, torch.device('cpu'), True, workspaces)
        assert list(workspaces) == [len(indices)]


def test_flips_draw_half_and_keep_pixels():
    gens = [construct.data_generator(s) for s in (1, 2)]
    perm, flip = construct.draw_epoch(gens, 10000, torch.device('cpu'))
    assert all(torch.equal(p.sort().values, torch.arange(10000)) for p in perm)
    assert 0.47 < flip.float().mean() < 0.53 and not torch.equal(perm[0], perm[1])
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    idx, fl = torch.tensor([[0, 1]]), torch.tensor([[True, False]])
    x = construct.augment(images, idx, fl)
    assert x.shape == (2, 1, 28, 28)
    assert torch.equal(x[0, 0] * 255, images[0].flip(-1).float()) and torch.equal(x[1, 0] * 255, images[1].float())


def test_val_networks_and_seeds_differ(tmp_path, mnist):
    val = tiny_args(tmp_path, kind='val')
    assert not val.train_small
    shard = construct.make_pairs(range(1), val.recipe, mnist, torch.device('cpu'))
    assert 'simple' not in shard and torch.isnan(shard['acc_small']).all()
    train = construct.make_pairs(range(1), tiny_args(tmp_path).recipe, mnist, torch.device('cpu'))
    assert shard['seed'][0] != train['seed'][0]
    assert not torch.equal(shard['basic']['conv1.weight'], train['basic']['conv1.weight'])
    with_simple = construct.make_pairs(range(1), tiny_args(tmp_path, '--train_simple', kind='val').recipe,
                                             mnist, torch.device('cpu'))
    assert 'simple' in with_simple and torch.equal(with_simple['basic']['conv1.weight'], shard['basic']['conv1.weight'])


def test_same_seed_same_shards_and_split_independent(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    generation.generate(tiny_args(a, '--num_data', '3', '--models_per_step', '3'))
    generation.generate(tiny_args(b, '--num_data', '1', '--start_index', '2', '--models_per_step', '1'))
    generation.generate(tiny_args(b, '--num_data', '3', '--models_per_step', '2'))  # resumes: makes 0, 1
    assert [s[:2] for s in shards.list_shards(b)] == [(0, 2), (2, 3)]
    pa, pb = shards.read_pairs(str(a), 3), shards.read_pairs(str(b), 3)
    assert torch.equal(pa['seed'], pb['seed'])
    for name, t in pa['simple'].items():
        torch.testing.assert_close(t, pb['simple'][name], atol=1e-5, rtol=1e-4)
    generation.generate(tiny_args(a, '--num_data', '3', '--models_per_step', '3'))  # nothing to do
    again = shards.read_pairs(str(a), 3)
    assert all(torch.equal(again['basic'][n], t) for n, t in pa['basic'].items())
    c = tmp_path / 'c'
    generation.generate(tiny_args(c, '--num_data', '3', '--models_per_step', '3'))
    pc = shards.read_pairs(str(c), 3)
    assert all(torch.equal(pc['basic'][n], t) for n, t in pa['basic'].items())  # bit-identical on CPU


def test_other_recipe_is_refused(tmp_path):
    # a run that fails on its input claims nothing; a claim without networks yet says how to undo it
    with pytest.raises(utils.UserError, match='MNIST file missing'):
        generation.generate(tiny_args(tmp_path, '--num_data', '1', '--mnist_root', str(tmp_path / 'none')))
    assert not os.path.exists(tmp_path / 'recipe.json')
    shards.claim_root(str(tmp_path), {'seed': 5})
    with pytest.raises(utils.UserError,
                       match='was claimed with another recipe.*holds no networks yet: .*delete its recipe.json'):
        generation.generate(tiny_args(tmp_path, '--num_data', '1'))
    os.remove(tmp_path / 'recipe.json')
    generation.generate(tiny_args(tmp_path, '--num_data', '1'))
    with pytest.raises(utils.UserError, match='holds pairs made with another recipe.*seed') as refused:
        generation.generate(tiny_args(tmp_path, '--num_data', '1', '--seed', '1'))
    assert 'delete its recipe.json' not in str(refused.value)
    assert len(shards.list_shards(tmp_path)) == 1


def _cli(*argv, script='construct_train.py'):
    return subprocess.run([sys.executable, script, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('flags, message', [
    (['--num_data', '0'], '--num_data must be > 0'),
    (['--start_index', '-1'], '--start_index must be >= 0'),
    (['--lr', '0'], '--lr must be > 0'),
    (['--mnist_root', '/nonexistent'], 'MNIST file missing'),
])
def test_bad_flags(tmp_path, flags, message):
    r = _cli('--data_root', str(tmp_path / 'd'), *TINY, *flags)
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr
    assert not shards.list_shards(tmp_path / 'd')


def test_unwritable_data_root(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    r = _cli('--data_root', str(blocker / 'sub'), *TINY)
    assert r.returncode == 2 and 'is not writable' in r.stderr


def test_resume_after_kill(tmp_path):
    root = tmp_path / 'pairs'
    cmd = [sys.executable, 'construct_train.py', '--data_root', str(root), '--num_data', '12',
           '--models_per_step', '1', '--num_threads', '1', *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(shards.list_shards(root)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = shards.list_shards(root)
    assert 2 <= len(done) < 12, 'kill the process mid-run'
    for _, _, path in done:
        shards.load_shard(path)  # every shard left behind is complete
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = shards.list_shards(root)
    assert shards.duplicates(files) == ([], [])
    assert shards.covered_indices(root) == set(range(12)) and len(files) == 12
    assert f'{12 - len(done)} to make' in r.stderr
    ref = tmp_path / 'ref'
    generation.generate(tiny_args(ref, '--num_data', '12', '--models_per_step', '1'))
    a, b = shards.read_pairs(str(root), 12), shards.read_pairs(str(ref), 12)
    assert all(torch.equal(a['simple'][n], t) for n, t in b['simple'].items())


def test_run_sh_content():
    args = generate_sh.get_args(['--num_gpus', '2', '--num_processes_each_gpu', '2', '--num_data_each_process', '5',
                                 '--start_index', '10', '--num_nodes', '2', '--node_rank', '1'])
    lines = generate_sh.run_sh(args).splitlines()
    procs = [line for line in lines if line.startswith('python')]
    assert procs[0] == ('python construct_train.py --gpu_id 0 --num_data 5 --start_index 30 --data_root ./data/train '
                        '--processes_per_gpu 2 &')  # each process sizes its steps from its share of the GPU
    assert [p.split('--gpu_id ')[1].split()[0] for p in procs] == ['0', '0', '1', '1']
    assert [int(p.split('--start_index ')[1].split()[0]) for p in procs] == [30, 35, 40, 45]
    assert lines[-1] == 'wait'
    cpu = generate_sh.run_sh(generate_sh.get_args(['--num_gpus', '0', '--num_processes_each_gpu', '2',
                                                   '--num_cpus', '4', '--val']))
    assert 'construct_val.py' in cpu and '--device cpu --num_threads 2' in cpu and './data/val' in cpu
    assert '--processes_per_gpu' not in cpu
    slurm = generate_sh.slurm_sh(generate_sh.get_args(['--num_gpus', '8', '--num_processes_each_gpu', '5',
                                                       '--slurm', '--num_nodes', '2']))
    assert '#SBATCH --array=0-79' in slurm and 'SLURM_ARRAY_TASK_ID * 7500' in slurm
    assert '#SBATCH --gres=gpu:1' in slurm and slurm.count('python ') == 1  # one process, one GPU per task
    with pytest.raises(utils.UserError, match='--node_rank'):
        generate_sh.get_args(['--num_nodes', '2', '--node_rank', '2'])


def test_generate_sh_and_run_sh_end_to_end(tmp_path):
    root = tmp_path / 'pairs'
    out = tmp_path / 'run.sh'
    extra = ' '.join(TINY[:-2] + ['--models_per_step', '1'])
    r = _cli('--num_gpus', '0', '--num_processes_each_gpu', '2', '--num_data_each_process', '1', '--num_cpus', '2',
             '--data_root', str(root), '--out', str(out), '--extra', extra, script='generate_sh.py')
    assert r.returncode == 0, r.stderr
    r = subprocess.run(['sh', str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert shards.covered_indices(root) == {0, 1}
    pairs = shards.read_pairs(str(root), 2)
    assert pairs['simple']['conv1.weight'].shape == (2, 3, 6, 3, 3)


def test_corrupt_shard_is_named(tmp_path):
    generation.generate(tiny_args(tmp_path, '--num_data', '1'))
    (_, _, path), = shards.list_shards(tmp_path)
    with open(path, 'r+b') as f:
        f.truncate(100)
    with pytest.raises(utils.UserError, match=f'shard {path} cannot be read.*delete it and re-run generation'):
        shards.read_pairs(str(tmp_path), 1)
