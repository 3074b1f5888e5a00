"""MNIST reader, the original blocks, the stacked forms and the small utilities."""
import gzip
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mnist
import net
import symmetry
import utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')
RAW = os.path.join(REPO, 'data', 'MNIST', 'raw')


def test_mnist_train_set():
    images, labels = mnist.load_mnist(os.path.join(REPO, 'data'), train=True)
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_mnist_test_set_and_pixels():
    images, labels = mnist.load_mnist(os.path.join(REPO, 'data'), train=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    x = net.to_float(images[:5])
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0 and float(x.min()) >= 0.0
    assert torch.equal(x * 255, images[:5].float())  # ToTensor: divide by 255, no normalisation


@pytest.fixture
def mnist_copy(tmp_path):
    """A private copy of the gzipped MNIST files in torchvision's layout."""
    raw = tmp_path / 'MNIST' / 'raw'
    raw.mkdir(parents=True)
    for name in mnist.MNIST_FILES:
        shutil.copy(os.path.join(RAW, name + '.gz'), raw / (name + '.gz'))
    return tmp_path, raw


def _read_fresh(root, train=False):
    mnist.load_mnist.cache_clear()
    return mnist.load_mnist(str(root), train=train)


def test_mnist_reads_gz_then_uncompressed_cache(mnist_copy):
    root, raw = mnist_copy
    images, _ = _read_fresh(root)
    assert (raw / 't10k-images-idx3-ubyte').exists()  # decompressed once as a cache
    (raw / 't10k-images-idx3-ubyte.gz').unlink()  # the cache alone suffices
    again, _ = _read_fresh(root)
    assert torch.equal(images, again)


def test_mnist_root_may_be_the_raw_folder(mnist_copy):
    _, raw = mnist_copy
    images, labels = _read_fresh(raw)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    for name in mnist.MNIST_FILES:  # the uncompressed files (the test set's, cached by the read above) suffice too
        (raw / (name + '.gz')).unlink()
    again, _ = _read_fresh(raw)
    assert torch.equal(images, again)


def test_mnist_missing_file(mnist_copy):
    root, raw = mnist_copy
    (raw / 't10k-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(utils.UserError, match='t10k-labels-idx1-ubyte.*missing|missing.*t10k-labels'):
        _read_fresh(root)


def test_mnist_truncated_gz(mnist_copy):
    root, raw = mnist_copy
    path = raw / 't10k-images-idx3-ubyte.gz'
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(utils.UserError, match='t10k-images-idx3-ubyte.gz.*truncated or corrupt'):
        _read_fresh(root)


def test_mnist_wrong_md5(mnist_copy):
    root, raw = mnist_copy
    images, _ = _read_fresh(root)
    data = bytearray(gzip.decompress((raw / 't10k-images-idx3-ubyte.gz').read_bytes()))
    data[1000] ^= 0xFF  # one flipped pixel: same size and header, wrong md5
    (raw / 't10k-images-idx3-ubyte').unlink()
    (raw / 't10k-images-idx3-ubyte.gz').write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(utils.UserError, match='t10k-images-idx3-ubyte.gz: md5'):
        _read_fresh(root)


def test_mnist_corrupt_cache_is_refused_without_gz(mnist_copy):
    root, raw = mnist_copy
    _read_fresh(root)
    plain = raw / 't10k-labels-idx1-ubyte'
    data = bytearray(plain.read_bytes())
    data[-1] ^= 1
    plain.write_bytes(bytes(data))
    mnist.load_mnist.cache_clear()
    assert _read_fresh(root)[1].shape == (10000,)  # the .gz is still there: re-decompressed, cache repaired
    plain.write_bytes(bytes(data))
    (raw / 't10k-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(utils.UserError, match='t10k-labels-idx1-ubyte: md5 mismatch'):
        _read_fresh(root)


def test_mnist_wrong_magic_number():
    data = (1234).to_bytes(4, 'big') + bytes(100)
    with pytest.raises(utils.UserError, match='magic number'):
        mnist._parse_idx(data, 't10k-labels-idx1-ubyte')
    header = (2049).to_bytes(4, 'big') + (9999).to_bytes(4, 'big')
    with pytest.raises(utils.UserError, match='dimensions'):
        mnist._parse_idx(header + bytes(9999), 't10k-labels-idx1-ubyte')


def test_missing_mnist_is_a_clear_cli_error(tmp_path):
    code = 'import mnist, utils; utils.run_main(lambda: mnist.load_mnist(%r))' % str(tmp_path)
    r = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert 'MNIST file missing' in r.stderr and 'Traceback' not in r.stderr


BLOCK_NAMES = ['BeginBlock', 'BasicBlock', 'SimpleBlock', 'SimpleBlock_NoBn', 'MLPBlock', 'AttnBlock', 'LastBlock']


@pytest.mark.parametrize('name', BLOCK_NAMES)
def test_original_blocks_match_fixtures(name):
    ref = torch.load(os.path.join(FIXTURES, 'original_net_blocks.pt'), weights_only=True)[name]
    block = getattr(net, name)()
    block.load_state_dict(ref['state_dict'], strict=True)
    block.eval()
    with torch.no_grad():
        out = block(ref['input'].clone())
    torch.testing.assert_close(out, ref['output_eval'], atol=1e-6, rtol=0)


def test_builders_shapes():
    large = net.large_network()
    small = net.small_network(large[0], large[2])
    x = torch.rand(2, 1, 28, 28)
    assert large(x).shape == (2, 10) and small(x).shape == (2, 10)
    assert small[0] is large[0] and small[2] is large[2] and isinstance(small[1], net.SimpleBlock_NoBn)


def _trained_like(block, seed):
    """A block with non-trivial BN statistics."""
    torch.manual_seed(seed)
    m = net.BLOCKS[block]()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.parametrize('middle', ['basic', 'simple'])
def test_stacked_forward_equals_modules_in_eval(middle):
    k = 3
    mods = [[_trained_like(b, 10 * j + i) for i, b in enumerate(['begin', middle, 'last'])] for j in range(k)]
    states = [net.stack_states([m[i].state_dict() for m in mods]) for i in range(3)]
    x = torch.rand(5, 1, 28, 28)
    logits = net.stacked_logits(x, *states, middle)
    for j in range(k):
        with torch.no_grad():
            ref = torch.nn.Sequential(*mods[j])(x)
        torch.testing.assert_close(logits[j], ref, atol=1e-5, rtol=1e-5)
    acc = net.stacked_accuracy(x[:, 0], torch.zeros(5, dtype=torch.long), *states, middle, chunk_images=2)
    expect = torch.stack([(logits[j].argmax(-1) == 0).double().mean() * 100 for j in range(k)])
    torch.testing.assert_close(acc, expect)
    begin_out = net.begin_outputs(x[:, 0], states[0], chunk_images=3)
    for j in range(k):
        with torch.no_grad():
            torch.testing.assert_close(begin_out[j], mods[j][0](x), atol=1e-6, rtol=1e-6)
    for chunk_nets in (1, 2, None):  # the cached Begin output gives the same accuracies
        cached = net.stacked_accuracy(x[:, 0], torch.zeros(5, dtype=torch.long), *states, middle, chunk_images=2,
                                      chunk_nets=chunk_nets, begin_out=begin_out)
        torch.testing.assert_close(cached, expect)


def test_stacked_train_mode_updates_bn_like_modules():
    k = 2
    mods = [net.BasicBlock().train() for _ in range(k)]
    s = net.stack_states([m.state_dict() for m in mods])
    x = torch.rand(4, k * 6, 14, 14)
    out = net.basic_forward(x, s, training=True)
    for j in range(k):
        ref = mods[j](x[:, 6 * j:6 * j + 6])
        torch.testing.assert_close(out[:, 6 * j:6 * j + 6], ref, atol=1e-5, rtol=1e-5)
        for name, t in mods[j].state_dict().items():
            torch.testing.assert_close(s[name][j], t, atol=1e-6, rtol=1e-6)


def test_fresh_states_follow_seeds():
    a = net.fresh_states('simple', [1, 2])
    b = net.fresh_states('simple', [2])
    torch.manual_seed(2)
    ref = net.SimpleBlock_NoBn().state_dict()
    assert torch.equal(a['conv1.weight'][1], b['conv1.weight'][0])
    assert torch.equal(b['conv2.weight'][0], ref['conv2.weight'])
    assert torch.equal(net.unstack_state(a, 1)['conv1.weight'], ref['conv1.weight'])


def test_set_logger_no_duplicates(tmp_path, capsys):
    log = tmp_path / 'sub' / 'train.log'
    utils.set_logger(str(log))
    utils.set_logger(str(log))
    logging.info('hello once')
    lines = [line for line in log.read_text().splitlines() if 'hello once' in line]
    assert len(lines) == 1 and lines[0][:4].isdigit()  # timestamped
    assert capsys.readouterr().err.count('hello once') == 1


def test_device_helper(tmp_path):
    assert utils.get_device(0, 'cpu') == torch.device('cpu')
    assert utils.get_device(0).type in ('cpu', 'cuda')
    with pytest.raises(utils.UserError, match='--device foo: not a device'):
        utils.get_device(0, 'foo')
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(utils.UserError, match=f'--device cuda:{gpus}: ' + ('no CUDA GPU' if not gpus else 'GPU')):
        utils.get_device(0, f'cuda:{gpus}')
    with pytest.raises(utils.UserError, match='is a folder'):  # nothing is written in its place
        utils.atomic_write(str(tmp_path), 'text')


def test_seeds_and_histogram():
    assert utils.seed_for(0, 'train', 5) == utils.seed_for(0, 'train', 5)
    assert utils.seed_for(0, 'train', 5) != utils.seed_for(0, 'val', 5) != utils.seed_for(1, 'train', 5)
    assert 0 <= utils.seed_for(3, 'val', 7) < 2 ** 63
    assert utils.acc_histogram([0.0, 4.99, 5.0, 97.5, 100.0]) == [2, 1] + [0] * 17 + [2]


def test_atomic_save_leaves_no_partial_file(tmp_path):
    path = tmp_path / 'x.pt'
    utils.atomic_save({'a': torch.ones(2)}, str(path))
    with pytest.raises(Exception):
        utils.atomic_save({'a': lambda: 0}, str(path))  # cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(2))
    assert os.listdir(tmp_path) == ['x.pt']


def test_channel_permutations_keep_both_networks_functions():
    begin, basic, last = (_trained_like(b, i) for i, b in enumerate(['begin', 'basic', 'last']))
    simple = _trained_like('simple', 3)
    sds = [m.state_dict() for m in (begin, basic, last, simple)]
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randperm(6, generator=gen), torch.randperm(6, generator=gen)
    assert not torch.equal(p, torch.arange(6)) and not torch.equal(q, torch.arange(6))
    permuted = symmetry.permute_network(*sds, p, q)
    x = torch.rand(4, 1, 28, 28)

    def outputs(states):
        mods = [net.BLOCKS[b]() for b in ('begin', 'basic', 'last', 'simple')]
        for m, sd in zip(mods, states):
            m.load_state_dict(sd, strict=True)
            m.eval()
        with torch.no_grad():
            return torch.nn.Sequential(*mods[:3])(x), torch.nn.Sequential(mods[0], mods[3], mods[2])(x)

    for a, b in zip(outputs(sds), outputs(permuted)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(permuted[1]['conv1.weight'], sds[1]['conv1.weight'])
    # the batched form used for augmentation gives the same tensors
    c1, c2, s1, s2 = symmetry.permute_pairs(sds[1]['conv1.weight'][None], sds[1]['conv2.weight'][None],
                                       sds[3]['conv1.weight'][None], sds[3]['conv2.weight'][None], p[None], q[None])
    for got, want in zip((c1, c2, s1, s2), (permuted[1]['conv1.weight'], permuted[1]['conv2.weight'],
                                            permuted[3]['conv1.weight'], permuted[3]['conv2.weight'])):
        assert torch.equal(got[0], want)


def test_atomic_write_text_bytes_and_permissions(tmp_path):
    utils.atomic_write(str(tmp_path / 'a.txt'), 'text\n')
    utils.atomic_write(str(tmp_path / 'b.bin'), b'\x00\x01')
    assert (tmp_path / 'a.txt').read_text() == 'text\n' and (tmp_path / 'b.bin').read_bytes() == b'\x00\x01'
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / 'a.txt').stat().st_mode & 0o777 == 0o666 & ~umask  # readable like open()'s, not 0600
    with pytest.raises(ZeroDivisionError):
        utils.atomic_write(str(tmp_path / 'a.txt'), lambda f: 1 / 0)
    assert sorted(os.listdir(tmp_path)) == ['a.txt', 'b.bin'] and (tmp_path / 'a.txt').read_text() == 'text\n'
