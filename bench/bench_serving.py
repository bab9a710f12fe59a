"""Serving benchmark in the style of vLLM's benchmark_serving: streamed /v1/completions requests of
random token-id prompts of a fixed length (ignore_eos, so every answer is exactly --output-len
tokens), at each client concurrency of a sweep. Per level: request throughput, output and total
tok/s, TTFT, TPOT and inter-token latency (mean, p50, p99), and each stage's busy fraction from
/metrics. Starts the server itself (python -m engine serve) unless --url is given.

--json-share 0,0.5 runs every level once per share: that share of the requests carries a
`response_format` json_schema (the grammar masks their logits; they end when the JSON is complete or
at --output-len), reported per kind (plain / json) beside the plain-only level of the same call.
--mix-share 0,0.5 does the same with requests that ask for more than text: half of that share
`logprobs: --mix-logprobs` (top 5 by default), half presence/frequency/repetition penalties
(kinds logprobs / penalty). Each run takes fresh prompts of the same lengths (the prefix cache would
serve repeated ones), and `vs plain` is its output tok/s over the level's plain-only run.

    python bench/bench_serving.py --model qwen3-30b-a3b --stages 2 --serve-args "--load-format dummy" \\
        --concurrency 1,8,64,256 --input-len 1024 --output-len 256 --out bench/results/serving.json
    python bench/bench_serving.py ... --concurrency 64 --json-share 0,0.5   # the grammar's cost beside plain
    python bench/bench_serving.py ... --concurrency 64 --mix-share 0,0.5    # logprobs' and penalties' cost
    python bench/bench_serving.py --num-prompts 8 --input-len 16 --output-len 8 --concurrency 1,4   # tiny, CPU

--shared-prefix-tokens N puts one shared N-token system prompt ahead of every prompt's --input-len
own tokens (the prefix cache then serves it); `--serve-args --no-enable-prefix-caching` is the
cache-off run to compare:
    python bench/bench_serving.py --model qwen3-30b-a3b --stages 1 --serve-args "--load-format dummy" \
        --shared-prefix-tokens 2048 --input-len 256 --output-len 256 --concurrency 64,256

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
# --json-share requests: nested objects, arrays, enums and bounded numbers (strings and arrays are
# unbounded, so a random model writes long answers)
BENCH_SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "kind": {"enum": ["a", "b", "c"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 100},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "qty": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "qty"]}}},
    "required": ["title", "kind", "score", "items"]}


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    kind: str = "plain"  # "json" (response_format json_schema), "logprobs" or "penalty" (--mix-share)


def floats(s: str) -> list[float]:
    out = [float(x) for x in s.split(",") if x.strip()]
    if not out or not all(0 <= x <= 1 for x in out):
        raise argparse.ArgumentTypeError(f"shares in [0, 1], comma-separated, got {s!r}")
    return out


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


def spread(indices: list[int], share: float) -> list[int]:
    """That share of the indices, spread evenly through them."""
    return [x for j, x in enumerate(indices) if int((j + 1) * share) > int(j * share)]


def level_kinds(n: int, json_share: float, mix_share: float) -> list[str]:
    """Each request's kind: json_share of them json, mix_share alternately logprobs and penalty."""
    kinds = ["plain"] * n
    for i in spread(list(range(n)), json_share):
        kinds[i] = "json"
    rest = [i for i in range(n) if kinds[i] == "plain"]
    for j, i in enumerate(spread(rest, min(1.0, mix_share * n / max(1, len(rest))))):
        kinds[i] = ("logprobs", "penalty")[j % 2]
    return kinds


def request_body(a, prompt: list[int], kind: str, schema: dict) -> dict:
    body = {"model": a.served_model_name, "prompt": prompt, "max_tokens": a.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    elif kind == "logprobs":
        body["logprobs"] = a.mix_logprobs
    elif kind == "penalty":
        body.update(PENALTIES)
    return body


async def run_level(url: str, a, concurrency: int, prompts: list[list[int]], kinds: list[str]
                    ) -> tuple[list[RequestResult], float]:
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    schema = json.loads(Path(a.json_schema).read_text()) if a.json_schema else BENCH_SCHEMA
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout), limits=limits) as client:
        async def limited(p, kind):
            async with sem:
                return await one_request(client, url, request_body(a, p, kind, schema), kind)
        t = time.perf_counter()
        results = await asyncio.gather(*(limited(p, k) for p, k in zip(prompts, kinds)))
        return list(results), time.perf_counter() - t


def latency_stats(ok: list[RequestResult], duration: float) -> dict:
    """Output tok/s and TTFT / TPOT / ITL (mean, p50, p99) of some completed requests."""
    ttft = [r.ttft_s * 1e3 for r in ok]
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    itl = [x * 1e3 for r in ok for x in r.itl_s]
    row = {"completed": len(ok), "output_throughput": sum(r.output_tokens for r in ok) / duration}
    for name, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        row[f"mean_{name}"] = statistics.fmean(xs) if xs else float("nan")
        row[f"median_{name}"] = pct(xs, 50)
        row[f"p99_{name}"] = pct(xs, 99)
    return row


