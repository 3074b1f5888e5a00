"""Train the KT translator: an MLP-Mixer that writes a SimpleBlock_NoBn from a BasicBlock's conv weights.

The original README's command runs as is:
    python train.py --gpu_id 0 --num_epochs 1000 --batch_size 4096 --lr 1e-3 --optimizer adam --log_step 10 \
        --train_data_length 300000 --num_layers 24 --scheduler cos --mask_target t --prob 0.

Outputs go to a run directory named after the hyper-parameters (see run_name):
    <ckpt_path>/<run>/  last.pth (resume state, every epoch), <best mean acc>.pth (the best translator,
                        at the end), summary.json (accuracy rows for later scripts)
    <log_path>/<run>/   train.log, args.json (the flags), metrics.csv, TensorBoard events (if installed)

summary.json: {"run", "checkpoint" (path of the best translator), "config" (MLPMixer kwargs), "best_epoch",
"num_epochs", "num_val", "num_test_images", "train_pairs", "rows": {name: {"mean", "min", "max",
"histogram" (20 counts, 5% bins), "accs" (per val network)}}} with rows "Large (BasicBlock)", "Random Init",
"Mean target", "Weight selection", "Retrained" (if the val set has retrained small blocks), "KT (best)",
"KT (last)"; accuracies in % on the MNIST test set.
"""
import argparse
import csv
import json
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import loader
import net
import utils
from mixer import NUM_TOKENS, MLPMixer
from utils import UserError

log = logging.getLogger(__name__)
RESUME_FREE_ARGS = ('resume', 'stop_after_epoch', 'device', 'gpu_id', 'mnist_root', 'train_path', 'val_path')
METRICS = ('epoch', 'loss', 'lr', 'mean', 'min', 'max')


