"""The GPUs' measured ceilings, for the floors the benchmarks compare against: HBM copy bandwidth
(read + write), the bf16 matmul rate (8192^3), and with 2+ GPUs the GPU-to-GPU copy bandwidth
(256 MiB) and a 4 KiB copy's round trip with a host sync. One JSON line each.

    python bench/ceilings.py"""
from __future__ import annotations

import json
import time

import torch


def timed_s(fn, reps: int = 20) -> float:
    """Median seconds of fn over reps, CUDA events around each call."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    n = torch.cuda.device_count()
    x = torch.randn(2**29, dtype=torch.bfloat16, device="cuda:0")  # 1 GiB
    y = torch.empty_like(x)
    t = timed_s(lambda: y.copy_(x))
    print(json.dumps({"what": "hbm_copy", "gpu": torch.cuda.get_device_name(0), "gpus": n,
                      "GBps_rw": round(2 * x.numel() * 2 / t / 1e9, 1)}), flush=True)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda:0")
    b = torch.randn_like(a)
    t = timed_s(lambda: a @ b)
    print(json.dumps({"what": "bf16_matmul", "TFLOPs": round(2 * 8192**3 / t / 1e12, 1)}), flush=True)
    if n < 2:
        return
    src = torch.randn(128 * 2**20, dtype=torch.bfloat16, device="cuda:0")
    dst = torch.empty_like(src, device="cuda:1")
    t = timed_s(lambda: dst.copy_(src))
    print(json.dumps({"what": "p2p_copy", "GBps": round(src.numel() * 2 / t / 1e9, 1),
                      "peer_access": torch.cuda.can_device_access_peer(0, 1)}), flush=True)
    small = torch.randn(2048, dtype=torch.bfloat16, device="cuda:0")
    sd = torch.empty_like(small, device="cuda:1")
    for _ in range(10):
        sd.copy_(small)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t0 = time.perf_counter()
    for _ in range(1000):
        sd.copy_(small)
        torch.cuda.synchronize(1)
    print(json.dumps({"what": "p2p_4KiB_roundtrip_host_sync", "us": round((time.perf_counter() - t0) * 1e3, 2)}))


if __name__ == "__main__":
    main()
