"""EngineClient: an LLM's stage processes, their pipes and the router thread that reads rank 0's
messages: start them, send to rank 0, wait for replies, name the stage that failed, end them."""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from itertools import count
from multiprocessing.connection import Listener, wait
from pathlib import Path
from typing import Any, Callable

from .runtime.launch import AUTHKEY_ENV

POLL_S = 0.25  # how often blocked waits look at the engine's health
GATHER_FAILURES_S = 0.3  # after a first failure, wait this long for the others before picking the culprit
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_WORKERS: "weakref.WeakSet[subprocess.Popen]" = weakref.WeakSet()  # every live worker of this process


def kill_workers() -> None:
    """End every stage process this process started (the CLI's Ctrl-C handler)."""
    for p in list(_WORKERS):
        try:
            p.kill()
        except OSError:
            pass


# sun_path holds 108 bytes with the terminating NUL: a longer socket path fails to bind
_UNIX_PATH_MAX = 107


def rendezvous_dir() -> str:
    """A new private folder for the stages' FileStore and the pipe socket ("pipe" inside it): under
    the temp folder (TMPDIR), or under /tmp where that path would be too long for a Unix socket."""
    for parent in (None, "/tmp"):
        if parent is not None and not Path(parent).is_dir():
            continue
        d = tempfile.mkdtemp(prefix="moepipe-rdzv-", dir=parent)
        if len(os.fsencode(os.path.join(d, "pipe"))) <= _UNIX_PATH_MAX:
            return d
        os.rmdir(d)
    raise RuntimeError(f"the temp folder {tempfile.gettempdir()!r} is too long for the stages' Unix socket path "
                       f"({_UNIX_PATH_MAX} bytes in all) and /tmp is missing: set TMPDIR to a shorter path")


class StageDied(RuntimeError):
    """A stage process ended while the engine needed it."""


class EngineClosed(RuntimeError):
    """The engine was closed."""


