"""Train the KT translator: an MLP-Mixer that writes a SimpleBlock_NoBn from a BasicBlock's conv weights.

The original README's command runs verbatim:
    python train.py --gpu_id 0 \\
                    --optimizer adam --lr 0.001 --batch_size 4096 \\
                    --wd 0. --scheduler cos --warmup 0 --grad_clip -1. \\
                    --num_layers 24 --s_dim 72 --c_dim 128 --hidden_s_dim 256 --hidden_c_dim 512 \\
                    --mask_target t --prob 0. \\
                    --noise_target t --noise 0. \\
                    --dropout 0.1 \\
                    --num_epochs 1000 --log_step 25 --train_data_length 300000
Several processes: `torchrun --nproc_per_node N train.py <the same flags>` (distributed.py): --batch_size
stays the global batch. A run is repeated with `python train.py @<log dir>/flagfile.txt`.

Outputs go to a run directory named after the hyper-parameters (run_name):
    <ckpt_path>/<run>/  last.pth (resume state, every epoch), <best mean acc>.pth (the best translator,
                        at the end), summary.json (accuracy rows for report.py)
    <log_path>/<run>/   train.log (our lines and the original's), flagfile.txt, args.json, metrics.csv,
                        TensorBoard events (if installed; the original's tags Loss, Lr, Mean_Accuracy)

summary.json: {"run", "checkpoint" (path of the best translator), "config" (MLPMixer kwargs), "kt" (only with
--inputs/--output beyond the original: {"inputs", "output"}, also in the checkpoints), "best_epoch",
"best_step", "steps_per_epoch", "num_epochs", "selection" ("val" or "holdout <N>"), "num_val",
"num_test_images", "train_pairs", "rows": {name: {"mean", "min", "max", "histogram" (20 counts, 5% bins),
"accs" (per val network)}}} with rows "Large (BasicBlock)", "Random Init", "Mean target" (if the train set
has small blocks), "Mean canonical target" (with --canonical_targets), "Weight selection", "Weight selection
(folded)", "Weight selection (folded, refit)", "Retrained" (if the
val set has retrained small blocks), "KT (best)", "KT (last)"; accuracies in % on the MNIST test set.
"""
import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import distributed
import evaluate
import loader
import losses
import mnist
import net
import utils
import mixer
from mixer import NUM_TOKENS
from utils import UserError

log = logging.getLogger(__name__)
METRICS = ('epoch', 'loss', 'lr', 'mean', 'min', 'max')
BEST_NAME = re.compile(r'\d+\.\d\d\.pth')  # <best val mean accuracy>.pth


