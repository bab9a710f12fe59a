"""Automatic layer split: contiguous layer counts per stage that even out the stages' busy time,
from measured costs (each layer's, the embedding's on stage 0, head + sampling on the last stage),
without letting any stage cut the shared KV pool short (the pool is the minimum over stages).

Measurement: LayerClock (engine/runtime/clock.py) puts timing hooks on a Stage's layers for a warm-up
workload, on the stage's clock, the one its busy time is measured on."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Costs:
    """Milliseconds of one workload: per layer (index = layer), the embedding (stage 0) and the head
    with sampling (last stage)."""
    layer_ms: list[float]
    embed_ms: float
    head_ms: float

    def stage_ms(self, counts: list[int]) -> list[float]:
        out, start = [], 0
        for r, n in enumerate(counts):
            ms = sum(self.layer_ms[start:start + n])
            ms += self.embed_ms if r == 0 else 0.0
            ms += self.head_ms if r == len(counts) - 1 else 0.0
            out.append(ms)
            start += n
        return out


@dataclass(frozen=True)
class MemoryModel:
    """Bytes per stage for the KV-pool constraint: usable card bytes (per stage), weights per layer,
    embedding (stage 0), head (last stage), a fixed reserve per stage, KV bytes per token per layer."""
    card_bytes: list[int]
    layer_bytes: list[int]
    embed_bytes: int
    head_bytes: int
    reserve_bytes: int
    kv_bytes_per_token_layer: int

    def stage_tokens(self, rank: int, start: int, end: int, num_stages: int) -> int:
        w = sum(self.layer_bytes[start:end]) + self.reserve_bytes
        w += self.embed_bytes if rank == 0 else 0
        w += self.head_bytes if rank == num_stages - 1 else 0
        free = self.card_bytes[rank] - w
        return max(0, free) // max(1, (end - start) * self.kv_bytes_per_token_layer)

    def pool_tokens(self, counts: list[int]) -> int:
        out, start = [], 0
        for r, n in enumerate(counts):
            out.append(self.stage_tokens(r, start, start + n, len(counts)))
            start += n
        return min(out)


def even_counts(num_layers: int, num_stages: int) -> list[int]:
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if r < extra else 0) for r in range(num_stages)]


def choose_split(costs: Costs, num_stages: int, memory: MemoryModel | None = None,
                 min_pool_tokens: int | None = None) -> list[int]:
    """Layer counts minimising the busiest stage's time (ties: the smaller sum of squares, i.e. the
    more even one), every stage holding at least one layer. With `memory`, every stage must leave KV
    room for min_pool_tokens (default: the even split's pool), so balancing never shrinks the pool."""
    L = len(costs.layer_ms)
    if not 1 <= num_stages <= L:
        raise ValueError(f"cannot split {L} layers over {num_stages} stages")
    if memory is not None and min_pool_tokens is None:
        min_pool_tokens = memory.pool_tokens(even_counts(L, num_stages))
    prefix = [0.0]
    for c in costs.layer_ms:
        prefix.append(prefix[-1] + c)
    INF = (float("inf"), float("inf"))

    def cost(r: int, i: int, j: int) -> float | None:
        if memory is not None and memory.stage_tokens(r, i, j, num_stages) < min_pool_tokens:
            return None
        ms = prefix[j] - prefix[i]
        ms += costs.embed_ms if r == 0 else 0.0
        ms += costs.head_ms if r == num_stages - 1 else 0.0
        return ms

    # best[r][j]: (max stage ms, sum of squares) of stages 0..r covering layers [0, j); back[r][j]: i
    best = [[INF] * (L + 1) for _ in range(num_stages)]
    back = [[-1] * (L + 1) for _ in range(num_stages)]
    for j in range(1, L - num_stages + 2):
        c = cost(0, 0, j)
        if c is not None:
            best[0][j], back[0][j] = (c, c * c), 0
    for r in range(1, num_stages):
        for j in range(r + 1, L - (num_stages - r - 1) + 1):
            for i in range(r, j):
                prev = best[r - 1][i]
                c = cost(r, i, j) if prev != INF else None
                if c is None:
                    continue
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[r][j]:
                    best[r][j], back[r][j] = cand, i
    if best[-1][L] == INF:
        raise ValueError(f"no split of {L} layers over {num_stages} stages keeps a KV pool of "
                         f"{min_pool_tokens} tokens on every stage")
    counts, j = [], L
    for r in range(num_stages - 1, -1, -1):
        i = back[r][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def costs_from_stats(stats: list[dict], num_layers: int) -> Costs:
    """Costs from each stage's measured stats: 'layer_ms' {layer: ms} and 'eager_ms' (the forwards
    the clocks saw), 'busy_ms' (all its forwards), 'sample_ms' (last stage) and 'clock'. On CUDA,
    graph decode steps run no hooks, so the clocked times are scaled by busy_ms / eager_ms; on CPU
    ('clock': 'cpu') every forward is clocked and used as is. What a stage spends
    outside its layers is its embedding (stage 0) or head (last stage); a middle stage's remainder
    is spread over its layers."""
    layer_ms = [0.0] * num_layers
    embed_ms = head_ms = 0.0
    last = len(stats) - 1
    for r, s in enumerate(stats):
        eager = float(s.get("eager_ms") or s["busy_ms"])
        total = eager if s.get("clock") == "cpu" else s["busy_ms"]
        scale = total / eager if eager > 0 else 1.0
        per = {int(k): float(v) * scale for k, v in s["layer_ms"].items()}
        for i, ms in per.items():
            layer_ms[i] = ms
        rest = max(0.0, total - sum(per.values()))
        if r == 0 and r == last:
            head_ms = rest + s.get("sample_ms", 0.0)  # one stage: nothing to balance
        elif r == 0:
            embed_ms = rest
        elif r == last:
            head_ms = rest + s.get("sample_ms", 0.0)
        elif per:
            for i in per:
                layer_ms[i] += rest / len(per)
    return Costs(layer_ms, embed_ms, head_ms)


def warmup_workload(vocab_size: int, num_stages: int, max_len: int, device: str = "cuda",
                    seed: int = 0) -> tuple[list[list[int]], int]:
    """The built-in workload: 2 x stages requests of mixed prompt lengths (64..512 tokens on CUDA,
    16..128 on CPU, capped by max_len) and 16 (CPU: 8) new tokens each, so both prefill chunks and
    decode steps are in the measurement. Returns (prompts, new tokens per request)."""
    g = torch.Generator().manual_seed(seed)
    base, new = (64, 16) if device == "cuda" else (16, 8)
    lengths = [min(base << (i % 4), max(1, max_len - new - 1)) for i in range(2 * num_stages)]
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths], new


def describe(counts: list[int], costs: Costs, before: list[int]) -> str:
    """'layers 1,3 (predicted busy ms 30.2, 31.0; the split 2,2 measured 60.1, 2.5)'."""
    now = ", ".join(f"{x:.1f}" for x in costs.stage_ms(counts))
    was = ", ".join(f"{x:.1f}" for x in costs.stage_ms(before))
    return (f"layers {','.join(map(str, counts))} (predicted busy ms per stage {now}; "
            f"the split {','.join(map(str, before))} measured {was})")


def memory_model(cfg, num_stages: int, dtype: torch.dtype, card_bytes: list[int],
                 reserve_gib: float | None = None) -> MemoryModel:
    """The plan's arithmetic (engine/tools/plan.py) as a MemoryModel: weights as the engine allocates
    them, the plan's runtime + activation reserve per stage."""
    from model.tensors import layer_params

    from .plan import GIB, default_reserve_gib, outer_params
    esz = torch.empty((), dtype=dtype).element_size()
    reserve = default_reserve_gib(cfg) if reserve_gib is None else reserve_gib
    return MemoryModel(card_bytes=list(card_bytes),
                       layer_bytes=[layer_params(cfg, i)[0] * esz for i in range(cfg.num_hidden_layers)],
                       embed_bytes=outer_params(cfg, True, False) * esz,
                       head_bytes=outer_params(cfg, False, True) * esz,
                       reserve_bytes=int(reserve * GIB),
                       kv_bytes_per_token_layer=cfg.kv_bytes_per_token_per_layer(dtype))


def measure_costs(llm) -> tuple[Costs, list[dict]]:
    """Run the built-in warm-up workload on a started LLM with per-layer clocks on every stage;
    the costs and the stages' stats entries."""
    from ..params import SamplingParams
    llm.stats(reset=True, profile={"op": "start", "trace": False, "layers": True})
    prompts, new = warmup_workload(llm.config.vocab_size, llm.args.stages, llm.max_model_len, llm.options.device)
    llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    stats = llm.stats(reset=True, profile={"op": "stop"})
    return costs_from_stats(stats["stages"], llm.config.num_hidden_layers), stats["stages"]


def auto_layers(llm) -> tuple[list[int], dict]:
    """The measured split for a started LLM (see choose_split) and a report of it: the KV-pool
    floor applies on CUDA when the pool is sized from free memory (on CPU, or with kv_cache_gib,
    every stage gets the same fixed KV budget, so there is no pool to protect by moving layers)."""
    from model.config import parse_dtype
    o = llm.options
    before = [s["layers"][1] - s["layers"][0] for s in llm.stage_info]
    costs, stages = measure_costs(llm)
    memory = None
    if o.device == "cuda" and o.kv_cache_gib is None:
        cards = [int(s["card_bytes"] * o.gpu_memory_utilization) for s in stages]
        memory = memory_model(llm.config, llm.args.stages, parse_dtype(o.dtype), cards)
    counts = choose_split(costs, llm.args.stages, memory)
    report = {"before": before, "before_ms": costs.stage_ms(before), "after": counts,
              "predicted_ms": costs.stage_ms(counts), "layer_ms": costs.layer_ms, "embed_ms": costs.embed_ms,
              "head_ms": costs.head_ms, "summary": describe(counts, costs, before)}
    return counts, report
