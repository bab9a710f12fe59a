"""The client's pipe to rank 0 (engine/client.py): a message over multiprocessing's 16 KiB split (an
8k-token prompt's ids) reaches the stage without waiting for a delayed ACK, as it did over loopback
TCP, where every such message cost about 40 ms."""
import time

from engine import LLM


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
