"""Compress one trained network with a trained translator: BasicBlock in, SimpleBlock_NoBn (or the small block the
translator was trained to write: its JSON's "target") out.

    python translate.py --ckpt T.pth --complex basic.pth --out simple.pth [--begin begin.pth --last last.pth]
    python translate.py --ckpt T.pth --data_root data/val --index 7 --out simple.pth

--ckpt is train.py's best translator (a plain state dict, with its configuration in the <same stem>.json
beside it; older runs: one dict {'config', 'model', ...}) or a bare state dict of the original implementation
(then --num_layers/--s_dim/--c_dim/--hidden_s_dim/--hidden_c_dim give the configuration, defaulting to
train.py's). With --begin and --last it also prints the MNIST test accuracy of the network
before (BasicBlock) and after (translated SimpleBlock_NoBn) compression. --data_root/--index take the whole
network from a dataset of construct_train.py or construct_val.py instead (shards or the original layout) and
also score the dataset's own small block when it has one (the pair's target, or the retrained block).
"""
import argparse
import inspect
import os

import torch

import evaluate
import loader
import mnist
import mixer
import net
import runs
import utils
from mixer import MLPMixer, config_from_state_dict
import original_layout
from utils import UserError

# flag -> (MLPMixer keyword, its default: the same as train.py's flag)
SIZE_FLAGS = {flag: (kw, inspect.signature(MLPMixer).parameters[kw].default) for flag, kw in
              (('num_layers', 'num_layers'), ('s_dim', 'S_dim'), ('c_dim', 'C_dim'),
               ('hidden_s_dim', 'hidden_S_dim'), ('hidden_c_dim', 'hidden_C_dim'))}


def get_args(argv=None):
    """Parse the flags."""
    p = argparse.ArgumentParser(description='Translate a BasicBlock state dict into a small block\'s (SimpleBlock_NoBn '
                                            'or the target the translator writes).')
    p.add_argument('--ckpt', required=True, help="translator: train.py's checkpoint or the original's state dict")
    p.add_argument('--complex', help='BasicBlock state dict (the original format)')
    p.add_argument('--out', required=True, help='where to write the small block\'s state dict')
    p.add_argument('--small_block', default=None, choices=tuple(net.SMALL_BLOCKS),
                   help='the block a bare state dict writes (default SimpleBlock_NoBn); checked against a train.py '
                        'checkpoint, which records it')
    p.add_argument('--begin', help='BeginBlock state dict of the same network (with --last: report accuracy)')
    p.add_argument('--last', help='LastBlock state dict of the same network')
    p.add_argument('--data_root', help='instead of --complex/--begin/--last: a dataset of construct_train.py or '
                                       'construct_val.py, whose network --index is translated and scored')
    p.add_argument('--index', type=int, default=None, help='which network of --data_root')
    for flag, (_, default) in SIZE_FLAGS.items():
        p.add_argument(f'--{flag}', type=int, default=None,
                       help=f'translator size for a bare state dict (default {default}); '
                            'checked against a train.py checkpoint')
    utils.add_shared_flags(p, 'device', 'gpu_id', 'mnist_root')
    p.add_argument('--num_test_images', type=int, default=10000, help='score on the first N test images (for tests)')
    args = p.parse_args(argv)
    if (args.complex is None) == (args.data_root is None):
        raise UserError('give the block to translate either as --complex FILE or as --data_root DIR --index I')
    if args.data_root is not None and (args.index is None or args.begin or args.last):
        raise UserError('--data_root takes --index I (which network) and no --begin/--last: they come from the dataset')
    if args.data_root is None and args.index is not None:
        raise UserError('--index I picks a network of --data_root DIR; with --complex it has no meaning')
    if args.index is not None and args.index < 0:
        raise UserError(f'--index {args.index} must be >= 0')
    if (args.begin is None) != (args.last is None):
        raise UserError('--begin and --last go together: give both to measure the accuracy, or neither')
    if not 1 <= args.num_test_images <= 10000:
        raise UserError(f'--num_test_images {args.num_test_images} must be in [1, 10000]')
    return args


def flags_of(config):
    """A translator configuration written as the size flags."""
    return ' '.join(f'--{flag} {config[kw]}' for flag, (kw, _) in SIZE_FLAGS.items())


