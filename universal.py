"""The Universal block: one small block used for every network, trained with the translator's functional objective
(losses.FunctionalLoss: match each network's BasicBlock output through its frozen Begin, plus --ce_weight x the
cross-entropy through its Last) on the same training networks. It is the translator that ignores its input: a
translator that does not beat it by two paired standard errors shows no use of the block it reads.

    python universal.py --train_path data/demo/train --train_data_length 224 [--small_block MLPBlock] [--ce_weight 1]

It is made once per training set, size, target and --ce_weight, and kept beside the data, in
<train_path>/universal/<block>_n<N>[_ce<w>].pt (path_for); train.py finds it there and adds the "Universal block"
row to its tables and verdicts. Adam, cosine learning rate, --num_epochs passes over the networks in batches of
--batch_size; the block starts from the target's default initialisation (seeded).
"""
import argparse
import logging
import os
import time

import torch

import loader
import losses
import net
import targets
import utils

FORMAT = 'kt-universal-v1'


def path_for(train_path, block, n, ce_weight=0.0):
    """Where the Universal block of training networks 0..n-1 of train_path, target block, is kept."""
    name = f'{block}_n{n}' + (f'_ce{ce_weight:g}' if ce_weight > 0 else '')
    return os.path.join(train_path, 'universal', name + '.pt')


def load_for(train_path, block, n, ce_weight=0.0):
    """The Universal block's state dict (one block, float32) made for this training set, target and objective (the
    functional term with ce_weight), or None when universal.py has not made it."""
    path = path_for(train_path, block, n, ce_weight)
    if not os.path.exists(path):
        return None
    made = utils.load_file(path, 'Universal block', '; delete it and run universal.py again')
    if not isinstance(made, dict) or made.get('format') != FORMAT or made.get('small_block') != block:
        raise utils.UserError(f'{path}: not a {block} Universal block of universal.py; delete it and run universal.py')
    return made['state']


def get_args(argv=None):
    """The flags, checked."""
    p = argparse.ArgumentParser(description='Train the Universal block (one small block for every network).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--train_path', default='./data/train', help='training pairs (shards or the original layout)')
    p.add_argument('--train_data_length', type=int, default=300000, help='use training networks 0..N-1')
    p.add_argument('--small_block', default=None, choices=tuple(net.SMALL_BLOCKS),
                   help="the block to train; default: the one the data's recipe.json names (SimpleBlock_NoBn if none)")
    p.add_argument('--ce_weight', type=float, default=0.0, help='functional term: plus this x the cross-entropy '
                   'through each network\'s Last (a separate file per value)')
    p.add_argument('--functional_images', type=int, default=32, help='MNIST training images per step')
    p.add_argument('--num_epochs', type=int, default=100, help='passes over the training networks')
    p.add_argument('--batch_size', type=int, default=64, help='networks per step')
    p.add_argument('--lr', type=float, default=1e-2, help='Adam peak learning rate (cosine to 0)')
    p.add_argument('--seed', type=int, default=0, help='seeds the initial block, the order and the images')
    utils.add_shared_flags(p, 'gpu_id', 'device', 'mnist_root')
    p.add_argument('--out', default=None, help='where to write it (default: path_for, where train.py looks)')
    args = p.parse_args(argv)
    for flag in ('train_data_length', 'functional_images', 'num_epochs', 'batch_size', 'lr'):
        if getattr(args, flag) <= 0:
            raise utils.UserError(f'--{flag} must be > 0 (got {getattr(args, flag)})')
    if args.ce_weight < 0:
        raise utils.UserError(f'--ce_weight {args.ce_weight} must be >= 0')
    return args


def train_universal(args, train_set, block, device):
    """One block of `block`'s written tensors trained on every network of train_set; (state dict, last epoch's loss)."""
    convs = [train_set.basic[k].to(device) for k in ('conv1.weight', 'conv2.weight')]
    objective = losses.FunctionalLoss(train_set, convs, args, device, block)
    start = targets.written(block, net.fresh_states(block, [args.seed], device))
    params = [torch.nn.Parameter(t.clone()) for t in start]  # each (1, ...): one block, broadcast to every network
    opt = torch.optim.Adam(params, lr=args.lr)
    n, bs = len(train_set), args.batch_size
    iters = -(-n // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.num_epochs * iters)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for epoch in range(args.num_epochs):
        perm, total = torch.randperm(n, generator=gen, device=device), 0.0
        for i in range(iters):
            idx = perm[i * bs:(i + 1) * bs]
            loss = objective([p.expand(len(idx), *p.shape[1:]) for p in params], idx, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if epoch % max(1, args.num_epochs // 10) == 0 or epoch == args.num_epochs - 1:
            logging.info(f'epoch {epoch}: functional loss {total / iters:.6g}')
    with torch.no_grad():
        state = net.unstack_state(targets.state_of(block, [p.detach() for p in params]), 0)
    return {k: v.cpu() for k, v in state.items()}, total / iters


def main(argv=None):
    args = get_args(argv)
    device = utils.get_device(args.gpu_id, args.device)
    networks = ('begin',) + (('last',) if args.ce_weight > 0 else ())
    train_set = loader.TrainDataset(args.train_path, args.train_data_length, with_networks=networks)
    for block in networks:
        train_set.require(block, 'the functional objective' + ' with --ce_weight > 0' * (block == 'last'))
    block = args.small_block or train_set.small_block or net.DEFAULT_SMALL  # its small blocks are never read
    out = args.out or path_for(args.train_path, block, args.train_data_length, args.ce_weight)
    utils.set_logger(os.path.splitext(out)[0] + '.log')
    logging.info(f'Universal {block} on {len(train_set)} networks of {args.train_path}: {vars(args)}')
    t0 = time.time()
    state, loss = train_universal(args, train_set, block, device)
    utils.atomic_save({'format': FORMAT, 'small_block': block, 'state': state, 'loss': loss,
                       'train_path': args.train_path, 'train_data_length': args.train_data_length,
                       'settings': {k: v for k, v in vars(args).items() if k not in ('out', 'gpu_id', 'device')}}, out)
    logging.info(f'wrote {out} ({time.time() - t0:.0f} s, final functional loss {loss:.6g})')


if __name__ == '__main__':
    utils.run_main(main)
