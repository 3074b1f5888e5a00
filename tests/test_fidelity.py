"""The original's own command, log lines, warm-up and flagfile, as its users rely on them."""
import json
import os
import re
import shlex

import pytest
import torch

import runs
import train
import utils
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


def record_lrs(monkeypatch):
    """The list that receives the lr of every training step of train.main from now on."""
    seen = []
    real_step = train.train_step

    def recording_step(model, optimizer, *a, **kw):
        seen.append(optimizer.param_groups[0]['lr'])
        return real_step(model, optimizer, *a, **kw)

    monkeypatch.setattr(train, 'train_step', recording_step)
    return seen


def test_warmup_matches_the_original_per_iteration(pair_sets, tmp_path, monkeypatch):
    """--warmup 1 with 3 steps per epoch (W = 3 iterations): step j runs at lr x min(j, 3) / 3, from j = 0."""
    seen = record_lrs(monkeypatch)
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


# The original train.py's flags as its flagfile.txt holds them (absl: one --flag=value a line), warmup_iters
# among them: it declares that flag and overwrites it with warmup x iterations per epoch before use.
ORIGINAL_FLAGFILE = """--gpu_id=0
--num_epochs=300
--log_step=25
--optimizer=adam
--lr=0.001
--wd=0.0
--grad_clip=-1.0
--warmup=0
--warmup_iters=0
--batch_size=4096
--scheduler=cos
--mask_target=t
--prob=0.0
--noise_target=t
--noise=0.0
--ckpt_path=./ckpts/nobn
--log_path=./logs/nobn
--train_path=/data/nobn
--val_path=/data/val
--num_layers=24
--s_dim=72
--c_dim=128
--hidden_s_dim=256
--hidden_c_dim=512
--dropout=0.0
--train_data_length=300000
--num_cycles=1
"""


def test_an_original_flagfile_replays(tmp_path):
    path = tmp_path / 'flagfile.txt'
    path.write_text(ORIGINAL_FLAGFILE)
    args = train.get_args(['--flagfile', str(path)])
    train.check_args(args)
    paths = ('ckpt_path', 'log_path', 'train_path', 'val_path', 'flagfile')
    assert {k: v for k, v in vars(args).items() if k not in paths} == \
        {k: v for k, v in vars(train.get_args([])).items() if k not in paths}
    assert (args.gpu_id, args.train_path) == ('0', '/data/nobn')
    assert [a.help for a in train.PARSER._actions if a.dest == 'warmup_iters'][0].startswith('ignored')


# The lines of absl's own flags that its flags_into_string() writes first, in this order, into the original's
# flagfile.txt; the run's own flags follow in alphabetical order.
ABSL_OWN_LINES = """--nohelp
--nohelpfull
--nohelpshort
--nohelpxml
--noonly_check_args
--noonly_check_flags
--nopdb
--nopdb_post_mortem
--norun_with_pdb
--norun_with_profiling
--use_cprofile_for_profiling
--noalsologtostderr
--log_dir=
--logger_levels=
--nologtostderr
--showprefixforinfo
--stderrthreshold=fatal
--verbosity=0
"""


def absl_flagfile(values):
    """flagfile.txt as the original's train.py writes it: absl's own lines, then one --flag=value a line, sorted."""
    return ABSL_OWN_LINES + ''.join(f'--{k}={v}\n' for k, v in sorted(values.items()))


def test_the_authors_absl_flagfile_replays(pair_sets, tmp_path):
    """Every flag the original declares, as absl prints it, for a tiny run; our additions on the command line."""
    original = dict(batch_size=5, c_dim=16, ckpt_path=tmp_path / 'ckpts', dropout=0.0, gpu_id=0, grad_clip=-1.0,
                    hidden_c_dim=16, hidden_s_dim=16, log_path=tmp_path / 'logs', log_step=2, lr=0.001,
                    mask_target='t', noise=0.0, noise_target='t', num_cycles=1, num_epochs=2, num_layers=1,
                    optimizer='adam', prob=0.0, s_dim=72, scheduler='cos', train_data_length=12,
                    train_path=pair_sets['train'], val_path=pair_sets['val'], warmup=0, warmup_iters=0, wd=0.0)
    path = tmp_path / 'flagfile.txt'
    path.write_text(absl_flagfile(original))
    assert path.read_text().splitlines()[17:20] == ['--verbosity=0', '--batch_size=5', '--c_dim=16']
    ours = ['--val_data_length', '3', '--num_test_images', '200', '--device', 'cpu']
    command = [w for k, v in original.items() for w in (f'--{k}', str(v))] + ours
    want = vars(train.get_args(command))
    for form in (['@' + str(path)], ['--flagfile', str(path)], [f'--flagfile={path}']):
        got = vars(train.get_args(form + ours))
        assert train.PARSER.ignored == ABSL_OWN_LINES.split()
        assert {k: v for k, v in got.items() if k != 'flagfile'} == {k: v for k, v in want.items() if k != 'flagfile'}
    assert train.get_args(command) and train.PARSER.ignored == []
    train.main(['@' + str(path)] + ours)
    log_dir = run_dirs(command)[1]
    assert json.load(open(os.path.join(log_dir, 'args.json'))) == want  # the run of the original's command
    lines = open(os.path.join(log_dir, 'train.log')).read().splitlines()
    said = [line for line in lines if "absl's own" in line]
    assert len(said) == 1 and said[0].endswith(' '.join(ABSL_OWN_LINES.split()))


