"""Small helpers shared by the scripts: logging, devices, seeds, atomic saves, errors, summaries."""
import argparse
import hashlib
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import threading

import torch


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a dataset): reported without a traceback."""


class WriteError(Exception):
    """A file could not be written (disk full, read-only, I/O error): `path` and the OSError `error`."""

    def __init__(self, path, error):
        super().__init__(path, error)
        self.path, self.error = path, error

    def __str__(self):
        return f'cannot write {self.path}: {self.error.strerror or self.error}'


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived (stop_signals): the run stops where it is."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    def __str__(self):
        return f'stopped by {signal.Signals(self.signum).name}'


class Stopped(Exception):
    """A run that ends early on purpose: its one line (what is kept, how to resume) and its exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def stopped(cause, kept, resume):
    """The Stopped of a WriteError or Interrupted `cause`: one line with what is `kept` and the `resume` command;
    exit status 128 + the signal's number (as a shell reports a killed process), 1 for a failed write."""
    code = 128 + cause.signum if isinstance(cause, Interrupted) else 1
    fix = 'free space or fix the folder, then ' if isinstance(cause, WriteError) else ''
    return Stopped(f'{cause}; safe on disk: {kept}; nothing half-written remains; {fix}resume with: {resume}', code)


def resume_command(script, argv=None, extra=()):
    """The command that repeats this process: python `script` with its flags (argv, else sys.argv's when they are
    the script's; tests call main() in-process) and the `extra` flags it lacks."""
    if argv is None:
        argv = sys.argv[1:] if os.path.basename(sys.argv[0]) == script else []
    return shlex.join(['python', script, *argv, *(a for a in extra if a not in argv)])


def run_main(main):
    """Run a script's main(); a UserError becomes one clear line on stderr and exit status 2, a Stopped its line
    and its status, a WriteError its line and status 1: never a traceback."""
    try:
        main()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f'error: {e}' if e.code == 1 else str(e), file=sys.stderr)
        sys.exit(e.code)
    except WriteError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


class stop_signals:
    """Within `with stop_signals():`, SIGTERM and SIGINT raise Interrupted at once in the main thread (a group of
    networks or an epoch can take minutes; SLURM waits 30 s before SIGKILL); a second signal kills as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self.old = {s: signal.signal(s, self._raise) for s in self.SIGNALS}
        return self

    def _raise(self, signum, frame):
        for s in self.SIGNALS:  # the cleanup after the first signal is not interrupted again but can be killed
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signum)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


class _FileHandler(logging.FileHandler):
    """A log file whose failed write raises WriteError instead of printing logging's '--- Logging error ---'."""

    def handleError(self, record):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise WriteError(self.baseFilename, error) from None
        super().handleError(record)


def log_to_files(message):
    """Put `message` in the log files only (run_main prints it on the console); a failed write is ignored."""
    record = logging.LogRecord('root', logging.ERROR, __file__, 0, message, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, _FileHandler):
            try:
                h.handle(record)
            except (WriteError, OSError):
                pass


def set_logger(log_path):
    """Log INFO to `log_path` (with timestamps) and to the console; safe to call again."""
    logger = logging.getLogger()
    logger.setLevel(logging.INFO)
    for h in [h for h in logger.handlers if getattr(h, '_kt', False)]:
        logger.removeHandler(h)
        h.close()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        file_handler = _FileHandler(log_path)
    except OSError as e:
        raise WriteError(log_path, e) from None
    file_handler.setFormatter(logging.Formatter('%(asctime)s:%(levelname)s: %(message)s'))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter('%(message)s'))
    for h in (file_handler, console):
        h._kt = True
        logger.addHandler(h)
    return logger


_own_pin = None  # the CUDA_VISIBLE_DEVICES value get_device set itself, if any


def gpu_pin(gpu_id, environ):
    """The CUDA_VISIBLE_DEVICES value to set for --gpu_id, or None to keep the one in `environ`."""
    # As the original: with nothing set, the process sees only the GPU(s) gpu_id names (its cuda:0 first).
    return None if 'CUDA_VISIBLE_DEVICES' in environ else str(gpu_id)


def choose_gpu(gpu_id, environ, num_visible):
    """The device for --gpu_id (an int, or the original's string form '0' or '0,1'): `environ` is the
    environment before gpu_pin, num_visible the CUDA devices the process sees after it (0 without CUDA)."""
    if num_visible == 0:
        return 'cpu'
    if gpu_pin(gpu_id, environ) is not None:
        return 'cuda:0'
    # A scheduler (SLURM, ...) already chose the GPUs: --gpu_id indexes them, so that the processes of
    # one run.sh spread over them instead of all landing on the first.
    if not str(gpu_id).lstrip('-').isdigit():
        raise UserError(f'--gpu_id {gpu_id}: CUDA_VISIBLE_DEVICES={environ["CUDA_VISIBLE_DEVICES"]} is already '
                        f'set, and --gpu_id k then picks the k-th GPU it makes visible: give one index '
                        f'(0..{num_visible - 1})')
    gpu_id = int(gpu_id)
    if not 0 <= gpu_id < num_visible:
        raise UserError(f'--gpu_id {gpu_id}: CUDA_VISIBLE_DEVICES={environ["CUDA_VISIBLE_DEVICES"]} makes '
                        f'{num_visible} GPU(s) visible, and --gpu_id k picks the k-th of them (0..{num_visible - 1})')
    return f'cuda:{gpu_id}'


