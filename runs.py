"""The folders of one train.py run: their name, the flags, metrics, TensorBoard events, the resume state, the best
translator and the summary.

    <ckpt_path>/<run>/  last.pth (resume state, every epoch), <best mean acc>.pth (the best translator as the
                        original saves it: a plain MLPMixer state dict named str(round(mean, 2)) + '.pth'),
                        <best mean acc>.json (its config, epoch and flags), summary.json (rows for report.py)
    <log_path>/<run>/   train.log, flagfile.txt, args.json, metrics.csv, TensorBoard events (tensorboard or
                        tensorboardX installed)

SIGTERM, SIGINT or a failed write stop a run at once (stopping): every file is written atomically, so last.pth is
the last complete epoch's, and the one line printed names it and the command that resumes (--resume).
"""
import contextlib
import csv
import io
import json
import logging
import math
import os
import re

import torch

import utils
from utils import UserError

log = logging.getLogger(__name__)
current = None  # the Run of this process once made: what stopping() reports as kept
METRICS = ('epoch', 'loss', 'lr', 'mean', 'min', 'max')
BEST_NAME = re.compile(r'\d+\.\d{1,2}\.(pth|json)')  # str(round(<best val mean>, 2)) + '.pth' and its .json


def run_name(args, default):
    """optimisation / architecture / data sub-directories (default: the parser's get_default), e.g.
    adam_lr0.001_bs4096_wd0_clip-1_cos_wu0_cyc1_ep300/L24_S72_C128_hs256_hc512_do0/mask-t0_noise-t0_n300000_seed0"""
    return os.path.join(
        f'{args.optimizer}_lr{args.lr:g}_bs{args.batch_size}_wd{args.wd:g}_clip{args.grad_clip:g}_{args.scheduler}'
        f'_wu{args.warmup}_cyc{args.num_cycles}_ep{args.num_epochs}',
        f'L{args.num_layers}_S{args.s_dim}_C{args.c_dim}_hs{args.hidden_s_dim}_hc{args.hidden_c_dim}'
        f'_do{args.dropout:g}',
        f'mask-{args.mask_target}{args.prob:g}_noise-{args.noise_target}{args.noise:g}'
        f'_n{args.train_data_length}_seed{args.seed}' + research_suffix(args, default))


def research_suffix(args, default):
    """What non-default options beyond the original add to the last sub-directory: nothing for the original's
    runs, else _val<N>, _test<N>, _tf32, _bf16, _hold<N>, _perm, _canon, _hinv and, with a functional term,
    _<loss>-w<functional_weight>-ce<ce_weight>-img<functional_images>, e.g. _perm_functional-w1-ce0-img64, and
    _in-folded, _out-residual, and _to-<small block> for a target other than SimpleBlock_NoBn (train.target_of)."""
    parts = ([f'val{args.val_data_length}'] if args.val_data_length != default('val_data_length') else []) + \
        ([f'test{args.num_test_images}'] if args.num_test_images != default('num_test_images') else []) + \
        (['tf32'] if args.tf32 else []) + ([args.amp] if args.amp != 'none' else []) + \
        ([f'hold{args.holdout_networks}'] if args.holdout_networks else []) + \
        (['perm'] if args.perm_aug else []) + (['canon'] if args.canonical_targets else []) + \
        (['hinv'] if args.hidden_invariant_loss else [])
    if args.loss != 'mse':
        parts.append(f'{args.loss}-w{args.functional_weight:g}-ce{args.ce_weight:g}-img{args.functional_images}')
    parts += ([f'in-{args.inputs}'] if args.inputs != default('inputs') else []) + \
        ([f'out-{args.output}'] if args.output != default('output') else []) + \
        ([f'to-{args.small_block}'] if getattr(args, 'small_block', None) else [])
    return ''.join('_' + p for p in parts)


def flagfile_text(args):
    """The flags of a run, one --flag=value a line (switches that are on as --flag), for @flagfile.txt."""
    lines = []
    for key, value in sorted(vars(args).items()):
        if key in ('flagfile', 'resume', 'stop_after_epoch') or value is None or value is False:
            continue  # the file repeats the run from its start
        lines.append(f'--{key}' if value is True else f'--{key}={value}')
    return '\n'.join(lines) + '\n'


def data_fingerprint(train_set, val_set, holdout=None):
    """Counts and float64 sums of the blocks a run reads (training pairs and their targets, held-out and
    validation networks): what a resumed run checks so that it reads the data it started on (folders may move)."""
    def total(*sets):
        return sum(t.sum(dtype=torch.float64).item() for s in sets if s is not None
                   for blocks in (s.basic, s.simple) if blocks is not None for t in blocks.values())
    return {'train': [len(train_set) + (len(holdout) if holdout else 0), total(train_set, holdout)],
            'val': [len(val_set), total(val_set)]}


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


