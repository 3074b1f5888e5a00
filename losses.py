"""What the translator is trained on: the batch (augmented inputs and targets) and the loss of one step.

The faithful objective is the original's: --prob / --noise perturb the inputs and/or targets, and the loss
is the mean of the two conv weights' MSE against the small block the pair's network was trained with.
Research options (off by default) change it: --perm_aug (exact channel-permutation augmentation),
--canonical_targets (symmetry-free targets), --hidden_invariant_loss (MSE under the best hidden order) and
--loss functional / mse+functional (match the BasicBlock's output instead of, or beside, its weights), and
--inputs / --output (a translator that also reads the BatchNorms, mixer.FunctionTranslator: the inputs then
carry rules.bn_inputs after the two convs, permuted and perturbed as they are).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import mnist
import net
import rules
import symmetry
from distributed import take_share
from targets import state_of, written
from utils import UserError


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
    """Mean over the written tensors of their MSE (the original's loss: the two conv tensors)."""
    loss = F.mse_loss(outputs[0], targets[0])
    for o, t in zip(outputs[1:], targets[1:]):
        loss = loss + F.mse_loss(o, t)
    return loss / len(targets)


def random_perms(n, gen, device):
    """n independent uniformly random permutations of the residual channels, one per row, drawn from gen."""
    return torch.rand(n, net.PLANES, generator=gen, device=device).argsort(1)


def perm_augment(inputs, targets, gen, block=net.DEFAULT_SMALL):
    """--perm_aug: per pair, fresh P (residual channels) and Q (BasicBlock hidden channels) applied with
    symmetry.permute_pairs to the inputs (symmetry.permute_bn to their BatchNorm inputs, if any) and, if any, the targets
    (written tensors of `block`: symmetry.permute_written). Returns (inputs, targets, p)."""
    c1, c2, *bn = inputs  # bn: rules.bn_inputs when the translator reads them
    p, q = random_perms(len(c1), gen, c1.device), random_perms(len(c1), gen, c1.device)
    # without SimpleBlock_NoBn targets (--loss functional on --skip_simple data, another block) empty stand-ins keep
    # one code path
    own = targets and block == net.DEFAULT_SMALL
    s1, s2 = targets if own else (c1.new_empty(len(c1), 0, *net.SIMPLE_SHAPES['conv1.weight'][1:]),
                                  c1.new_empty(len(c1), net.PLANES, 0, 3, 3))
    c1, c2, s1, s2 = symmetry.permute_pairs(c1, c2, s1, s2, p, q)
    if targets:
        targets = [s1, s2] if own else symmetry.permute_written(block, targets, p)
    return [c1, c2, *symmetry.permute_bn(bn, p, q)], targets, p


def unpermute_small(outputs, p, block=net.DEFAULT_SMALL):
    """Small blocks written for P-permuted inputs, back in their networks' own channel order (the inverse
    of symmetry.permute_pairs on s1, s2; of symmetry.permute_written for other blocks)."""
    inv = p.argsort(1)
    if block != net.DEFAULT_SMALL:
        return symmetry.permute_written(block, outputs, inv)
    b = torch.arange(len(p), device=p.device)[:, None]
    return [outputs[0].transpose(1, 2)[b, inv].transpose(1, 2), outputs[1][b, inv]]


def hidden_invariant_loss(outputs, targets):
    """Batch mean of each pair's faithful loss (mse(conv1) + mse(conv2)) / 2 against the best of the 6
    orders r of the target's hidden channels (t1[:, r] with t2[:, :, r])."""
    o1, o2 = outputs
    t1, t2 = targets
    per_order = [((o1 - t1[:, r]).square().flatten(1).mean(1) + (o2 - t2[:, :, r]).square().flatten(1).mean(1)) / 2
                 for r in map(list, symmetry.HIDDEN_ORDERS)]
    return torch.stack(per_order, 1).amin(1).mean()


class FunctionalLoss:
    """The functional term: on a fresh batch of MNIST training images, each network's translated
    small block (SimpleBlock_NoBn, or another target, in eval mode) should give what its BasicBlock gives (MSE of the
    outputs, eval-mode BN), both after the network's frozen Begin; plus ce_weight x the cross-entropy of Begin -> translated -> Last.

    Vectorised over the networks of a step with the stacked forms of net.py. Memory and time grow as
    (networks per step = --batch_size) x (--functional_images): each activation is B x 6 x 14 x 14 per image."""

    def __init__(self, train_set, basic_convs, args, device, block=net.DEFAULT_SMALL):
        self.ce_weight, self.num_images, self.block = args.ce_weight, args.functional_images, block
        self.begin = {k: t.to(device) for k, t in train_set.begin.items()}
        # the conv weights are already on the device as the translator's inputs: share them
        self.basic = {k: t.to(device) for k, t in train_set.basic.items() if k not in ('conv1.weight', 'conv2.weight')}
        self.basic['conv1.weight'], self.basic['conv2.weight'] = basic_convs
        self.last = {k: t.to(device) for k, t in train_set.last.items()} if self.ce_weight > 0 else None
        images, labels = mnist.load_mnist(args.mnist_root, train=True)
        self.images, self.labels = images.to(device), labels.to(device)

    def __call__(self, outputs, idx, gen):
        """(functional MSE + ce_weight x CE) of the translated blocks `outputs` of training networks idx."""
        j = torch.randint(len(self.images), (self.num_images,), generator=gen, device=self.images.device)
        x = net.to_float(self.images[j]).unsqueeze(1)  # (N, 1, 28, 28), shared by every network
        with torch.no_grad():
            h = net.begin_forward(x, {k: t[idx] for k, t in self.begin.items()})  # (N, K*6, 14, 14)
            want = net.basic_forward(h, {k: t[idx] for k, t in self.basic.items()})
        got = net.small_forward(h, state_of(self.block, outputs))
        loss = F.mse_loss(got, want)
        if self.ce_weight > 0:
            logits = net.last_forward(got, {k: t[idx] for k, t in self.last.items()})  # (K, N, 10)
            loss = loss + self.ce_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           self.labels[j].repeat(len(idx)))
        return loss


