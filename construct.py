"""The recipe of a training pair: (trained BasicBlock, small block trained in its place: SimpleBlock_NoBn, or
another of net.SMALL_BLOCKS with --small_block).

train_one is the recipe for one network, the definition; make_pairs is the same K networks at a time, which
generation.py runs. Steps is the one extension point of the faster paths in speed/.
"""
import concurrent.futures
import copy
import dataclasses

import torch
import torch.nn.functional as F

import net
import sizing
import utils

MOMENTUM = 0.9
NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides a dataset's contents; a data root holds one recipe only."""
    kind: str = 'train'
    seed: int = 0
    num_epochs: int = 10
    lr: float = 0.01
    batch_size: int = 128
    momentum: float = MOMENTUM
    train_small: bool = True
    num_train_images: int = 60000
    num_test_images: int = 10000
    small_block: str = net.DEFAULT_SMALL

    def as_json(self):
        """recipe.json's dict; the original pair's recipe keeps the original keys (no 'small_block')."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != 'small_block' or v != net.DEFAULT_SMALL}


# ----------------------------------------------------------------------------------------
# The recipe, for one network: the definition of a pair.

def train_one(recipe, index, mnist):
    """Pair `index`, the definition make_pairs follows: a fresh Begin -> BasicBlock -> Last trained num_epochs epochs
    (SGD, momentum, random flips, all drawn from (seed, index) only), then Begin and Last frozen in eval mode and a
    fresh small block (recipe.small_block) trained between them the same way. Returns state dicts and test
    accuracies (%)."""
    train_x, train_y, test_x, test_y = mnist
    seed = utils.seed_for(recipe.seed, recipe.kind, index)
    begin, basic, last = net.BeginBlock(), net.BasicBlock(), net.LastBlock()
    simple = net.SMALL_BLOCKS[recipe.small_block]()
    for m, sd in zip((begin, basic, last, simple), init_pair(seed, recipe.small_block)):
        m.to(train_x.device).load_state_dict(sd)
    g = data_generator(seed)

    def train(model, params):
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum)
        for _ in range(recipe.num_epochs):
            perm, flip = torch.randperm(len(train_x), generator=g), torch.rand(len(train_x), generator=g) < 0.5
            for b0 in range(0, len(train_x), recipe.batch_size):  # the last partial batch is kept
                idx, fl = perm[b0:b0 + recipe.batch_size].to(train_x.device), flip[b0:b0 + recipe.batch_size]
                x = train_x[idx].float() / 255
                x[fl] = x[fl].flip(-1)
                loss = F.cross_entropy(model(x.unsqueeze(1)), train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()

    @torch.no_grad()
    def accuracy(model):
        return (model.eval()(test_x.float().unsqueeze(1) / 255).argmax(1) == test_y).double().mean().item() * 100

    large = torch.nn.Sequential(begin, basic, last).train()
    train(large, large.parameters())
    out = {'acc_large': accuracy(large)}  # large.eval(): Begin and Last stay in eval mode from here on
    out.update(zip(('begin', 'basic', 'last'), (copy.deepcopy(m.state_dict()) for m in (begin, basic, last))))
    if recipe.train_small:
        large.requires_grad_(False)
        small = torch.nn.Sequential(begin, simple, last)
        out['acc_small_init'] = accuracy(small)
        simple.train()
        train(small, simple.parameters())
        out['acc_small'], out['simple'] = accuracy(small), simple.state_dict()
    return out


# ----------------------------------------------------------------------------------------
# The same, K networks at a time: their states stacked on a leading K axis, grouped convolutions.
PAIR_BLOCKS = ('begin', 'basic', 'last', 'simple')  # init_pair's order


def init_pair(seed, small_block=net.DEFAULT_SMALL):
    """Default-initialised state dicts (begin, basic, last, simple) of one pair, from its seed: the small block
    (any of net.SMALL_BLOCKS) is drawn after the large network, from the same stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        begin, basic, last = net.large_network()
        simple = net.SMALL_BLOCKS[small_block]()
    return [m.state_dict() for m in (begin, basic, last, simple)]


