"""HopChannel: everything that crosses a pipeline hop, one object per rank.

Three process groups join the S ranks:
- `fwd` (NCCL on CUDA, gloo on CPU): each micro-batch's int32 plan and hidden states, rank k -> k+1;
- `ret` (the same backend): the last stage's sampled ids and logprob table -> rank 0;
- `ctrl` (gloo, host memory, both directions): the fixed int64 header of every message
  (engine/runtime/step_plan.py) and the typed control messages (Stats, Stop), pickled.

Every message down the pipeline starts with a header on `ctrl`, so a receiver learns what comes
next without reading device memory. Messages on one link arrive in the order they were sent, which
is what keeps a Stats request behind the micro-batches already in flight. Sends are asynchronous
(_Link: the tensors of a send stay alive until it completes)."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .step_plan import H_AUX0, H_KIND, HEADER, PlanView, plan_len

BATCH, STATS, STOP = 0, 1, 2
_CPU = torch.device("cpu")


@dataclass
class Stats:
    """A stats request on its way down, and (from the last stage) the reply to rank 0: each stage
    runs its profiler command, then appends its stats dict to `stages`."""
    reset: bool
    per_step: bool
    profile: dict | None = None  # a StageProfiler command (engine/runtime/trace.py), or None
    stages: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Stop:
    """The end of serving: each rank passes it on, then returns."""


Ctrl = Stats | Stop


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device: through pinned memory (torch's caching host allocator keeps the
    block until the asynchronous copy is done) on CUDA, a private copy on CPU."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t.clone()
    return t.pin_memory().to(device, non_blocking=True)


class _Link:
    """One group's sends in order. A data link completes its previous send before the next (as
    the hidden states' buffers are reused); a host link (ordered: False) never waits for the
    receiver, keeping each message's tensors until its send has completed."""

    def __init__(self, group, ordered: bool = True):
        self.group, self.ordered = group, ordered
        self._pending: list = []  # (work, tensor) of the sends not known complete

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        if self.ordered:
            self.flush()
        else:
            self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        for t in tensors:
            if t.numel():
                t = t.contiguous()
                self._pending.append((dist.isend(t, dst, group=self.group), t))

    def recv(self, src: int, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel():
            dist.recv(tensor, src, group=self.group)
        return tensor

    def irecv(self, src: int, tensor: torch.Tensor):
        return dist.irecv(tensor, src, group=self.group) if tensor.numel() else None

    def flush(self) -> None:
        for w, _ in self._pending:
            w.wait()
        self._pending = []


class HopChannel:
    """The hops of rank `rank` of `num_stages`: down to rank + 1, up from rank - 1, and between the
    last stage and rank 0. Tensors live on `device`; headers and control messages on the host."""

    def __init__(self, rank: int, num_stages: int, device: torch.device, fwd_group, ret_group, ctrl_group):
        self.rank, self.num_stages, self.device = rank, num_stages, device
        self.next, self.prev, self.last = rank + 1, rank - 1, num_stages - 1
        self._fwd, self._ret = _Link(fwd_group), _Link(ret_group)
        # headers and control messages: down, and from the last stage back to rank 0
        self._head, self._back = _Link(ctrl_group, ordered=False), _Link(ctrl_group, ordered=False)

    # ---- down the pipeline -------------------------------------------------------------------
    def send_batch(self, view: PlanView) -> None:
        """A micro-batch's header and plan to the next rank, ahead of its hidden states; a step that
        is not decode-only also sends its host lengths on the host link (PlanView.host_lens), so
        that the next rank's eager step never reads them back from the device."""
        head = [torch.from_numpy(np.array(view.header, dtype=np.int64))]
        if not view.decode_only:
            head.append(torch.from_numpy(np.ascontiguousarray(view.host_lens())))
        self._head.send(self.next, head)
        self._fwd.send(self.next, [view.plan])

    def send_hidden(self, x: torch.Tensor) -> None:
        self._fwd.send(self.next, [x])

    def send_ctrl(self, msg: Ctrl) -> None:
        """A control message to the next rank (the last stage: a Stats reply to rank 0)."""
        to_zero = self.rank == self.last
        link, dst = (self._back, 0) if to_zero else (self._head, self.next)
        raw = pickle.dumps(msg)
        header = np.zeros(HEADER, dtype=np.int64)
        header[H_KIND] = STOP if isinstance(msg, Stop) else STATS
        header[H_AUX0] = len(raw)
        link.send(dst, [torch.from_numpy(header), torch.frombuffer(bytearray(raw), dtype=torch.uint8)])

    def recv_batch(self) -> PlanView | Ctrl:
        """The next message from the previous rank: a micro-batch's PlanView (its hidden states
        follow: recv_hidden) or a control message. The header is read from host memory."""
        return self._recv(self.prev, self._head)

    def recv_hidden(self, view: PlanView, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
        return self._fwd.recv(self.prev, torch.empty(view.T, hidden_size, dtype=dtype, device=self.device))

    def recv_ctrl(self) -> Ctrl:
        """Rank 0: the last stage's next control reply (Stats), in the order the requests went down."""
        msg = self._recv(self.last, self._back)
        if isinstance(msg, PlanView):
            raise RuntimeError("expected a control reply from the last stage, got a micro-batch")
        return msg

    def _recv(self, src: int, link: _Link) -> PlanView | Ctrl:
        h = link.recv(src, torch.empty(HEADER, dtype=torch.int64, device=_CPU)).tolist()
        if h[H_KIND] == BATCH:
            lens = None
            if not (view := PlanView(h, None)).decode_only:
                lens = link.recv(src, torch.empty(2 * view.B + 1, dtype=torch.int32, device=_CPU)).numpy()
            plan = self._fwd.recv(src, torch.empty(plan_len(h), dtype=torch.int32, device=self.device))
            return PlanView(h, plan, lens=lens)
        raw = link.recv(src, torch.empty(h[H_AUX0], dtype=torch.uint8, device=_CPU))
        return pickle.loads(raw.numpy().tobytes())

    # ---- the last stage's sampled ids back to rank 0 -----------------------------------------
    def send_return(self, tensors: list[torch.Tensor]) -> None:
        """The last stage: the sampled ids, then the logprob table when one was asked."""
        self._ret.send(0, tensors)

    def post_return(self, tensor: torch.Tensor):
        """Rank 0: post the receive of one returned tensor (its work handle, or None when empty)."""
        return self._ret.irecv(self.last, tensor)

    def flush(self) -> None:
        """Complete every send still in flight (before a rank returns)."""
        for link in (self._head, self._fwd, self._back, self._ret):
            link.flush()
