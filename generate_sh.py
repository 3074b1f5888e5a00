"""Write run.sh: one background generation process per (GPU, slot), then `wait`.

Edit the constants below (or override them with flags), then

    python generate_sh.py && nohup sh run.sh &

Each process makes a contiguous, disjoint index range. num_gpus = 0 runs CPU processes that
share the cores. With --num_nodes N --node_rank R every machine writes the run.sh of its own
slice of the index range (node R starts at start_index + R * the pairs of one node).
--slurm writes a SLURM array script instead: one array task per process slice, each a single process on
a GPU of its own (the G x P slices of G GPUs with P processes each become G x P tasks of one GPU).
"""
import argparse
import os
import shlex

import utils

num_gpus = 8
num_processes_each_gpu = 5
num_data_each_process = 7500
start_index = 0
data_root = './data/train'


def get_args(argv=None):
    """Flags overriding the constants above."""
    p = argparse.ArgumentParser(description='Write run.sh for parallel pair generation.')
    p.add_argument('--num_gpus', type=int, default=num_gpus, help='GPUs per machine; 0 = CPU processes')
    p.add_argument('--num_processes_each_gpu', type=int, default=num_processes_each_gpu,
                   help='processes per GPU (per machine when --num_gpus 0)')
    p.add_argument('--num_data_each_process', type=int, default=num_data_each_process,
                   help='networks made by each process')
    p.add_argument('--start_index', type=int, default=start_index, help='first index of the whole job')
    p.add_argument('--data_root', type=str, default=None,
                   help=f'shard folder (default {data_root}, or ./data/val with --val)')
    p.add_argument('--val', action='store_true', help='run construct_val.py instead of construct_train.py')
    p.add_argument('--num_nodes', type=int, default=1, help='machines sharing the job')
    p.add_argument('--node_rank', type=int, default=0, help='this machine, 0 .. num_nodes - 1')
    p.add_argument('--num_cpus', type=int, default=os.cpu_count() or 1,
                   help='cores shared by CPU processes (sets each one\'s --num_threads)')
    p.add_argument('--extra', type=str, default='',
                   help='extra flags for every process, e.g. "--seed 1 --num_epochs 10"')
    p.add_argument('--out', type=str, default='run.sh', help='script to write')
    p.add_argument('--slurm', action='store_true',
                   help='write a SLURM array script instead of run.sh: a task per process slice, one GPU each')
    args = p.parse_args(argv)
    for flag in ('num_processes_each_gpu', 'num_data_each_process', 'num_nodes', 'num_cpus'):
        if getattr(args, flag) <= 0:
            raise utils.UserError(f'--{flag} must be > 0 (got {getattr(args, flag)})')
    if args.num_gpus < 0 or args.start_index < 0:
        raise utils.UserError('--num_gpus and --start_index must be >= 0')
    if not 0 <= args.node_rank < args.num_nodes:
        raise utils.UserError(f'--node_rank must be in [0, {args.num_nodes}) (got {args.node_rank})')
    if args.data_root is None:
        args.data_root = './data/val' if args.val else data_root
    return args


def process_slices(args):
    """(gpu, num_data, start) of each process of this node."""
    num_proc = max(args.num_gpus, 1) * args.num_processes_each_gpu
    node_start = args.start_index + args.node_rank * num_proc * args.num_data_each_process
    return [(p // args.num_processes_each_gpu if args.num_gpus else 0, args.num_data_each_process,
             node_start + p * args.num_data_each_process) for p in range(num_proc)]


def command(args, gpu, num, start):
    """The generation command of one process."""
    script = 'construct_val.py' if args.val else 'construct_train.py'
    cmd = (f'python {script} --gpu_id {gpu} --num_data {num} --start_index {start} '
           f'--data_root {shlex.quote(args.data_root)}')
    if args.num_gpus == 0:
        threads = max(1, args.num_cpus // args.num_processes_each_gpu)
        cmd += f' --device cpu --num_threads {threads}'
    else:  # each process sizes its steps from its share of the GPU, not from all the memory it sees free
        cmd += f' --processes_per_gpu {args.num_processes_each_gpu}'
    return cmd + (f' {args.extra}' if args.extra else '')


def run_sh(args):
    """run.sh: every process in the background, then wait for all."""
    lines = [f'{command(args, *s)} &' for s in process_slices(args)]
    return '\n'.join(['#!/bin/sh', f'# node {args.node_rank} of {args.num_nodes}; written by generate_sh.py',
                      *lines, 'wait', ''])


def slurm_sh(args):
    """A SLURM array script: task t makes slice t of the whole job (all nodes' slices)."""
    num_tasks = max(args.num_gpus, 1) * args.num_processes_each_gpu * args.num_nodes
    n = args.num_data_each_process
    script = 'construct_val.py' if args.val else 'construct_train.py'
    gres = '#SBATCH --gres=gpu:1' if args.num_gpus else '#SBATCH --cpus-per-task=1'  # a process uses one GPU
    device = '' if args.num_gpus else ' --device cpu --num_threads 1'
    return '\n'.join([
        '#!/bin/bash', '#SBATCH --job-name=kt-pairs', f'#SBATCH --array=0-{num_tasks - 1}', gres,
        '#SBATCH --output=slurm-%A_%a.out', '',
        f'python {script} --num_data {n} --start_index $(( {args.start_index} + SLURM_ARRAY_TASK_ID * {n} )) '
        f'--data_root {shlex.quote(args.data_root)}{device}' + (f' {args.extra}' if args.extra else ''), ''])


def main():
    """Write the script."""
    args = get_args()
    text = slurm_sh(args) if args.slurm else run_sh(args)
    utils.atomic_write(args.out, text)
    print(f'wrote {args.out}' + ('' if args.slurm else f': {len(process_slices(args))} processes'))


if __name__ == '__main__':
    utils.run_main(main)