def get_args(argv=None):
    """Parse the flags: the original train.py's names and defaults first, then the additions."""
    p = argparse.ArgumentParser(description='Train the Knowledge Translation translator (MLP-Mixer) on MNIST '
                                            'weight pairs.', formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--gpu_id', type=int, default=0, help='GPU to use when CUDA is present')
    p.add_argument('--num_epochs', type=int, default=300, help='training epochs')
    p.add_argument('--log_step', type=int, default=25, help='evaluate every log_step epochs (and at the last one)')
    p.add_argument('--optimizer', default='adam', choices=['adam', 'sgd'], help='sgd uses momentum 0.9')
    p.add_argument('--lr', type=float, default=0.001, help='peak learning rate')
    p.add_argument('--wd', type=float, default=0., help='weight decay')
    p.add_argument('--grad_clip', type=float, default=-1, help='clip the global gradient norm to this if > 0')
    p.add_argument('--warmup', type=int, default=0, help='epochs of per-iteration linear lr warm-up')
    p.add_argument('--batch_size', type=int, default=4096, help='pairs per step')
    p.add_argument('--scheduler', default='cos',
                   help='after warm-up, stepped once per epoch: cos, linear, constant, or reduce_<factor> '
                        '(reduce-on-plateau of the epoch loss, patience 2, e.g. reduce_0.5)')
    p.add_argument('--mask_target', default='t', choices=['t', 's', 'both'],
                   help='tensors --prob masks: t = translator inputs, s = targets')
    p.add_argument('--prob', type=float, default=0., help='zero each element with this probability')
    p.add_argument('--noise_target', default='t', choices=['t', 's', 'both'], help='tensors --noise perturbs')
    p.add_argument('--noise', type=float, default=0., help='std of Gaussian noise added')
    p.add_argument('--ckpt_path', default='./ckpts/nobn', help='run directories with checkpoints go under this')
    p.add_argument('--log_path', default='./logs/nobn', help='run directories with logs go under this')
    p.add_argument('--train_path', default='./data/train', help='training pairs (shards or the original layout)')
    p.add_argument('--val_path', default='./data/val', help='validation networks (shards or the original layout)')
    p.add_argument('--num_layers', type=int, default=24, help='Mixer layers of the translator')
    p.add_argument('--s_dim', type=int, default=72, help='number of tokens; must be 72')
    p.add_argument('--c_dim', type=int, default=128, help='channels per token (9 taps mapped to this)')
    p.add_argument('--hidden_s_dim', type=int, default=256, help='hidden width of token mixing')
    p.add_argument('--hidden_c_dim', type=int, default=512, help='hidden width of channel mixing')
    p.add_argument('--dropout', type=float, default=0., help='dropout in the Mixer MLPs')
    p.add_argument('--train_data_length', type=int, default=300000, help='use training pairs 0..N-1')
    p.add_argument('--num_cycles', type=int, default=1, help='cos: T_max = (num_epochs - warmup) // num_cycles')
    # beyond the original
    p.add_argument('--device', default=None, help='e.g. cpu, cuda, cuda:1; None: CUDA if present, else CPU')
    p.add_argument('--seed', type=int, default=0, help='seeds the translator init, shuffling and augmentation')
    p.add_argument('--resume', action='store_true', help="continue the run from its last.pth if there is one")
    p.add_argument('--val_data_length', type=int, default=100, help='use validation networks 0..N-1')
    p.add_argument('--mnist_root', default='data', help='folder holding MNIST/raw/')
    p.add_argument('--num_test_images', type=int, default=10000,
                   help='score on the first N MNIST test images only (for quick tests; the paper uses all 10000)')
    p.add_argument('--tf32', action='store_true',
                   help='CUDA: TF32 matmuls (about 1.85x faster steps on an H200, lower precision than the fp32 '
                        'the paper used)')
    p.add_argument('--stop_after_epoch', type=int, default=None,
                   help='stop after this epoch as if killed, leaving last.pth for --resume (for tests)')
    return p.parse_args(argv)


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
        (0 <= args.warmup < args.num_epochs, f'--warmup {args.warmup} must be in [0, num_epochs)'),
        (args.num_cycles >= 1, f'--num_cycles {args.num_cycles} must be >= 1'),
        (args.s_dim == NUM_TOKENS, f'--s_dim {args.s_dim} must be {NUM_TOKENS}: the translator reads 36 + 36 '
                                   f'(out, in) kernel tokens of the two BasicBlock convs'),
        (min(args.c_dim, args.hidden_s_dim, args.hidden_c_dim) >= 1, '--c_dim, --hidden_s_dim and --hidden_c_dim '
                                                                     'must be >= 1'),
        (args.num_layers >= 0, f'--num_layers {args.num_layers} must be >= 0'),
        (0 <= args.dropout < 1, f'--dropout {args.dropout} must be in [0, 1)'),
        (args.train_data_length >= 1, f'--train_data_length {args.train_data_length} must be >= 1'),
        (args.val_data_length >= 1, f'--val_data_length {args.val_data_length} must be >= 1'),
        (1 <= args.num_test_images <= 10000, f'--num_test_images {args.num_test_images} must be in [1, 10000]'),
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
        f'_n{args.train_data_length}_seed{args.seed}')


def translator_config(args):
    """MLPMixer keyword arguments from the flags."""
    return dict(num_layers=args.num_layers, S_dim=args.s_dim, C_dim=args.c_dim, hidden_S_dim=args.hidden_s_dim,
                hidden_C_dim=args.hidden_c_dim, dropout=args.dropout)


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


def warmup_lr(args, epoch, it, iters):
    """Linear warm-up: iteration it of epoch epoch reaches --lr at the last warm-up iteration."""
    return args.lr * (epoch * iters + it + 1) / (args.warmup * iters)


def perturb(tensors, prob, noise, gen):
    """Zero each element with probability prob, then add N(0, noise^2); fresh draws from gen."""
    out = []
    for t in tensors:
        if prob > 0:
            t = t * (torch.rand(t.shape, generator=gen, device=t.device) >= prob)
        if noise > 0:
            t = t + noise * torch.randn(t.shape, generator=gen, device=t.device)
        out.append(t)
    return out