def data_generator(seed):
    """The generator of one network's shuffles and flips (separate from its initialisation)."""
    return torch.Generator().manual_seed(seed ^ 0x5DEECE66D)


def skip_epochs(gens, n, epochs):
    """Advance each network's generator past `epochs` epochs of draw_epoch (the large phase's, under --large_from)."""
    for _ in range(epochs):
        draw_epoch(gens, n, 'cpu')


def draw_epoch(gens, n, device):
    """Each network's shuffled order (K, n) and flip decisions (K, n) for one epoch."""
    perms, flips = [], []
    for g in gens:
        perms.append(torch.randperm(n, generator=g))
        flips.append(torch.rand(n, generator=g) < 0.5)
    return torch.stack(perms).to(device), torch.stack(flips).to(device)


def augment(images, idx, flip):
    """Images idx (K, B) of uint8 MNIST, each flipped horizontally where flip, as floats (B, K, 28, 28)."""
    x = images[idx]
    x = torch.where(flip[..., None, None], x.flip(-1), x)
    return net.to_float(x).transpose(0, 1)


def sgd_update(params, grads, bufs, lr, momentum=MOMENTUM):
    """torch.optim.SGD's update (no dampening, Nesterov or weight decay) on zeroed buffers: exactly SGD's steps."""
    with torch.no_grad():
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-lr)


def sgd_steps(params, loss_fn, recipe, bufs, update=sgd_update):
    """Steps.build's (step, reset) on the momentum buffers bufs, each step's update by update (sgd_update's
    signature)."""
    def step(idx, flip):
        loss_fn(idx, flip).backward()
        update(params, [p.grad for p in params], bufs, recipe.lr, recipe.momentum)
        for p in params:
            p.grad = None

    def reset():
        for b in bufs:
            b.zero_()
    return step, reset


def cross_entropy(logits_fn, labels):
    """loss_fn(idx, flip): the sum of the K networks' mean cross-entropies (each gets exactly its own gradient) on
    images idx (K, B), from their logits (K, B, 10) logits_fn(idx, flip); labels: all the images' labels."""
    def loss_fn(idx, flip):
        return F.cross_entropy(logits_fn(idx, flip).reshape(-1, NUM_CLASSES), labels[idx].reshape(-1),
                               reduction='sum') / idx.shape[1]
    return loss_fn


class Steps:
    """How each phase's loss and SGD step are built: the plain way. The one extension point of the faster paths:
    speed/generate.py passes a subclass to generation.generate and make_pairs, which overrides these methods."""

    describe = staticmethod(lambda: 'eager')  # the step, for the log line

    def large_loss(self, images, labels, begin, basic, last):
        """loss_fn(idx, flip) of the first phase: the large networks' training forward."""
        def logits(idx, flip):
            h = net.begin_forward(augment(images, idx, flip), begin, training=True)
            return net.last_forward(net.basic_forward(h, basic, training=True), last, training=True)
        return cross_entropy(logits, labels)

    def small_loss(self, images, labels, begin, last, simple, cache):
        """loss_fn(idx, flip) of the small-block phase; cache: the frozen Begin's outputs (Workspace.begin_cache)."""
        k = begin['conv.weight'].shape[0]
        knets = torch.arange(k, device=images.device)[:, None]

        def begin_out(idx, flip):  # (B, K*6, 14, 14)
            if cache is not None:  # Begin is frozen: its output only depends on (image, flipped)
                return cache[knets, flip.long(), idx].transpose(0, 1).flatten(1, 2)
            with torch.no_grad():
                return net.begin_forward(augment(images, idx, flip), begin)
        # training=True: a small block's own BatchNorms (SimpleBlock) use batch statistics, as in train_one
        return cross_entropy(lambda idx, flip: net.last_forward(net.small_forward(begin_out(idx, flip), simple,
                                                                                  training=True), last), labels)

    def build(self, params, loss_fn, recipe):
        """(step, reset): step(idx, flip) is one SGD step (forward, backward, update) of the K networks whose
        trainable tensors are `params`; reset() zeroes the momentum for new networks in the same tensors."""
        return sgd_steps(params, loss_fn, recipe, [torch.zeros_like(p) for p in params])


