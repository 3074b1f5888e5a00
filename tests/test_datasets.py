"""TrainDataset / ValDataset: both layouts, the item API, stacked attributes and clear errors."""
import os
import shutil

import pytest
import torch

import loader
import shards
from conftest import write_original, write_shards
from utils import UserError

pytestmark = pytest.mark.usefixtures('one_thread')


def test_train_shards_items_and_attributes(tmp_path):
    pairs = write_shards(tmp_path, 10, shard_size=4, seed=5)
    ds = loader.TrainDataset(str(tmp_path), 9)
    assert len(ds) == 9 and ds.layout == 'shards' and ds.recipe is not None
    assert ds.basic['conv1.weight'].shape == (9, 6, 6, 3, 3) and ds.basic['conv1.weight'].is_contiguous()
    assert ds.simple['conv2.weight'].shape == (9, 6, 3, 3, 3)
    assert ds.begin is None and ds.last is None  # training never needs them
    torch.testing.assert_close(ds.acc_small, pairs['acc_small'][:9])
    inputs, targets = ds[6]  # crosses the first shard boundary
    assert len(inputs) == 10 and len(targets) == 2
    for got, key in zip(inputs, loader.BASIC_KEYS):
        assert torch.equal(got, pairs['basic'][key][6])
    assert torch.equal(targets[0], pairs['simple']['conv1.weight'][6])
    assert torch.equal(targets[1], pairs['simple']['conv2.weight'][6])
    full = loader.TrainDataset(str(tmp_path), 10, with_networks=True)
    assert torch.equal(full.last['fc.weight'], pairs['last']['fc.weight'])


def test_val_shards_items(pair_sets):
    ds = loader.ValDataset(pair_sets['val'], 3)
    begin, inputs, last = ds[2]
    assert set(begin) >= {'conv.weight', 'bn.running_var'} and set(last) >= {'fc.weight', 'downsample.weight'}
    assert torch.equal(begin['conv.weight'], ds.begin['conv.weight'][2])
    assert torch.equal(inputs[1], ds.basic['conv2.weight'][2]) and len(inputs) == 10
    assert ds.simple is not None  # retrained small blocks ('simple' in the shards)


def test_original_layout_train_and_val(tmp_path):
    train_pairs = write_original(tmp_path / 'train', 4, 'train', seed=3)
    val_pairs = write_original(tmp_path / 'val', 3, 'val', seed=4)
    ds = loader.TrainDataset(str(tmp_path / 'train'), 4, with_networks=True)
    assert ds.layout == 'original' and ds.acc_small is None
    for block in ('basic', 'simple', 'begin', 'last'):
        for key, t in getattr(ds, block).items():
            assert torch.equal(t, train_pairs[block][key]), (block, key)
    inputs, targets = ds[1]
    assert torch.equal(inputs[4], train_pairs['basic']['bn1.running_mean'][1])
    assert torch.equal(targets[1], train_pairs['simple']['conv2.weight'][1])
    val = loader.ValDataset(str(tmp_path / 'val'), 3)
    assert val.layout == 'original' and val.simple is None
    begin, inputs, last = val[0]
    assert torch.equal(last['fc.bias'], val_pairs['last']['fc.bias'][0])
    assert torch.equal(inputs[0], val_pairs['basic']['conv1.weight'][0])


def test_to_moves_every_tensor(pair_sets):
    ds = loader.ValDataset(pair_sets['val'], 3).to('meta')
    tensors = [t for b in ('begin', 'basic', 'last', 'simple') for t in getattr(ds, b).values()]
    tensors += [ds.acc_large, ds.acc_small]
    assert all(t.device.type == 'meta' for t in tensors)


def test_too_many_pairs_says_how_many(pair_sets, tmp_path):
    with pytest.raises(UserError, match='asked for 13 pairs .* but 12 exist'):
        loader.TrainDataset(pair_sets['train'], 13)
    write_original(tmp_path, 2, 'val')
    with pytest.raises(UserError, match='but 2 exist; missing indices: 2-4'):
        loader.ValDataset(str(tmp_path), 5)


def test_missing_indices_are_listed(tmp_path):
    write_shards(tmp_path / 's', 12, shard_size=4)
    os.remove(shards.shard_path(str(tmp_path / 's'), 4, 8))
    with pytest.raises(UserError, match='missing indices: 4-7'):
        loader.TrainDataset(str(tmp_path / 's'), 12)
    write_original(tmp_path / 'o', 4, 'train')
    os.remove(tmp_path / 'o' / 'labels' / '2.pth')
    with pytest.raises(UserError, match=r'labels: .*missing indices: 2$'):
        loader.TrainDataset(str(tmp_path / 'o'), 4)