def summarize(concurrency: int, results: list[RequestResult], duration: float, m0: dict, m1: dict,
              json_share: float = 0.0, mix_share: float = 0.0) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    row = {"concurrency": concurrency, "json_share": json_share, "mix_share": mix_share, "num_prompts": len(results),
           **latency_stats(ok, duration), "failed": len(results) - len(ok), "duration_s": duration,
           "request_throughput": len(ok) / duration, "total_token_throughput": (in_tokens + out_tokens) / duration,
           "total_input_tokens": in_tokens, "total_output_tokens": out_tokens}
    if json_share > 0 or mix_share > 0:  # each kind beside the others, over the same wall time
        row["by_kind"] = {k: latency_stats([r for r in ok if r.kind == k], duration)
                          for k in ("plain", "json", "logprobs", "penalty") if any(r.kind == k for r in results)}
    busy = {}
    for k, v in m1.items():
        s = re.fullmatch(r'moepipe:stage_busy_seconds_total\{stage="(\d+)"\}', k)
        if s:
            busy[int(s.group(1))] = (v - m0.get(k, 0.0)) / duration
    row["stage_busy_fraction"] = [busy[r] for r in sorted(busy)]
    row["preemptions"] = m1.get("moepipe:num_preemptions_total", 0) - m0.get("moepipe:num_preemptions_total", 0)
    if "moepipe:step_cost_scale" in m1:  # --max-step-ms: the cost model's calibration at the level's end,
        row["step_cost_scale"] = m1["moepipe:step_cost_scale"]  # and the level's steps past the bound
        row["step_bound_over"] = m1.get("moepipe:step_bound_over_total", 0) - m0.get("moepipe:step_bound_over_total", 0)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        row["errors"] = errors[:5]
    return row


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
    ap.add_argument("--json-share", type=floats, default=[0.0],
                    help="shares of json_schema requests, each level run once per share (e.g. 0,0.5)")
    ap.add_argument("--json-schema", help="a JSON schema file for those requests (default: a built-in one)")
    ap.add_argument("--mix-share", type=floats, default=[0.0],
                    help="shares of requests with logprobs or penalties, each level run once per share (e.g. 0,0.5)")
    ap.add_argument("--mix-logprobs", type=int, default=5, help="logprobs (top k) of those logprobs requests")
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--startup-timeout", type=float, default=1800)
    ap.add_argument("--out", help="JSON results file")
    a = ap.parse_args()
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
        # first-call costs (allocator, kernels, the schema's compile) out of the figures
        asyncio.run(run_level(url, a, 2, warm, level_kinds(2, max(a.json_share), max(a.mix_share))))
        for c in a.concurrency:
            n = a.num_prompts or max(8, 2 * c)
            plain = None
            for js, ms in [(js, ms) for js in a.json_share for ms in a.mix_share]:
                # fresh prompts for each run: the prefix cache would serve a repeated one's prompt
                prompts = [shared + [rng.randrange(10, vocab - 10) for _ in range(a.input_len)] for _ in range(n)]
                m0 = metrics(sync, url)
                results, dt = asyncio.run(run_level(url, a, c, prompts, level_kinds(n, js, ms)))
                row = summarize(c, results, dt, m0, metrics(sync, url), js, ms)
                plain = row if js == ms == 0 else plain
                if plain is not None and plain["output_throughput"] > 0:
                    row["vs_plain"] = row["output_throughput"] / plain["output_throughput"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": gpu_name(), "command": " ".join(shlex.quote(x) for x in sys.argv),
              "model": a.model or a.url or "tiny preset", "stages": a.stages, "serve_args": a.serve_args,
              "input_len": a.input_len, "shared_prefix_tokens": a.shared_prefix_tokens, "output_len": a.output_len,
              "mix": {"logprobs": a.mix_logprobs, **PENALTIES}, "results": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n")
    hdr = (f"{'conc':>5} {'json':>5} {'mix':>5} {'reqs':>5} {'ok':>4} {'req/s':>7} {'out tok/s':>10} "
           f"{'vs plain':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'busy':>12}")
    print(f"\nserving: {record['model']}, {record['device']}, in {a.shared_prefix_tokens} shared + {a.input_len} / "
          f"out {a.output_len} tokens (ms for TTFT/TPOT)")
    print(hdr)
    for r in rows:
        busy = "/".join(f"{b:.2f}" for b in r["stage_busy_fraction"])
        vs = f"{r['vs_plain']:.3f}" if "vs_plain" in r else ""
        print(f"{r['concurrency']:>5} {r['json_share']:>5.2f} {r['mix_share']:>5.2f} {r['num_prompts']:>5} "
              f"{r['completed']:>4} {r['request_throughput']:>7.2f} {r['output_throughput']:>10.1f} {vs:>8} "
              f"{r['median_ttft_ms']:>9.1f} {r['p99_ttft_ms']:>9.1f} {r['median_tpot_ms']:>9.2f} "
              f"{r['p99_tpot_ms']:>9.2f} {busy:>12}")
        for kind, k in r.get("by_kind", {}).items():
            print(f"{'':>5} {kind:>11} {'':>5} {k['completed']:>4} {'':>7} {k['output_throughput']:>10.1f} {'':>8} "
                  f"{k['median_ttft_ms']:>9.1f} {k['p99_ttft_ms']:>9.1f} {k['median_tpot_ms']:>9.2f} "
                  f"{k['p99_tpot_ms']:>9.2f}")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