@dataclass
class Batch:
    """One step's pairs: translator inputs, weight targets ([] without small blocks), the pairs' indices
    into the training set, and the --perm_aug residual permutations (None without)."""
    inputs: list
    targets: list
    idx: torch.Tensor
    perm: torch.Tensor = None

    def take(self, part):
        """This rank's share of the batch (all of it outside torchrun)."""
        inputs, targets, idx, perm = take_share(part, self.inputs, self.targets, self.idx, self.perm)
        return Batch(inputs, targets, idx, perm)


class Objective:
    """The flags' training objective over a training set held on the device: batch() and loss()."""

    def __init__(self, args, train_set, device, block=net.DEFAULT_SMALL):
        self.args, self.block = args, block
        self.inputs = [train_set.basic[k].to(device) for k in ('conv1.weight', 'conv2.weight')]
        if (args.inputs, args.output) != ('conv', 'direct'):  # mixer.FunctionTranslator reads the BatchNorms too
            self.inputs += [t.to(device) for t in rules.bn_inputs(train_set.basic)]
        self.targets = [t.to(device) for t in written(block, train_set.simple)] if train_set.simple is not None else []
        self.raw_targets = self.targets  # for the Mean target row
        if args.canonical_targets:
            self.targets = list(symmetry.canonical_simple(*self.targets))
        self.functional = FunctionalLoss(train_set, self.inputs[:2], args, device, block) \
            if args.loss != 'mse' else None

    def batch(self, idx, gen):
        """The pairs idx with the flags' augmentation, fresh draws from gen."""
        inputs, targets = [x[idx] for x in self.inputs], [y[idx] for y in self.targets]
        perm = None
        if self.args.perm_aug:
            inputs, targets, perm = perm_augment(inputs, targets, gen, self.block)
        inputs, targets = augment(inputs, targets, self.args, gen)
        return Batch(inputs, targets, idx, perm)

    def loss(self, outputs, batch, gen):
        """The step's loss: the weight MSE (faithful, or --hidden_invariant_loss) and/or the functional term;
        --perm_aug outputs go back to the networks' own channel order for the functional term."""
        args = self.args
        loss = 0.
        if args.loss != 'functional':
            loss = (hidden_invariant_loss if args.hidden_invariant_loss else mse_loss)(outputs, batch.targets)
        if args.loss != 'mse':
            own_order = outputs if batch.perm is None else unpermute_small(outputs, batch.perm, self.block)
            term = self.functional(own_order, batch.idx, gen)
            loss = loss + (args.functional_weight if args.loss == 'mse+functional' else 1.0) * term
        return loss


def flag_checks(args, default):
    """(ok, message) pairs for the research flags (train.check_args raises the first failing one)."""
    functional_flags = ('functional_weight', 'ce_weight', 'functional_images')
    return [
        (args.functional_weight >= 0, f'--functional_weight {args.functional_weight} must be >= 0'),
        (args.ce_weight >= 0, f'--ce_weight {args.ce_weight} must be >= 0'),
        (args.functional_images >= 1, f'--functional_images {args.functional_images} must be >= 1'),
        (args.loss != 'mse' or all(getattr(args, k) == default(k) for k in functional_flags),
         '--functional_weight, --ce_weight and --functional_images set the functional term: use them with '
         '--loss functional or mse+functional'),
        (args.loss != 'functional' or args.functional_weight == default('functional_weight'),
         '--functional_weight weighs the functional term against the weight MSE of --loss mse+functional; '
         'with --loss functional it is the only term'),
        (args.output == 'direct' or not args.canonical_targets,
         f'--output {args.output} adds its delta to a weight selection, whose hidden channels are not in the '
         'canonical form of --canonical_targets; use --output direct with it'),
        (args.loss != 'functional' or not (args.hidden_invariant_loss or args.canonical_targets),
         '--hidden_invariant_loss and --canonical_targets change the weight MSE, which --loss functional '
         'does not have'),
    ]


def target_checks(args, block):
    """Refuse the options that exist for SimpleBlock_NoBn targets only, or a residual output without a rule."""
    if block == net.DEFAULT_SMALL:
        return
    for flag in ('canonical_targets', 'hidden_invariant_loss'):
        if getattr(args, flag):
            raise UserError(f'--{flag}: defined for SimpleBlock_NoBn targets only; the target here is {block}')
    if args.output != 'direct' and args.output not in rules.RESIDUAL_OUTPUTS[block]:
        raise UserError(f'--output {args.output}: {block} has no training-free rule of that kind to add a delta '
                        f'to (rules.rules_of); use --output direct'
                        + ''.join(f' or {o}' for o in rules.RESIDUAL_OUTPUTS[block]))


def check_data(args, train_set):
    """Refuse a training set that lacks the blocks the objective needs, naming the folder and the flag."""
    if args.loss != 'functional':
        train_set.require('simple', f'the MSE targets of training (--loss {args.loss}; --loss functional '
                                    f'trains without them)')
    if args.loss != 'mse':
        for block, folder, needed in (('begin', 'backup_begin', True), ('last', 'backup_last', args.ce_weight > 0)):
            if needed and getattr(train_set, block) is None:
                why = f'--loss {args.loss}' + ' with --ce_weight > 0' * (block == 'last')
                raise UserError(f'{args.train_path}: holds no {block.capitalize()} blocks (in the original layout: '
                                f'{folder}/), needed for {why}')