PLAIN = Steps()


class Workspace:
    """The device tensors of K networks trained side by side, kept for a whole run: their stacked states, the Begin
    cache and each phase's step; every group loads its networks into them, so a step is built only once."""

    def __init__(self, states, recipe, mnist, steps=PLAIN):
        self.states, self.recipe, self.mnist, self.steps = states, recipe, mnist, steps
        self.k = states['last']['fc.weight'].shape[0]
        self.cache, self.built = None, {}

    def load(self, states):
        """Copy the stacked states of new networks into the workspace's tensors."""
        with torch.no_grad():
            for block, state in states.items():
                for name, t in state.items():
                    self.states[block][name].copy_(t)

    def begin_cache(self, images, begin):
        """Frozen Begin's output for every image, unflipped and flipped: (K, 2, N, 6, 14, 14), one tensor per run."""
        if self.cache is None:
            self.cache = torch.empty(self.k, 2, len(images), *net.FEATURE, device=images.device)
        for flipped in (0, 1):
            net.begin_outputs(images.flip(-1) if flipped else images, begin, out=self.cache[:, flipped])
        return self.cache

    def step(self, phase, params, loss_fn):
        """The phase's step, built at its first use, its momentum zeroed."""
        if phase not in self.built:
            self.built[phase] = self.steps.build(params, loss_fn, self.recipe)
        step, reset = self.built[phase]
        reset()
        return step


def train_phase(step, gens, n, device, recipe, after_epoch=lambda epoch: None):
    """recipe.num_epochs epochs of SGD steps over n images, every network in its own order with its own flips,
    after_epoch(epoch) after each. The next epoch's orders are drawn in a second thread (20 ms a pair on one CPU
    core, which would leave a GPU idle); the generators are still drawn one epoch after another."""
    with concurrent.futures.ThreadPoolExecutor(1) as drawer:
        drawn = drawer.submit(draw_epoch, gens, n, device)
        for epoch in range(recipe.num_epochs):
            perm, flip = drawn.result()
            if epoch + 1 < recipe.num_epochs:
                drawn = drawer.submit(draw_epoch, gens, n, device)
            for b0 in range(0, n, recipe.batch_size):  # the last partial batch is kept
                step(perm[:, b0:b0 + recipe.batch_size], flip[:, b0:b0 + recipe.batch_size])
            after_epoch(epoch)


def trainable(state):
    """The float parameters of a stacked state (not BN statistics), set to require grad."""
    return [t.requires_grad_() for name, t in state.items() if 'running' not in name and 'num_batches' not in name]


def freeze(*states):
    """Stop tracking gradients of the stacked states' tensors."""
    for t in [t for state in states for t in state.values()]:
        t.requires_grad_(False)


def small_phase(begin, last, simple, gens, recipe, mnist, cache_begin=None, ws=None, after_epoch=lambda epoch: None):
    """The recipe's second phase: train the stacked small blocks `simple` in place between the frozen, eval-mode
    Begin and Last; return their test accuracy (K,) before and after. ws: the Workspace holding these states."""
    train_x, train_y, test_x, test_y = mnist
    k, device = begin['conv.weight'].shape[0], begin['conv.weight'].device
    ws = ws or Workspace({'begin': begin, 'last': last, 'simple': simple}, recipe, mnist)
    frozen = [t.clone() for t in (*begin.values(), *last.values())]
    acc_init = net.stacked_accuracy(test_x, test_y, begin, simple, last, 'simple')
    if cache_begin is None:
        cache_begin = sizing.begin_cache_fits(recipe.num_epochs, k, len(train_x), device)
    cache = ws.begin_cache(train_x, begin) if cache_begin else None
    step = ws.step(('small', cache is not None), trainable(simple),
                   ws.steps.small_loss(train_x, train_y, begin, last, simple, cache))
    train_phase(step, gens, len(train_x), device, recipe, after_epoch)
    freeze(simple)
    if not all(torch.equal(a, b) for a, b in zip((*begin.values(), *last.values()), frozen)):
        raise RuntimeError('the frozen Begin/Last changed during the small-block phase')
    return acc_init, net.stacked_accuracy(test_x, test_y, begin, simple, last, 'simple')


