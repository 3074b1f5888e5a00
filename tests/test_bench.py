"""Every benchmark of bench/ runs end to end at its smallest size: they time the repository's own code paths, so a
change that breaks one shows here rather than in the next GPU session (speed/ has its own: speed/tests)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCHES = {  # script -> (tiny flags, a line its report must print); OUT and TMP stand for files of the test
    'bench_begin_cache.py': (['--k', '4', '--num_images', '64', '--caps_mib', '0.1', '0', '--repeats', '1'],
                             '| 4 x 64 | '),
    'bench_draw.py': (['--k', '8', '--repeats', '1'], 'K = 8: '),
    'bench_eval.py': (['--quick', '--num_nets', '2', '--num_images', '200', '--no_sweep', '--repeats', '1',
                       '--out', 'OUT'], '| (c) train.py: evaluate.Scorer'),
    'bench_generate.py': (['--k', '2', '--num_images', '256', '--epochs', '1', '--workers', '0', '--out', 'OUT'],
                          '| (c) ours, batched K=2 |'),
    'bench_loading.py': (['--quick', '--num_pairs', '64', '--repeats', '1', '--tmp_dir', 'TMP', '--out', 'OUT'],
                         '| shards of 256 |'),
    'bench_translator_step.py': (['--quick', '--batches', '8', '--main_batch', '8', '--num_layers', '1',
                                  '--warmup', '1', '--iters', '1', '--repeats', '1', '--out', 'OUT'],
                                 '| Adam(fused=True), fp32'),
    'profile_step.py': (['--k', '1'], 'aten::convolution_backward'),
    'bench_mnist_load.py': ([], 'later load (cache, md5): '),
}


@pytest.mark.parametrize('script', BENCHES)
def test_benchmark_runs(script, tmp_path):
    flags, line = BENCHES[script]
    out = tmp_path / 'result.json'
    flags = [{'OUT': str(out), 'TMP': str(tmp_path)}.get(f, f) for f in flags]
    run = subprocess.run([sys.executable, f'bench/{script}', *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert line in run.stdout, run.stdout[-3000:]
    if 'OUT' in BENCHES[script][0]:
        result = json.load(open(out))
        assert result['rows']
        if script == 'bench_eval.py':  # the fast evaluator scores every network as the plain one does
            assert result['accuracies_identical'] is True and result['disagreements'] == []


def test_bench_eval_stops_on_a_cpu_when_the_paths_disagree(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(os.path.join(ROOT, 'bench'))
    import bench_eval
    import net
    stacked_logits = net.stacked_logits
    monkeypatch.setattr(net, 'stacked_logits', lambda *a, **k: stacked_logits(*a, **k) + 1e-3)
    with pytest.raises(AssertionError, match='logits of network 0'):
        bench_eval.main(['--quick', '--num_nets', '2', '--num_images', '200', '--no_sweep', '--repeats', '1',
                         '--device', 'cpu', '--out', str(tmp_path / 'result.json')])
    assert not (tmp_path / 'result.json').exists()
