"""What the cross-architecture first look adds to its runs (results/cross_arch/runs/<T>/<name>/, scored on
data/demo/val's 100 networks), without retraining them:

  * the Retrained row: T's blocks retrained in place in the same networks (construct_val.py --small_block T
    --train_simple --large_from data/demo/val, `bash experiments/cross_arch.sh retrained T`), added to summary.json;
  * translated.pt: the run's best translator applied to the 100 BasicBlocks. They are made once from the run's
    checkpoint (under --ckpt_root), and must score exactly the summary's KT (best) row (on the run's test images:
    all 10,000, or AttnBlock's first 2,000);
  * agreement.json: how alike each row's blocks are across networks. Every block gets the same inputs, Begin's
    outputs of validation network 0 on the first 64 test images; its output minus its input is its effect. The
    value is the mean cosine between the effects of two different networks' blocks: +1 is one block for every
    network. A function-space measure, so it needs no alignment of hidden units.

Idempotent: a row or file already there must come out the same.

    python experiments/cross_arch_rows.py > results/cross_arch/rows.log
"""
import argparse
import glob
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import evaluate  # noqa: E402
import loader  # noqa: E402
import mnist  # noqa: E402
import net  # noqa: E402
import rules  # noqa: E402
import translate  # noqa: E402
import utils  # noqa: E402

VAL, NUM_VAL = 'data/demo/val', 100
PROBE_IMAGES = 64


def effect_agreement(block, probe):
    """Mean cosine, over pairs of different networks, of the effects (output - input) of a stacked block on the
    same inputs `probe` (B, 6, 14, 14); a block with no effect counts as cosine 0."""
    k = next(iter(block.values())).shape[0]
    block = {name: t.contiguous() for name, t in block.items()}  # a rule's tensors may be views
    x = probe.repeat(1, k, 1, 1)
    with torch.no_grad():
        effect = (net.small_forward(x, block) - x).view(len(probe), k, -1).transpose(0, 1).flatten(1)
    unit = effect / effect.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    return ((cos.sum() - cos.diagonal().sum()) / (k * (k - 1))).item()


def best_checkpoint(ckpt_root, run_dir):
    """The best translator of a run (train.py names it by its accuracy; last.pth is the last epoch's)."""
    found = [p for p in glob.glob(os.path.join(ckpt_root, run_dir, 'ckpts', '**', '*.pth'), recursive=True)
             if os.path.basename(p) != 'last.pth']
    if len(found) != 1:
        raise utils.UserError(f'{run_dir}: expected one best checkpoint under {ckpt_root}, found {len(found)}')
    return found[0]


def translated_blocks(run_dir, ckpt_root, basic, target):
    """The run's translations of the validation BasicBlocks, from run_dir/translated.pt or made and kept there."""
    path = os.path.join(run_dir, 'translated.pt')
    if not os.path.exists(path):
        args = argparse.Namespace(ckpt=best_checkpoint(ckpt_root, run_dir), small_block=target,
                                  **{flag: None for flag in translate.SIZE_FLAGS})
        blocks = evaluate.translate_blocks(translate.load_translator(args), basic)
        utils.atomic_save({k: t.clone() for k, t in blocks.items()}, path)
    return utils.load_file(path, 'translated blocks')


def retrained_blocks(root, val):
    """The stacked small blocks retrained in val's networks under root, or None when root has not all of them."""
    try:
        theirs = loader.ValDataset(root, NUM_VAL)
    except utils.UserError as e:  # not made yet, or not all of it
        print(f'no Retrained row from {root} yet ({" ".join(str(e).split())[:200]})')
        return None
    for name in ('begin', 'basic', 'last'):
        if not all(torch.equal(a, b) for a, b in zip(getattr(theirs, name).values(), getattr(val, name).values())):
            raise utils.UserError(f'{root}: its {name} blocks are not those of {VAL}')
    return theirs.simple


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default='data/cross_arch', help="the study's generated roots ($DATA of cross_arch.sh)")
    p.add_argument('--ckpt_root', default='/tmp/kt_results', help="where cross_arch.sh's runs keep their checkpoints")
    args = p.parse_args()
    os.chdir(REPO)
    val = loader.ValDataset(VAL, NUM_VAL)
    images, labels = mnist.load_mnist('data', train=False)
    scorers = {}

    def scorer(n):  # a run scored on its first n test images (AttnBlock's: fewer, for time)
        if n not in scorers:
            scorers[n] = evaluate.Scorer(images[:n], labels[:n], val.begin, val.last)
        return scorers[n]
    probe = net.begin_outputs(images[:PROBE_IMAGES], {k: t[:1] for k, t in val.begin.items()})[0]
    agreement, added = {}, {}  # per target: {blocks: agreement}, {row: summary row} for its summaries
    for path in sorted(glob.glob('results/cross_arch/runs/*/*_demo_val*/summary.json')):
        run_dir, s = os.path.dirname(path), json.load(open(path))
        target, rows, score = s['target'], s['rows'], scorer(s['num_test_images'])
        if target not in agreement:  # the rows every run of this target shares
            shared = {'Random Init': evaluate.random_init(NUM_VAL, 0, target),
                      **{name: rule(val.basic) for name, rule in rules.rules_of(target).items()}}
            retrained = retrained_blocks(os.path.join(args.data, target, 'val'), val)
            if retrained is not None:
                shared['Retrained'] = retrained
            agreement[target] = {name: effect_agreement(block, probe) for name, block in shared.items()}
            added[target] = {} if retrained is None else {'Retrained': evaluate.acc_row(score(retrained))}
            print(f'{target}: ' + ', '.join(f'{n} {v:+.3f}' for n, v in agreement[target].items()))
        new = added[target]
        for name, row in new.items():
            if name in rows and rows[name] != row:
                raise utils.UserError(f'{path}: its "{name}" row differs from the one measured now')
        if new.keys() - rows.keys():
            s['rows'] = {**rows, **new}
            utils.atomic_write(path, json.dumps(s, indent=1))
        blocks = translated_blocks(run_dir, args.ckpt_root, val.basic, target)
        if evaluate.acc_row(score(blocks))['accs'] != rows['KT (best)']['accs']:
            raise utils.UserError(f'{run_dir}/translated.pt does not score the summary\'s KT (best) row')
        run = os.path.basename(run_dir)
        agreement[target][run] = effect_agreement(blocks, probe)
        print(f'{target} {run}: KT outputs across networks {agreement[target][run]:+.3f}; '
              f'{evaluate.verdict(s["rows"])}')
    utils.atomic_write('results/cross_arch/agreement.json', json.dumps(agreement, indent=1) + '\n')
    print('wrote results/cross_arch/agreement.json')


if __name__ == '__main__':
    utils.run_main(main)
