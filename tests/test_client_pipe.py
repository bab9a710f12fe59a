"""The client's pipe to rank 0 (engine/client.py): a message over multiprocessing's 16 KiB split (an
8k-token prompt's ids) reaches the stage without waiting for a delayed ACK, as it did over loopback
TCP, where every such message cost about 40 ms."""
import time

from engine import LLM
from engine.params import SamplingParams


def test_large_message_round_trip_has_no_ack_stall():
    with LLM("tiny", load_format="dummy", device="cpu", kv_cache_gib=0.01, verbose=False) as llm:
        llm.stats()
        ids = list(range(1000, 13000))  # pickled: 3 bytes an id, past the 16 KiB split
        times = []
        for _ in range(5):
            t = time.perf_counter()
            llm.client.send(("abort", ids))  # unknown sequence ids: rank 0 drops them
            llm.stats()  # answered after the abort: the round trip of the large message
            times.append(time.perf_counter() - t)
    # the stall is a delayed ACK (40 ms on Linux) on every large message; the minimum of a few
    # round trips is far below it unless each one waits for it
    assert min(times) < 0.025, times


def test_a_temp_folder_too_long_for_a_unix_socket_falls_back_to_tmp(tmp_path, monkeypatch):
    """TMPDIR deep enough that the pipe's path passes sun_path's 107 bytes: the engine still starts
    (its rendezvous folder under /tmp) and answers; a short TMPDIR is used as it is."""
    import os
    import tempfile

    from engine import client
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    d = client.rendezvous_dir()
    try:
        assert d.startswith("/tmp/moepipe-rdzv-") and len(os.path.join(d, "pipe")) <= 107
    finally:
        os.rmdir(d)
    with LLM("tiny", load_format="dummy", device="cpu", kv_cache_gib=0.01, verbose=False) as llm:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))[0]
        assert len(out.outputs[0].token_ids) == 2
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = client.rendezvous_dir()
    try:
        assert d.startswith(str(tmp_path))
    finally:
        os.rmdir(d)
