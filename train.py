"""Train the KT translator: an MLP-Mixer that writes a SimpleBlock_NoBn from a BasicBlock's conv weights.

The original README's command runs as is:
    python train.py --gpu_id 0 --num_epochs 1000 --batch_size 4096 --lr 1e-3 --optimizer adam --log_step 10 \
        --train_data_length 300000 --num_layers 24 --scheduler cos --mask_target t --prob 0.

Several processes: `torchrun --nproc_per_node N [--nnodes M ...] train.py <the same flags>` (see the
distributed section): --batch_size stays the global batch and the loss curve is that of one process
(up to float rounding; with --dropout > 0 the masks differ).

Outputs go to a run directory named after the hyper-parameters (see run_name):
    <ckpt_path>/<run>/  last.pth (resume state, every epoch), <best mean acc>.pth (the best translator,
                        at the end), summary.json (accuracy rows for later scripts)
    <log_path>/<run>/   train.log, args.json (the flags), metrics.csv, TensorBoard events (if installed)

summary.json: {"run", "checkpoint" (path of the best translator), "config" (MLPMixer kwargs), "best_epoch",
"num_epochs", "num_val", "num_test_images", "train_pairs", "rows": {name: {"mean", "min", "max",
"histogram" (20 counts, 5% bins), "accs" (per val network)}}} with rows "Large (BasicBlock)", "Random Init",
"Mean target" (if the train set has small blocks), "Weight selection", "Retrained" (if the val set has retrained
small blocks), "KT (best)", "KT (last)"; accuracies in % on the MNIST test set.
"""
import argparse
import csv
import itertools
import json
import logging
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import loader
import net
import utils
from mixer import NUM_TOKENS, MLPMixer
from utils import UserError

log = logging.getLogger(__name__)
RESUME_FREE_ARGS = ('resume', 'stop_after_epoch', 'device', 'gpu_id', 'mnist_root', 'train_path', 'val_path',
                    'compile')
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
    p.add_argument('--amp', default='none', choices=['none', 'bf16'],
                   help='bf16: the training forward under torch.autocast to bfloat16 (CUDA; CPU autocast is '
                        'allowed too, but only CPUs with bf16 units gain), loss in float32; evaluation stays '
                        'float32')
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the translator for training (first steps compile: minutes on a CPU); '
                        'checkpoints hold the plain translator either way')
    # research options (off by default)
    p.add_argument('--perm_aug', action='store_true',
                   help='exact augmentation: per pair per batch, fresh random permutations P of the 6 residual '
                        'channels and Q of the BasicBlock\'s 6 hidden channels (net.permute_pairs) applied to '
                        'inputs and targets before --prob/--noise (the networks\' functions are unchanged)')
    p.add_argument('--loss', default='mse', choices=['mse', 'functional', 'mse+functional'],
                   help='mse: the faithful weight MSE against the retrained small blocks; functional: the '
                        'translated SimpleBlock_NoBn must reproduce the BasicBlock\'s output on MNIST training '
                        'images passed through each network\'s frozen Begin (needs Begin/Last, no small blocks: '
                        'works on construct_train.py --skip_simple data); mse+functional: both. The functional '
                        'term costs --batch_size networks x --functional_images images of 6x14x14 activations '
                        'per step: --batch_size bounds the networks per step (and the memory)')
    p.add_argument('--functional_weight', type=float, default=1.0,
                   help='--loss mse+functional: weight of the functional term against the weight MSE')
    p.add_argument('--ce_weight', type=float, default=0.0,
                   help='functional term: plus this x the cross-entropy of Begin -> translated block -> Last '
                        'against the images\' labels')
    p.add_argument('--functional_images', type=int, default=64,
                   help='functional term: MNIST training images per step (fresh each step, the same for every '
                        'network of the step)')
    p.add_argument('--hidden_invariant_loss', action='store_true',
                   help='weight MSE against the best of the 3! orders of the target\'s 3 hidden channels, per '
                        'pair (those channels have no canonical order)')
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
        (args.functional_weight >= 0, f'--functional_weight {args.functional_weight} must be >= 0'),
        (args.ce_weight >= 0, f'--ce_weight {args.ce_weight} must be >= 0'),
        (args.functional_images >= 1, f'--functional_images {args.functional_images} must be >= 1'),
        (args.loss != 'mse' or (args.functional_weight, args.ce_weight, args.functional_images) == (1.0, 0.0, 64),
         '--functional_weight, --ce_weight and --functional_images set the functional term: use them with '
         '--loss functional or mse+functional'),
        (args.loss != 'functional' or args.functional_weight == 1.0,
         '--functional_weight weighs the functional term against the weight MSE of --loss mse+functional; '
         'with --loss functional it is the only term'),
        (args.loss != 'functional' or not args.hidden_invariant_loss,
         '--hidden_invariant_loss changes the weight MSE, which --loss functional does not have'),
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
    """What the research options add to the last sub-directory: nothing when they are off (faithful runs keep
    their names), else _perm (--perm_aug), _hinv (--hidden_invariant_loss) and, with a functional term,
    _<loss>-w<functional_weight>-ce<ce_weight>-img<functional_images>, e.g. _perm_functional-w1-ce0-img64."""
    parts = (['perm'] if args.perm_aug else []) + (['hinv'] if args.hidden_invariant_loss else [])
    if args.loss != 'mse':
        parts.append(f'{args.loss}-w{args.functional_weight:g}-ce{args.ce_weight:g}-img{args.functional_images}')
    return ''.join('_' + p for p in parts)


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