def write_metrics(path, rows):
    """Rewrite metrics.csv atomically with all rows so far (plus a 'holdout' column with --holdout_networks)."""
    text = io.StringIO()
    w = csv.DictWriter(text, METRICS + tuple(k for k in rows[0] if k not in METRICS) if rows else METRICS)
    w.writeheader()
    w.writerows(rows)
    utils.atomic_write(path, text.getvalue())


def tensorboard_writer(log_dir, start_epoch):
    """A SummaryWriter of torch.utils.tensorboard (needs the tensorboard package), else of tensorboardX (what the
    original imports), else None: neither is a dependency. TensorBoard hides the directory's earlier events from
    start_epoch on: a rerun of the same flags or a resumed run shows each epoch once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(log_dir, purge_step=start_epoch)


def log_scalars(writer, row, lr, epoch):
    """The original's TensorBoard scalars: Loss, Lr (after the epoch's scheduler step), Mean_Accuracy."""
    if writer is None:
        return
    writer.add_scalar('Loss', row['loss'], epoch)
    writer.add_scalar('Lr', lr, epoch)
    if row['mean'] != '':
        writer.add_scalar('Mean_Accuracy', row['mean'], epoch)


def meta_path(checkpoint):
    """Where the metadata of a best translator lives: beside it, <same stem>.json."""
    return os.path.splitext(checkpoint)[0] + '.json'


def read_meta(checkpoint):
    """The metadata train.py wrote beside a best translator ({'config', 'epoch', ...}), or None if there is none."""
    path = meta_path(checkpoint)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: the metadata of {checkpoint} cannot be read ({e}); delete it to read '
                        f'{checkpoint} as a bare state dict') from None
    if not isinstance(meta, dict) or not isinstance(meta.get('config'), dict):
        raise UserError(f'{path}: not the metadata train.py writes beside its best translator (no "config")')
    return meta


class Run:
    """The checkpoint and log folders of one run. Only the main process (rank 0 under torchrun) writes files."""

    def __init__(self, args, default, resume_free, is_main=True):
        self.args, self.resume_free, self.is_main = args, resume_free, is_main
        self.name = run_name(args, default)
        self.ckpt_dir, self.log_dir = os.path.join(args.ckpt_path, self.name), os.path.join(args.log_path, self.name)
        self.last_path = os.path.join(self.ckpt_dir, 'last.pth')
        self.metrics_path = os.path.join(self.log_dir, 'metrics.csv')
        self.writer, self.saved_epoch = None, None
        global current
        current = self

    def resume_state(self, fingerprint, device):
        """last.pth of the run when --resume finds one, else None; refused if written with other flags or data,
        or on another kind of device."""
        args, path = self.args, self.last_path
        if not (args.resume and os.path.exists(path)):
            return None
        state = utils.load_file(path, 'resume checkpoint', '; delete it to start the run afresh')
        changed = {k: (v, getattr(args, k, None)) for k, v in state['args'].items()
                   if k not in self.resume_free and getattr(args, k, None) != v}
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
            raise UserError(f'{path}: the run was started on a {made_on} device and its random streams continue '
                            f'only there; resume with --device {made_on}')
        return state

    def restore(self, state, config, model, optimizer, scheduler, gen, ctx):
        """Continue a killed run from its last.pth `state`: weights, optimiser, scheduler and every random stream;
        (first epoch to run, metrics rows so far)."""
        if state['config'] != config:
            raise UserError(f'{self.last_path}: translator {state["config"]} differs from the flags ({config})')
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None:
            scheduler.load_state_dict(state['scheduler'])
        set_rng_state(state['rng'], gen, ctx.device)
        self.saved_epoch = state['epoch']
        ctx.restore_rng(state['rng'], self.args.seed)
        log.info(f'resumed from {self.last_path} at epoch {state["epoch"]}, '
                 f'best mean so far {state["best"]["mean"]:.2f}')
        return state['epoch'], state['metrics']

    def open(self, ctx, state):
        """Make the folders, start train.log, write the flags (args.json, flagfile.txt), say what is resumed."""
        args = self.args
        if self.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            utils.set_logger(os.path.join(self.log_dir, 'train.log'))
            log.info(f'flags: {json.dumps(vars(args), sort_keys=True)}')
            log.info(f'run directory: {self.ckpt_dir} (logs: {self.log_dir}); device {ctx.device}')
            if ctx.distributed:
                log.info(f'torchrun: {ctx.world} processes ({torch.distributed.get_backend()}); each takes its share '
                         f'of every global batch of {args.batch_size} pairs and of the val networks')
            utils.atomic_write(os.path.join(self.log_dir, 'args.json'),
                               json.dumps(vars(args), indent=1, sort_keys=True))
            utils.atomic_write(os.path.join(self.log_dir, 'flagfile.txt'), flagfile_text(args))
        if args.resume and state is None:
            log.info(f'--resume: no {self.last_path} yet, starting afresh')
        elif not args.resume and os.path.exists(self.last_path):
            log.info(f'note: overwriting the earlier run in {self.ckpt_dir} (pass --resume to continue it instead)')

    def start(self, metrics, start_epoch):
        """metrics.csv with the rows so far, and the TensorBoard writer."""
        if self.is_main:
            write_metrics(self.metrics_path, metrics)
            self.writer = tensorboard_writer(self.log_dir, start_epoch)

    def end_epoch(self, metrics, lr, state):
        """After each epoch: metrics.csv, the TensorBoard scalars of its row (lr after the scheduler step),
        last.pth (state)."""
        if self.is_main:
            log_scalars(self.writer, metrics[-1], lr, metrics[-1]['epoch'])
            write_metrics(self.metrics_path, metrics)
            utils.atomic_save(state, self.last_path)
            self.saved_epoch = state['epoch']

    def kept(self):
        """What a stopped run leaves to --resume from."""
        if self.saved_epoch is not None:
            return f'{self.last_path} with {self.saved_epoch} of {self.args.num_epochs} epochs done'
        if os.path.exists(self.last_path):
            return f'{self.last_path} of an earlier run of these flags (this one saved no epoch)'
        return f'no checkpoint yet (the run stopped in its first epoch; nothing in {self.ckpt_dir} to resume from)'

    def close(self):
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()

    def save_best(self, model_state, mean, meta):
        """The best translator as the original saves it, a plain state dict named str(round(mean, 2)) + '.pth',
        with `meta` beside it (meta_path); the pair an earlier run of these flags left is removed."""
        path = os.path.join(self.ckpt_dir, f'{round(mean, 2)}.pth')
        utils.atomic_write(meta_path(path), json.dumps(meta, indent=1))
        utils.atomic_save(model_state, path)
        keep = {os.path.basename(path), os.path.basename(meta_path(path))}
        for name in sorted(os.listdir(self.ckpt_dir)):
            if BEST_NAME.fullmatch(name) and name not in keep:
                os.remove(os.path.join(self.ckpt_dir, name))
                log.info(f'removed {name}, the best translator of an earlier run in {self.ckpt_dir}')
        return path

    def write_summary(self, summary):
        """summary.json, what report.py reads: {"run", "checkpoint" (path of the best translator), "config"
        (MLPMixer kwargs), "best_epoch", "best_step", "steps_per_epoch", "num_epochs", "selection" ("val" or
        "holdout <N>"), "num_val", "num_test_images", "train_pairs", "rows": {name: {"mean", "min", "max",
        "histogram" (20 counts, 5% bins), "accs" (per val network)}}} with rows "Large (BasicBlock)", "Random Init",
        "Mean target" (if the train set has small blocks), "Mean canonical target" (with --canonical_targets),
        "Weight selection", "Weight selection (folded)", "Weight selection (folded, refit)", "Retrained" (if the val
        set has retrained small blocks), "KT (best)", "KT (last)", and "Identity (block skipped)", "Universal block"
        (when universal.py made one), the target's rules (rules.rules_of); accuracies in % on the MNIST test set;
        "kt" ({"inputs", "output"}) when --inputs or --output is not the original's, "target" (the small block
        written) when not SimpleBlock_NoBn."""
        utils.atomic_write(os.path.join(self.ckpt_dir, 'summary.json'), json.dumps(summary, indent=1))


@contextlib.contextmanager
def stopping(argv=None):
    """Around a train.py run: SIGTERM / SIGINT stop it at once (an epoch can take minutes), and so does a failed
    write; either becomes utils.Stopped, one line with the last good checkpoint and the command that resumes."""
    global current
    current = None
    with utils.stop_signals():
        try:
            yield
        except (utils.WriteError, utils.Interrupted) as e:
            kept = current.kept() if current is not None else 'nothing yet (stopped before the run folder was made)'
            stop = utils.stopped(e, kept, utils.resume_command('train.py', argv, ['--resume']))
            utils.log_to_files(str(stop))
            raise stop from None
