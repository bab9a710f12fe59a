"""Serving benchmark in the style of vLLM's benchmark_serving: streamed /v1/completions requests of
random token-id prompts of a fixed length (ignore_eos, so every answer is exactly --output-len
tokens), at each client concurrency of a sweep. Per level: request throughput, output and total
tok/s, TTFT, TPOT and inter-token latency (mean, p50, p99), and each stage's busy fraction from
/metrics. Starts the server itself (python -m engine serve) unless --url is given.

    python bench/bench_serving.py --model qwen3-30b-a3b --stages 2 --serve-args "--load-format dummy" \\
        --concurrency 1,8,64,256 --input-len 1024 --output-len 256 --out bench/results/serving.json
    python bench/bench_serving.py --num-prompts 8 --input-len 16 --output-len 8 --concurrency 1,4   # tiny, CPU

--shared-prefix-tokens N puts one shared N-token system prompt ahead of every prompt's --input-len
own tokens (the prefix cache then serves it); `--serve-args --no-enable-prefix-caching` is the
cache-off run to compare:
    python bench/bench_serving.py --model qwen3-30b-a3b --stages 1 --serve-args "--load-format dummy" \
        --shared-prefix-tokens 2048 --input-len 256 --output-len 256 --concurrency 64,256

--mix-share S makes a share S of each level's requests ask for more than plain text: half of them
`logprobs: --mix-logprobs` (top 5 by default), half presence/frequency/repetition penalties. Each level
then runs twice, plain only and mixed, on fresh prompts of the same lengths each time (the prefix
cache would serve repeated ones), and reports both throughputs, their ratio, and each kind's figures
within the mixed run (the cost of the extras against plain requests):
    python bench/bench_serving.py --model qwen3-30b-a3b --stages 2 --serve-args "--load-format dummy" \
        --concurrency 64 --input-len 1024 --output-len 256 --mix-share 0.5
    python bench/bench_serving.py --num-prompts 8 --input-len 16 --output-len 8 --concurrency 4 --mix-share 0.5

JSON goes to --out; the table is printed last."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}  # --mix-share
KINDS = ("plain", "logprobs", "penalty")


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    kind: str = "plain"  # KINDS


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---- the server --------------------------------------------------------------------------------
def start_server(a) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="bench_serving_")) / "server.log"
    cmd = [sys.executable, "-m", "engine", "serve", "--host", "127.0.0.1", "--port", "0", "--quiet",
           "--served-model-name", a.served_model_name, "--log-level", "warning"]
    model = a.model
    if model and not Path(model).exists() and "dummy" in a.serve_args:
        model = preset_folder(model, log.parent)
    if model:
        cmd += ["--model", model]
    if a.stages:
        cmd += ["--stages", str(a.stages)]
    cmd += shlex.split(a.serve_args)
    print("server:", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + a.startup_timeout
    while True:
        text = log.read_text(errors="replace")
        m = re.search(r"serving \S+ on (http://[\w.:]+:\d+)", text)
        if m:
            print(text.strip().splitlines()[-1], flush=True)
            return proc, m.group(1), log
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"error: the server did not start (exit {proc.poll()}); log {log}:\n{text[-4000:]}")
        time.sleep(0.2)


def preset_folder(name: str, where: Path) -> str:
    """A folder holding only the preset's config.json, for --load-format dummy of a published shape."""
    sys.path.insert(0, str(ROOT))
    from loader.presets import PRESETS, preset_config
    if name not in PRESETS:
        raise SystemExit(f"error: --model {name}: no such folder or preset ({', '.join(sorted(PRESETS))})")
    d = where / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(preset_config(name), indent=2))
    return str(d)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metrics(client, url: str) -> dict[str, float]:
    out = {}
    text = re.sub(r',?model_name="[^"]*"', "", client.get(url + "/metrics", timeout=60).text)
    for line in text.replace("{,", "{").replace("{}", "").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- the clients -------------------------------------------------------------------------------
async def one_request(client, url: str, body: dict, kind: str = "plain") -> RequestResult:
    res = RequestResult(False, len(body["prompt"]), kind=kind)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = obj["error"].get("message", "error event")
                    return res
                now = time.perf_counter()
                if obj.get("choices"):
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
        res.latency_s = time.perf_counter() - start
        res.ok = res.output_tokens > 0 and last is not None
        if not res.ok:
            res.error = "no tokens"
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