# ---- research options: --perm_aug, --hidden_invariant_loss, --loss functional / mse+functional

HIDDEN_ORDERS = tuple(itertools.permutations(range(3)))  # the 3! orders of the small block's hidden channels


def random_perms(n, gen, device):
    """n independent uniformly random permutations of range(6), one per row (n, 6), drawn from gen."""
    return torch.rand(n, 6, generator=gen, device=device).argsort(1)


def perm_augment(inputs, targets, gen):
    """--perm_aug: per pair, fresh P (residual channels) and Q (BasicBlock hidden channels) applied with
    net.permute_pairs to the inputs and, if any, the targets. Returns (inputs, targets, p)."""
    c1, c2 = inputs
    p, q = random_perms(len(c1), gen, c1.device), random_perms(len(c1), gen, c1.device)
    # without targets (--loss functional on --skip_simple data) empty stand-ins keep one code path
    s1, s2 = targets if targets else (c1.new_empty(len(c1), 0, 6, 3, 3), c1.new_empty(len(c1), 6, 0, 3, 3))
    c1, c2, s1, s2 = net.permute_pairs(c1, c2, s1, s2, p, q)
    return [c1, c2], ([s1, s2] if targets else targets), p


def unpermute_small(outputs, p):
    """Small blocks written for P-permuted inputs, back in their networks' own channel order (the inverse
    of net.permute_pairs on s1, s2)."""
    inv = p.argsort(1)
    b = torch.arange(len(p), device=p.device)[:, None]
    return [outputs[0].transpose(1, 2)[b, inv].transpose(1, 2), outputs[1][b, inv]]


def hidden_invariant_loss(outputs, targets):
    """Batch mean of each pair's faithful loss (mse(conv1) + mse(conv2)) / 2 against the best of the 6
    orders r of the target's hidden channels (t1[:, r] with t2[:, :, r])."""
    o1, o2 = outputs
    t1, t2 = targets
    per_order = [((o1 - t1[:, r]).square().flatten(1).mean(1) + (o2 - t2[:, :, r]).square().flatten(1).mean(1)) / 2
                 for r in map(list, HIDDEN_ORDERS)]
    return torch.stack(per_order, 1).amin(1).mean()


