"""End-to-end benchmark on a GPU machine: moepipe on N stages beside the transformers peer
(bench/hf_peer.py), same machine, same call, random weights of a real shape.

    python bench/bench_e2e.py --stages 1 --peer bench/hf_peer.py      (bench/gpu.sh e2e runs this)

The model is the preset's shape with Qwen's YaRN override (factor 4 over 32768, 131072 positions, so
one config serves the 2k..32k figures and the 90k/128k runs). By default its weights are dummy
(load_format="dummy": random on each stage's device, nothing written); `--load-format auto` writes a
checkpoint to --ckpt once and loads it. Runs the peer in a subprocess, then moepipe on --stages:
load time, decode ms/step at batch 1 and 16 (prompt 128, 64 steps, measured as the peer does:
(t(65 tokens) - t(1 token)) / 64, each t the fastest of --decode-reps calls; the peer's one call),
batch-1 decode at a 32k context, 256 requests x (128 -> 128) greedy and sampled (temperature 0.8,
top-p 0.9), prefill tokens/s, long-context TTFT, decode at that context and peak memory per stage. With --one-gpu the same model then runs on 1 GPU for the decode
and throughput rows, in the same call. Prints a table last; JSON goes to --out."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def run_peer(script: str, prefill: str, timeout: int) -> list[dict]:
    cmd = [sys.executable, script, "--preset", "qwen3-30b-a3b", "--prefill", prefill, "--decode", "64",
           "--batch", "1,16", "--prompt", "128"]
    print("peer:", " ".join(cmd), flush=True)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(f"peer timed out after {timeout} s", flush=True)
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    for r in rows:
        print("peer", r, flush=True)
    print(f"peer wall {time.perf_counter() - t:.0f} s", flush=True)
    return rows


def stage_stats(st) -> list[dict]:
    """Per-stage dicts from llm.stats(): {"stages": [...], "scheduler": {...}} (or an older list)."""
    return st["stages"] if isinstance(st, dict) else st


def timed(llm, prompts, n):
    from engine import SamplingParams
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == n for o in outs)
    return dt


def throughput(llm, rand, n_req: int, prompt: int, new: int, **sampling) -> dict:
    """n_req requests x (prompt -> new tokens) at once: output tokens/s over the whole call."""
    from engine import SamplingParams
    sp = SamplingParams(max_tokens=new, ignore_eos=True, **sampling)
    prompts = [rand(prompt) for _ in range(n_req)]
    llm.generate(prompts[:8], SamplingParams(max_tokens=4, ignore_eos=True, **sampling))  # warm-up
    llm.stats(reset=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t
    st = stage_stats(llm.stats(reset=True))
    n = sum(len(o.token_ids) for o in outs)
    return {"what": "throughput", "requests": n_req, "prompt": prompt, "new": new, "sampling": sampling or "greedy",
            "s": round(dt, 3), "out_tok_per_s": round(n / dt, 1),
            "busy_frac": [round(s["busy_ms"] / 1e3 / dt, 3) for s in st]}


def decode_rows(llm, rand, long_ctx: int, n_req: int = 256, reps: int = 3) -> list[dict]:
    """Decode ms/step at batch 1 and 16 (prompt 128), at batch 1 after a long_ctx prompt, and the
    256 x (128 -> 128) throughput, greedy and sampled: the rows put beside one GPU. The short rows
    take the fastest of reps (>= 1) calls of each length, (min t(65) - min t(1)) / 64: one slow
    call (a 1-token call 12 ms slow moves a single difference by ~0.2 ms/step at batch 1) does not
    set the figure."""
    if reps < 1:
        raise ValueError(f"--decode-reps must be at least 1, got {reps}")
    rows = []
    for B in (1, 16):
        prompts = [rand(128) for _ in range(B)]
        timed(llm, prompts, 2)
        t1 = min(timed(llm, prompts, 1) for _ in range(reps))
        t65 = min(timed(llm, prompts, 65) for _ in range(reps))
        ms = (t65 - t1) / 64 * 1e3
        rows.append({"what": "decode", "batch": B, "prompt": 128, "ms_per_step": round(ms, 3),
                     "tok_per_s": round(B / ms * 1e3, 1), "ttft_s": round(t1, 4)})
        print(rows[-1], flush=True)
    if long_ctx and long_ctx + 65 <= llm.max_model_len:
        _, ms = stream_times(llm, rand(long_ctx), 65)
        rows.append({"what": "decode", "batch": 1, "prompt": long_ctx, "ms_per_step": round(ms, 3),
                     "tok_per_s": round(1e3 / ms, 1)})
        print(rows[-1], flush=True)
    for sampling in ({"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9}):
        rows.append(throughput(llm, rand, n_req, 128, 128, **sampling))
        print(rows[-1], flush=True)
    return rows


def stream_times(llm, prompt, n):
    """(ttft, decode ms/step) for one prompt, from the arrival times of its tokens."""
    from engine import SamplingParams
    t0, times = time.perf_counter(), []
    for _ in llm.stream([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)):
        times.append(time.perf_counter() - t0)
    return times[0], (times[-1] - times[0]) / (len(times) - 1) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/moepipe-q30")
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers-override", type=int, default=None, help="fewer layers (smoke test)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--prefill", default="2048,8192,32768")
    ap.add_argument("--long", default="90000,128000")
    ap.add_argument("--peer", default=None, help="path to hf_peer.py; omit to skip the peer")
    ap.add_argument("--peer-prefill", default="2048,8192,32768,90000")
    ap.add_argument("--peer-timeout", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--attention", default=None)
    ap.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default: the engine's)")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="the engine's max_num_seqs (default: its own)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the engine's token budget per step (default: its own)")
    ap.add_argument("--mixed", action="store_true", help="also 32 concurrent requests, one of 90k tokens")
    ap.add_argument("--load-format", default="dummy", choices=["dummy", "auto"],
                    help="dummy: random weights made on each stage (default); auto: write --ckpt once and load it")
    ap.add_argument("--one-gpu", action="store_true", help="also the decode and throughput rows on 1 GPU")
    ap.add_argument("--decode-ctx", type=int, default=32768, help="context of the long batch-1 decode row")
    ap.add_argument("--decode-reps", type=int, default=3,
                    help="calls of each length the batch-1/16 decode rows take the fastest of")
    ap.add_argument("--requests", type=int, default=256, help="requests of the throughput rows")
    ap.add_argument("--load", default="", help="more throughput rows, NxPROMPTxNEW each, greedy (issue 24's: "
                                               "256x128x1024,1000x1024x128); empty: none")
    a = ap.parse_args()
    if a.decode_reps < 1:
        ap.error(f"--decode-reps must be at least 1, got {a.decode_reps}")
    bad = [x for x in a.load.split(",") if x.strip() and not re.fullmatch(r"\s*[1-9]\d*x[1-9]\d*x[1-9]\d*\s*", x.lower())]
    if bad:
        raise SystemExit(f"error: --load {bad[0]!r}: expected NxPROMPTxNEW, positive integers (e.g. 256x128x1024)")

    import torch
    from engine import LLM
    from loader.presets import preset_config, yarn_config
    from loader.writer import write_checkpoint

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"date": datetime.date.today().isoformat(), "card": card, "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "preset": a.preset, "stages": a.stages}
    ckpt = Path(a.ckpt)
    cfg = yarn_config(preset_config(a.preset))
    if a.layers_override:
        cfg["num_hidden_layers"] = cfg["max_window_layers"] = a.layers_override
    if a.load_format == "dummy":
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    elif not (ckpt / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(ckpt, cfg, seed=0, device="cuda")
        result["write_s"] = round(time.perf_counter() - t, 1)
        print(f"wrote {ckpt} in {result['write_s']} s", flush=True)

    out = Path(a.out or f"bench/results/e2e_{card.replace(' ', '-')}_{result['date']}.json")

    def save() -> None:  # after every section: a run cut short by its time limit keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != out.parent.resolve():
            Path(os.environ["OUT"], out.name).write_text(json.dumps(result, indent=1))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` ends us: save in the finally below
    try:
        return run(a, result, save, ckpt)
    finally:
        save()


def run(a, result: dict, save, ckpt: Path) -> int:
    import torch
    from engine import LLM
    if a.peer:
        result["peer"] = run_peer(a.peer, a.peer_prefill, a.peer_timeout)

    t = time.perf_counter()
    kv = {k: v for k, v in (("block_size", a.block_size), ("max_num_seqs", a.max_num_seqs),
                            ("max_num_batched_tokens", a.max_num_batched_tokens)) if v is not None}
    llm = LLM(str(ckpt), stages=a.stages, attention=a.attention, verbose=True, load_format=a.load_format, **kv)
    result["load_s"] = round(time.perf_counter() - t, 1)
    result["stage_info"] = llm.stage_info
    V = llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, V, (n,), generator=g).tolist()
    timed(llm, [rand(128)], 4)  # warm-up
    rows = result["moepipe"] = []
    rows += decode_rows(llm, rand, a.decode_ctx, a.requests, a.decode_reps)
    save()
    for i, L in enumerate(ints(a.prefill)):
        for _ in range(2 if i == 0 else 1):  # a fresh prompt each time: the prefix cache would serve a repeat
            llm.stats(reset=True)
            dt = timed(llm, [rand(L)], 1)
        st = stage_stats(llm.stats(reset=True))
        rows.append({"what": "prefill", "tokens": L, "s": round(dt, 4), "tok_per_s": round(L / dt, 1),
                     "busy_s": [round(s["busy_ms"] / 1e3, 3) for s in st],
                     "peak_gib": [round(s.get("peak_gib", 0), 2) for s in st]})
        print(rows[-1], flush=True)
    for L in ints(a.long):
        if L + 33 > llm.max_model_len:
            print(f"skip long {L}: past max_model_len {llm.max_model_len}")
            continue
        # resting memory (weights, pool, graphs) from a 16-token request; then the prompt alone
        # (max_tokens=1): its time to first token, each stage's busy share of it, peak beyond rest
        llm.stats(reset=True)
        timed(llm, [rand(16)], 1)
        rest = stage_stats(llm.stats(reset=True))
        prompt = rand(L)
        ttft1 = timed(llm, [prompt], 1)
        st = stage_stats(llm.stats(reset=True))
        ttft, ms = stream_times(llm, prompt, 33)  # the same prompt again: its TTFT is the prefix cache's
        st2 = stage_stats(llm.stats(reset=True))
        rows.append({"what": "long", "tokens": L, "ttft_s": round(ttft1, 3), "ttft_stream_s": round(ttft, 3),
                     "decode_ms_per_step": round(ms, 3), "prefill_tok_per_s": round(L / ttft1, 1),
                     "busy_frac": [round(s["busy_ms"] / 1e3 / ttft1, 3) for s in st],
                     "prefill_steps": [s.get("steps") for s in st],
                     "peak_beyond_rest_gib": [round(s.get("peak_gib", 0) - r.get("peak_gib", 0), 3)
                                              for s, r in zip(st, rest)],
                     "peak_gib": [round(max(s.get("peak_gib", 0), s2.get("peak_gib", 0)), 2)
                                  for s, s2 in zip(st, st2)],
                     "kv_pool_gib": [round(s.get("kv_gib", 0), 2) for s in st]})
        print(rows[-1], flush=True)
    for spec in [x for x in a.load.split(",") if x.strip()]:
        n_req, prompt, new = (int(v) for v in spec.lower().split("x"))
        x = throughput(llm, rand, n_req, prompt, new)
        x.update(what="load", total_tok_per_s=round(n_req * (prompt + new) / x["s"], 1),
                 ms_per_out_step=round(x["s"] / new * 1e3, 2))
        rows.append(x)
        print(rows[-1], flush=True)
        save()
    if a.mixed:
        # many requests of mixed lengths at once, one of them 90k tokens: served without OOM
        lens = [90000] + [int(x) for x in torch.randint(100, 8000, (31,), generator=g)]
        prompts = [rand(n) for n in lens]
        llm.stats(reset=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, __import__("engine").SamplingParams(max_tokens=64, temperature=0,
                                                                                      ignore_eos=True))
        dt = time.perf_counter() - t
        raw = llm.stats(reset=True)
        st = stage_stats(raw)
        rows.append({"what": "mixed", "requests": len(lens), "prompt_tokens": sum(lens),
                     "new_tokens": sum(len(o.token_ids) for o in outs), "s": round(dt, 2),
                     "preemptions": raw["scheduler"].get("preemptions") if isinstance(raw, dict)
                     else st[0].get("preemptions"),
                     "peak_gib": [round(s.get("peak_gib", 0), 2) for s in st]})
        print(rows[-1], flush=True)
    llm.close()
    save()
    if a.one_gpu:
        t = time.perf_counter()
        with LLM(str(ckpt), stages=1, attention=a.attention, verbose=False, load_format=a.load_format) as one:
            result["one_gpu_load_s"] = round(time.perf_counter() - t, 1)
            timed(one, [rand(128)], 4)
            result["one_gpu"] = decode_rows(one, rand, a.decode_ctx, a.requests, a.decode_reps)
    save()
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    peer = {(x.get("what"), x.get("batch"), x.get("tokens")): x for x in r.get("peer", [])}
    print(f"\n== {r['card']} x{r['gpus']}, {r['preset']}, {r['stages']} stages, {r['date']} ==")
    print(f"load: moepipe {r['load_s']} s")
    print(f"{'measure':28s} {'moepipe':>12s} {'peer':>12s} {'ratio':>8s}")
    one = {(x["what"], x.get("batch"), x.get("prompt"), str(x.get("sampling"))): x for x in r.get("one_gpu", [])}
    for x in r["moepipe"]:
        o = one.get((x["what"], x.get("batch"), x.get("prompt"), str(x.get("sampling"))))
        if x["what"] == "decode" and x["prompt"] != 128:
            ov = o["ms_per_step"] if o else float("nan")
            print(f"{'decode ms/step b=1 ctx ' + str(x['prompt']):28s} {x['ms_per_step']:12.2f} {'':12s} {'':8s}"
                  f"   1 GPU {ov:.2f}")
        elif x["what"] == "throughput":
            ov = o["out_tok_per_s"] if o else float("nan")
            name = f"{x['requests']}x({x['prompt']}->{x['new']}) T={x['sampling']['temperature']} tok/s"
            print(f"{name:28s} {x['out_tok_per_s']:12.0f} {'':12s} {'':8s}   1 GPU {ov:.0f} ({x['out_tok_per_s'] / ov:.2f}x)"
                  f", busy {x['busy_frac']}")
        elif x["what"] == "decode":
            ov = o["ms_per_step"] if o else float("nan")
            p = peer.get(("decode", x["batch"], None))
            pv = p["ms_per_step"] if p else None
            print(f"{'decode ms/step b=' + str(x['batch']):28s} {x['ms_per_step']:12.2f} {pv or float('nan'):12.2f} "
                  f"{(pv / x['ms_per_step']) if pv else float('nan'):8.2f}x   1 GPU {ov:.2f}")
        elif x["what"] == "prefill":
            p = peer.get(("prefill", None, x["tokens"]))
            pv = p.get("tok_per_s") if p else None
            print(f"{'prefill tok/s ' + str(x['tokens']):28s} {x['tok_per_s']:12.0f} {pv or float('nan'):12.0f} "
                  f"{(x['tok_per_s'] / pv) if pv else float('nan'):8.2f}x")
        elif x["what"] == "load":
            name = f"{x['requests']}x({x['prompt']}->{x['new']}) greedy"
            print(f"{name:28s} {x['out_tok_per_s']:12.0f} out tok/s, {x['total_tok_per_s']:.0f} total tok/s, "
                  f"{x['ms_per_out_step']:.1f} ms per output step (the call / new tokens), busy {x['busy_frac']}")
        elif x["what"] == "mixed":
            print(f"mixed: {x['requests']} requests, {x['prompt_tokens']} prompt + {x['new_tokens']} new tokens "
                  f"in {x['s']} s, peak GiB {x['peak_gib']}, preemptions {x['preemptions']}")
        else:
            p = peer.get(("prefill", None, x["tokens"]))
            pv = p.get("s") if p else None
            print(f"{'long ' + str(x['tokens']) + ' ttft s':28s} {x['ttft_s']:12.2f} {pv or float('nan'):12.2f}"
                  f"   decode {x['decode_ms_per_step']:.2f} ms/step, busy {x.get('busy_frac')}, "
                  f"peak GiB {x['peak_gib']} ({x.get('peak_beyond_rest_gib')} beyond rest)")


if __name__ == "__main__":
    sys.exit(main())