# ---------------------------------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    """argparse that reads every number form absl accepted as a value (`--grad_clip -1.`, `-.5`, `-1e-3`),
    and `@file` / `--flagfile file` with one `--flag=value` a line (blank lines and # comments skipped)."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars='@', **kwargs)
        self._negative_number_matcher = re.compile(r'^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$')

    def convert_arg_line_to_args(self, line):
        line = line.strip()
        return [] if not line or line.startswith('#') else [line]

    def parse_args(self, args=None, namespace=None):
        args, out = list(sys.argv[1:] if args is None else args), []
        while args:  # --flagfile FILE and --flagfile=FILE mean @FILE
            a = args.pop(0)
            if a == '--flagfile' and args:
                a = '@' + args.pop(0)
            elif a.startswith('--flagfile='):
                a = '@' + a.split('=', 1)[1]
            out.append(a)
        return super().parse_args(out, namespace)


def make_parser():
    """The flags in four groups: the original's (its names and defaults), additions that change results,
    system flags (may change on --resume), and research options (off by default)."""
    p = Parser(description='Train the Knowledge Translation translator (MLP-Mixer) on MNIST weight pairs.',
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f = p.add_argument_group('faithful', "the original train.py's flags and defaults")
    f.add_argument('--num_epochs', type=int, default=300, help='training epochs')
    f.add_argument('--log_step', type=int, default=25, help='evaluate every log_step epochs (and at the last one)')
    f.add_argument('--optimizer', default='adam', choices=['adam', 'sgd'], help='sgd uses momentum 0.9')
    f.add_argument('--lr', type=float, default=0.001, help='peak learning rate')
    f.add_argument('--wd', type=float, default=0., help='weight decay')
    f.add_argument('--grad_clip', type=float, default=-1, help='clip the global gradient norm to this if > 0')
    f.add_argument('--warmup', type=int, default=0,
                   help='epochs of linear warm-up: iteration j (from 0) runs at lr x j / (warmup x iterations '
                        'per epoch), then the scheduler takes over per epoch')
    f.add_argument('--batch_size', type=int, default=4096, help='pairs per step')
    f.add_argument('--scheduler', default='cos',
                   help='after warm-up, stepped once per epoch: cos, linear, constant, or reduce_<factor> '
                        '(reduce-on-plateau of the epoch loss, patience 2, e.g. reduce_0.5)')
    f.add_argument('--mask_target', default='t', choices=['t', 's', 'both'],
                   help='tensors --prob masks: t = translator inputs, s = targets')
    f.add_argument('--prob', type=float, default=0., help='zero each element with this probability')
    f.add_argument('--noise_target', default='t', choices=['t', 's', 'both'], help='tensors --noise perturbs')
    f.add_argument('--noise', type=float, default=0., help='std of Gaussian noise added')
    f.add_argument('--num_layers', type=int, default=24, help='Mixer layers of the translator')
    f.add_argument('--s_dim', type=int, default=72, help='number of tokens; must be 72')
    f.add_argument('--c_dim', type=int, default=128, help='channels per token (9 taps mapped to this)')
    f.add_argument('--hidden_s_dim', type=int, default=256, help='hidden width of token mixing')
    f.add_argument('--hidden_c_dim', type=int, default=512, help='hidden width of channel mixing')
    f.add_argument('--dropout', type=float, default=0., help='dropout in the Mixer MLPs')
    f.add_argument('--train_data_length', type=int, default=300000, help='use training pairs 0..N-1')
    f.add_argument('--num_cycles', type=int, default=1, help='cos: T_max = (num_epochs - warmup) // num_cycles')
    e = p.add_argument_group('extended', 'beyond the original; they change the results')
    e.add_argument('--seed', type=int, default=0, help='seeds the translator init, shuffling and augmentation')
    e.add_argument('--val_data_length', type=int, default=100, help='use validation networks 0..N-1')
    e.add_argument('--num_test_images', type=int, default=10000,
                   help='score on the first N MNIST test images only (for quick tests; the paper uses all 10000)')
    e.add_argument('--holdout_networks', type=int, default=0,
                   help='pick the best epoch on training networks train_data_length .. +N-1, held out from '
                        'training, instead of on the validation networks (the original picks on the validation '
                        'networks); N=0: the original')
    e.add_argument('--tf32', action='store_true',
                   help='CUDA: TF32 matmuls and cuDNN convolutions (faster, lower precision); without it both '
                        'stay float32')
    e.add_argument('--amp', default='none', choices=['none', 'bf16'],
                   help='bf16: the training forward under torch.autocast to bfloat16 (CUDA; CPU autocast is '
                        'allowed too, but only CPUs with bf16 units gain), loss in float32; evaluation stays '
                        'float32')
    s = p.add_argument_group('system', 'where and how the run executes; these may change on --resume')
    s.add_argument('--gpu_id', type=int, default=0, metavar='K',
                   help='GPU to use: with CUDA_VISIBLE_DEVICES unset, sets it to K and uses cuda:0 (as the '
                        'original); when it is already set (SLURM, ...), the K-th GPU it makes visible (cuda:K). '
                        'Ignored under torchrun (each process takes cuda:LOCAL_RANK)')
    s.add_argument('--device', default=None,
                   help='e.g. cpu, cuda, cuda:1; None: CUDA if present, else CPU (on --resume: the same kind of '
                        'device as the run, whose random streams are that kind\'s)')
    s.add_argument('--train_path', default='./data/train', help='training pairs (shards or the original layout)')
    s.add_argument('--val_path', default='./data/val', help='validation networks (shards or the original layout)')
    s.add_argument('--ckpt_path', default='./ckpts/nobn', help='run directories with checkpoints go under this')
    s.add_argument('--log_path', default='./logs/nobn', help='run directories with logs go under this')
    s.add_argument('--mnist_root', default='data', help='folder holding MNIST/raw/')
    s.add_argument('--resume', action='store_true', help='continue the run from its last.pth if there is one')
    s.add_argument('--stop_after_epoch', type=int, default=None,
                   help='stop after this epoch as if killed, leaving last.pth for --resume (for tests)')
    s.add_argument('--compile', nargs='?', const='model', default=None, choices=('model', 'blocks'),
                   help='torch.compile the translator for training: model (bare --compile) as one graph (first '
                        'steps compile: minutes on a CPU), blocks each mixing MLP on its own (its 48 identical blocks '
                        'compile once: seconds); checkpoints hold the plain translator either way')
    s.add_argument('--flagfile', metavar='FILE',
                   help='read flags from FILE, one --flag=value a line (as @FILE; every run writes its own '
                        'flagfile.txt)')
    r = p.add_argument_group('research', 'options beyond the paper, off by default')
    r.add_argument('--perm_aug', action='store_true',
                   help='exact augmentation: per pair per batch, fresh random permutations of the 6 residual '
                        'channels and of the BasicBlock\'s 6 hidden channels, applied to inputs and targets '
                        'before --prob/--noise (the networks\' functions are unchanged)')
    r.add_argument('--canonical_targets', action='store_true',
                   help='train on the canonical form of each target (net.canonical_simple: hidden channels '
                        'rescaled to unit conv1 norm and put in a fixed order; the same function)')
    r.add_argument('--hidden_invariant_loss', action='store_true',
                   help='weight MSE against the best of the 3! orders of the target\'s hidden channels')
    r.add_argument('--loss', default='mse', choices=['mse', 'functional', 'mse+functional'],
                   help='mse: the faithful weight MSE; functional: the translated block must reproduce the '
                        'BasicBlock\'s output on MNIST training images through each network\'s frozen Begin '
                        '(no small blocks needed: works on construct_train.py --skip_simple data); '
                        'mse+functional: both. The functional term costs --batch_size networks x '
                        '--functional_images images of 6x14x14 activations per step')
    r.add_argument('--functional_weight', type=float, default=1.0,
                   help='--loss mse+functional: weight of the functional term against the weight MSE')
    r.add_argument('--ce_weight', type=float, default=0.0,
                   help='functional term: plus this x the cross-entropy of Begin -> translated block -> Last')
    r.add_argument('--functional_images', type=int, default=64,
                   help='functional term: MNIST training images per step (fresh each step, shared by the networks)')
    r.add_argument('--inputs', default='conv', choices=['conv', 'folded'],
                   help='conv: the BasicBlock\'s two conv weights (the original); folded: its convs with the '
                        'BatchNorm scales folded in, each token with its output channel\'s BatchNorm shift '
                        '(mixer.FunctionTranslator)')
    r.add_argument('--output', default='direct', choices=['direct', 'residual'],
                   help='direct: the translator writes the small block; residual: it writes a delta added to '
                        'Weight selection (folded), from a zero last layer (untrained, it is that baseline)')
    p.system_flags = tuple(a.dest for a in s._group_actions)
    return p


PARSER = make_parser()
RESUME_FREE_ARGS = PARSER.system_flags  # flags that may differ between a run and its --resume


def get_args(argv=None):
    """Parse the flags (argv: a list, or None for sys.argv)."""
    return PARSER.parse_args(argv)


def check_args(args):
    """Refuse out-of-range flags with a message naming the flag."""
    default = PARSER.get_default
    functional_flags = ('functional_weight', 'ce_weight', 'functional_images')
    checks = [
        (0 <= args.prob <= 1, f'--prob {args.prob} must be in [0, 1]'),
        (args.noise >= 0, f'--noise {args.noise} must be >= 0'),
        (args.lr > 0, f'--lr {args.lr} must be > 0'),
        (args.wd >= 0, f'--wd {args.wd} must be >= 0'),
        (args.batch_size > 0, f'--batch_size {args.batch_size} must be > 0'),
        (args.log_step > 0, f'--log_step {args.log_step} must be > 0'),
        (args.num_epochs > 0, f'--num_epochs {args.num_epochs} must be > 0'),
        (0 <= args.warmup < args.num_epochs, f'--warmup {args.warmup} must be in [0, num_epochs)'),
        (args.num_cycles >= 1, f'--num_cycles {args.num_cycles} must be >= 1'),
        (args.s_dim == NUM_TOKENS, f'--s_dim {args.s_dim} must be {NUM_TOKENS}: the translator reads 36 + 36 '
                                   f'(out, in) kernel tokens of the two BasicBlock convs'),
        (min(args.c_dim, args.hidden_s_dim, args.hidden_c_dim) >= 1,
         '--c_dim, --hidden_s_dim and --hidden_c_dim must be >= 1'),
        (args.num_layers >= 0, f'--num_layers {args.num_layers} must be >= 0'),
        (0 <= args.dropout < 1, f'--dropout {args.dropout} must be in [0, 1)'),
        (args.train_data_length >= 1, f'--train_data_length {args.train_data_length} must be >= 1'),
        (args.val_data_length >= 1, f'--val_data_length {args.val_data_length} must be >= 1'),
        (1 <= args.num_test_images <= 10000, f'--num_test_images {args.num_test_images} must be in [1, 10000]'),
        (args.holdout_networks >= 0, f'--holdout_networks {args.holdout_networks} must be >= 0'),
        (args.functional_weight >= 0, f'--functional_weight {args.functional_weight} must be >= 0'),
        (args.ce_weight >= 0, f'--ce_weight {args.ce_weight} must be >= 0'),
        (args.functional_images >= 1, f'--functional_images {args.functional_images} must be >= 1'),
        (args.loss != 'mse' or all(getattr(args, k) == default(k) for k in functional_flags),
         '--functional_weight, --ce_weight and --functional_images set the functional term: use them with '
         '--loss functional or mse+functional'),
        (args.loss != 'functional' or args.functional_weight == default('functional_weight'),
         '--functional_weight weighs the functional term against the weight MSE of --loss mse+functional; '
         'with --loss functional it is the only term'),
        (args.output != 'residual' or not args.canonical_targets,
         '--output residual adds its delta to Weight selection (folded), whose hidden channels are not in the '
         'canonical form of --canonical_targets; use --output direct with it'),
        (args.loss != 'functional' or not (args.hidden_invariant_loss or args.canonical_targets),
         '--hidden_invariant_loss and --canonical_targets change the weight MSE, which --loss functional '
         'does not have'),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    parse_scheduler(args.scheduler)
    if args.scheduler == 'cos' and (args.num_epochs - args.warmup) // args.num_cycles < 1:
        raise UserError(f'--num_cycles {args.num_cycles} leaves a cosine period (num_epochs - warmup) // num_cycles '
                        f'of 0 epochs; use fewer cycles or more epochs')


def parse_scheduler(name):
    """('cos' | 'linear' | 'constant', None) or ('reduce', factor); a UserError for anything else."""
    if name in ('cos', 'linear', 'constant'):
        return name, None
    if name.startswith('reduce_'):
        try:
            factor = float(name[len('reduce_'):])
        except ValueError:
            factor = None
        if factor is not None and 0 < factor < 1:
            return 'reduce', factor
        raise UserError(f'--scheduler {name}: reduce_<factor> needs a factor in (0, 1), e.g. reduce_0.5')
    raise UserError(f'--scheduler {name}: unknown; use cos, linear, constant or reduce_<factor>')


def run_name(args):
    """optimisation / architecture / data sub-directories, e.g.
    adam_lr0.001_bs4096_wd0_clip-1_cos_wu0_cyc1_ep300/L24_S72_C128_hs256_hc512_do0/mask-t0_noise-t0_n300000_seed0"""
    return os.path.join(
        f'{args.optimizer}_lr{args.lr:g}_bs{args.batch_size}_wd{args.wd:g}_clip{args.grad_clip:g}_{args.scheduler}'
        f'_wu{args.warmup}_cyc{args.num_cycles}_ep{args.num_epochs}',
        f'L{args.num_layers}_S{args.s_dim}_C{args.c_dim}_hs{args.hidden_s_dim}_hc{args.hidden_c_dim}'
        f'_do{args.dropout:g}',
        f'mask-{args.mask_target}{args.prob:g}_noise-{args.noise_target}{args.noise:g}'
        f'_n{args.train_data_length}_seed{args.seed}' + research_suffix(args))


def research_suffix(args):
    """What non-default options beyond the original add to the last sub-directory: nothing for the original's
    runs, else _val<N>, _test<N>, _tf32, _bf16, _hold<N>, _perm, _canon, _hinv, with a functional term
    _<loss>-w<functional_weight>-ce<ce_weight>-img<functional_images>, e.g. _perm_functional-w1-ce0-img64, and
    _in-folded, _out-residual."""
    default = PARSER.get_default
    parts = ([f'val{args.val_data_length}'] if args.val_data_length != default('val_data_length') else []) + \
        ([f'test{args.num_test_images}'] if args.num_test_images != default('num_test_images') else []) + \
        (['tf32'] if args.tf32 else []) + ([args.amp] if args.amp != 'none' else []) + \
        ([f'hold{args.holdout_networks}'] if args.holdout_networks else []) + \
        (['perm'] if args.perm_aug else []) + (['canon'] if args.canonical_targets else []) + \
        (['hinv'] if args.hidden_invariant_loss else [])
    if args.loss != 'mse':
        parts.append(f'{args.loss}-w{args.functional_weight:g}-ce{args.ce_weight:g}-img{args.functional_images}')
    parts += ([f'in-{args.inputs}'] if args.inputs != default('inputs') else []) + \
        ([f'out-{args.output}'] if args.output != default('output') else [])
    return ''.join('_' + p for p in parts)


def translator_config(args):
    """MLPMixer keyword arguments from the flags."""
    return dict(num_layers=args.num_layers, S_dim=args.s_dim, C_dim=args.c_dim, hidden_S_dim=args.hidden_s_dim,
                hidden_C_dim=args.hidden_c_dim, dropout=args.dropout)


def translator_kt(args):
    """--inputs / --output as mixer.build_translator's kt (None for the original translator)."""
    kt = {'inputs': args.inputs, 'output': args.output}
    return None if kt == mixer.DEFAULT_KT else kt


def flagfile_text(args):
    """The flags of a run, one --flag=value a line (switches that are on as --flag), for @flagfile.txt."""
    lines = []
    for key, value in sorted(vars(args).items()):
        if key in ('flagfile', 'resume', 'stop_after_epoch') or value is None or value is False:
            continue  # the file repeats the run from its start
        lines.append(f'--{key}' if value is True else f'--{key}={value}')
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------- optimisation

def make_optimizer(model, args):
    """Adam, or SGD with momentum 0.9; both with weight decay --wd."""
    if args.optimizer == 'adam':
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.wd)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)


def make_scheduler(optimizer, args):
    """The per-epoch scheduler that takes over after warm-up; None for constant."""
    kind, factor = parse_scheduler(args.scheduler)
    epochs = args.num_epochs - args.warmup
    if kind == 'cos':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs // args.num_cycles)
    if kind == 'linear':
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=epochs, power=1.0)
    if kind == 'reduce':
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='min', factor=factor, patience=2)
    return None


