"""Compile every Triton kernel variant the engine will launch before the first request. Triton
compiles per constexpr tile choice (the kernels pick tiles from the token count) and per integer
argument class (== 1, divisible by 16, other), so a forward is run at each class of token count,
each side of the MoE path switch, fresh prefills (one and several per micro-batch) and chunks
behind a cached context, and decode batches at short and long contexts; then the micro-batches
each kernel module declares for the variants its own launch choices reach at this model's shape
(declared_shapes: tile configs chosen from the token and row counts, which a token ladder can miss).
Outputs are thrown away; the k/v written land in blocks the pool hands out later, whose contents
are always written before they are read."""
from __future__ import annotations

import time

import torch

from .batch import AttnBatch
from .stage import Stage


def _ladder(limit: int) -> list[int]:
    """1, 2, 3 and each power of two up to limit with its +1 neighbour (another divisibility class)."""
    out = {1, 2, 3, limit}
    p = 4
    while p <= limit:
        out |= {p, min(p + 1, limit)}
        p *= 2
    return sorted(n for n in out if 1 <= n <= limit)


def packed(T: int, max_context: int) -> list[int]:
    """T tokens as fresh prompts of at most max_context each (a micro-batch holds several prompts,
    so its token count can pass the context limit; the kernels' variants follow the total)."""
    return [max_context] * (T // max_context) + ([T % max_context] if T % max_context else [])


def warm_shapes(max_tokens: int, max_batch: int, max_context: int, small_max: int,
                block_size: int = 16) -> list[tuple[list[int], list[int]]]:
    """(query_lens, context_lens) of each warm-up micro-batch."""
    shapes: list[tuple[list[int], list[int]]] = []
    tokens = sorted(set(_ladder(max_tokens)) | {t for t in (small_max, small_max + 1) if t <= max_tokens})
    for T in tokens:
        shapes.append((packed(T, max_context), packed(T, max_context)))  # fresh prefill(s)
        if 2 * T <= max_context and T > 1:
            shapes.append(([T], [2 * T]))  # a chunk behind cached tokens
    for b in (2, 16, 17):  # several prompts in one micro-batch (the scheduler packs short ones)
        t = min(8, max_tokens // b)
        if t >= 2 and b <= max_batch:
            shapes.append(([t] * b, [t] * b))
            if 2 * t <= max_context:
                shapes.append(([t] * b, [2 * t] * b))
    T = min(max_tokens, 512)
    if max_context > 2 * T:
        shapes.append(([T], [max_context]))  # a chunk deep in a long context
    if max_context > 64 and max_tokens > 16:  # short chunks deep in a context: on sm_90 the
        shapes.append(([16], [max_context]))  # split-KV variants of the prefill kernel, alone
        if max_batch > 1:                     # and beside decode rows
            shapes.append(([16, 1], [max_context, 16]))
    S = block_size
    contexts = sorted({c for c in (16, 2048, max_context) if c <= max_context})
    few = sorted(set(contexts) | ({3 * S} if 3 * S <= max_context else set()))  # + a table width M of 3
    for b in sorted(set(_ladder(max_batch)) | {t for t in (small_max, small_max + 1) if t <= max_batch}):
        for c in few if b <= 3 else contexts[:2]:  # long contexts at few rows: cost, not classes
            shapes.append(([1] * b, [c] * b))  # decode
    if max_batch > 1 and max_tokens > 1:  # prefill + decode mixed, the prefill's context making the
        t = min(max_tokens - 1, 64)        # block-table width M 1, 16, 17 and t's own (Triton
        for c in sorted({t, S, 16 * S, 17 * S}):  # specializes integers == 1 and divisible by 16)
            if c <= max_context:
                shapes.append(([min(t, c), 1], [c, min(16, c)]))
    return shapes


def declared_shapes(stage: Stage, max_tokens: int, max_batch: int, max_context: int
                    ) -> list[tuple[list[int], list[int]]]:
    """The micro-batches the kernel modules declare for their own variants, beyond the token
    ladder: each tile config and int-argument class their launch choices can reach at this model's
    shape (model/attention_prefill_triton.warm_classes, model/moe_warm.warm_token_counts)."""
    cfg, be, S = stage.cfg, stage.backend, stage.kv_cache.shape[3]
    out: list[tuple[list[int], list[int]]] = []
    if be.attention in ("fa", "auto"):
        from .attention_prefill_triton import _num_sms, warm_classes
        dev = stage.device
        sms = _num_sms(dev.index if dev.index is not None else torch.cuda.current_device())
        K = cfg.num_key_value_heads
        out += warm_classes(stage.dtype, cfg.head_dim, cfg.num_attention_heads // K, K, max_tokens, max_batch,
                            max_context, S, sms)
    if be.moe == "triton" and cfg.num_experts:
        from .moe_warm import warm_token_counts
        out += [(packed(n, max_context), packed(n, max_context))
                for n in warm_token_counts(cfg.num_experts, cfg.num_experts_per_tok, be.moe_small_max_pairs,
                                           max_tokens, be.moe_rows_max_pairs,
                                           be.moe_ranked_max_pairs)]
    return out


@torch.inference_mode()
def precompile(stage: Stage, max_tokens: int, max_batch: int, max_context: int | None = None) -> float:
    """Run the stage once at every shape class the engine will use (after allocate_kv; the KV pool
    is reused as scratch). max_tokens: the largest micro-batch in tokens (several prompts when it
    passes max_context); max_batch: the most sequences decoding at once; max_context: the longest
    context (default: the model's limit).
    Returns the seconds it took."""
    assert stage.kv_cache is not None, "allocate_kv() before precompile()"
    t0 = time.perf_counter()
    num_blocks, S = stage.kv_cache.shape[2], stage.kv_cache.shape[3]
    max_context = min(max_context or stage.cfg.max_position_embeddings, stage.cfg.max_position_embeddings)
    dev, H = stage.device, stage.cfg.hidden_size
    small_max = max(1, stage.backend.moe_small_max_pairs // max(1, stage.cfg.num_experts_per_tok))
    shapes = warm_shapes(max_tokens, max_batch, max_context, small_max, S)
    if dev.type == "cuda" and len(stage.layers):
        shapes += declared_shapes(stage, max_tokens, max_batch, max_context)
    for qlens, ctxs in shapes:
        tables = [[(j + 7 * i) % num_blocks for j in range(-(-c // S))] for i, c in enumerate(ctxs)]
        batch = AttnBatch.build(qlens, ctxs, tables, S, [True] * len(qlens), dev)
        T = sum(qlens)
        x = (torch.randint(0, stage.cfg.vocab_size, (T,), device=dev) if stage.has_embed
             else torch.randn(T, H, device=dev, dtype=stage.dtype))
        stage(x, batch)
    if dev.type == "cuda":
        from .attention_triton import warm_decode_merge, warm_decode_split
        if len(stage.layers):  # the merge kernel at every split-count class (its choice mixes batch and context)
            cfg = stage.cfg
            warm_decode_merge(cfg.num_attention_heads, cfg.head_dim, stage.dtype, dev)
            warm_decode_split(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, S, stage.dtype, dev)
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0
