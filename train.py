"""Train the KT translator: an MLP-Mixer that writes a SimpleBlock_NoBn (or the small block the training data's
recipe names, --small_block) from a BasicBlock's conv weights.

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

Outputs go to a run directory named after the hyper-parameters (runs.py: last.pth, the best translator as the
original names it, <mean>.pth, with <mean>.json beside it, summary.json, train.log, flagfile.txt, metrics.csv...).
"""
import argparse
import logging
import math
import time

import torch
from tqdm import tqdm

import distributed
import evaluate
import loader
import losses
import mixer
import mnist
import net
import runs
import utils
from mixer import NUM_TOKENS
import shards
import universal
from utils import UserError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- flags

def make_parser():
    """The flags in four groups: the original's (its names and defaults), additions that change results,
    system flags (may change on --resume), and research options (off by default)."""
    p = utils.FlagParser(description='Train the Knowledge Translation translator (MLP-Mixer) on MNIST weight pairs.',
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
                        'per epoch), then the scheduler takes over per epoch; at or above --num_epochs the whole '
                        'run is warm-up, as in the original')
    f.add_argument('--warmup_iters', type=int, default=0,
                   help='ignored: the original declares it and overwrites it with warmup x iterations per epoch; '
                        'accepted so that its flagfile.txt replays')
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
    utils.add_shared_flags(s, 'gpu_id', 'device', helps={
        'gpu_id': 'ignored under torchrun: each process takes cuda:LOCAL_RANK',
        'device': "on --resume: the same kind of device as the run, whose random streams are that kind's"})
    s.add_argument('--train_path', default='./data/train', help='training pairs (shards or the original layout)')
    s.add_argument('--val_path', default='./data/val', help='validation networks (shards or the original layout)')
    s.add_argument('--ckpt_path', default='./ckpts/nobn', help='run directories with checkpoints go under this')
    s.add_argument('--log_path', default='./logs/nobn', help='run directories with logs go under this')
    utils.add_shared_flags(s, 'mnist_root')
    s.add_argument('--resume', action='store_true', help='continue the run from its last.pth if there is one')
    s.add_argument('--stop_after_epoch', type=int, default=None,
                   help='stop after this epoch as if killed, leaving last.pth for --resume (for tests)')
    s.add_argument('--compile', nargs='?', const='model', default=None, choices=('model', 'blocks'),
                   help='torch.compile the translator for training: model (bare --compile) as one graph (first '
                        'steps compile: minutes on a CPU), blocks each mixing MLP on its own (its 48 identical blocks '
                        'compile once: seconds); checkpoints hold the plain translator either way')
    s.add_argument('--flagfile', metavar='FILE',
                   help='read flags from FILE, one --flag=value a line (as @FILE; every run writes its own '
                        'flagfile.txt; the lines of absl\'s own flags atop the original\'s are skipped)')
    r = p.add_argument_group('research', 'options beyond the paper, off by default')
    r.add_argument('--perm_aug', action='store_true',
                   help='exact augmentation: per pair per batch, fresh random permutations of the 6 residual '
                        'channels and of the BasicBlock\'s 6 hidden channels, applied to inputs and targets '
                        'before --prob/--noise (the networks\' functions are unchanged)')
    r.add_argument('--canonical_targets', action='store_true',
                   help='train on the canonical form of each target (symmetry.canonical_simple: hidden channels '
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
    r.add_argument('--small_block', default=argparse.SUPPRESS, choices=tuple(net.SMALL_BLOCKS),
                   help='the block the translator writes where the training data does not say (no recipe.json '
                        'and no small blocks); by default the one its recipe.json names, SimpleBlock_NoBn if none')
    r.add_argument('--inputs', default='conv', choices=['conv', 'folded'],
                   help='conv: the BasicBlock\'s two conv weights (the original); folded: its convs with the '
                        'BatchNorm scales folded in, each token with its output channel\'s BatchNorm shift '
                        '(mixer.FunctionTranslator)')
    r.add_argument('--output', default='direct', choices=['direct', 'residual', 'refit'],
                   help='direct: the translator writes the small block; residual / refit: it writes a delta added '
                        'to Weight selection (folded) / (folded, refit), from a zero last layer (untrained, it is '
                        'that baseline)')
    p.system_flags = tuple(a.dest for a in s._group_actions)
    return p


def target_of(args, train_set):
    """The block the translator writes: --small_block, else the training data's (train_set.small_block), else
    SimpleBlock_NoBn. Sets args.small_block when it is not SimpleBlock_NoBn (the original's runs keep their flags
    and run names). A flag that contradicts the small blocks the data holds is refused, except by --loss functional,
    which needs none (they are dropped)."""
    given, data = getattr(args, 'small_block', None), train_set.small_block
    if given and data and given != data and train_set.simple is not None:
        if args.loss != 'functional':
            raise UserError(f'--small_block {given}: {args.train_path} holds {data} small blocks (its recipe.json), '
                            f'which --loss {args.loss} would take as targets; use --loss functional (no targets), or '
                            f'pairs made with construct_train.py --small_block {given}')
        train_set.simple = None  # another block's: no targets, no Mean target row
    target = given or data or net.DEFAULT_SMALL
    if target != net.DEFAULT_SMALL:
        args.small_block = target
    elif given:
        del args.small_block
    losses.target_checks(args, target)
    return target


PARSER = make_parser()
RESUME_FREE_ARGS = PARSER.system_flags  # flags that may differ between a run and its --resume


def get_args(argv=None):
    """Parse the flags (argv: a list, or None for sys.argv)."""
    return PARSER.parse_args(argv)


def check_args(args):
    """Refuse out-of-range flags with a message naming the flag."""
    checks = [
        (0 <= args.prob <= 1, f'--prob {args.prob} must be in [0, 1]'),
        (args.noise >= 0, f'--noise {args.noise} must be >= 0'),
        (args.lr > 0, f'--lr {args.lr} must be > 0'),
        (args.wd >= 0, f'--wd {args.wd} must be >= 0'),
        (args.batch_size > 0, f'--batch_size {args.batch_size} must be > 0'),
        (args.log_step > 0, f'--log_step {args.log_step} must be > 0'),
        (args.num_epochs > 0, f'--num_epochs {args.num_epochs} must be > 0'),
        (args.warmup >= 0, f'--warmup {args.warmup} must be >= 0'),
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
    ]
    for ok, message in checks + losses.flag_checks(args, PARSER.get_default):
        if not ok:
            raise UserError(message)
    parse_scheduler(args.scheduler)
    after_warmup = args.num_epochs - args.warmup  # none: the run is warm-up only and the scheduler never steps
    if args.scheduler == 'cos' and after_warmup > 0 and after_warmup // args.num_cycles < 1:
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


def translator_config(args):
    """MLPMixer keyword arguments from the flags."""
    return dict(num_layers=args.num_layers, S_dim=args.s_dim, C_dim=args.c_dim, hidden_S_dim=args.hidden_s_dim,
                hidden_C_dim=args.hidden_c_dim, dropout=args.dropout)


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

def load_data(args, device, announce=True):
    """(training set, validation set on the device, held-out training networks on the device or None); announce:
    print the original's 'load N training data' and 'load N validation data' lines."""
    for flag, path, kind in (('--train_path', args.train_path, 'train'), ('--val_path', args.val_path, 'val')):
        made = (shards.read_recipe(path) or {}).get('kind', kind)  # the original layout has no recipe.json
        if made != kind:  # training on validation networks, or picking epochs on training ones, leaks
            raise UserError(f'{flag} {path} holds {made} networks (construct_{made}.py); '
                            f'it takes {kind} networks from construct_{kind}.py')
    # the functional term needs each training network's Begin, and its Last only for --ce_weight (7 GB at 300k)
    networks = (('begin',) + (('last',) if args.ce_weight > 0 else ())) if args.loss != 'mse' else ()
    train_set = loader.TrainDataset(args.train_path, args.train_data_length, with_networks=networks)
    losses.check_data(args, train_set)
    if announce:
        print(f'load {len(train_set)} training data')
    val_set = loader.ValDataset(args.val_path, args.val_data_length).to(device)
    if announce:
        print(f'load {len(val_set)} validation data')
    holdout = None
    if args.holdout_networks:
        holdout = loader.TrainDataset(args.train_path, args.holdout_networks, with_networks=True,
                                      start=args.train_data_length).to(device)
        for block in ('begin', 'last'):
            holdout.require(block, '--holdout_networks (held-out networks are scored like validation networks)')
    return train_set, val_set, holdout


def log_setup(args, score, holdout, objective, num_train, cache_time):
    """What a run does beyond the original's: the Begin cache, the held-out selection, the functional term's size."""
    if score.begin_out is not None:
        log.info(f'the validation networks\' Begin outputs on the test images cached in {cache_time:.1f} s')
    if holdout:
        log.info(f'the best epoch is picked on {len(holdout)} held-out training networks '
                 f'({args.train_data_length}..{args.train_data_length + len(holdout) - 1}), not on the val networks')
    if objective.functional:  # measured on CPU: about 12 activations of (images, networks, 6, 14, 14) at the peak
        gib = 12 * args.functional_images * min(args.batch_size, num_train) * net.FEATURE_NUMEL * 4 / 2 ** 30
        log.info(f'functional term: {args.functional_images} MNIST training images per step through each of up to '
                 f'{args.batch_size} networks: about {gib:.1f} GiB of activations per step')


# ---------------------------------------------------------------------------------------- main

def main(argv=None):
    """Train the translator; SIGTERM / SIGINT or a failed write stop it with one line (runs.stopping)."""
    with runs.stopping(argv):
        return run_training(argv)


def run_training(argv=None):
    args = get_args(argv)
    absl_flags = PARSER.ignored  # an original flagfile.txt's lines of absl itself, logged once the log is open
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
    train_set, val_set, holdout = load_data(args, device, ctx.is_main)
    target = target_of(args, train_set)
    objective = losses.Objective(args, train_set, device, target)
    made = universal.load_for(args.train_path, target, args.train_data_length, args.ce_weight)
    images, labels = mnist.load_mnist(args.mnist_root, train=False)
    images, labels = images[:args.num_test_images].to(device), labels[:args.num_test_images].to(device)
    load_time, t0 = time.time() - t0, time.time()
    score = evaluate.Scorer(images, labels, val_set.begin, val_set.last, ctx)
    score_holdout = evaluate.Scorer(images, labels, holdout.begin, holdout.last, ctx) if holdout else None
    cache_time = time.time() - t0

    # Run directory, logs, and the state of a killed run.
    run = runs.Run(args, PARSER.get_default, RESUME_FREE_ARGS, ctx.is_main)
    fingerprint = runs.data_fingerprint(train_set, val_set, holdout)
    state = run.resume_state(fingerprint, device)
    run.open(ctx, state)
    if absl_flags:
        log.info(f"flagfile: ignored absl's own flags, which set no run setting: {' '.join(absl_flags)}")
    log.info(f'{len(train_set)} training pairs ({train_set.layout}) from {args.train_path}, '
             f'{len(val_set)} validation networks ({val_set.layout}) from {args.val_path}, '
             f'{len(images)} test images; loaded in {load_time:.1f} s')
    log_setup(args, score, holdout, objective, len(train_set), cache_time)
    refs = evaluate.run_references(score, val_set, objective, args, state, made)  # measured once per run

    kt = mixer.kt_of(args.inputs, args.output)
    model = mixer.build_translator(config, kt, target).to(device)
    # what the checkpoints and JSONs record beside the config: the research options and a target not the original's
    extra = {**({'kt': kt} if kt else {}), **({'target': target} if target != net.DEFAULT_SMALL else {})}
    ctx.seed_rank(args.seed)
    log.info(f'translator: {config}{f", {extra}" if extra else ""}, {net.num_params(model):,} parameters')
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    n, bs = len(train_set), args.batch_size
    iters = math.ceil(n / bs)  # the original's len(DataLoader): the last batch may be short
    evaluation = evaluate.BestEpoch(score, val_set, bs, score_holdout, holdout, state)
    start_epoch, metrics, stopped = 0, [], False
    if state is not None:
        start_epoch, metrics = run.restore(state, config, model, optimizer, scheduler, gen, ctx)
    train_model = ctx.wrap(model, args.amp, args.compile)  # model itself outside torchrun, without --amp/--compile
    run.start(metrics, start_epoch)

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
            message += evaluation(model, epoch, row)
        log.info(message + f'  [{time.time() - t0:.1f} s]')
        metrics.append(row)
        rng = dict(runs.rng_state(gen, device), **ctx.rng_states())  # every rank: a collective under torchrun
        run.end_epoch(metrics, optimizer.param_groups[0]['lr'], {
            'config': config, **extra, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch + 1,
            'scheduler': scheduler.state_dict() if scheduler is not None else None, 'metrics': metrics,
            **evaluation.state(), 'refs': refs, 'rng': rng, 'data': fingerprint, 'args': vars(args)})
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            log.info(f'--stop_after_epoch {args.stop_after_epoch}: stopping; continue with --resume')
            stopped = True
            break
    run.close()
    if stopped or not ctx.is_main:
        return ctx.close()

    best = evaluation.best
    best_step = (best['epoch'] + 1) * iters
    best_path = run.save_best(best['model'], evaluation.best_val(), {
        'config': config, **extra, 'epoch': best['epoch'], 'step': best_step, 'mean_acc': evaluation.best_val(),
        'args': vars(args)})
    final = {**refs, 'KT (best)': best['accs'], 'KT (last)': evaluation.last_accs}
    run.write_summary({
        'run': run.name, 'checkpoint': best_path, 'config': config, **extra, 'best_epoch': best['epoch'],
        'best_step': best_step, 'steps_per_epoch': iters, 'num_epochs': args.num_epochs,
        'selection': f'holdout {len(holdout)}' if holdout else 'val', 'num_val': len(val_set),
        'num_test_images': len(images), 'train_pairs': len(train_set),
        'rows': {name: evaluate.acc_row(accs) for name, accs in final.items()}})
    evaluation.log_final(final, best_path, best_step)
    ctx.close()


if __name__ == '__main__':
    utils.run_main(main)