def step_scheduler(scheduler, epoch_loss):
    """One per-epoch step; reduce-on-plateau watches the epoch's summed loss."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(epoch_loss)
    elif scheduler is not None:
        scheduler.step()


def warmup_lr(args, step, iters):
    """The original's warm-up: lr x min(step, W) / W at iteration `step` (from 0), W = warmup x iters."""
    total = args.warmup * iters
    return args.lr * min(step, total) / total


def set_lr(optimizer, lr):
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group['lr'] = lr


def train_step(model, optimizer, objective, batch, gen, weight=1.0, grad_clip=-1.):
    """One optimiser step of `model` (as wrapped by distributed.Context.wrap) on `batch`; the loss, detached.
    weight scales this rank's loss so that DDP's gradient average is that of the global batch mean."""
    loss = objective.loss(model(batch.inputs), batch, gen)
    if weight != 1:
        loss = loss * weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(distributed.unwrap(model).parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------- data, logs, checkpoints

def load_data(args, device):
    """(training set, validation set on the device, held-out training networks on the device or None)."""
    for flag, path, kind in (('--train_path', args.train_path, 'train'), ('--val_path', args.val_path, 'val')):
        made = (loader.read_recipe(path) or {}).get('kind', kind)  # the original layout has no recipe.json
        if made != kind:  # training on validation networks, or picking epochs on training ones, leaks
            raise UserError(f'{flag} {path} holds {made} networks (construct_{made}.py); '
                            f'it takes {kind} networks from construct_{kind}.py')
    # the functional term needs each training network's Begin, and its Last only for --ce_weight (7 GB at 300k)
    networks = (('begin',) + (('last',) if args.ce_weight > 0 else ())) if args.loss != 'mse' else ()
    train_set = loader.TrainDataset(args.train_path, args.train_data_length, with_networks=networks)
    losses.check_data(args, train_set)
    val_set = loader.ValDataset(args.val_path, args.val_data_length).to(device)
    holdout = None
    if args.holdout_networks:
        holdout = loader.TrainDataset(args.train_path, args.holdout_networks, with_networks=True,
                                      start=args.train_data_length).to(device)
        for block in ('begin', 'last'):
            holdout.require(block, '--holdout_networks (held-out networks are scored like validation networks)')
    return train_set, val_set, holdout


def write_metrics(path, rows):
    """Rewrite metrics.csv atomically with all rows so far (plus a 'holdout' column with --holdout_networks)."""
    text = io.StringIO()
    w = csv.DictWriter(text, METRICS + tuple(k for k in rows[0] if k not in METRICS) if rows else METRICS)
    w.writeheader()
    w.writerows(rows)
    utils.atomic_write(path, text.getvalue())


def tensorboard_writer(log_dir, start_epoch):
    """A SummaryWriter if tensorboard is installed, else None (it is never a dependency). TensorBoard hides the
    directory's earlier events from start_epoch on: a rerun of the same flags or a resumed run shows each epoch once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir, purge_step=start_epoch)


def rng_state(gen, device):
    """Every random state a resumed run needs: torch's (dropout, init), CUDA's, and the batch generator's."""
    state = {'torch': torch.get_rng_state(), 'gen': gen.get_state(), 'gen_device': device.type}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, gen, device):
    """Restore rng_state()."""
    torch.set_rng_state(state['torch'])
    gen.set_state(state['gen'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def data_fingerprint(train_set, val_set, holdout=None):
    """Counts and float64 sums of the blocks a run reads (training pairs and their targets, held-out and
    validation networks): what a resumed run checks so that it reads the data it started on (folders may move)."""
    def total(*sets):
        return sum(t.sum(dtype=torch.float64).item() for s in sets if s is not None
                   for blocks in (s.basic, s.simple) if blocks is not None for t in blocks.values())
    return {'train': [len(train_set) + (len(holdout) if holdout else 0), total(train_set, holdout)],
            'val': [len(val_set), total(val_set)]}


def load_resume_state(args, path, fingerprint, device):
    """last.pth of the run when --resume finds one, else None; refused if written with other flags or data,
    or on another kind of device."""
    if not (args.resume and os.path.exists(path)):
        return None
    state = utils.load_file(path, 'resume checkpoint', '; delete it to start the run afresh')
    changed = {k: (v, getattr(args, k, None)) for k, v in state['args'].items()
               if k not in RESUME_FREE_ARGS and getattr(args, k, None) != v}
    if changed:
        raise UserError(f'{path} was written with other flags (stored vs given: {changed}); '
                        f'resume with the same flags or drop --resume')
    for split, flag in (('train', '--train_path'), ('val', '--val_path')):
        (n0, s0), (n1, s1) = state.get('data', fingerprint)[split], fingerprint[split]
        if n0 != n1 or not math.isclose(s0, s1, rel_tol=1e-9, abs_tol=1e-6):
            raise UserError(f'{path}: the run was started on other {split} networks than {flag} '
                            f'{getattr(args, flag[2:])} holds now; point {flag} at the data it started on, '
                            f'or drop --resume')
    made_on = state['rng'].get('gen_device', device.type)
    if made_on != device.type:
        raise UserError(f'{path}: the run was started on a {made_on} device and its random streams continue only '
                        f'there; resume with --device {made_on}')
    return state


def open_run(args, ctx, ckpt_dir, log_dir):
    """Make the run directories, start train.log, and write the flags (args.json, flagfile.txt)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    utils.set_logger(os.path.join(log_dir, 'train.log'))
    log.info(f'flags: {json.dumps(vars(args), sort_keys=True)}')
    log.info(f'run directory: {ckpt_dir} (logs: {log_dir}); device {ctx.device}')
    if ctx.distributed:
        log.info(f'torchrun: {ctx.world} processes ({torch.distributed.get_backend()}); each takes its share of '
                 f'every global batch of {args.batch_size} pairs and of the val networks')
    utils.atomic_write(os.path.join(log_dir, 'args.json'), json.dumps(vars(args), indent=1, sort_keys=True))
    utils.atomic_write(os.path.join(log_dir, 'flagfile.txt'), flagfile_text(args))


def log_scalars(writer, row, lr, epoch):
    """The original's TensorBoard scalars: Loss, Lr (after the epoch's scheduler step), Mean_Accuracy."""
    if writer is None:
        return
    writer.add_scalar('Loss', row['loss'], epoch)
    writer.add_scalar('Lr', lr, epoch)
    if row['mean'] != '':
        writer.add_scalar('Mean_Accuracy', row['mean'], epoch)


def log_original(prefix, accs):
    """The original train.py's accuracy line and its 'Accuracy Distribution' line."""
    log.info(evaluate.original_line(prefix, accs))
    log.info(f'Accuracy Distribution {utils.acc_histogram(accs)}')


# ---------------------------------------------------------------------------------------- main

def main(argv=None):
    args = get_args(argv)
    check_args(args)
    config = translator_config(args)
    ctx = distributed.setup(args.device, args.gpu_id)  # rank 0 of 1 outside torchrun
    device = ctx.device
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    # torch's default lets cuDNN convolutions (scoring, the functional loss's networks) use TF32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)

    # Data first, so that bad input fails before a run directory is made. Everything stays on the
    # device; a batch is an index lookup into these tensors.
    t0 = time.time()
    train_set, val_set, holdout = load_data(args, device)
    objective = losses.Objective(args, train_set, device)
    images, labels = mnist.load_mnist(args.mnist_root, train=False)
    images, labels = images[:args.num_test_images].to(device), labels[:args.num_test_images].to(device)
    load_time, t0 = time.time() - t0, time.time()
    score = evaluate.Scorer(images, labels, val_set.begin, val_set.last, ctx)
    score_holdout = evaluate.Scorer(images, labels, holdout.begin, holdout.last, ctx) if holdout else None
    cache_time = time.time() - t0

    # Run directory, logs, and the state of a killed run.
    run = run_name(args)
    ckpt_dir, log_dir = os.path.join(args.ckpt_path, run), os.path.join(args.log_path, run)
    last_path = os.path.join(ckpt_dir, 'last.pth')
    fingerprint = data_fingerprint(train_set, val_set, holdout)
    state = load_resume_state(args, last_path, fingerprint, device)
    if ctx.is_main:  # under torchrun only rank 0 logs and writes files
        open_run(args, ctx, ckpt_dir, log_dir)
    if args.resume and state is None:
        log.info(f'--resume: no {last_path} yet, starting afresh')
    elif not args.resume and os.path.exists(last_path):
        log.info(f'note: overwriting the earlier run in {ckpt_dir} (pass --resume to continue it instead)')
    log.info(f'{len(train_set)} training pairs ({train_set.layout}) from {args.train_path}, '
             f'{len(val_set)} validation networks ({val_set.layout}) from {args.val_path}, '
             f'{len(images)} test images; loaded in {load_time:.1f} s')
    if score.begin_out is not None:
        log.info(f'the validation networks\' Begin outputs on the test images cached in {cache_time:.1f} s')
    if holdout:
        log.info(f'the best epoch is picked on {len(holdout)} held-out training networks '
                 f'({args.train_data_length}..{args.train_data_length + len(holdout) - 1}), not on the val networks')
    if objective.functional:  # measured on CPU: about 12 activations of (images, networks, 6, 14, 14) at the peak
        gib = 12 * args.functional_images * min(args.batch_size, len(train_set)) * net.FEATURE_NUMEL * 4 / 2 ** 30
        log.info(f'functional term: {args.functional_images} MNIST training images per step through each of up to '
                 f'{args.batch_size} networks: about {gib:.1f} GiB of activations per step')

    # Reference rows, measured once per run (a resumed run reads them back).
    if state is not None:
        refs = state['refs']
    else:
        t0 = time.time()
        refs = evaluate.reference_rows(score, val_set, objective.raw_targets, args.seed)
        if args.canonical_targets:
            refs['Mean canonical target'] = score(evaluate.mean_block(objective.targets, len(val_set)))
        log.info(f'reference rows measured in {time.time() - t0:.1f} s')
    for name, accs in refs.items():
        evaluate.log_row(name, accs)
    log_original('Random Init', refs['Random Init'])

    kt = translator_kt(args)
    model = mixer.build_translator(config, kt).to(device)
    ctx.seed_rank(args.seed)
    log.info(f'translator: {config}{f", {kt}" if kt else ""}, {net.num_params(model):,} parameters')
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    n, bs = len(train_set), args.batch_size
    iters = math.ceil(n / bs)
    stopped, start_epoch, metrics, last_accs = False, 0, [], None
    best = {'mean': -1.0, 'epoch': -1, 'model': None, 'accs': None}  # picked on --holdout_networks, else on val
    if state is not None:
        if state['config'] != config:
            raise UserError(f'{last_path}: translator {state["config"]} differs from the flags ({config})')
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None:
            scheduler.load_state_dict(state['scheduler'])
        start_epoch, best, metrics, last_accs = state['epoch'], state['best'], state['metrics'], state['last_accs']
        set_rng_state(state['rng'], gen, device)
        ctx.restore_rng(state['rng'], args.seed)
        log.info(f'resumed from {last_path} at epoch {start_epoch}, best mean so far {best["mean"]:.2f}')
    train_model = ctx.wrap(model, args.amp, args.compile)  # model itself outside torchrun, without --amp/--compile
    metrics_path = os.path.join(log_dir, 'metrics.csv')
    if ctx.is_main:
        write_metrics(metrics_path, metrics)
    writer = tensorboard_writer(log_dir, start_epoch) if ctx.is_main else None

    for epoch in range(start_epoch, args.num_epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no per-step sync
        for it in tqdm(range(iters), desc=f'epoch {epoch}', leave=False, disable=None if ctx.is_main else True):
            if epoch < args.warmup:
                set_lr(optimizer, warmup_lr(args, epoch * iters + it, iters))
            batch = objective.batch(perm[it * bs:(it + 1) * bs], gen)
            part, weight = ctx.share(len(batch.idx))  # this rank's share of the global batch (all of it)
            loss_sum += train_step(train_model, optimizer, objective, batch.take(part), gen, weight, args.grad_clip)
        epoch_loss = ctx.mean(loss_sum).item()
        lr = optimizer.param_groups[0]['lr']  # the lr of the epoch's last step
        if epoch < args.warmup:
            set_lr(optimizer, warmup_lr(args, (epoch + 1) * iters, iters))
        else:
            step_scheduler(scheduler, epoch_loss)
        row = {'epoch': epoch, 'loss': epoch_loss / iters, 'lr': lr, 'mean': '', 'min': '', 'max': '',
               **({'holdout': ''} if holdout else {})}
        log.info(f'Epoch {epoch}, Loss: {row["loss"]:.6f}')
        message = f'epoch {epoch}/{args.num_epochs}: loss {row["loss"]:.6g}  lr {lr:.3g}'
        if (epoch % args.log_step == 0 and epoch != 0) or epoch == args.num_epochs - 1:
            middle = evaluate.translate_blocks(model, val_set.basic, bs)
            last_accs = score(middle)
            row.update(mean=last_accs.mean().item(), min=last_accs.min().item(), max=last_accs.max().item())
            log_original(f'Epoch {epoch}', last_accs)
            pick = row['mean']
            if holdout:
                pick = score_holdout(evaluate.translate_blocks(model, holdout.basic, bs)).mean().item()
                row['holdout'] = pick
                message += f'  held-out mean {pick:.2f}'
            if pick > best['mean']:
                best = {'mean': pick, 'epoch': epoch, 'accs': last_accs,
                        'model': {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                # the original's line, with the val mean as there
                log.info(f'Update Best Mean Accuracy {row["mean"]:.2f}%' +
                         (f' (picked on the held-out mean {pick:.2f}%)' if holdout else ''))
            message += (f'  test acc {utils.acc_summary(last_accs)}  (best {"held-out " if holdout else ""}mean '
                        f'{best["mean"]:.2f} at {best["epoch"]})')
            message += f'\n  counts per 5% bin: {utils.acc_histogram(last_accs)}'
        log.info(message + f'  [{time.time() - t0:.1f} s]')
        metrics.append(row)
        log_scalars(writer, row, optimizer.param_groups[0]['lr'], epoch)
        rng = dict(rng_state(gen, device), **ctx.rng_states())  # every rank: a collective under torchrun
        if ctx.is_main:
            write_metrics(metrics_path, metrics)
            utils.atomic_save({'config': config, **({'kt': kt} if kt else {}), 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                               'scheduler': scheduler.state_dict() if scheduler is not None else None,
                               'epoch': epoch + 1, 'best': best, 'metrics': metrics, 'last_accs': last_accs,
                               'refs': refs, 'rng': rng, 'data': fingerprint, 'args': vars(args)}, last_path)
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            log.info(f'--stop_after_epoch {args.stop_after_epoch}: stopping; continue with --resume')
            stopped = True
            break
    if writer is not None:
        writer.close()
    if stopped or not ctx.is_main:
        return ctx.close()

    best_val = best['accs'].mean().item()
    best_path = os.path.join(ckpt_dir, f'{best_val:.2f}.pth')
    utils.atomic_save({'config': config, **({'kt': kt} if kt else {}), 'model': best['model'], 'epoch': best['epoch'],
                       'mean_acc': best_val, 'args': vars(args)}, best_path)
    for name in os.listdir(ckpt_dir):  # an earlier run of these flags left its best translator here
        if BEST_NAME.fullmatch(name) and name != os.path.basename(best_path):
            os.remove(os.path.join(ckpt_dir, name))
            log.info(f'removed {name}, the best translator of an earlier run in {ckpt_dir}')
    final = {**refs, 'KT (best)': best['accs'], 'KT (last)': last_accs}
    summary = {'run': run, 'checkpoint': best_path, 'config': config, **({'kt': kt} if kt else {}),
               'best_epoch': best['epoch'],
               'best_step': (best['epoch'] + 1) * iters, 'steps_per_epoch': iters, 'num_epochs': args.num_epochs,
               'selection': f'holdout {len(holdout)}' if holdout else 'val', 'num_val': len(val_set),
               'num_test_images': len(images), 'train_pairs': len(train_set),
               'rows': {name: evaluate.acc_row(accs) for name, accs in final.items()}}
    utils.atomic_write(os.path.join(ckpt_dir, 'summary.json'), json.dumps(summary, indent=1))
    log.info(f'Best Mean Accuracy {best_val:.2f}%' + (f' (picked on the held-out mean {best["mean"]:.2f}%)'
                                                      if holdout else ''))
    log.info(f'Accuracy Distribution {utils.acc_histogram(best["accs"])}')
    log.info(f'summary (test accuracy in %, {len(val_set)} validation networks):')
    for name, accs in final.items():
        evaluate.log_row(name, accs)
    log.info(f'best translator (epoch {best["epoch"]}, step {summary["best_step"]}, val mean {best_val:.2f}) '
             f'saved to {best_path}')
    ctx.close()


if __name__ == '__main__':
    utils.run_main(main)
