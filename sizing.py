"""How many networks a generation process trains side by side, and whether it keeps the frozen Begin's outputs:
sized from its share of the GPU's memory (construct_train.py --models_per_step 0, --begin_cache auto)."""
import torch

import net
import utils

NET_BYTES = 600 * 2 ** 20  # GPU memory of one network of a step, mostly its Begin cache (538 MiB at 60,000 images)
PROCESS_BYTES = 2 ** 30  # GPU memory of a process beyond its networks: CUDA context, MNIST, cuDNN workspaces
MAX_MODELS_PER_STEP = 128  # the fastest on an H200 (BENCHMARKS.md)


def memory_share(total, free, processes):
    """Bytes one of `processes` processes sharing a GPU may fill: min(free, total) / processes - 1 GiB.

    Processes starting together see the same free memory and so claim at most all of it together; one
    starting later sees the others' memory gone; a share never exceeds total / processes."""
    return max(0, min(free, total) // processes - PROCESS_BYTES)


def models_per_step_for(share):
    """Networks per step that fit in a share of GPU memory (600 MiB each), at least 1, at most 128."""
    return int(max(1, min(MAX_MODELS_PER_STEP, share // NET_BYTES)))


def gpu_share(device, processes):
    """This process's memory_share of its GPU, from the memory free now; None off CUDA."""
    if device.type != 'cuda':
        return None
    free, total = torch.cuda.mem_get_info(device)
    return memory_share(total, free, processes)


def default_models_per_step(device, share):
    """Networks per step: one on a CPU (grouped convolutions are slower there), up to 128 on a GPU
    (measured on an H200: BENCHMARKS.md), fewer when this process's memory share is short."""
    return 1 if device.type != 'cuda' else models_per_step_for(share)


def begin_cache_bytes(k, num_images):
    """Memory of the small-block phase's frozen-Begin cache of k networks (float32, both flips)."""
    return k * 2 * num_images * net.FEATURE_NUMEL * 4


def use_begin_cache(args, k, share):
    """--begin_cache on / off; auto: on a GPU, cache Begin's outputs when they fit in half this process's share
    (the rule make_pairs applies to the whole free memory, which processes starting together would all
    claim), None elsewhere."""
    if args.begin_cache != 'auto':
        return args.begin_cache == 'on'
    if share is None:
        return None
    return args.num_epochs > 1 and begin_cache_bytes(k, args.num_train_images) <= share // 2


def begin_cache_fits(num_epochs, k, num_images, device):
    """Whether make_pairs caches Begin's outputs when not told: over one epoch, in half the free memory."""
    return num_epochs > 1 and utils.fits_in_memory(begin_cache_bytes(k, num_images), device, 0.5)
