"""The original's own command, log lines, warm-up and flagfile, as its users rely on them."""
import os
import re
import shlex

import pytest

import runs
import train
from test_train import TINY, read_metrics, run_dirs, train_argv

pytestmark = pytest.mark.usefixtures('one_thread')

# The original README's translator command, exactly as printed there.
ORIGINAL_COMMAND = r"""python train.py --gpu_id 0 \
                --optimizer adam --lr 0.001 --batch_size 4096 \
                --wd 0. --scheduler cos --warmup 0 --grad_clip -1. \
                --num_layers 24 --s_dim 72 --c_dim 128 --hidden_s_dim 256 --hidden_c_dim 512 \
                --mask_target t --prob 0. \
                --noise_target t --noise 0. \
                --dropout 0.1 \
                --num_epochs 1000 --log_step 25 --train_data_length 300000
"""


def shell_words(command):
    """The words a POSIX shell passes to the program: backslash-newlines joined, then split."""
    return shlex.split(command.replace('\\\n', ' '))


def original_flags():
    words = shell_words(ORIGINAL_COMMAND)
    assert words[:2] == ['python', 'train.py']
    return words[2:]


def test_original_command_parses_verbatim():
    args = train.get_args(original_flags())
    train.check_args(args)
    want = dict(gpu_id='0', optimizer='adam', lr=0.001, batch_size=4096, wd=0.0, scheduler='cos', warmup=0,
                grad_clip=-1.0, num_layers=24, s_dim=72, c_dim=128, hidden_s_dim=256, hidden_c_dim=512,
                mask_target='t', prob=0.0, noise_target='t', noise=0.0, dropout=0.1, num_epochs=1000, log_step=25,
                train_data_length=300000)
    assert {k: getattr(args, k) for k in want} == want
    # everything else keeps its default
    defaults = train.get_args([])
    assert {k: v for k, v in vars(args).items() if k not in want} == \
        {k: v for k, v in vars(defaults).items() if k not in want}


FLOAT_FLAGS = ('lr', 'wd', 'grad_clip', 'prob', 'noise', 'dropout', 'functional_weight', 'ce_weight')


@pytest.mark.parametrize('value', ['-1.', '0.', '.5', '-.5', '1e-3', '-1e-3', '-1', '2.5E+2'])
@pytest.mark.parametrize('flag', FLOAT_FLAGS)
def test_every_absl_number_form(flag, value):
    assert getattr(train.get_args([f'--{flag}', value]), flag) == float(value)
    assert getattr(train.get_args([f'--{flag}={value}']), flag) == float(value)


def test_negative_integers_too():
    assert train.get_args(['--warmup', '-1']).warmup == -1  # parsed; check_args then names the flag
    assert train.get_args(['--stop_after_epoch=-2']).stop_after_epoch == -2


def test_original_command_runs_through_one_evaluation(pair_sets, tmp_path):
    """The verbatim flags plus only what a test needs: data paths, a tiny translator, one epoch."""
    overrides = ['--train_path', pair_sets['train'], '--val_path', pair_sets['val'], '--train_data_length', '12',
                 '--val_data_length', '3', '--num_test_images', '200', '--device', 'cpu',
                 '--ckpt_path', str(tmp_path / 'ckpts'), '--log_path', str(tmp_path / 'logs'),
                 *TINY, '--num_epochs', '1']
    argv = original_flags() + overrides
    train.main(argv)
    ckpt_dir, log_dir = run_dirs(argv)
    args = train.get_args(argv)
    assert (args.dropout, args.log_step, args.grad_clip, args.batch_size) == (0.1, 25, -1.0, 4096)
    assert os.path.exists(os.path.join(ckpt_dir, 'summary.json'))
    text = open(os.path.join(log_dir, 'train.log')).read()
    # the original's lines, with its wording and number formats
    for pattern in (r'Random Init, Mean Accuracy \d+\.\d\d%, Min Accuracy \d+\.\d\d%, Max Accuracy \d+\.\d\d%',
                    r'Accuracy Distribution \[(\d+, ){19}\d+\]',
                    r'Epoch 0, Loss: \d+\.\d{6}\n',
                    r'Epoch 0, Mean Accuracy \d+\.\d\d%, Min Accuracy \d+\.\d\d%, Max Accuracy \d+\.\d\d%',
                    r'Update Best Mean Accuracy \d+\.\d\d%',
                    r'Best Mean Accuracy \d+\.\d\d%\n.*Accuracy Distribution \[(\d+, ){19}\d+\]'):
        assert re.search(pattern, text), pattern
    rows = read_metrics(log_dir)
    best = [line for line in text.splitlines() if ': Best Mean Accuracy' in line][0]
    assert best.endswith(f'Best Mean Accuracy {float(rows[-1]["mean"]):.2f}%')


def test_warmup_matches_the_original_per_iteration(pair_sets, tmp_path, monkeypatch):
    """--warmup 1 with 3 steps per epoch (W = 3 iterations): step j runs at lr x min(j, 3) / 3, from j = 0."""
    seen = []
    real_step = train.train_step

    def recording_step(model, optimizer, *a, **kw):
        seen.append(optimizer.param_groups[0]['lr'])
        return real_step(model, optimizer, *a, **kw)

    monkeypatch.setattr(train, 'train_step', recording_step)
    train.main(train_argv(pair_sets, tmp_path, '--warmup', '1', '--num_epochs', '3', '--lr', '0.003',
                          '--log_step', '100'))
    w = 3
    assert seen[:w + 2] == pytest.approx([0.0, 0.001, 0.002, 0.003, 0.003], abs=1e-15)
    # then the cosine schedule, per epoch, over the 2 epochs left: epoch 2 at lr x (1 + cos(pi / 2)) / 2
    assert seen[6:] == pytest.approx([0.0015] * 3)


def test_rerun_from_own_flagfile(pair_sets, tmp_path):
    first = train_argv(pair_sets, tmp_path / 'a', '--num_epochs', '3', '--log_step', '1', '--dropout', '0.1',
                       '--prob', '0.1', '--grad_clip', '-1.')
    train.main(first)
    log_a = run_dirs(first)[1]
    flagfile = os.path.join(log_a, 'flagfile.txt')
    lines = open(flagfile).read().splitlines()
    assert '--dropout=0.1' in lines and '--grad_clip=-1.0' in lines and all(x.startswith('--') for x in lines)
    other = ['--ckpt_path', str(tmp_path / 'b' / 'ckpts'), '--log_path', str(tmp_path / 'b' / 'logs')]
    for again in (['@' + flagfile, *other], ['--flagfile', flagfile, *other]):
        args = train.get_args(again)
        assert {k: v for k, v in vars(args).items() if not k.endswith('_path') and k != 'flagfile'} == \
            {k: v for k, v in vars(train.get_args(first)).items() if not k.endswith('_path') and k != 'flagfile'}
    train.main(['--flagfile=' + flagfile, *other, '--num_epochs', '3'])
    log_b = os.path.join(str(tmp_path / 'b' / 'logs'), runs.run_name(train.get_args(first), train.PARSER.get_default))
    first_eval = [(r['epoch'], r['loss'], r['mean']) for r in read_metrics(log_a) if r['mean']][0]
    assert first_eval == [(r['epoch'], r['loss'], r['mean']) for r in read_metrics(log_b) if r['mean']][0]


def test_missing_flagfile_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.get_args(['@' + str(tmp_path / 'nope.txt')])
    assert exc.value.code == 2 and 'nope.txt' in capsys.readouterr().err
