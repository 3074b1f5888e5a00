"""torchrun support for train.py: one small context that knows this process's place in the job.

`torchrun --nproc_per_node N train.py <flags>` runs the same script on N processes. Every rank draws the
same per-epoch permutation and the same augmentation randomness from the shared seed, builds the whole
global batch of --batch_size pairs and keeps its contiguous share of it (rank_batch): shares differ by at
most one pair, so --batch_size need not divide by the world size. Each rank's loss is scaled so that DDP's
gradient average over ranks is the gradient of the mean over the global batch, exactly as in one process
(true of every --loss here: each is a mean over pairs plus terms equal on every rank). The val networks
are scored in contiguous shares, one per rank, and all-gathered. Only rank 0 logs and writes files. Dropout
draws from each rank's own torch generator (seed_rank), so with --dropout > 0 runs match one process only
in law. Outside torchrun the context is rank 0 of 1 and every method is a no-op or the identity; under
torchrun it joins the process group even with one process (DDP and the collectives run, NCCL on a GPU).
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import utils
from utils import UserError


class Context:
    """rank, world size, device and the few collectives of a (possibly) distributed run."""

    def __init__(self, rank=0, world=1, local_rank=0, device=torch.device('cpu'), distributed=False):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.distributed = distributed  # in a process group (torchrun, even with one process): collectives run
        self.is_main = rank == 0  # the process that logs and writes files

    def share(self, total):
        """(slice, loss weight) of this rank's share of a global batch of `total` pairs."""
        return rank_batch(total, self.rank, self.world)

    def mean(self, t):
        """The mean over ranks of a tensor (all-reduced in place); t itself outside torchrun."""
        if self.distributed:
            dist.all_reduce(t)
            t /= self.world
        return t

    def network_share(self, k):
        """This rank's contiguous share of range(k) networks (all of them outside torchrun)."""
        size = -(-k // self.world)
        return slice(min(self.rank * size, k), min((self.rank + 1) * size, k))

    def gather(self, k, score):
        """score(part) for every rank's share `part` of range(k) (network_share), all-gathered into (k,) float64."""
        if not self.distributed:
            return score(slice(0, k))
        size, part = -(-k // self.world), self.network_share(k)
        mine = torch.zeros(size, dtype=torch.float64, device=self.device)
        if part.stop > part.start:
            mine[:part.stop - part.start] = score(part)
        shares = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(shares, mine)
        return torch.cat(shares)[:k]

    def wrap(self, model, amp='none', compile=None):
        """What the training step calls: model, under --amp bf16, in DDP under torchrun, compiled with --compile
        (model: all of it, as one graph; blocks: each mixing MLP of model, in place). Parameters are shared;
        checkpoints save `model` itself (unwrap)."""
        if compile == 'blocks':
            model.compile_blocks()
        wrapped = BF16Forward(model) if amp == 'bf16' else model
        if self.distributed:
            wrapped = DistributedDataParallel(wrapped, device_ids=[self.device.index]
                                              if self.device.type == 'cuda' else None)
        return torch.compile(wrapped) if compile == 'model' else wrapped

    def seed_rank(self, seed):
        """Ranks > 0 get their own torch seed (their dropout masks differ); rank 0 keeps `seed`."""
        if self.rank > 0:
            torch.manual_seed(utils.seed_for(seed, 'rank', self.rank))

    def rng_states(self):
        """{'ranks': every rank's torch (and CUDA) RNG state} under torchrun, {} otherwise. A collective:
        every rank must call it, not only the main one."""
        if not self.distributed:
            return {}
        mine = {'torch': torch.get_rng_state()}
        if self.device.type == 'cuda':
            mine['cuda'] = torch.cuda.get_rng_state(self.device)
        states = [None] * self.world
        dist.all_gather_object(states, mine)
        return {'ranks': states}

    def restore_rng(self, rng, seed):
        """This rank's states from rng_states(); saved at another world size: seed_rank."""
        if not self.distributed:
            return
        states = rng.get('ranks')
        if states is None or len(states) != self.world:
            return self.seed_rank(seed)
        torch.set_rng_state(states[self.rank]['torch'])
        if self.device.type == 'cuda' and 'cuda' in states[self.rank]:
            torch.cuda.set_rng_state(states[self.rank]['cuda'], self.device)

    def close(self):
        """Wait for every rank, then leave the process group."""
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()


def setup(device_flag=None, gpu_id=0):
    """The Context of this process: from torchrun's environment (joining the process group), else rank 0 of 1
    on --device / --gpu_id."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    launched = all(v in os.environ for v in ('WORLD_SIZE', 'RANK', 'MASTER_ADDR', 'MASTER_PORT'))
    if world <= 1 and not launched:  # torchrun --nproc_per_node 1 still joins a group: its NCCL path runs
        return Context(device=utils.get_device(gpu_id, device_flag))
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
    return Context(rank, world, local_rank, device, distributed=True)


def rank_device(device_flag, local_rank):
    """Under torchrun: cuda:LOCAL_RANK (modulo the visible GPUs) unless --device cpu; --gpu_id is ignored."""
    kind = utils.check_device(device_flag).type if device_flag else ('cuda' if torch.cuda.is_available() else 'cpu')
    if kind == 'cpu':
        return torch.device('cpu')
    if kind != 'cuda' or not torch.cuda.is_available():
        raise UserError(f'--device {device_flag}: under torchrun use cpu or cuda (CUDA available: '
                        f'{torch.cuda.is_available()})')
    return torch.device('cuda', local_rank % torch.cuda.device_count())


def rank_batch(total, rank, world):
    """(slice, loss weight) of rank's contiguous share of a global batch of `total` pairs.
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


def unwrap(model):
    """The plain translator inside Context.wrap's result."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif isinstance(model, (DistributedDataParallel, BF16Forward)):
            model = model.module
        else:
            return model
