"""StageProcesses: an LLM's stage processes: start them, name the one that failed, end them."""
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
from multiprocessing.connection import Listener, wait
from pathlib import Path

from .launch import AUTHKEY_ENV

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


class StageDied(RuntimeError):
    """A stage process ended while the engine needed it."""


class EngineClosed(RuntimeError):
    """The engine was closed."""


class StageProcesses:
    """LLM's stage processes (self._procs, self._conns): start them and read their load reports; on a
    failure name the culprit, end them all and set self._dead."""

    def _start(self) -> None:
        S, timeout_s = self.args.stages, self.options.load_timeout_s
        key = os.urandom(16)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        # the stages' FileStore (no socket on any interface); NCCL keeps using it for communicators
        # it creates lazily (point-to-point pairs), so it lives until the stages end
        rdzv = self._rdzv = tempfile.mkdtemp(prefix="moepipe-rdzv-")
        env = dict(os.environ, **{AUTHKEY_ENV: key.hex()})
        if Path("/sys/class/net/lo").exists():  # gloo's and NCCL's own sockets on loopback: every stage is here
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env["PYTHONPATH"] = os.pathsep.join([_REPO_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        host, port = listener.address
        try:
            for rank in range(S):
                # own session: the terminal's Ctrl-C reaches only this process, which ends the stages
                p = subprocess.Popen([sys.executable, "-m", "engine.worker", host, str(port), str(rank)],
                                     env=env, start_new_session=True, cwd=_REPO_ROOT)
                self._procs.append(p)
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
                for rank, p in enumerate(self._procs):
                    if p.poll() is not None and rank not in ready:
                        self._fail({rank: None})
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stages did not finish loading within {timeout_s:.0f} s (load_timeout_s)")
        except BaseException:
            self._kill_all()
            raise
        finally:
            listener.close()
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
        codes = {r: p.poll() for r, p in enumerate(self._procs)}
        self._kill_all()
        rank = silent[0] if silent else order[0]
        p = self._procs[rank] if rank < len(self._procs) else None
        if rank in said:
            _, _, summary, tb = said[rank]
            err = StageDied(f"stage {rank} failed: {summary}\n\nstage {rank} traceback:\n{tb}")
        else:
            err = StageDied(f"stage {rank} (pid {p.pid if p else '?'}) died with exit code {codes.get(rank)}")
        self._dead = err
        raise err

    def _kill_all(self) -> None:
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for c in self._conns:
            if c is not None:
                c.close()
        self._conns = [None] * len(self._conns)
        if getattr(self, "_rdzv", None):
            shutil.rmtree(self._rdzv, ignore_errors=True)