def make_pairs(indices, recipe, mnist, device, cache_begin=None, workspaces=None, steps=PLAIN, epoch_log=None,
               large=None):
    """Train the networks `indices` side by side; return their shard (CPU copies). workspaces: a dict K ->
    Workspace kept across calls (one K at a time: each holds a Begin cache), so that groups reuse its steps.
    epoch_log: a dict that receives each phase's test accuracies (K,) after every epoch (--original_log).
    large: these networks' trained {'begin', 'basic', 'last', 'acc_large'} (stacked; --large_from): the first phase
    is skipped, its draws of the data order replayed, so the small blocks are those of a full run."""
    train_x, train_y, test_x, test_y = mnist
    k = len(indices)
    seeds = [utils.seed_for(recipe.seed, recipe.kind, i) for i in indices]
    sds = [init_pair(s, recipe.small_block) for s in seeds]
    states = {block: net.stack_states([sd[j] for sd in sds]) for j, block in enumerate(PAIR_BLOCKS)}
    if large is not None:
        if 'seed' in large and large['seed'].tolist() != seeds:
            raise utils.UserError(f'--large_from: networks {indices[0]}..{indices[-1]} were made from other seeds')
        states.update({b: large[b] for b in ('begin', 'basic', 'last')})
    workspaces = {} if workspaces is None else workspaces  # None: a workspace for this call only
    ws = workspaces.get(k)
    if ws is None or ws.mnist is not mnist:
        workspaces.clear()  # free the previous K's workspace before this one is allocated
        ws = workspaces[k] = Workspace({b: {n: t.to(device) for n, t in s.items()} for b, s in states.items()},
                                       recipe, mnist, steps)
    else:
        ws.load(states)
    begin, basic, last, simple = (ws.states[b] for b in PAIR_BLOCKS)
    gens = [data_generator(s) for s in seeds]

    def scorer(key, middle, kind):  # after_epoch: each epoch's test accuracies into epoch_log[key]
        if epoch_log is None:
            return lambda epoch: None
        epoch_log[key] = []
        return lambda epoch: epoch_log[key].append(net.stacked_accuracy(test_x, test_y, begin, middle, last, kind))

    # 1. the large network, all of it trained (or taken, trained, from another root)
    if large is None:
        params = trainable(begin) + trainable(basic) + trainable(last)
        step = ws.step('large', params, steps.large_loss(train_x, train_y, begin, basic, last))
        train_phase(step, gens, len(train_x), device, recipe, scorer('large', basic, 'basic'))
        freeze(begin, basic, last)
        acc = {'acc_large': net.stacked_accuracy(test_x, test_y, begin, basic, last, 'basic')}
    else:
        skip_epochs(gens, len(train_x), recipe.num_epochs)
        acc_large = large.get('acc_large')  # the original layout has no place for it: measured again, the same way
        acc = {'acc_large': acc_large.to(torch.float64) if acc_large is not None
               else net.stacked_accuracy(test_x, test_y, begin, basic, last, 'basic')}
    nan = torch.full((k,), float('nan'), dtype=torch.float64)
    acc['acc_small_init'], acc['acc_small'] = nan, nan.clone()

    # 2. the small block between the frozen (eval-mode) Begin and Last
    if recipe.train_small:
        acc['acc_small_init'], acc['acc_small'] = small_phase(begin, last, simple, gens, recipe, mnist, cache_begin,
                                                              ws, scorer('small', simple, 'simple'))

    shard = {'recipe': recipe.as_json(), 'index': torch.tensor(list(indices), dtype=torch.long),
             'seed': torch.tensor(seeds, dtype=torch.long),
             'begin': begin, 'basic': basic, 'last': last, **acc}
    if recipe.train_small:
        shard['simple'] = simple
    return {key: ({n: t.detach().to('cpu', copy=True) for n, t in v.items()} if isinstance(v, dict) and key != 'recipe'
                  else v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in shard.items()}