def test_absl_own_flags_are_skipped_only_in_a_flagfile(tmp_path, capsys):
    # on the command line they stay unknown flags, and a flag of ours that starts with "no" is not one of them
    with pytest.raises(SystemExit):
        train.get_args(['--nohelp'])
    assert 'unrecognized arguments: --nohelp' in capsys.readouterr().err
    path = tmp_path / 'flagfile.txt'
    path.write_text(ABSL_OWN_LINES + '--noise=0.5\n--noise_target=s\n')
    args = train.get_args(['@' + str(path)])
    assert (args.noise, args.noise_target) == (0.5, 's') and len(train.PARSER.ignored) == 18


def test_gpu_id_takes_the_original_string_form(monkeypatch, capsys):
    assert train.get_args(['--gpu_id', '0,1']).gpu_id == '0,1'
    with pytest.raises(SystemExit):
        train.get_args(['--gpu_id', 'first'])
    assert '--gpu_id' in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(utils, '_own_pin', None)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    # as the original: os.environ['CUDA_VISIBLE_DEVICES'] = FLAGS.gpu_id, then cuda:0
    assert utils.get_device('0,1') == torch.device('cuda:0') and os.environ['CUDA_VISIBLE_DEVICES'] == '0,1'
    assert utils.get_device('1') == torch.device('cuda:0') and os.environ['CUDA_VISIBLE_DEVICES'] == '1'
    # a scheduler's variable is kept and --gpu_id indexes its GPUs: one index, as an int (construct_train) or a string
    monkeypatch.setattr(utils, '_own_pin', None)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,6')
    assert utils.get_device('1') == utils.get_device(1) == torch.device('cuda:1')
    with pytest.raises(utils.UserError, match='--gpu_id 0,1: CUDA_VISIBLE_DEVICES=4,6 is already set'):
        utils.get_device('0,1')
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '4,6'


def test_a_gpu_asked_for_without_one_is_one_warning(pair_sets, tmp_path, monkeypatch, capsys):
    """--gpu_id on a machine without a visible GPU: one warning line naming the device used, at every script's
    device choice (utils.get_device); --device cpu is said on purpose and stays silent."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(utils, '_own_pin', None)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # recorded, so that the variable get_device sets is undone
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    argv = [a for a in train_argv(pair_sets, tmp_path, '--num_epochs', '1') if a not in ('--device', 'cpu')]
    train.main(argv + ['--gpu_id', '0,1'])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
    assert warnings == [f'warning: --gpu_id 0,1 asks for a GPU, but torch {torch.__version__} sees none: running on '
                        f'cpu (--device cpu chooses it without this warning)']
    assert 'device cpu' in open(os.path.join(run_dirs(argv)[1], 'train.log')).read()
    assert utils.get_device('0,1', 'cpu') == torch.device('cpu') and 'warning' not in capsys.readouterr().err
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # every GPU hidden: the warning says so
    assert utils.get_device(0) == torch.device('cpu')
    assert "sees none, CUDA_VISIBLE_DEVICES='': running on cpu" in capsys.readouterr().err


def test_the_original_lines_once_each(pair_sets, tmp_path, capsys):
    """'load N training data' / 'load N validation data' printed, and 'Accuracy Distribution' only where the
    original writes it: after the Random Init row and after the best mean at the end, not after each evaluation."""
    argv = train_argv(pair_sets, tmp_path)  # evaluations at epochs 2 and 3
    train.main(argv)
    assert 'load 12 training data\nload 3 validation data\n' in capsys.readouterr().out
    lines = open(os.path.join(run_dirs(argv)[1], 'train.log')).read().splitlines()
    heads = [re.match(r'(Random Init|Epoch \d+(?=, Mean)|Best Mean Accuracy|Accuracy Distribution)\b',
                      line.split(': ', 1)[-1]) for line in lines]
    assert [m.group(1) for m in heads if m] == [
        'Random Init', 'Accuracy Distribution', 'Epoch 2', 'Epoch 3', 'Best Mean Accuracy', 'Accuracy Distribution']


@pytest.mark.parametrize('warmup', [2, 5])
def test_warmup_at_or_beyond_num_epochs_is_warmup_only(pair_sets, tmp_path, monkeypatch, warmup):
    """As the original: LambdaLR min(j, W) / W at every iteration j of the run (W = warmup x 3 steps), the
    scheduler never steps; --warmup_iters is ignored (the original overwrites it)."""
    seen = record_lrs(monkeypatch)
    argv = train_argv(pair_sets, tmp_path, '--warmup', str(warmup), '--num_epochs', '2', '--lr', '0.003',
                      '--warmup_iters', '1')
    train.check_args(train.get_args(argv))
    train.main(argv)
    w = warmup * 3
    assert seen == pytest.approx([0.003 * min(j, w) / w for j in range(6)], rel=1e-12, abs=1e-15)
    assert [float(r['lr']) for r in read_metrics(run_dirs(argv)[1])] == pytest.approx([seen[2], seen[5]])