def load_translator(args):
    """The translator of --ckpt, in eval mode; a UserError if the weights do not fit the configuration."""
    ckpt = utils.load_file(args.ckpt, 'translator checkpoint')
    asked = getattr(args, 'small_block', None)  # callers with the size flags only ask for nothing
    given = {kw: getattr(args, flag) for flag, (kw, _) in SIZE_FLAGS.items() if getattr(args, flag) is not None}
    bare = isinstance(ckpt, dict) and ckpt and all(isinstance(t, torch.Tensor) for t in ckpt.values())
    meta = runs.read_meta(args.ckpt) if bare else None
    if meta is not None or (isinstance(ckpt, dict) and 'config' in ckpt and 'model' in ckpt):
        config, state = (dict(meta['config']), ckpt) if meta is not None else (dict(ckpt['config']), ckpt['model'])
        kt = (meta or ckpt).get('kt')  # train.py --inputs/--output, when not the original's
        target = (meta or ckpt).get('target', net.DEFAULT_SMALL)
        if asked not in (None, target):
            raise UserError(f'{args.ckpt} is a translator writing {target} blocks, but --small_block asks for '
                            f'{asked}; drop the flag')
        clash = [f'--{flag} {getattr(args, flag)}' for flag, (kw, _) in SIZE_FLAGS.items()
                 if kw in given and config.get(kw) != given[kw]]
        if clash:
            raise UserError(f'{args.ckpt} is a translator with {flags_of(config)}, but the flags ask for '
                            f'{" ".join(clash)}; drop the size flags')
    elif bare:
        config = {kw: default for _, (kw, default) in SIZE_FLAGS.items()}
        config.update(given, dropout=0.)
        state, kt, target = ckpt, None, asked or net.DEFAULT_SMALL
    else:
        raise UserError(f'{args.ckpt}: neither a translator state dict (train.py\'s or the original\'s) nor an '
                        f'older train.py checkpoint (dict with "config" and "model")')
    model = mixer.build_translator(config, kt, target)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError):
        try:
            hint = f'; its shapes say {flags_of(config_from_state_dict(state))}'
        except (KeyError, IndexError, AttributeError):
            hint = ' (it is not an MLPMixer translator)'
        raise UserError(f'{args.ckpt}: weights do not fit a translator with {flags_of(config)} writing {target} '
                        f'blocks{hint}') from None
    return model.eval()


def load_block(path, block, what):
    """A state dict that must load strictly into net.BLOCKS[block]; a UserError naming the file otherwise."""
    sd = utils.load_file(path, what)
    module = net.BLOCKS[block]()
    if not isinstance(sd, dict):
        raise UserError(f'{path}: not a state dict ({what})')
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f'{path}: not a {type(module).__name__} state dict of this repository\'s MNIST network '
                        f'({" ".join(str(e).split())[:300]})') from None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def read_network(root, index):
    """Network `index` of a dataset as plain float32 state dicts: begin, basic, last, and simple if it has one."""
    if os.path.isdir(os.path.join(root, original_layout.ORIGINAL_DIRS['train']['basic'])):  # the original train layout
        data = loader.TrainDataset(root, 1, with_networks=True, start=index)
        data.require('begin', f'scoring network {index}')  # optional in a training set, ValDataset requires them
        data.require('last', f'scoring network {index}')
    else:  # shards of either kind, or the original val layout
        data = loader.ValDataset(root, 1, start=index)
    return {name: net.unstack_state(getattr(data, name), 0)
            for name in ('begin', 'basic', 'last', 'simple') if getattr(data, name) is not None}


def main(argv=None):
    args = get_args(argv)
    model = load_translator(args)
    if args.data_root is not None:
        network = read_network(args.data_root, args.index)
    else:
        network = {'basic': load_block(args.complex, 'basic', 'BasicBlock')}
        if args.begin is not None:
            network['begin'] = load_block(args.begin, 'begin', 'BeginBlock')
            network['last'] = load_block(args.last, 'last', 'LastBlock')
    if 'begin' in network:  # a bad --device or --mnist_root fails before --out is written
        device = utils.get_device(args.gpu_id, args.device)
        torch.backends.cudnn.allow_tf32 = False  # scored in float32, as train.py does without --tf32
        images, labels = mnist.load_mnist(args.mnist_root, train=False)
    basic = network['basic']
    translated = evaluate.translate_blocks(model, {k: t[None] for k, t in basic.items()})
    simple = {k: t[0].contiguous() for k, t in translated.items()}
    net.SMALL_BLOCKS[model.target]().load_state_dict(simple, strict=True)  # the original format, by construction
    utils.atomic_save(simple, args.out)
    print(f'wrote {args.out}: {model.target}, ' + ', '.join(f'{k} {tuple(t.shape)}' for k, t in simple.items()
                                                             if t.is_floating_point()))
    if 'begin' not in network:
        return
    images, labels = images[:args.num_test_images].to(device), labels[:args.num_test_images].to(device)
    blocks = dict(network, translated=simple)
    stacked = {name: {k: v[None].to(device) for k, v in sd.items()} for name, sd in blocks.items()}
    score = evaluate.Scorer(images, labels, stacked['begin'], stacked['last'])
    accs = {name: score(stacked[name], 'basic' if name == 'basic' else 'simple')[0].item()
            for name in ('basic', 'translated', 'simple') if name in stacked}
    line = (f'test accuracy on {len(images)} MNIST test images: large (BasicBlock) {accs["basic"]:.2f}%, '
            f'compressed (translated {model.target}) {accs["translated"]:.2f}%')
    if 'simple' in accs:
        line += f', the dataset\'s own {net.small_block_of(network["simple"])} {accs["simple"]:.2f}%'
    print(line)


if __name__ == '__main__':
    utils.run_main(main)
