"""One stage process started by EngineClient as `python -m engine.runtime.worker ADDRESS RANK`
(never importing the user's main module). It connects back to the client's listener (a Unix
socket at ADDRESS), says its rank, receives (EngineArgs, store path), loads its stage and serves.
Rank 0 also takes requests from the client and sends events back.

Messages LLM -> rank 0: ("add", [(seq_id, prompt ids, params, cache_salt, grammar payload or None)]),
("abort", [seq_id]), ("stats", token, reset, per_step, profile command or None), ("reset_prefix_cache", token),
("shutdown",). Any rank -> LLM: ("ready", rank, info), ("error", rank, one-line summary, full
traceback); rank 0 -> LLM: ("events", [(seq_id, token, reason, extra)]), ("refused", seq_id, message),
("stats", token, snapshot), ("reset_prefix_cache", token, True when nothing stays cached)."""
from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client

from .launch import AUTHKEY_ENV


def _reader(conn, inbox: queue.Queue, stopping: threading.Event) -> None:
    """Feed LLM's messages to the inbox; if LLM goes away (its end closed, or it was killed),
    end this process at once unless it is already shutting down."""
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "shutdown":
                stopping.set()
            inbox.put(msg)
    except (EOFError, OSError):
        if not stopping.is_set():
            os._exit(3)


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


def serve_requests(engine, inbox: queue.Queue, send) -> None:
    """Rank 0's loop: take LLM's messages, step the pipeline, stream events back."""
    from .scheduler import RequestRefused
    while True:
        try:
            msg = inbox.get(block=not engine.has_work)
        except queue.Empty:
            msg = None
        while msg is not None:
            kind = msg[0]
            if kind == "add":
                for sid, prompt, params, cache_salt, grammar in msg[1]:
                    try:
                        engine.add(sid, prompt, params, cache_salt, grammar)
                    except RequestRefused as e:
                        send(("refused", sid, str(e)))
            elif kind == "abort":
                engine.abort(msg[1])
            elif kind == "stats":
                engine.request_stats(*msg[1:])  # token, reset, per_step[, profiler command]
            elif kind == "reset_prefix_cache":
                send(("reset_prefix_cache", msg[1], engine.scheduler.reset_prefix_cache()))
            elif kind == "shutdown":
                engine.shutdown()
                return
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                msg = None
        if engine.has_work:
            events = engine.step()
            if events:
                send(("events", events))
        for reply in engine.take_replies():
            send(reply)


def main(address: str, rank: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is LLM's to handle; it ends us
    _exit_with_parent()
    try:
        conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop(AUTHKEY_ENV)))
        conn.send(("hello", rank, os.getpid()))
        args, store_path = conn.recv()
    except (OSError, EOFError):  # LLM is gone already (interrupted or failed while we started)
        os._exit(3)
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    inbox: queue.Queue = queue.Queue()
    stopping = threading.Event()
    threading.Thread(target=_reader, args=(conn, inbox, stopping), daemon=True).start()
    try:
        import torch
        import torch.distributed as dist

        from .launch import build_rank, init_distributed
        o = args.options
        if o.device == "cuda":
            torch.cuda.set_device(rank)
        else:  # the stages (and LLM's process) share the cores: oversubscribed OpenMP threads spin
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // (o.stages + 1)))
        init_distributed(rank, o.stages, o.device, store_path)
        r = build_rank(args, rank, rank)
        send(("ready", rank, r.info))
        if rank == 0:
            serve_requests(r.engine, inbox, send)
        else:
            r.worker.serve()
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as e:  # report with the traceback, then die: LLM ends the other stages
        tb = traceback.format_exc()
        try:  # LLM's StageDied carries the traceback; stderr gets it only when LLM cannot
            send(("error", rank, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, tb))
        except OSError:
            print(f"[moepipe] stage {rank} failed:\n{tb}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(1)
    stopping.set()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