def augment(inputs, targets, args, gen):
    """Apply --prob to the --mask_target tensors and --noise to the --noise_target ones."""
    on_t = {'t': True, 's': False, 'both': True}
    on_s = {'t': False, 's': True, 'both': True}
    inputs = perturb(inputs, args.prob * on_t[args.mask_target], args.noise * on_t[args.noise_target], gen)
    targets = perturb(targets, args.prob * on_s[args.mask_target], args.noise * on_s[args.noise_target], gen)
    return inputs, targets


def mse_loss(outputs, targets):
    """Mean over the two conv tensors of their MSE."""
    return (F.mse_loss(outputs[0], targets[0]) + F.mse_loss(outputs[1], targets[1])) / 2


@torch.no_grad()
def translate(model, conv1, conv2, batch_size=4096):
    """Eval-mode translation of stacked BasicBlock convs into a stacked SimpleBlock_NoBn state."""
    was_training = model.training
    model.eval()
    outs = [model([conv1[i:i + batch_size], conv2[i:i + batch_size]]) for i in range(0, len(conv1), batch_size)]
    model.train(was_training)
    return {'conv1.weight': torch.cat([o[0] for o in outs]), 'conv2.weight': torch.cat([o[1] for o in outs])}


def eval_chunks(device):
    """(images, networks) per forward of net.stacked_accuracy. Measured for 100 networks x 10000 images:
    on an H200, 10 networks x 1000 images takes 0.13 s (0.6 GiB) against 0.32 s for a per-network
    module loop and 0.11 s at best with 5 GiB chunks; on CPU grouped convolutions are about 2x slower
    than that loop, so there one network at a time (as fast as the loop)."""
    return (1000, 10) if device.type == 'cuda' else (500, 1)


def acc_row(accs):
    """A summary row: mean/min/max, the 20-bin histogram and the per-network accuracies (in %)."""
    accs = torch.as_tensor(accs, dtype=torch.float64).cpu()
    return {'mean': accs.mean().item(), 'min': accs.min().item(), 'max': accs.max().item(),
            'histogram': utils.acc_histogram(accs), 'accs': [round(a, 4) for a in accs.tolist()]}


def log_row(name, accs):
    """Log one accuracy row and its distribution."""
    log.info(f'{name:>17}: {utils.acc_summary(accs)}  (n={len(accs)})')
    log.info(f'{"":>17}  counts per 5% bin: {utils.acc_histogram(accs)}')


