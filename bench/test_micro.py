"""CPU micro-benchmarks of the host-side hot paths (pytest-benchmark; not part of the CI tests):

    python -m pytest bench/test_micro.py --benchmark-only

The scheduler and metadata building run on every step of every micro-batch, so their cost per
step bounds decode speed from the host side."""
import torch

from engine.runtime.block_manager import BlockManager
from engine.params import SamplingParams
from engine.runtime.scheduler import Scheduler
from engine.runtime.sequence import Sequence
from model.batch import AttnBatch
from model.moe import experts_grouped, experts_loop, route


def _decoding_scheduler(n: int, prompt: int = 128) -> Scheduler:
    s = Scheduler(BlockManager(700 * n, 16), max_num_seqs=n, max_num_batched_tokens=prompt * n, max_model_len=1 << 20)
    for i in range(n):
        s.add(Sequence(i, list(range(prompt)), SamplingParams(max_tokens=10_000, temperature=0), ()))
    s.complete(s.schedule(), [1] * n)  # everyone prefilled: decoding from here
    return s


def test_schedule_and_complete_256_decodes(benchmark):
    s = _decoding_scheduler(256)
    benchmark.pedantic(lambda: s.complete(s.schedule(), [1] * 256), rounds=300, warmup_rounds=5)


def test_attn_batch_build_64_decodes_at_8k(benchmark):
    tables = [list(range(i * 512, (i + 1) * 512)) for i in range(64)]
    benchmark(AttnBatch.build, [1] * 64, [8192] * 64, tables, 16, [True] * 64, "cpu")


def _moe_inputs(N: int):
    torch.manual_seed(0)
    E, I, H, k = 16, 64, 128, 4
    x = torch.randn(N, H)
    gate, w13, w2 = torch.randn(E, H) * 0.1, torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    _, w, ids = route(x, gate, k, True)
    return x, w13, w2, ids, w


def test_experts_grouped_512_tokens(benchmark):
    benchmark(experts_grouped, *_moe_inputs(512))


def test_experts_reference_loop_512_tokens(benchmark):
    benchmark(experts_loop, *_moe_inputs(512))