def request_body(a, prompt: list[int], kind: str) -> dict:
    body = {"model": a.served_model_name, "prompt": prompt, "max_tokens": a.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "logprobs":
        body["logprobs"] = a.mix_logprobs
    elif kind == "penalty":
        body.update(PENALTIES)
    return body


def mix_kinds(n: int, share: float, seed: int) -> list[str]:
    """round(n x share) requests at random places get an extra, alternately logprobs and penalties."""
    picked = sorted(random.Random(seed).sample(range(n), round(n * share)))
    kinds = ["plain"] * n
    for j, i in enumerate(picked):
        kinds[i] = KINDS[1 + j % 2]
    return kinds


async def run_level(url: str, a, concurrency: int, prompts: list[list[int]],
                    kinds: list[str] | None = None) -> tuple[list[RequestResult], float]:
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    kinds = kinds or ["plain"] * len(prompts)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout), limits=limits) as client:
        async def limited(p, kind):
            async with sem:
                return await one_request(client, url, request_body(a, p, kind), kind)
        t = time.perf_counter()
        results = await asyncio.gather(*(limited(p, k) for p, k in zip(prompts, kinds)))
        return list(results), time.perf_counter() - t


def summarize(concurrency: int, results: list[RequestResult], duration: float, m0: dict, m1: dict) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    ttft = [r.ttft_s * 1e3 for r in ok]
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    itl = [x * 1e3 for r in ok for x in r.itl_s]
    row = {"concurrency": concurrency, "num_prompts": len(results), "completed": len(ok),
           "failed": len(results) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
           "total_token_throughput": (in_tokens + out_tokens) / duration,
           "total_input_tokens": in_tokens, "total_output_tokens": out_tokens}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        row[f"mean_{name}"] = statistics.fmean(xs) if xs else float("nan")
        row[f"median_{name}"] = pct(xs, 50)
        row[f"p99_{name}"] = pct(xs, 99)
    busy = {}
    for k, v in m1.items():
        s = re.fullmatch(r'moepipe:stage_busy_seconds_total\{stage="(\d+)"\}', k)
        if s:
            busy[int(s.group(1))] = (v - m0.get(k, 0.0)) / duration
    row["stage_busy_fraction"] = [busy[r] for r in sorted(busy)]
    row["preemptions"] = m1.get("moepipe:num_preemptions_total", 0) - m0.get("moepipe:num_preemptions_total", 0)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        row["errors"] = errors[:5]
    return row


def kind_rows(results: list[RequestResult], duration: float) -> dict:
    """Per kind of request in one mixed level: its share of the output tok/s and its own decode pace."""
    out = {}
    for kind in KINDS:
        ok = [r for r in results if r.ok and r.kind == kind]
        if not ok:
            continue
        tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
        out[kind] = {"completed": len(ok), "output_throughput": sum(r.output_tokens for r in ok) / duration,
                     "median_tpot_ms": pct(tpot, 50), "median_ttft_ms": pct([r.ttft_s * 1e3 for r in ok], 50)}
    return out