def get_device(gpu_id=0, device=None):
    """`device` if given, else the GPU --gpu_id names (choose_gpu) when CUDA is present, else CPU and a warning."""
    global _own_pin
    if device:
        return check_device(device)
    environ = dict(os.environ)
    if _own_pin is not None and environ.get('CUDA_VISIBLE_DEVICES') == _own_pin:
        del environ['CUDA_VISIBLE_DEVICES']  # set by an earlier call of this process, not by a scheduler
    pin = gpu_pin(gpu_id, environ)
    if pin is not None:
        os.environ['CUDA_VISIBLE_DEVICES'] = _own_pin = pin
    num_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    chosen = torch.device(choose_gpu(gpu_id, environ, num_visible))
    if chosen.type == 'cpu':  # --gpu_id (default 0, as the original's) asked for a GPU: say that none is used
        env = environ.get('CUDA_VISIBLE_DEVICES')
        hidden = '' if env is None else f', CUDA_VISIBLE_DEVICES={env!r}'
        print(f'warning: --gpu_id {gpu_id} asks for a GPU, but torch {torch.__version__} sees none{hidden}: '
              f'running on {chosen} (--device cpu chooses it without this warning)', file=sys.stderr)
    return chosen


def check_device(name):
    """torch.device(name); a UserError naming --device if it is malformed or a GPU this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f'--device {name}: not a device ({e}); use cpu, cuda or cuda:N') from None
    if device.type == 'cuda':
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f'--device {name}: no CUDA GPU is visible to torch {torch.__version__} here; '
                            f'use --device cpu')
        if device.index is not None and device.index >= n:
            raise UserError(f'--device {name}: {n} GPU(s) are visible, cuda:0..cuda:{n - 1}')
    return device


# The flags of absl itself that absl's flags_into_string() puts at the top of the original's flagfile.txt
# (--nohelp ... --verbosity=0): they concern absl's own help, debugger and logging, none of them a run setting.
ABSL_OWN_FLAGS = frozenset((
    'help', 'helpfull', 'helpshort', 'helpxml', 'only_check_args', 'only_check_flags', 'pdb', 'pdb_post_mortem',
    'run_with_pdb', 'run_with_profiling', 'use_cprofile_for_profiling', 'alsologtostderr', 'log_dir',
    'logger_levels', 'logtostderr', 'showprefixforinfo', 'stderrthreshold', 'verbosity'))


def absl_own_flag(line):
    """Whether a flagfile line sets one of ABSL_OWN_FLAGS (`--name`, `--noname` or `--name=value`)."""
    name = line[2:].split('=', 1)[0] if line.startswith('--') else ''
    return name in ABSL_OWN_FLAGS or (name.startswith('no') and '=' not in line and name[2:] in ABSL_OWN_FLAGS)


class FlagParser(argparse.ArgumentParser):
    """argparse that reads every number form absl accepted as a value (`--grad_clip -1.`, `-.5`, `-1e-3`),
    and `@file` / `--flagfile file` with one `--flag=value` a line (blank lines and # comments skipped); in a
    file, absl's own flags (ABSL_OWN_FLAGS) are skipped and listed in `ignored` until the next parse."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars='@', **kwargs)
        self._negative_number_matcher = re.compile(r'^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$')
        self.ignored = []

    def convert_arg_line_to_args(self, line):
        line = line.strip()
        if absl_own_flag(line):
            self.ignored.append(line)
            return []
        return [] if not line or line.startswith('#') else [line]

    def parse_args(self, args=None, namespace=None):
        self.ignored = []
        args, out = list(sys.argv[1:] if args is None else args), []
        while args:  # --flagfile FILE and --flagfile=FILE mean @FILE
            a = args.pop(0)
            if a == '--flagfile' and args:
                a = '@' + args.pop(0)
            elif a.startswith('--flagfile='):
                a = '@' + a.split('=', 1)[1]
            out.append(a)
        return super().parse_args(out, namespace)


def gpu_ids(value):
    """argparse type of --gpu_id: the original's string form, one GPU index or several ('0', '0,1')."""
    if not re.fullmatch(r'\d+(,\d+)*', str(value)):
        raise argparse.ArgumentTypeError(f'{value!r}: give a GPU index (0) or a comma-separated list (0,1)')
    return str(value)


# Flags several scripts declare, in one place: name -> add_argument keywords. A script may give its own default.
SHARED_FLAGS = {
    'gpu_id': dict(type=gpu_ids, default='0', metavar='K',
                   help='GPU(s) to use, as the original: with CUDA_VISIBLE_DEVICES unset, sets it to K (e.g. 0 or 0,1) '
                        'and uses cuda:0; when it is already set (SLURM, ...), K is one index and picks the K-th GPU '
                        'it makes visible (cuda:K)'),
    'device': dict(default=None, help='e.g. cpu, cuda, cuda:1'),
    'mnist_root': dict(default='data', help='folder holding MNIST/raw/'),
    'num_threads': dict(type=int, default=0, help='CPU threads of this process; 0 = torch default'),
}


def add_shared_flags(parser, *names, helps=None, **defaults):
    """Declare the SHARED_FLAGS `names` on parser (or an argument group); `defaults` overrides their defaults,
    `helps` adds a script's own sentence to a help, e.g. add_shared_flags(p, 'device', 'mnist_root', device='cpu')."""
    for name in names:
        kwargs = dict(SHARED_FLAGS[name])
        if name in defaults:
            kwargs['default'] = defaults.pop(name)
        if name == 'device' and not kwargs['default']:
            kwargs['help'] += '; unset: CUDA if present (the GPU --gpu_id names), else CPU with a warning'
        if helps and name in helps:
            kwargs['help'] += f' ({helps[name]})'
        parser.add_argument(f'--{name}', **kwargs)
    if defaults:
        raise TypeError(f'defaults for flags not declared here: {sorted(defaults)}')


def fits_in_memory(nbytes, device, fraction=0.3):
    """Whether nbytes fit in `fraction` of the device's free memory (CUDA) or of the available RAM."""
    if device.type == 'cuda':
        return nbytes < fraction * torch.cuda.mem_get_info(device)[0]
    return nbytes < fraction * os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def seed_for(seed, split, index):
    """A 63-bit seed derived only from (seed, split, index); train and val never collide."""
    digest = hashlib.sha256(f'kt/{seed}/{split}/{index}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


class _Recorder:
    """A binary file that keeps the first exception of its writes: torch.save reports one as a RuntimeError
    ('unexpected pos ...'), without the errno or the signal."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except BaseException as e:  # an OSError, or Interrupted raised by a signal handler within the write
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def atomic_write(path, data):
    """Write `data` (bytes, str, or a function that writes to a binary file object) to path through a
    temporary file in the same folder and os.replace: never a half-written file. A failed write (disk full,
    read-only folder, I/O error) removes the temporary file and raises WriteError naming `path`."""
    if os.path.isdir(path):
        raise UserError(f'{path} is a folder; give a file name to write')
    tmp = f = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp_', suffix=os.path.splitext(path)[1])
        with os.fdopen(fd, 'wb') as raw:
            f = _Recorder(raw)
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(raw.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would make it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass  # an I/O error may forbid it too: the WriteError below is what the user must see
        error = e if isinstance(e, OSError) else getattr(f, 'error', None)
        if isinstance(error, OSError) and isinstance(e, (OSError, RuntimeError)):
            raise WriteError(path, error) from None
        if error is not None and isinstance(e, RuntimeError):
            raise error from None  # the signal's Interrupted that torch.save turned into a RuntimeError
        raise


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))


def acc_histogram(accs):
    """Counts of accuracies (in %) in the 20 bins [0, 5), [5, 10), ..., [95, 100]."""
    accs = torch.as_tensor(accs, dtype=torch.float64)
    return torch.bincount((accs / 5).floor().clamp(0, 19).long(), minlength=20).tolist()


def acc_summary(accs):
    """'mean / min / max' of accuracies in %."""
    accs = torch.as_tensor(accs, dtype=torch.float64)
    return f'mean {accs.mean():.2f}  min {accs.min():.2f}  max {accs.max():.2f}'


def load_file(path, what='file', hint=''):
    """torch.load(path, weights_only=True) onto the CPU; a missing or unreadable file is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist{hint}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'{what} {path} cannot be read ({type(e).__name__}: {e}): '
                        f'corrupt or not a torch file{hint}') from None


def missing_ranges(indices, start, stop):
    """Contiguous ranges [a, b) of [start, stop) not in `indices`."""
    ranges, a = [], None
    for i in range(start, stop):
        if i in indices:
            if a is not None:
                ranges.append((a, i))
                a = None
        elif a is None:
            a = i
    if a is not None:
        ranges.append((a, stop))
    return ranges


def format_ranges(ranges, limit=10):
    """'a-b, c, ...' for a list of [a, b) ranges."""
    parts = [f'{a}' if b == a + 1 else f'{a}-{b - 1}' for a, b in ranges[:limit]]
    return ', '.join(parts) + (f', ... ({len(ranges)} ranges)' if len(ranges) > limit else '')
