"""engine/runtime/channel.py on gloo between three real processes: micro-batches (header, plan,
hidden; the host lengths of steps that are not decode-only) relayed down in order, typed Stats
requests behind them gathering every stage's entry and coming back to rank 0, returned ids, and Stop
ending every rank."""
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.runtime.channel import HopChannel, Stats, Stop
from engine.runtime.step_plan import H_B, H_MAXQ, H_MB, H_T, HEADER, PlanView, offsets, plan_len

S, HID = 3, 4


def _header(mb: int, T: int) -> np.ndarray:
    """Micro-batch 0 decode-only (T rows of one token), the others a chunk of 2 tokens and T - 2 decodes."""
    h = np.zeros(HEADER, dtype=np.int64)
    h[H_MB], h[H_T] = mb, T
    h[H_B], h[H_MAXQ] = (T, 1) if mb == 0 else (T - 1, 2)
    return h


def _lens(h: np.ndarray, plan: torch.Tensor) -> list[int]:
    """The plan's query_start and context_lens, as the host link carries them."""
    at = offsets(h.tolist())
    return plan[at["query_start"][0]:at["context_lens"][1]].tolist()


def _plan(h: np.ndarray, seed: int) -> torch.Tensor:
    return torch.randint(0, 1000, (plan_len(h.tolist()),), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int32)


def _rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=S)
    groups = tuple(dist.new_group(list(range(S)), backend="gloo") for _ in range(3))
    ch = HopChannel(rank, S, torch.device("cpu"), *groups)
    got = []
    if rank == 0:
        for mb in range(3):
            h = _header(mb, 2 + mb)
            plan = _plan(h, mb)
            ch.send_batch(PlanView(h.tolist(), plan, host=plan.numpy()))
            ch.send_hidden(torch.full((2 + mb, HID), float(mb)))
            if mb == 1:
                ch.send_ctrl(Stats(True, False, {"op": "start"}, [{"rank": 0}]))
        ids = [torch.empty(2 + mb, dtype=torch.int64) for mb in range(3)]
        works = [ch.post_return(t) for t in ids]
        reply = ch.recv_ctrl()
        for w in works:
            w.wait()
        got = [reply, [t.tolist() for t in ids]]
        ch.send_ctrl(Stop())
        ch.flush()
    else:
        while True:
            msg = ch.recv_batch()
            if isinstance(msg, Stop):
                got.append("stop")
                if rank < S - 1:
                    ch.send_ctrl(msg)
                ch.flush()
                break
            if isinstance(msg, Stats):
                got.append(("stats", msg.reset, msg.per_step, msg.profile))
                msg.stages.append({"rank": rank})
                ch.send_ctrl(msg)
                continue
            assert isinstance(msg, PlanView) and isinstance(msg.header, list)
            mb = msg.header[H_MB]
            h = _header(mb, 2 + mb)
            assert msg.header == h.tolist() and torch.equal(msg.plan, _plan(h, mb))
            # the host lengths: absent for a decode-only step, else the plan's own (relayed on)
            assert (msg.lens is None) if mb == 0 else (msg.lens.tolist() == _lens(h, msg.plan)), (mb, msg.lens)
            if rank < S - 1:
                ch.send_batch(msg)
            x = ch.recv_hidden(msg, HID, torch.float32)
            assert torch.equal(x, torch.full((msg.T, HID), float(mb)))
            got.append(("batch", mb))
            if rank < S - 1:
                ch.send_hidden(x)
            else:
                ch.send_return([torch.arange(msg.T) + 10 * mb])
    torch.save(got, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_batches_stats_returns_and_stop_cross_every_hop_in_order():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_rank, args=(os.path.join(d, "store"), d), nprocs=S, join=True)
        got = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(S)]
    reply, ids = got[0]
    assert isinstance(reply, Stats) and reply.stages == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    assert ids == [[10 * mb + i for i in range(2 + mb)] for mb in range(3)]
    for r in (1, 2):  # the stats request arrives between micro-batches 1 and 2, as sent
        assert got[r] == [("batch", 0), ("batch", 1), ("stats", True, False, {"op": "start"}), ("batch", 2), "stop"]

