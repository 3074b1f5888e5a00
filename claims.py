"""Claims: which process is making which networks of a data root, so that two processes on one root (run.sh
started twice, two machines given the same --node_rank) never make the same group at once.

Before making the group [start, stop), a process creates <root>/claims/<start>_<stop>.claim exclusively
(O_CREAT | O_EXCL), holding {"host", "pid", "started"} as JSON; it removes the file once the group's shard is
written, and touches it every HEARTBEAT_S seconds meanwhile. Another process skips a group that overlaps a live
claim and comes back to it after its other groups. A claim is stale, and taken over (the log says so), when its
process is gone (same host: its pid no longer exists) or when its file was not touched for --claim_timeout hours
(any host: the only test across machines, a process that hangs included). Two processes that claim overlapping
groups at the same moment both see both claims: the earlier (started, host, pid) keeps its group.
"""
import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import socket
import threading
import time

from utils import WriteError

CLAIM_RE = re.compile(r'^(\d+)_(\d+)\.claim$')
HEARTBEAT_S = 60  # how often a holder touches its claims: --claim_timeout must be well above it
POLL_S = 2  # how often a process whose remaining groups are all claimed looks again
HOST = socket.gethostname()
log = logging.getLogger(__name__)


def claims_dir(root):
    """The folder of a root's claims."""
    return os.path.join(root, 'claims')


@dataclasses.dataclass
class Claim:
    """One claim file: its range, holder and the time it was last touched."""
    start: int
    stop: int
    path: str
    host: str = '?'
    pid: int = -1
    started: float = 0.0
    touched: float = 0.0

    def holder(self):
        """'host pid N' for messages."""
        return f'{self.host} pid {self.pid}'

    def stale(self, timeout_h, now=None):
        """Why the claim is stale ('process gone', 'untouched for ...'), or '' while it is live."""
        if self.host == HOST and self.pid > 0 and not pid_alive(self.pid):
            return 'process gone'
        idle = (time.time() if now is None else now) - self.touched
        return f'untouched for {idle / 3600:.2f} h > --claim_timeout {timeout_h:g} h' if idle > timeout_h * 3600 else ''

    def key(self):
        """The order that decides between two overlapping claims made at the same moment."""
        return self.started, self.host, self.pid, self.path


def pid_alive(pid):
    """Whether a process of this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_claims(root):
    """The claims of root, sorted by range; files that vanish while read are skipped, a claim whose JSON is not
    written yet (or is broken) keeps its defaults and is judged by its file time only."""
    folder, out = claims_dir(root), []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        m = CLAIM_RE.match(name)
        if not m:
            continue
        path = os.path.join(folder, name)
        try:
            touched = os.stat(path).st_mtime
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            continue
        claim = Claim(int(m.group(1)), int(m.group(2)), path, started=touched, touched=touched)
        try:
            info = json.loads(text)
            claim.host, claim.pid, claim.started = str(info['host']), int(info['pid']), float(info['started'])
        except (ValueError, KeyError, TypeError):
            pass
        out.append(claim)
    return sorted(out, key=lambda c: (c.start, c.stop, c.path))


class Claims:
    """The claims of this process on one root: try_claim, release, release_all; a thread touches them."""

    def __init__(self, root, timeout_h):
        self.root, self.timeout_h = root, timeout_h
        self.held = {}  # (start, stop) -> Claim
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = None

    def mine(self, claim):
        """Whether a claim read back is one of this process's."""
        return claim.host == HOST and claim.pid == os.getpid()

    def others(self, start, stop):
        """Claims of other processes overlapping [start, stop)."""
        return [c for c in read_claims(self.root) if c.start < stop and start < c.stop and not self.mine(c)]

    def try_claim(self, start, stop):
        """Claim [start, stop): None when claimed, else the live claim of another process that holds (part of) it.
        Stale claims in the way are removed first, and the log says whose they were."""
        for c in self.others(start, stop):
            why = c.stale(self.timeout_h)
            if not why:
                return c
            log.info(f'claims: taking over [{c.start}, {c.stop}) from {c.holder()} ({why}): {c.path}')
            remove(c.path)
        now = time.time()
        claim = Claim(start, stop, os.path.join(claims_dir(self.root), f'{start}_{stop}.claim'), HOST, os.getpid(),
                      now, now)
        with signals_deferred():  # a stop between creating the file and holding it would leave the file behind
            created = self.create(claim)
            if created:
                with self.lock:
                    self.held[(start, stop)] = claim
        if not created:
            return next(iter(self.others(start, stop)), None) or Claim(start, stop, claim.path)
        # another process may have claimed an overlapping range at the same moment: the earlier claim keeps it
        first = min((c for c in self.others(start, stop) if not c.stale(self.timeout_h)), key=Claim.key, default=None)
        if first is not None and first.key() < claim.key():
            self.release(start, stop)
            return first
        self.heartbeat()
        return None

    def create(self, claim):
        """Create the claim's file exclusively with its JSON; False if it exists already."""
        text = json.dumps({'host': claim.host, 'pid': claim.pid, 'started': claim.started,
                           'range': [claim.start, claim.stop]}).encode()
        for _ in range(3):  # another process may remove the empty folder between makedirs and open
            try:
                os.makedirs(claims_dir(self.root), exist_ok=True)
                fd = os.open(claim.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
                break
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue
            except OSError as e:
                raise WriteError(claim.path, e) from None
        else:
            raise WriteError(claim.path, OSError(errno.ENOENT, 'its folder keeps vanishing'))
        try:
            with os.fdopen(fd, 'wb') as f:
                f.write(text)
        except OSError as e:
            remove(claim.path)
            raise WriteError(claim.path, e) from None
        return True

    def release(self, start, stop):
        """Remove this process's claim of [start, stop)."""
        claim = self.held.get((start, stop))
        if claim is not None:
            remove(claim.path)  # before forgetting it: a stop in between leaves it to release_all, not on disk
            with self.lock:
                self.held.pop((start, stop), None)

    def release_all(self):
        """Remove every claim of this process, stop the heartbeat, and remove the claims folder if it is empty."""
        for start, stop in list(self.held):
            self.release(start, stop)
        self.done.set()
        try:
            os.rmdir(claims_dir(self.root))  # a clean run leaves the root as it was; others' claims keep it
        except OSError:
            pass

    def heartbeat(self):
        """Start the thread that touches the held claims every HEARTBEAT_S seconds."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._touch, name='claims-heartbeat', daemon=True)
            self.thread.start()

    def _touch(self):
        while not self.done.wait(HEARTBEAT_S):
            with self.lock:
                paths = [c.path for c in self.held.values()]
            for path in paths:
                try:
                    os.utime(path)
                except OSError:
                    pass  # released meanwhile, or the disk fails: the main thread reports its own writes


@contextlib.contextmanager
def signals_deferred():
    """SIGTERM and SIGINT wait until the block ends (they arrive then): for the few system calls that must not be
    split. Only the main thread can block them for the process; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = {signal.SIGTERM, signal.SIGINT}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def remove(path):
    """Delete a file that another process may delete first."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