class EngineClient:
    """The stage processes of one engine split (args.stages of them, `python -m engine.runtime.worker`),
    their pipes, and a router thread that reads them. Rank 0's "events" and "refused" messages go to
    on_message(msg) on the router thread; replies to call() are handled here. When a stage fails
    (or close() is called) every later send/call raises, and on_end(err) runs so the owner can end
    whatever waits on the engine."""

    def __init__(self, args, on_message: Callable[[tuple], None], on_end: Callable[[BaseException], None]):
        self.args, self.options = args, args.options
        self._on_message, self._on_end = on_message, on_end
        self.procs: list[subprocess.Popen] = []
        self._conns: list = []
        self.dead: BaseException | None = None
        self.closed = False
        self._rdzv: str | None = None
        self._listener: Listener | None = None  # while the stages connect
        self._send_lock = threading.RLock()
        self._lock = threading.Lock()
        self._waiters: dict[int, list] = {}  # call token -> [Event, reply]
        self._tokens = count()
        self._start()
        self._router = threading.Thread(target=self._route, name="moepipe-router", daemon=True)
        self._router.start()

    def _start(self) -> None:
        S, timeout_s = self.args.stages, self.options.load_timeout_s
        key = os.urandom(16)
        # the stages' FileStore (no socket on any interface); NCCL keeps using it for communicators
        # it creates lazily (point-to-point pairs), so it lives until the stages end
        rdzv = self._rdzv = rendezvous_dir()
        # the pipes to the stages: a Unix socket in that private folder, not TCP on loopback, where
        # multiprocessing writes a message over 16 KiB (a prompt of some 5k ids) as header then
        # payload, and Nagle's algorithm holds the payload until the receiver's delayed ACK (~40 ms)
        listener = self._listener = Listener(os.path.join(rdzv, "pipe"), family="AF_UNIX", authkey=key)
        env = dict(os.environ, **{AUTHKEY_ENV: key.hex()})
        if Path("/sys/class/net/lo").exists():  # gloo's and NCCL's own sockets on loopback: every stage is here
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env["PYTHONPATH"] = os.pathsep.join([_REPO_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        try:
            for rank in range(S):
                # own session: the terminal's Ctrl-C reaches only this process, which ends the stages
                p = subprocess.Popen([sys.executable, "-m", "engine.runtime.worker", listener.address, str(rank)],
                                     env=env, start_new_session=True, cwd=_REPO_ROOT)
                self.procs.append(p)
                _WORKERS.add(p)
            self._conns = [None] * S
            accepted: queue.Queue = queue.Queue()

            def accept():
                for _ in range(S):
                    try:
                        accepted.put(listener.accept())
                    except OSError:
                        return
            threading.Thread(target=accept, daemon=True).start()
            deadline = time.monotonic() + timeout_s
            ready: dict[int, dict] = {}
            while len(ready) < S:
                try:
                    conn = accepted.get(timeout=0.05)
                    _, rank, _ = conn.recv()
                    conn.send((self.args, os.path.join(rdzv, "store")))
                    self._conns[rank] = conn
                except queue.Empty:
                    pass
                live = [c for c in self._conns if c is not None]
                for c in wait(live, timeout=0.05) if live else ():
                    rank = self._conns.index(c)
                    try:
                        msg = c.recv()
                    except (EOFError, OSError):
                        self._fail({rank: None})
                    if msg[0] == "error":
                        self._fail({rank: msg})
                    ready[rank] = msg[2]
                for rank, p in enumerate(self.procs):
                    if p.poll() is not None and rank not in ready:
                        self._fail({rank: None})
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stages did not finish loading within {timeout_s:.0f} s (load_timeout_s)")
        except BaseException:
            self._kill_all()
            raise
        finally:
            self._close_listener()
        self.info = ready[0]
        self.stage_info = [ready[r] for r in range(S)]
        self.max_model_len = self.info["max_model_len"]

    def _fail(self, first: dict) -> None:
        """A stage failed (first: rank -> its error message, or None when it ended silently).
        Gather what the others say for a moment, end every stage, raise StageDied naming the
        stage that failed first-hand: one that ended silently (killed) beats one that reported an
        error (often just its peer's broken link); among reporters, the first to report."""
        said = {r: m for r, m in first.items() if m is not None}
        silent = [r for r, m in first.items() if m is None]
        order = list(first)
        end = time.monotonic() + GATHER_FAILURES_S
        live = [c for r, c in enumerate(self._conns) if c is not None and r not in first]
        while live and time.monotonic() < end:
            for c in wait(live, timeout=max(0.0, end - time.monotonic())):
                rank = self._conns.index(c)
                live.remove(c)
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is not None and msg[0] != "error":
                    live.append(c)
                    continue
                order.append(rank)
                if msg is None:
                    silent.append(rank)
                else:
                    said[rank] = msg
        codes = {r: p.poll() for r, p in enumerate(self.procs)}
        self._kill_all()
        rank = silent[0] if silent else order[0]
        p = self.procs[rank] if rank < len(self.procs) else None
        if rank in said:
            _, _, summary, tb = said[rank]
            err = StageDied(f"stage {rank} failed: {summary}\n\nstage {rank} traceback:\n{tb}")
        else:
            err = StageDied(f"stage {rank} (pid {p.pid if p else '?'}) died with exit code {codes.get(rank)}")
        self.dead = err
        raise err

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()  # unlinks its socket file in rdzv
            self._listener = None

    def _kill_all(self) -> None:
        self._close_listener()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for c in self._conns:
            if c is not None:
                c.close()
        self._conns = [None] * len(self._conns)
        if self._rdzv:
            shutil.rmtree(self._rdzv, ignore_errors=True)


    # ---- the router thread -------------------------------------------------------------------
    def _route(self) -> None:
        conns = list(self._conns)
        try:
            while not self.closed:
                for c in wait(conns, timeout=POLL_S):
                    rank = conns.index(c)
                    try:
                        msg = c.recv()
                    except (EOFError, OSError):
                        if self.closed:
                            return
                        self._fail({rank: None})
                    if msg[0] == "error":
                        self._fail({rank: msg})
                    self._handle(msg)
                if not self.closed and any(p.poll() is not None for p in self.procs):
                    dead = next(r for r, p in enumerate(self.procs) if p.poll() is not None)
                    self._fail({dead: None})
        except StageDied as e:
            self._end(e)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            self.dead = StageDied(f"engine router failed: {type(e).__name__}: {e}")
            self._kill_all()
            self._end(self.dead)

    def _handle(self, msg: tuple) -> None:
        if msg[0] in ("stats", "reset_prefix_cache"):  # (kind, token, reply)
            with self._lock:
                w = self._waiters.get(msg[1])
            if w is not None:
                w[1] = msg[2]
                w[0].set()
        else:
            self._on_message(msg)

    def _end(self, err: BaseException) -> None:
        """Wake every call() (it raises the engine's state) and hand err to the owner."""
        with self._lock:
            waiters = list(self._waiters.values())
        for w in waiters:
            w[0].set()
        self._on_end(err)

    # ---- talking to rank 0 -------------------------------------------------------------------
    def check_usable(self) -> None:
        """Raise StageDied (a stage failed) or EngineClosed (closed) when the engine cannot take work."""
        if self.dead is not None:
            raise self.dead
        if self.closed or not self.procs:
            raise EngineClosed("the engine is closed")

    def send(self, msg: tuple) -> None:
        """Send one message to rank 0; raises as check_usable when the engine cannot take it."""
        self.check_usable()
        with self._send_lock:
            try:
                self._conns[0].send(msg)
            except (OSError, AttributeError):
                self.check_usable()
                raise StageDied("stage 0 is gone") from None

    def send_if_running(self, msg: tuple) -> None:
        """send(msg) when the engine still runs; nothing when it died or was closed (an abort then
        has nothing left to stop)."""
        if self.dead is None and not self.closed:
            try:
                self.send(msg)
            except (StageDied, EngineClosed):
                pass

    def call(self, kind: str, *args: Any) -> Any:
        """Send (kind, token, *args) to rank 0 and wait for its (kind, token, reply); returns reply."""
        self.check_usable()
        token = next(self._tokens)
        w = [threading.Event(), None]
        with self._lock:
            self._waiters[token] = w
        try:
            self.send((kind, token, *args))
            while not w[0].wait(POLL_S):
                self.check_usable()
            if w[1] is None:
                self.check_usable()
                raise EngineClosed("the engine was closed")
            return w[1]
        finally:
            with self._lock:
                self._waiters.pop(token, None)

    def close(self, join: bool = False) -> None:
        """Ask the stages to shut down (killed after 10 s), end every waiter with EngineClosed.
        join: also wait for the router thread to end."""
        if self.closed:
            return
        self.closed = True
        if self.procs and self.dead is None and all(p.poll() is None for p in self.procs):
            try:
                with self._send_lock:
                    self._conns[0].send(("shutdown",))
                for p in self.procs:
                    p.wait(timeout=10)
            except (OSError, AttributeError, subprocess.TimeoutExpired):
                pass
        self._kill_all()
        self._end(EngineClosed("the engine was closed"))
        if join and threading.current_thread() is not self._router:
            self._router.join(timeout=10)
