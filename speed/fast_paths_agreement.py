"""How closely generation's faster paths agree with the plain step on the CPU: the figures BENCHMARKS.md quotes.

    python speed/fast_paths_agreement.py | tee results/fast_paths_agreement.log
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the top-level modules
import construct  # noqa: E402
import construct_train  # noqa: E402
import generate  # noqa: E402  (speed/generate.py)
import generation  # noqa: E402
import net  # noqa: E402

TINY = ['--num_epochs', '2', '--num_train_images', '600', '--num_test_images', '300', '--device', 'cpu']


def batch_norm_error(memory_format):
    """Largest error of a training-mode BatchNorm (output, running mean, running var) against float64."""
    x = (torch.randn(128, 12, 28, 28, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    out = []
    for t in (x.double(), x.contiguous(memory_format=memory_format)):
        mean, var = torch.zeros(12, dtype=t.dtype), torch.ones(12, dtype=t.dtype)
        y = F.batch_norm(t, mean, var, torch.ones(12, dtype=t.dtype), torch.zeros(12, dtype=t.dtype), True, 0.1, 1e-5)
        out.append((y, mean, var))
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(*out))


def large_steps(flags, images, labels, steps=4):
    """Every tensor of two large networks after `steps` SGD steps of generation's step (batch 64) with
    speed/generate.py's `flags` (speed/tests/test_generate_speed.py compares step variants with it too)."""
    args = generate.get_args(TINY + flags)
    fast = generate.FastSteps(args, images.device)
    sds = [construct.init_pair(s) for s in (5, 6)]
    begin, basic, last = (net.stack_states([sd[j] for sd in sds]) for j in range(3))
    perm, flip = construct.draw_epoch([construct.data_generator(s) for s in (5, 6)], len(images),
                                            images.device)
    params = construct.trainable(begin) + construct.trainable(basic) + construct.trainable(last)
    step, reset = fast.build(params, fast.large_loss(images, labels, begin, basic, last), args.recipe)
    reset()
    for b0 in range(0, steps * 64, 64):
        step(perm[:, b0:b0 + 64], flip[:, b0:b0 + 64])
    return [t.detach() for s in (begin, basic, last) for t in s.values()]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main():
    torch.set_num_threads(1)
    mnist = generation.load_mnist_to(torch.device('cpu'), construct_train.get_args('train', TINY))
    noise = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1))
    print(f'training BatchNorm (128 x 12 x 28 x 28) against float64: '
          f'contiguous {batch_norm_error(torch.contiguous_format):.1e}, '
          f'channels-last {batch_norm_error(torch.channels_last):.1e}')
    for name, images, lab in (('random images', noise, labels), ('MNIST', mnist[0][:256], mnist[1][:256])):
        eager = large_steps([], images, lab)
        print(f'{name}, 4 steps: compiled vs eager {max_diff(eager, large_steps(["--compile"], images, lab)):.1e}, '
              f'channels-last vs plain {max_diff(eager, large_steps(["--channels_last"], images, lab)):.1e}')
    cpu, fast = torch.device('cpu'), generate.get_args(TINY + ['--channels_last'])
    plain = construct.make_pairs(range(2), fast.recipe, mnist, cpu, True)
    last = construct.make_pairs(range(2), fast.recipe, mnist, cpu, True, steps=generate.FastSteps(fast, cpu))
    diff = max((plain[b][n] - last[b][n]).abs().max().item() for b in ('begin', 'basic', 'last', 'simple')
               for n in plain[b] if plain[b][n].is_floating_point())
    print(f'make_pairs, 2 + 2 epochs of 5 steps on 600 MNIST images: channels-last vs plain {diff:.1e} '
          f'(largest weight {max(plain["basic"]["conv1.weight"].abs().max().item(), 0):.2f} in conv1)')


if __name__ == '__main__':
    main()
