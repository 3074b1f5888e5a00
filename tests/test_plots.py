"""report.py --plot: PNG figures drawn from the summaries' own numbers."""
import json
import os

import pytest

import evaluate
import report
import utils

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def summary(run, n, kt, **refs):
    """A summary.json-like dict."""
    rows = {name: evaluate.acc_row(accs) for name, accs in {**refs, 'KT (best)': kt, 'KT (last)': kt}.items()}
    return {'run': run, 'train_pairs': n, 'num_val': len(kt), 'num_test_images': 10, 'config': {}, 'best_epoch': 0,
            'num_epochs': 1, 'rows': rows}


REFS = {'Random Init': [10.0, 11.0, 9.0], 'Weight selection': [30.0, 34.0, 32.0],
        'Weight selection (folded)': [36.0, 38.0, 40.0]}
RUNS = [summary('a/b/mask-t0_noise-t0_n64_seed0_hold32', 64, [20.0, 30.0, 40.0], **REFS),
        summary('a/b/mask-t0_noise-t0_n224_seed0_hold32', 224, [40.0, 50.0, 60.0], **REFS),
        summary('a/b/mask-t0_noise-t0_n64_seed0_hold32_perm', 64, [25.0, 25.0, 25.0], **REFS)]


def test_figures_hold_the_summaries_numbers(tmp_path):
    plt = report.pyplot()
    fig = report.plot_scaling(RUNS, plt)
    ax = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in ax.containers}  # errorbar containers: (data line, caps, bars)
    assert set(lines) == {'faithful MSE', 'MSE + perm'}  # run names in words
    assert [t.get_text() for t in ax.get_xticklabels()] == ['64', '224']  # plain ticks at the sizes run
    assert list(lines['faithful MSE'].get_xdata()) == [64, 224] and list(lines['faithful MSE'].get_ydata()) == [30, 50]
    bands = {p.get_label(): p.get_bbox() for p in ax.patches}  # axhspan: a Rectangle, y in data coordinates
    mean, se = report.mean_se(REFS['Weight selection (folded)'])
    band = bands['Weight selection (folded) (± 1 SE)']
    assert band.y0 == pytest.approx(mean - se) and band.y1 == pytest.approx(mean + se)
    plt.close(fig)
    fig = report.plot_histograms(RUNS[0], plt)
    heights = {}
    for container in fig.axes[0].containers:
        heights[container.get_label()] = [bar.get_height() for bar in container]
    assert heights['KT (best)'] == RUNS[0]['rows']['KT (best)']['histogram']
    assert heights['Weight selection (folded)'] == utils.acc_histogram(REFS['Weight selection (folded)'])
    plt.close(fig)


def test_plot_writes_pngs_and_warm_start(tmp_path, capsys):
    paths = []
    for i, s in enumerate(RUNS):
        os.makedirs(tmp_path / f'run{i}')
        paths.append(str(tmp_path / f'run{i}' / 'summary.json'))
        with open(paths[-1], 'w') as f:
            json.dump(s, f)
    warm = {'steps': [0, 10, 100], 'starts': {'Random Init': [[10, 50, 90], [12, 52, 92]],
                                              'KT': [[40, 70, 91], [42, 72, 93]]},
            'retrained': [95, 96], 'networks': [0, 1]}
    with open(tmp_path / 'warm.json', 'w') as f:
        json.dump(warm, f)
    written = report.plot(RUNS, paths, str(tmp_path / 'fig'), str(tmp_path / 'warm.json'))
    assert sorted(os.listdir(tmp_path / 'fig')) == sorted(os.path.basename(p) for p in written)
    assert len(written) == 1 + len(RUNS) + 1
    for p in written:
        with open(p, 'rb') as f:
            assert f.read(8) == PNG_MAGIC
    fig = report.plot_warm_start(warm, report.pyplot())
    kt = next(c.lines[0] for c in fig.axes[0].containers if c.get_label() == 'KT')
    assert list(kt.get_ydata()) == [41, 71, 92]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ['0', '10', '100'] and ax.get_xlim()[0] == -1
    assert not ax.xaxis.get_minorticklocs().size  # no symlog minor ticks, no '-10^1'
    with pytest.raises(utils.UserError, match='one accuracy per step'):
        report.plot_warm_start(dict(warm, steps=[0, 10]), report.pyplot())


@pytest.mark.parametrize('options, label', [
    ('', 'faithful MSE'), ('_perm_canon', 'MSE + perm + canonical targets'), ('_hinv', 'MSE + hidden-invariant loss'),
    ('_perm_functional-w1-ce0-img32', 'functional + perm'),
    ('_perm_functional-w1-ce1-img32_in-folded_out-refit', 'functional + CE + perm, folded inputs, refit output'),
    ('_in-folded_out-residual', 'MSE, folded inputs, residual output'), ('_mask-t0.1', 'MSE + mask 0.1')])
def test_legends_name_objectives_in_words(options, label):
    assert report.objective_of({'run': f'a/b/mask-t0_noise-t0_n224_seed1_hold32{options}'}) == label