def vocab_size(a) -> int:
    if a.vocab_size:
        return a.vocab_size
    if a.model and (Path(a.model) / "config.json").exists():
        return json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    sys.path.insert(0, str(ROOT))
    from loader.presets import PRESETS
    if a.model in PRESETS:  # --load-format dummy of a preset shape
        return PRESETS[a.model]["vocab_size"]
    if not a.model and not a.url:
        return 512  # the embedded tiny preset
    raise SystemExit("error: give --vocab-size (the model's vocabulary, for random prompt ids)")


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return f"{len(out)} x {out[0]}" if out else "cpu"
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start python -m engine serve)")
    ap.add_argument("--model", help="model folder or hub id for the server (default: the tiny preset)")
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--serve-args", default="", help="more flags for engine serve, e.g. '--load-format dummy'")
    ap.add_argument("--served-model-name", default="bench")
    ap.add_argument("--concurrency", type=ints, default=[1, 8, 64, 256])
    ap.add_argument("--num-prompts", type=int, default=None, help="per level (default: max(8, 2 x concurrency))")
    ap.add_argument("--input-len", type=int, default=1024, help="tokens of each prompt after the shared prefix")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0,
                    help="a system prompt of this many tokens shared by every prompt (default 0: none)")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=None, help="prompt ids are drawn from [10, vocab - 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument("--mix-share", type=float, default=0.0,
                    help="share of requests with logprobs or penalties; each level also runs plain only [default: 0]")
    ap.add_argument("--mix-logprobs", type=int, default=5, help="logprobs (top k) of the logprobs requests")
    ap.add_argument("--out", help="JSON results file")
    a = ap.parse_args()
    if not 0 <= a.mix_share <= 1:
        raise SystemExit(f"error: --mix-share must be in [0, 1], got {a.mix_share}")
    if a.url and (a.model or a.serve_args or a.stages):
        raise SystemExit("error: --url connects to a running server; --model/--stages/--serve-args start one")
    vocab = vocab_size(a)
    import httpx

    proc = None
    if a.url:
        url = a.url.rstrip("/")
    else:
        proc, url, _ = start_server(a)
    rows = []
    try:
        sync = httpx.Client()
        served = sync.get(url + "/v1/models", timeout=60).json()["data"][0]
        if a.url:
            a.served_model_name = served["id"]
        if a.shared_prefix_tokens + a.input_len + a.output_len > served.get("max_model_len", 1 << 30):
            raise SystemExit(f"error: prefix {a.shared_prefix_tokens} + input {a.input_len} + output {a.output_len} "
                             f"exceeds the server's max_model_len {served['max_model_len']}")
        rng = random.Random(a.seed)
        shared = [rng.randrange(10, vocab - 10) for _ in range(a.shared_prefix_tokens)]
        warm = [shared + [rng.randrange(10, vocab - 10) for _ in range(a.input_len)] for _ in range(2)]
        asyncio.run(run_level(url, a, 2, warm))  # first-call costs (allocator, kernels) out of the figures
        for c in a.concurrency:
            n = a.num_prompts or max(8, 2 * c)
            prompts = [shared + [rng.randrange(10, vocab - 10) for _ in range(a.input_len)] for _ in range(n)]
            m0 = metrics(sync, url)
            results, dt = asyncio.run(run_level(url, a, c, prompts))
            row = summarize(c, results, dt, m0, metrics(sync, url))
            if a.mix_share > 0:
                m0 = metrics(sync, url)
                fresh = [shared + [rng.randrange(10, vocab - 10) for _ in range(a.input_len)] for _ in range(n)]
                mixed, mdt = asyncio.run(run_level(url, a, c, fresh, mix_kinds(n, a.mix_share, a.seed + c)))
                row["mixed"] = {**summarize(c, mixed, mdt, m0, metrics(sync, url)), "kinds": kind_rows(mixed, mdt)}
                row["mixed_vs_plain"] = row["mixed"]["output_throughput"] / row["output_throughput"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": gpu_name(), "command": " ".join(shlex.quote(x) for x in sys.argv),
              "model": a.model or a.url or "tiny preset", "stages": a.stages, "serve_args": a.serve_args,
              "input_len": a.input_len, "shared_prefix_tokens": a.shared_prefix_tokens, "output_len": a.output_len,
              "mix_share": a.mix_share, "mix": {"logprobs": a.mix_logprobs, **PENALTIES} if a.mix_share else None,
              "results": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    hdr = (f"{'conc':>5} {'reqs':>5} {'ok':>4} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'TPOT p50':>9} {'TPOT p99':>9} {'busy':>12}")
    print(f"\nserving: {record['model']}, {record['device']}, in {a.shared_prefix_tokens} shared + {a.input_len} / "
          f"out {a.output_len} tokens (ms for TTFT/TPOT)")
    print(hdr)
    for r in rows:
        busy = "/".join(f"{b:.2f}" for b in r["stage_busy_fraction"])
        print(f"{r['concurrency']:>5} {r['num_prompts']:>5} {r['completed']:>4} {r['request_throughput']:>7.2f} "
              f"{r['output_throughput']:>10.1f} {r['median_ttft_ms']:>9.1f} {r['p99_ttft_ms']:>9.1f} "
              f"{r['median_tpot_ms']:>9.2f} {r['p99_tpot_ms']:>9.2f} {busy:>12}")
    if a.mix_share:
        print(f"\nmixed ({a.mix_share:.0%} of requests: logprobs={a.mix_logprobs} or penalties {PENALTIES}):")
        print(f"{'conc':>5} {'plain tok/s':>12} {'mixed tok/s':>12} {'ratio':>6}  per kind in the mixed run: "
              "tok/s, TPOT p50 ms")
        for r in rows:
            kinds = "  ".join(f"{k} {v['output_throughput']:.1f}, {v['median_tpot_ms']:.2f}"
                              for k, v in r["mixed"]["kinds"].items())
            print(f"{r['concurrency']:>5} {r['output_throughput']:>12.1f} {r['mixed']['output_throughput']:>12.1f} "
                  f"{r['mixed_vs_plain']:>6.3f}  {kinds}")
    failed = [r["failed"] for r in rows] + [r["mixed"]["failed"] for r in rows if "mixed" in r]
    return 0 if not any(failed) else 1


if __name__ == "__main__":
    sys.exit(main())