def test_corrupt_file_is_named(tmp_path):
    write_shards(tmp_path / 's', 8, shard_size=4)
    bad = shards.shard_path(str(tmp_path / 's'), 4, 8)
    with open(bad, 'wb') as f:
        f.write(b'not a torch file')
    with pytest.raises(UserError, match=bad):
        loader.TrainDataset(str(tmp_path / 's'), 8)
    write_original(tmp_path / 'o', 3, 'val')
    bad = str(tmp_path / 'o' / 'complex' / '1.pth')
    with open(bad, 'wb') as f:
        f.write(b'\x00' * 10)
    with pytest.raises(UserError, match=bad):
        loader.ValDataset(str(tmp_path / 'o'), 3)


def test_overlapping_shards_are_read_once(tmp_path, caplog):
    root = tmp_path / 's'
    whole = write_shards(root, 8, shard_size=4)
    part = shards._slice_shard(shards.load_shard(shards.shard_path(str(root), 4, 8)), 0, 2)
    part['index'] = torch.arange(2, 4)  # networks 2..3 made a second time (other values: which copy is read shows)
    shards.write_shard(str(root), part)
    for _ in range(2):
        data = loader.TrainDataset(str(root), 8)
        assert torch.equal(data.basic['conv1.weight'], whole['basic']['conv1.weight'])  # the shard starting first
    warned = [r.getMessage() for r in caplog.records if 'more than once' in r.getMessage()]
    assert len(warned) == 1 and 'indices 2-3' in warned[0] and 'shard_00000002_00000004.pt' in warned[0]


def test_renamed_shard_and_corrupt_recipe_are_named(tmp_path):
    root = tmp_path / 's'
    write_shards(root, 8, shard_size=4)
    shutil.copy(shards.shard_path(str(root), 0, 4), shards.shard_path(str(root), 4, 8))  # networks 0..3 as 4..7
    with pytest.raises(UserError, match='its networks are not 4..7 as its name says'):
        loader.TrainDataset(str(root), 8)
    (root / 'recipe.json').write_text('{"seed": ')
    with pytest.raises(UserError, match='recipe.json: not a readable recipe'):
        loader.TrainDataset(str(root), 4)


def test_empty_or_wrong_folders(tmp_path):
    with pytest.raises(UserError, match='no pairs there'):
        loader.TrainDataset(str(tmp_path), 1)
    write_original(tmp_path / 'o', 2, 'train')  # a train layout is not a val set
    with pytest.raises(UserError, match='no pairs there'):
        loader.ValDataset(str(tmp_path / 'o'), 2)
    # labels that are not SimpleBlock_NoBn: a BasicBlock in their place
    for i in range(2):
        torch.save(torch.load(tmp_path / 'o' / 'inputs' / f'{i}.pth', weights_only=True),
                   tmp_path / 'o' / 'labels' / f'{i}.pth')
    with pytest.raises(UserError, match=r'simple "conv1.weight" has shape \(6, 6, 3, 3\), expected \(3, 6, 3, 3\)'):
        loader.TrainDataset(str(tmp_path / 'o'), 2)


def test_train_set_without_small_blocks(tmp_path):
    write_shards(tmp_path, 4, simple=False)
    ds = loader.TrainDataset(str(tmp_path), 4)
    assert ds.simple is None and ds.basic['conv1.weight'].shape[0] == 4
    with pytest.raises(UserError, match='no small blocks .* MSE targets .*--skip_simple'):
        ds[0]


def test_reading_from_a_start_index(tmp_path):
    """Held-out networks (train.py --holdout_networks) are read as pairs start .. start + num - 1, in both layouts."""
    pairs = write_shards(tmp_path / 'shards', 10, shard_size=4, seed=5)
    ds = loader.TrainDataset(str(tmp_path / 'shards'), 5, with_networks=True, start=3)  # across two shard boundaries
    assert len(ds) == 5 and ds.start == 3
    for block in ('basic', 'simple', 'begin', 'last'):
        for key, t in getattr(ds, block).items():
            assert torch.equal(t, pairs[block][key][3:8]), (block, key)
    torch.testing.assert_close(ds.acc_small, pairs['acc_small'][3:8])
    original = write_original(tmp_path / 'original', 6, 'train', seed=3)
    ds = loader.TrainDataset(str(tmp_path / 'original'), 2, start=4)
    assert torch.equal(ds.basic['conv2.weight'], original['basic']['conv2.weight'][4:6])
    with pytest.raises(UserError, match=r'asked for 3 pairs \(8\.\.10\) but 10 exist; missing indices: 10'):
        loader.TrainDataset(str(tmp_path / 'shards'), 3, start=8)
