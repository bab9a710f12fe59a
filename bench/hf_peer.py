"""The peer: Hugging Face transformers running Qwen3-MoE with random bf16 weights of a preset's shape
(loader/presets.py, so the peer and the engine run the same shape), split over every visible GPU
as accelerate's device_map does (one GPU busy at a time); on one GPU, the whole model on it.

Prints one JSON line per measurement (decode ms/step per batch and prompt length, prefill tok/s),
for bench_e2e.py to put beside the engine's figures of the same call.

    python bench/hf_peer.py --preset qwen3-30b-a3b --prefill 2048,8192 --decode 64 --batch 1,16"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loader.presets import PRESETS, preset_config  # noqa: E402

PEER = "transformers" + ("+accelerate" if torch.cuda.device_count() > 1 else "")


def emit(**row) -> None:
    print(json.dumps({"peer": PEER, **row}), flush=True)


def sync() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def build(preset: str, experts_impl: str):
    """The model on meta, each module materialised on its GPU (layers in contiguous runs), weights
    N(0, 0.02) and norms 1; dispatched with accelerate's hooks when it spans several GPUs."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding
    cfg = Qwen3MoeConfig(**preset_config(preset), experts_implementation=experts_impl)
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    n, L = torch.cuda.device_count(), cfg.num_hidden_layers
    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": n - 1, "lm_head": n - 1}
    dmap.update({f"model.layers.{i}": i * n // L for i in range(L)})
    for name, dev in dmap.items():
        model.get_submodule(name).to_empty(device=f"cuda:{dev}")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)
    model.model.rotary_emb = Qwen3MoeRotaryEmbedding(config=cfg, device="cuda:0")
    model.eval()
    if n > 1:
        from accelerate import dispatch_model
        model = dispatch_model(model, device_map=dmap)
    return model, cfg


def decode(model, V: int, P: int, B: int, steps: int) -> None:
    """ms per step: (generate steps + 1 tokens - generate 1 token) / steps, so prefill cancels."""
    ids = torch.randint(0, V, (B, P), device="cuda:0")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    times = {}
    for n in (1, steps + 1):
        sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        times[n] = time.perf_counter() - t
        assert out.shape[1] == P + n
    per_step = (times[steps + 1] - times[1]) / steps
    emit(what="decode", batch=B, prompt=P, new_tokens=steps, ms_per_step=round(per_step * 1e3, 3),
         tok_per_s=round(B / per_step, 1), ttft_s=round(times[1], 4))


def prefill(model, V: int, L: int, reps: int) -> None:
    ids = torch.randint(0, V, (1, L), device="cuda:0")
    try:
        for _ in range(reps):  # the first length runs twice: the first run pays the warm-up
            sync()
            t = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync()
            dt = time.perf_counter() - t
    except torch.cuda.OutOfMemoryError:
        emit(what="prefill", tokens=L, error="OOM")
        return
    emit(what="prefill", tokens=L, s=round(dt, 4), tok_per_s=round(L / dt, 1),
         peak_gib=[round(torch.cuda.max_memory_allocated(d) / 2**30, 2) for d in range(torch.cuda.device_count())])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--experts", default="grouped_mm", help="transformers' experts_implementation")
    ap.add_argument("--prefill", default="2048,8192")
    ap.add_argument("--decode", type=int, default=64, help="decode steps timed")
    ap.add_argument("--prompt", default="128", help="prompt lengths of the decode runs")
    ap.add_argument("--batch", default="1,16")
    a = ap.parse_args()
    t0 = time.perf_counter()
    model, cfg = build(a.preset, a.experts)
    sync()
    emit(what="build", s=round(time.perf_counter() - t0, 2), gpus=torch.cuda.device_count(),
         gpu=torch.cuda.get_device_name(0), experts=str(model.get_experts_implementation()),
         torch=torch.__version__, mem_gib=[round(torch.cuda.memory_allocated(d) / 2**30, 2)
                                           for d in range(torch.cuda.device_count())])
    V = cfg.vocab_size
    with torch.inference_mode():
        for P in (int(p) for p in a.prompt.split(",")):
            for B in (int(b) for b in a.batch.split(",")):
                if P <= 4096 or B == 1:  # long contexts at batch 1 only
                    decode(model, V, P, B, a.decode)
                    torch.cuda.empty_cache()
        for i, L in enumerate(int(x) for x in a.prefill.split(",") if x):
            prefill(model, V, L, 2 if i == 0 else 1)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