def write_metrics(path, rows):
    """Rewrite metrics.csv atomically with all rows so far."""
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, METRICS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def tensorboard_writer(log_dir):
    """A SummaryWriter if tensorboard is installed, else None (it is never a dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def rng_state(gen, device):
    """Every random state a resumed run needs: torch's (dropout, init), CUDA's, and the batch generator's."""
    state = {'torch': torch.get_rng_state(), 'gen': gen.get_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, gen, device):
    """Restore rng_state()."""
    torch.set_rng_state(state['torch'])
    gen.set_state(state['gen'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    config = translator_config(args)
    device = utils.get_device(args.gpu_id, args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    # Data first, so that bad input fails before a run directory is made. Everything stays on the
    # device; a batch is an index lookup into these tensors.
    t0 = time.time()
    train_set = loader.TrainDataset(args.train_path, args.train_data_length)
    train_set.require('simple', 'the MSE targets of training')
    val_set = loader.ValDataset(args.val_path, args.val_data_length).to(device)
    images, labels = loader.load_mnist(args.mnist_root, train=False)
    images, labels = images[:args.num_test_images].to(device), labels[:args.num_test_images].to(device)
    x1, x2 = (train_set.basic[k].to(device) for k in ('conv1.weight', 'conv2.weight'))
    y1, y2 = (train_set.simple[k].to(device) for k in ('conv1.weight', 'conv2.weight'))
    v1, v2 = val_set.basic['conv1.weight'], val_set.basic['conv2.weight']
    load_time = time.time() - t0

    run = run_name(args)
    ckpt_dir, log_dir = os.path.join(args.ckpt_path, run), os.path.join(args.log_path, run)
    last_path = os.path.join(ckpt_dir, 'last.pth')
    state = None
    if args.resume and os.path.exists(last_path):
        state = utils.load_file(last_path, 'resume checkpoint', '; delete it to start the run afresh')
        changed = {k: (v, getattr(args, k, None)) for k, v in state['args'].items()
                   if k not in RESUME_FREE_ARGS and getattr(args, k, None) != v}
        if changed:
            raise UserError(f'{last_path} was written with other flags (stored vs given: {changed}); '
                            f'resume with the same flags or drop --resume')
    os.makedirs(ckpt_dir, exist_ok=True)
    utils.set_logger(os.path.join(log_dir, 'train.log'))
    log.info(f'flags: {json.dumps(vars(args), sort_keys=True)}')
    log.info(f'run directory: {ckpt_dir} (logs: {log_dir}); device {device}')
    with open(os.path.join(log_dir, 'args.json'), 'w') as f:
        json.dump(vars(args), f, indent=1, sort_keys=True)
    if args.resume and state is None:
        log.info(f'--resume: no {last_path} yet, starting afresh')
    elif not args.resume and os.path.exists(last_path):
        log.info(f'note: overwriting the earlier run in {ckpt_dir} (pass --resume to continue it instead)')
    log.info(f'{len(train_set)} training pairs ({train_set.layout}) from {args.train_path}, '
             f'{len(val_set)} validation networks ({val_set.layout}) from {args.val_path}, '
             f'{len(images)} test images; loaded in {load_time:.1f} s')

    chunk_images, chunk_nets = eval_chunks(device)

    def score(middle, kind='simple'):
        """Test accuracies (%) of every val network with `middle` between its own Begin and Last."""
        return net.stacked_accuracy(images, labels, val_set.begin, middle, val_set.last, kind,
                                    chunk_images, chunk_nets).cpu()

    # Reference rows, measured once per run (a resumed run reads them back).
    if state is not None:
        refs = state['refs']
    else:
        t0 = time.time()
        n_val = len(val_set)
        seeds = [utils.seed_for(args.seed, 'random_init', i) for i in range(n_val)]
        refs = {'Large (BasicBlock)': score(val_set.basic, 'basic'),
                'Random Init': score(net.fresh_states('simple', seeds, device)),
                'Mean target': score({k: y.mean(0, keepdim=True).expand(n_val, *y.shape[1:])
                                      for k, y in (('conv1.weight', y1), ('conv2.weight', y2))}),
                'Weight selection': score({'conv1.weight': v1[:, :3], 'conv2.weight': v2[:, :, :3]})}
        if val_set.simple is not None:
            refs['Retrained'] = score(val_set.simple)
        log.info(f'reference rows measured in {time.time() - t0:.1f} s')
    for name, accs in refs.items():
        log_row(name, accs)

    model = MLPMixer(**config).to(device)
    log.info(f'translator: {config}, {net.num_params(model):,} parameters')
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    start_epoch, best, metrics, last_accs = 0, {'mean': -1.0, 'epoch': -1, 'model': None, 'accs': None}, [], None
    if state is not None:
        if state['config'] != config:
            raise UserError(f'{last_path}: translator {state["config"]} differs from the flags ({config})')
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None:
            scheduler.load_state_dict(state['scheduler'])
        start_epoch, best, metrics, last_accs = state['epoch'], state['best'], state['metrics'], state['last_accs']
        set_rng_state(state['rng'], gen, device)
        log.info(f'resumed from {last_path} at epoch {start_epoch}, best mean so far {best["mean"]:.2f}')
    metrics_path = os.path.join(log_dir, 'metrics.csv')
    write_metrics(metrics_path, metrics)
    writer = tensorboard_writer(log_dir)

    n, bs = len(train_set), args.batch_size
    iters = math.ceil(n / bs)
    for epoch in range(start_epoch, args.num_epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no per-step sync
        for it in tqdm(range(iters), desc=f'epoch {epoch}', leave=False, disable=None):
            if epoch < args.warmup:
                for group in optimizer.param_groups:
                    group['lr'] = warmup_lr(args, epoch, it, iters)
            idx = perm[it * bs:(it + 1) * bs]
            inputs, targets = augment([x1[idx], x2[idx]], [y1[idx], y2[idx]], args, gen)
            loss = mse_loss(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            loss_sum += loss.detach()
        epoch_loss = loss_sum.item()
        lr = optimizer.param_groups[0]['lr']  # the lr this epoch ended with
        if epoch >= args.warmup:
            step_scheduler(scheduler, epoch_loss)
        row = {'epoch': epoch, 'loss': epoch_loss / iters, 'lr': lr, 'mean': '', 'min': '', 'max': ''}
        message = f'epoch {epoch}/{args.num_epochs}: loss {epoch_loss / iters:.6g}  lr {lr:.3g}'
        if (epoch % args.log_step == 0 and epoch != 0) or epoch == args.num_epochs - 1:
            last_accs = score(translate(model, v1, v2, bs))
            row.update(mean=last_accs.mean().item(), min=last_accs.min().item(), max=last_accs.max().item())
            if row['mean'] > best['mean']:
                best = {'mean': row['mean'], 'epoch': epoch, 'accs': last_accs,
                        'model': {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            message += f'  test acc {utils.acc_summary(last_accs)}  (best mean {best["mean"]:.2f} at {best["epoch"]})'
            message += f'\n  counts per 5% bin: {utils.acc_histogram(last_accs)}'
        log.info(message + f'  [{time.time() - t0:.1f} s]')
        metrics.append(row)
        write_metrics(metrics_path, metrics)
        if writer is not None:
            writer.add_scalar('Loss', row['loss'], epoch)
            writer.add_scalar('Lr', lr, epoch)
            if row['mean'] != '':
                writer.add_scalar('Mean_Accuracy', row['mean'], epoch)
        utils.atomic_save({'config': config, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                           'scheduler': scheduler.state_dict() if scheduler is not None else None,
                           'epoch': epoch + 1, 'best': best, 'metrics': metrics, 'last_accs': last_accs,
                           'refs': refs, 'rng': rng_state(gen, device), 'args': vars(args)}, last_path)
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            log.info(f'--stop_after_epoch {args.stop_after_epoch}: stopping; continue with --resume')
            if writer is not None:
                writer.close()
            return
    if writer is not None:
        writer.close()

    best_path = os.path.join(ckpt_dir, f'{best["mean"]:.2f}.pth')
    utils.atomic_save({'config': config, 'model': best['model'], 'epoch': best['epoch'],
                       'mean_acc': best['mean'], 'args': vars(args)}, best_path)
    final = {**refs, 'KT (best)': best['accs'], 'KT (last)': last_accs}
    rows = {name: acc_row(accs) for name, accs in final.items()}
    summary = {'run': run, 'checkpoint': best_path, 'config': config, 'best_epoch': best['epoch'],
               'num_epochs': args.num_epochs, 'num_val': len(val_set), 'num_test_images': len(images),
               'train_pairs': len(train_set), 'rows': rows}
    tmp = os.path.join(ckpt_dir, 'summary.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(ckpt_dir, 'summary.json'))
    log.info(f'summary (test accuracy in %, {len(val_set)} validation networks):')
    for name, accs in final.items():
        log_row(name, accs)
    log.info(f'best translator (epoch {best["epoch"]}, mean {best["mean"]:.2f}) saved to {best_path}')


if __name__ == '__main__':
    utils.run_main(main)