class FunctionalLoss:
    """The functional term: on a fresh batch of MNIST training images, each network's translated
    SimpleBlock_NoBn should give what its BasicBlock gives (MSE of the outputs, eval-mode BN), both after
    the network's frozen Begin; plus ce_weight x the cross-entropy of Begin -> translated -> Last.

    Vectorised over the networks of a step with the stacked forms of net.py. Memory and time grow as
    (networks per step = --batch_size) x (--functional_images): each activation is B x 6 x 14 x 14 per image."""

    def __init__(self, train_set, basic_convs, args, device):
        self.ce_weight, self.num_images = args.ce_weight, args.functional_images
        self.begin = {k: t.to(device) for k, t in train_set.begin.items()}
        # the conv weights are already on the device as the translator's inputs: share them
        self.basic = {k: t.to(device) for k, t in train_set.basic.items() if k not in ('conv1.weight', 'conv2.weight')}
        self.basic['conv1.weight'], self.basic['conv2.weight'] = basic_convs
        self.last = {k: t.to(device) for k, t in train_set.last.items()} if self.ce_weight > 0 else None
        images, labels = loader.load_mnist(args.mnist_root, train=True)
        self.images, self.labels = images.to(device), labels.to(device)

    def __call__(self, outputs, idx, gen):
        """(functional MSE + ce_weight x CE) of the translated blocks `outputs` of training networks idx."""
        j = torch.randint(len(self.images), (self.num_images,), generator=gen, device=self.images.device)
        x = net.to_float(self.images[j]).unsqueeze(1)  # (N, 1, 28, 28), shared by every network
        with torch.no_grad():
            h = net.begin_forward(x, {k: t[idx] for k, t in self.begin.items()})  # (N, K*6, 14, 14)
            want = net.basic_forward(h, {k: t[idx] for k, t in self.basic.items()})
        got = net.simple_forward(h, {'conv1.weight': outputs[0], 'conv2.weight': outputs[1]})
        loss = F.mse_loss(got, want)
        if self.ce_weight > 0:
            logits = net.last_forward(got, {k: t[idx] for k, t in self.last.items()})  # (K, N, 10)
            loss = loss + self.ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           self.labels[j].repeat(len(idx)))
        return loss


def training_loss(outputs, targets, args, functional=None, idx=None, p=None, gen=None):
    """The step's loss: the weight MSE (faithful, or --hidden_invariant_loss) and/or the functional term;
    p (--perm_aug) maps the outputs back to the networks' own channel order for the functional term."""
    if args.loss == 'mse' and not args.hidden_invariant_loss:
        return mse_loss(outputs, targets)  # the faithful loss
    loss = 0.
    if args.loss != 'functional':
        loss = (hidden_invariant_loss if args.hidden_invariant_loss else mse_loss)(outputs, targets)
    if args.loss != 'mse':
        term = functional(outputs if p is None else unpermute_small(outputs, p), idx, gen)
        loss = loss + (args.functional_weight if args.loss == 'mse+functional' else 1.0) * term
    return loss


@torch.no_grad()
def translate(model, conv1, conv2, batch_size=4096):
    """Eval-mode translation of stacked BasicBlock convs into a stacked SimpleBlock_NoBn state."""
    was_training = model.training
    model.eval()
    outs = [model([conv1[i:i + batch_size], conv2[i:i + batch_size]]) for i in range(0, len(conv1), batch_size)]
    model.train(was_training)
    return {'conv1.weight': torch.cat([o[0] for o in outs]), 'conv2.weight': torch.cat([o[1] for o in outs])}


def eval_chunks(device):
    """(images, networks) per forward of net.stacked_accuracy: on a GPU 10 networks side by side in small
    memory; on a CPU grouped convolutions are slower than separate ones, so one network at a time
    (bench/bench_eval.py measures both; BENCHMARKS.md)."""
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


# ---- distributed: `torchrun --nproc_per_node N train.py ...` runs this same script on N processes ----
# Every rank draws the same per-epoch permutation and the same augmentation randomness from the shared
# seed, builds the whole global batch of --batch_size pairs and keeps its contiguous share of it
# (rank_batch): shares differ by at most one pair, so --batch_size need not divide by the world size.
# Each rank's loss is scaled so that DDP's gradient average over ranks is the gradient of the mean over
# the global batch, exactly as in one process (this needs a loss that is a mean over pairs, plus terms
# equal on every rank: true of every --loss here). The val networks are scored in contiguous shares, one
# per rank, and all-gathered (100 networks x 10,000 images: 40-160 s on one CPU core, 0.13 s on an H200).
# Only rank 0 logs and writes files; every rank reads last.pth on --resume. Dropout draws from each
# rank's own torch generator (seed_rank), so with --dropout > 0 runs match one process only in law.

def setup_distributed(device_flag=None):
    """(rank, world_size, local_rank) from torchrun's env vars; joins the process group if world_size > 1."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return 0, 1, 0
    if 'RANK' not in os.environ or 'MASTER_ADDR' not in os.environ:
        raise UserError(f'WORLD_SIZE={world} is set but RANK or MASTER_ADDR is not: launch with torchrun '
                        f'(python -m torch.distributed.run), which sets them all')
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = rank_device(device_flag, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                device_id=device if device.type == 'cuda' else None)
    return rank, world, local_rank


def rank_device(device_flag, local_rank):
    """Under torchrun: cuda:LOCAL_RANK (modulo the visible GPUs) unless --device cpu; --gpu_id is ignored."""
    kind = torch.device(device_flag).type if device_flag else ('cuda' if torch.cuda.is_available() else 'cpu')
    if kind == 'cpu':
        return torch.device('cpu')
    if kind != 'cuda' or not torch.cuda.is_available():
        raise UserError(f'--device {device_flag}: under torchrun use cpu or cuda (CUDA available: '
                        f'{torch.cuda.is_available()})')
    return torch.device('cuda', local_rank % torch.cuda.device_count())


def world_info():
    """(rank, world_size) of the process group, (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    """True on rank 0 and in a single-process run: the process that logs and writes files."""
    return world_info()[0] == 0


def cleanup_distributed():
    """Wait for every rank, then leave the process group (nothing outside torchrun)."""
    if world_info()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def rank_batch(total, rank, world):
    """(slice, loss weight) of this rank's contiguous share of a global batch of `total` pairs.
    weight = share * world / total, so that DDP's average of the ranks' weighted batch-mean losses is
    the mean over the global batch. A rank left without a pair (total < world) runs pair 0 with weight 0:
    DDP needs every rank in every backward."""
    lo, hi = rank * total // world, (rank + 1) * total // world
    if hi > lo:
        return slice(lo, hi), (hi - lo) * world / total
    return slice(0, 1), 0.0


def take_share(part, *batches):
    """Each of batches (a tensor, a list of tensors, or None) cut to part along the batch axis."""
    return tuple(b if b is None else [t[part] for t in b] if isinstance(b, (list, tuple)) else b[part]
                 for b in batches)


def average_over_ranks(t):
    """The mean over ranks of a tensor (all-reduced in place); t itself outside torchrun."""
    world = world_info()[1]
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


def distributed_accuracy(images, labels, begin, middle, last, kind, chunk_images=1000, chunk_nets=None,
                         begin_out=None):
    """net.stacked_accuracy of all K networks; under torchrun each rank scores a contiguous share of
    ceil(K / world) networks and the shares are all-gathered (every rank returns all K accuracies)."""
    rank, world = world_info()
    if world == 1:
        return net.stacked_accuracy(images, labels, begin, middle, last, kind, chunk_images, chunk_nets, begin_out)
    k = begin['conv.weight'].shape[0]
    share = -(-k // world)
    part = slice(min(rank * share, k), min((rank + 1) * share, k))
    mine = torch.zeros(share, dtype=torch.float64, device=labels.device)
    if part.stop > part.start:
        b, m, l = ({n: t[part] for n, t in d.items()} for d in (begin, middle, last))
        mine[:part.stop - part.start] = net.stacked_accuracy(
            images, labels, b, m, l, kind, chunk_images, chunk_nets,
            None if begin_out is None else begin_out[part])
    shares = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shares, mine)
    return torch.cat(shares)[:k]


def seed_rank(seed):
    """Under torchrun, give ranks > 0 their own torch seed (dropout masks differ per rank); rank 0 keeps seed."""
    rank, world = world_info()
    if world > 1 and rank > 0:
        torch.manual_seed(utils.seed_for(seed, 'rank', rank))


def rank_rng_states(device):
    """{'ranks': [each rank's torch (and CUDA) RNG state]} under torchrun, for last.pth; {} otherwise."""
    if world_info()[1] == 1:
        return {}
    mine = {'torch': torch.get_rng_state()}
    if device.type == 'cuda':
        mine['cuda'] = torch.cuda.get_rng_state(device)
    states = [None] * world_info()[1]
    dist.all_gather_object(states, mine)
    return {'ranks': states}


def restore_rank_rng(rng, seed, device):
    """Under torchrun, this rank's RNG states from rank_rng_states (saved at another world size: seed_rank)."""
    rank, world = world_info()
    if world == 1:
        return
    states = rng.get('ranks')
    if states is None or len(states) != world:
        return seed_rank(seed)
    torch.set_rng_state(states[rank]['torch'])
    if device.type == 'cuda' and 'cuda' in states[rank]:
        torch.cuda.set_rng_state(states[rank]['cuda'], device)


class BF16Forward(torch.nn.Module):
    """--amp bf16: the wrapped translator's forward under autocast to bfloat16, outputs back in float32
    (the loss is computed in float32)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, weights):
        with torch.autocast(weights[0].device.type, dtype=torch.bfloat16):
            outputs = self.module(weights)
        return tuple(o.float() for o in outputs)


def wrap_model(model, args, device):
    """What the training step calls: model, under --amp, in DistributedDataParallel under torchrun, compiled
    with --compile. Parameters are shared; checkpoints save `model` itself (no 'module.'/'_orig_mod.')."""
    wrapped = BF16Forward(model) if args.amp == 'bf16' else model
    if world_info()[1] > 1:
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == 'cuda' else None)
    return torch.compile(wrapped) if args.compile else wrapped


def unwrap(model):
    """The plain translator inside wrap_model's result."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, (DistributedDataParallel, BF16Forward)):
            model = model.module
        else:
            return model


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    config = translator_config(args)
    rank, world, local_rank = setup_distributed(args.device)  # (0, 1, 0) outside torchrun
    device = utils.get_device(args.gpu_id, args.device) if world == 1 else rank_device(args.device, local_rank)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    # Data first, so that bad input fails before a run directory is made. Everything stays on the
    # device; a batch is an index lookup into these tensors.
    t0 = time.time()
    functional = args.loss != 'mse'  # needs each training network's Begin (and Last for --ce_weight)
    train_set = loader.TrainDataset(args.train_path, args.train_data_length, with_networks=functional)
    if args.loss != 'functional':
        train_set.require('simple', f'the MSE targets of training (--loss {args.loss}; --loss functional '
                                    f'trains without them)')
    if functional:
        for block, folder, needed in (('begin', 'backup_begin', True), ('last', 'backup_last', args.ce_weight > 0)):
            if needed and getattr(train_set, block) is None:
                why = f'--loss {args.loss}' + ' with --ce_weight > 0' * (block == 'last')
                raise UserError(f'{args.train_path}: holds no {block.capitalize()} blocks (in the original layout: '
                                f'{folder}/), needed for {why}')
        if args.ce_weight == 0:
            train_set.last = None  # not needed: free it (7 GB at 300k pairs)
    val_set = loader.ValDataset(args.val_path, args.val_data_length).to(device)
    images, labels = loader.load_mnist(args.mnist_root, train=False)
    images, labels = images[:args.num_test_images].to(device), labels[:args.num_test_images].to(device)
    x1, x2 = (train_set.basic[k].to(device) for k in ('conv1.weight', 'conv2.weight'))
    y1, y2 = ((train_set.simple[k].to(device) for k in ('conv1.weight', 'conv2.weight'))
              if train_set.simple is not None else (None, None))
    v1, v2 = val_set.basic['conv1.weight'], val_set.basic['conv2.weight']
    functional_loss = FunctionalLoss(train_set, (x1, x2), args, device) if functional else None
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
    if is_main():  # under torchrun only rank 0 logs and writes files
        os.makedirs(ckpt_dir, exist_ok=True)
        utils.set_logger(os.path.join(log_dir, 'train.log'))
        log.info(f'flags: {json.dumps(vars(args), sort_keys=True)}')
        log.info(f'run directory: {ckpt_dir} (logs: {log_dir}); device {device}')
        if world > 1:
            log.info(f'torchrun: {world} processes ({dist.get_backend()}); each takes its share of every global '
                     f'batch of {args.batch_size} pairs and of the val networks')
        with open(os.path.join(log_dir, 'args.json'), 'w') as f:
            json.dump(vars(args), f, indent=1, sort_keys=True)
    if args.resume and state is None:
        log.info(f'--resume: no {last_path} yet, starting afresh')
    elif not args.resume and os.path.exists(last_path):
        log.info(f'note: overwriting the earlier run in {ckpt_dir} (pass --resume to continue it instead)')
    log.info(f'{len(train_set)} training pairs ({train_set.layout}) from {args.train_path}, '
             f'{len(val_set)} validation networks ({val_set.layout}) from {args.val_path}, '
             f'{len(images)} test images; loaded in {load_time:.1f} s')
    if functional:  # measured on CPU: about 12 activations of (images, networks, 6, 14, 14) float32 at the peak
        gib = 12 * args.functional_images * min(args.batch_size, len(train_set)) * 6 * 14 * 14 * 4 / 2 ** 30
        log.info(f'functional term: {args.functional_images} MNIST training images per step through each of up to '
                 f'{args.batch_size} networks: about {gib:.1f} GiB of activations per step (proportional to '
                 f'--batch_size x --functional_images)')

    chunk_images, chunk_nets = eval_chunks(device)
    # The val networks' Begin never changes: its output on the test images is computed once (4.7 GB
    # for 100 networks x 10,000 images) when it fits, which makes every evaluation about 4x cheaper.
    begin_bytes = len(val_set) * len(images) * 6 * 14 * 14 * 4
    begin_out = net.begin_outputs(images, val_set.begin, chunk_images) \
        if utils.fits_in_memory(begin_bytes, device) else None

    def score(middle, kind='simple'):
        """Test accuracies (%) of every val network with `middle` between its own Begin and Last."""
        return distributed_accuracy(images, labels, val_set.begin, middle, val_set.last, kind,
                                    chunk_images, chunk_nets, begin_out).cpu()

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
                                      for k, y in (('conv1.weight', y1), ('conv2.weight', y2))})
                if y1 is not None else None,
                'Weight selection': score({'conv1.weight': v1[:, :3], 'conv2.weight': v2[:, :, :3]})}
        if y1 is None:
            del refs['Mean target']
            log.info('note: no "Mean target" row: the training set has no small blocks')
        if val_set.simple is not None:
            refs['Retrained'] = score(val_set.simple)
        log.info(f'reference rows measured in {time.time() - t0:.1f} s')
    for name, accs in refs.items():
        log_row(name, accs)

    model = MLPMixer(**config).to(device)
    seed_rank(args.seed)
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
        restore_rank_rng(state['rng'], args.seed, device)
        log.info(f'resumed from {last_path} at epoch {start_epoch}, best mean so far {best["mean"]:.2f}')
    train_model = wrap_model(model, args, device)  # model itself outside torchrun, without --amp and --compile
    metrics_path = os.path.join(log_dir, 'metrics.csv')
    if is_main():
        write_metrics(metrics_path, metrics)
    writer = tensorboard_writer(log_dir) if is_main() else None

    n, bs = len(train_set), args.batch_size
    iters = math.ceil(n / bs)
    for epoch in range(start_epoch, args.num_epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(n, generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)  # summed on the device: no per-step sync
        for it in tqdm(range(iters), desc=f'epoch {epoch}', leave=False, disable=None if is_main() else True):
            if epoch < args.warmup:
                for group in optimizer.param_groups:
                    group['lr'] = warmup_lr(args, epoch, it, iters)
            idx = perm[it * bs:(it + 1) * bs]
            inputs, targets, p = [x1[idx], x2[idx]], ([y1[idx], y2[idx]] if y1 is not None else []), None
            if args.perm_aug:
                inputs, targets, p = perm_augment(inputs, targets, gen)
            inputs, targets = augment(inputs, targets, args, gen)
            part, weight = rank_batch(len(idx), rank, world)  # this rank's share of the global batch (all of it)
            inputs, targets, idx, p = take_share(part, inputs, targets, idx, p)
            loss = training_loss(train_model(inputs), targets, args, functional_loss, idx, p, gen)
            if weight != 1:  # DDP averages the ranks' gradients: this makes that the global batch mean's
                loss = loss * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            loss_sum += loss.detach()
        epoch_loss = average_over_ranks(loss_sum).item()
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
        if is_main():
            write_metrics(metrics_path, metrics)
        if writer is not None:
            writer.add_scalar('Loss', row['loss'], epoch)
            writer.add_scalar('Lr', lr, epoch)
            if row['mean'] != '':
                writer.add_scalar('Mean_Accuracy', row['mean'], epoch)
        rng = dict(rng_state(gen, device), **rank_rng_states(device))  # every rank: a collective under torchrun
        if is_main():
            utils.atomic_save({'config': config, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                               'scheduler': scheduler.state_dict() if scheduler is not None else None,
                               'epoch': epoch + 1, 'best': best, 'metrics': metrics, 'last_accs': last_accs,
                               'refs': refs, 'rng': rng, 'args': vars(args)}, last_path)
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch:
            log.info(f'--stop_after_epoch {args.stop_after_epoch}: stopping; continue with --resume')
            if writer is not None:
                writer.close()
            return cleanup_distributed()
    if writer is not None:
        writer.close()
    if not is_main():
        return cleanup_distributed()

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
    cleanup_distributed()


if __name__ == '__main__':
    utils.run_main(main)
