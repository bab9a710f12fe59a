"""The maths of bench/bench_breakdown.py, apart from the engine it drives: which kernel group a GPU
kernel or CPU op belongs to, the per-step table from a profiler trace, and the bytes floor of each
group from the model's shapes.

Groups (GROUPS): attention (paged decode split + merge), moe (router GEMM, top-k, expert GEMMs),
dense (qkv and o projections), norm_rope (RMSNorms, q/k norm + rope + KV write), lm_head (the
vocabulary GEMM), sampler (everything the last stage's sampler launches), copies (memcpy, memset,
dtype conversions, fills, clones), other (embedding, residual adds, gathers, ...).

GPU (a kineto chrome trace): a kernel's group comes from its name, except that kernels launched
inside the bench's "bd.sample" annotation are the sampler's, and the lm_head is the longest GEMM
of each step (the vocabulary GEMM reads V*H weights, ~30x any per-layer projection). A kernel is
tied to its launch (cuda_runtime / cuda_driver event, the same "correlation" id), and the launch
to the innermost bench annotation around it on the host clock.
CPU (torch.profiler FunctionEvents with stacks): an op's group comes from the innermost model
source file on its Python stack; times are each op's self time, so nested ops count once."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

GROUPS = ("attention", "moe", "dense", "norm_rope", "lm_head", "sampler", "copies", "other")
LAYER_GROUPS = ("attention", "moe", "dense", "norm_rope")  # inside the decoder layers

_GPU_RULES = [  # (group, pattern on the lower-cased kernel name), first match wins
    ("copies", r"memcpy|memset|copy|(?<!pre)fill"),  # not _prefill_fa_kernel
    ("attention", r"_decode_split|_decode_merge|_prefill_fa|_fa3_kernel|_merge_kernel|flash|fmha|attention|sdpa"),
    ("moe", r"_gate_up|_down_combine|_down_grouped|_topk_softmax|moe"),
    ("norm_rope", r"rms_norm|qkv_norm_rope"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|splitk|_linear_small"),
]
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def gpu_group(name: str, scope: str | None) -> str:
    """The group of a GPU kernel by name; 'gemm' is resolved later into dense or lm_head."""
    if scope == "bd.sample":
        return "sampler"
    n = name.lower()
    for group, pat in _GPU_RULES:
        if re.search(pat, n):
            return group
    return "other"


# CPU: the innermost frame whose file (and, for ambiguous files, function) names a group
_CPU_FILES = [
    ("sampler", r"(stage_sampling|sampler|sampler_triton|sampler_penalties|sampler_logprobs)\.py"),
    ("attention", r"attention(_triton|_prefill_triton|_sdpa)?\.py"),
    ("dense", r"moe\.py\(\d+\): dense_mlp"),
    ("moe", r"(moe|fused_moe_triton)\.py"),
    ("norm_rope", r"(norm|rope|fused_triton)\.py"),
    ("copies", r"(step_plan|decode_graphs)\.py"),
    ("dense", r"(layers|linear_triton)\.py|backend\.py\(\d+\): linear"),
    ("attention", r"backend\.py\(\d+\): \w*_attend"),
    ("lm_head", r"stage\.py"),
]
_CPU_COPY_OPS = re.compile(r"aten::(copy_|clone|_to_copy|to|fill_|zero_|contiguous|index_put_|_index_put_impl_)$")


def cpu_group(ops: list[str], frames: list[str]) -> str:
    """The group of a CPU op. ops: the op and its op ancestors up to the first Python frame (innermost
    first); frames: the Python frames around it, innermost first ('model/moe.py(17): route')."""
    copy = any(_CPU_COPY_OPS.match(o) for o in ops[:1])
    for frame in frames:
        for group, pat in _CPU_FILES:
            if re.search(pat, frame):
                if group == "lm_head":  # ops straight in Stage.forward: the head's linear, else glue
                    if any(re.search(r"aten::(linear|addmm|mm|matmul)$", o) for o in ops):
                        return "lm_head"
                    return "copies" if copy else "other"
                return group
    return "copies" if copy else "other"


@dataclass
class Measured:
    steps: int  # decode steps (micro-batches) in the window
    wall_ms: float  # host wall time of the window
    group_ms: dict  # group -> summed device (or self CPU) time over the window
    busy_ms: float  # union of device activity (CPU: of top-level ops) over the window
    by_name: dict | None = None  # GPU: (group, kernel name) -> summed time over the window, for 'other' and 'copies'


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (any time unit, returned as given / 1e3)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total / 1e3


def from_chrome_trace(events: list[dict], steps: int, wall_ms: float, head_gemms: int | None = None) -> Measured:
    """A kineto chrome trace (GPU): device events grouped as the module docstring says (us -> ms).
    head_gemms: how many of the longest GEMMs are the lm_head's (default: one a step, a decode
    step's; 0 for prefill, where the head's few rows are shorter than the layers' GEMMs and count
    as dense)."""
    annotations = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("bd.")),
                         key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}

    def scope(corr) -> str | None:
        la = launches.get(corr)
        if la is None:
            return None
        inner = None
        for a in annotations:  # innermost: the latest-starting annotation that contains the launch
            if a["ts"] > la["ts"]:
                break
            if a["ts"] + a["dur"] >= la["ts"]:
                inner = a["name"]
        return inner

    device = [e for e in events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"]
    # only work launched inside the window (a step in flight at its start launched before it); a
    # trace without launch correlation (another kineto) keeps every device event instead
    mine = [e for e in device if e.get("args", {}).get("correlation") in launches]
    if 2 * len(mine) >= len(device):
        device = mine
    groups = {g: 0.0 for g in GROUPS}
    gemms, by_name = [], {}
    for e in device:
        g = "copies" if e["cat"] != "kernel" else gpu_group(e["name"], scope(e.get("args", {}).get("correlation")))
        if g == "gemm":
            gemms.append(e["dur"])
        else:
            groups[g] += e["dur"] / 1e3
        if g in ("other", "copies"):
            by_name[(g, e["name"])] = by_name.get((g, e["name"]), 0.0) + e["dur"] / 1e3
    gemms.sort(reverse=True)
    head = steps if head_gemms is None else head_gemms
    groups["lm_head"] += sum(gemms[:head]) / 1e3
    groups["dense"] += sum(gemms[head:]) / 1e3
    busy = union_ms([(e["ts"], e["ts"] + e["dur"]) for e in device])
    return Measured(steps, wall_ms, groups, busy, by_name)


def top_kernels(m: Measured, group: str, n: int = 8) -> list[dict]:
    """The n kernels of a group ('other' or 'copies', GPU traces) that took the most time: name
    (cut to 80 characters) and ms per step."""
    rows = sorted(((ms, name) for (g, name), ms in (m.by_name or {}).items() if g == group), reverse=True)
    return [{"kernel": name[:80], "ms": ms / m.steps} for ms, name in rows[:n]]


def _python_frame(name: str) -> bool:
    """Python frames, module scopes and annotations: not ops (with_stack records them as events)."""
    return bool(_FRAME.match(name)) or name.startswith(("<built-in", "bd.", "ProfilerStep", "nn.Module:"))


_FRAME = re.compile(r".+\(\d+\): ")  # 'model/moe.py(17): route', '<frozen runpy>(198): _run_module_as_main'


def from_cpu_events(events, steps: int, wall_ms: float) -> Measured:
    """torch.profiler FunctionEvents on CPU with with_stack=True (Python frames are events too):
    each op's self time in the group of its frames (us -> ms); busy: the union of the outermost ops."""
    groups = {g: 0.0 for g in GROUPS}
    top = []
    for e in events:
        if _python_frame(e.name):
            continue
        ops, frames, outermost = [e.name], [], True
        p = e.cpu_parent
        while p is not None:
            if _python_frame(p.name):
                frames.append(p.name)
            else:
                outermost = False
                if not frames:
                    ops.append(p.name)
            p = p.cpu_parent
        groups[cpu_group(ops, frames)] += e.self_cpu_time_total / 1e3
        if outermost:
            top.append((e.time_range.start, e.time_range.end))
    return Measured(steps, wall_ms, groups, union_ms(top))


# ---- bytes floors ------------------------------------------------------------------------------
def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts touched by `tokens` tokens each routed to top_k of num_experts uniformly at
    random (dummy weights route about uniformly): E * (1 - (1 - k/E)^T)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def floor_bytes(cfg, batch: int, context: float, wbytes: int = 2, logits_bytes: int = 4) -> dict:
    """Bytes one decode step of `batch` sequences at mean context `context` must move per group:
    weights read once (MoE: the expected distinct experts of the step), KV read, the logits' passes.
    cfg: model.config.ModelConfig; wbytes: bytes of a weight / activation element."""
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    sparse = [cfg.is_sparse(i) for i in range(L)]
    n_moe = sum(sparse)
    expert = 3 * cfg.moe_intermediate_size * H * wbytes
    moe = n_moe * (expected_experts(cfg.num_experts, cfg.num_experts_per_tok, batch) * expert
                   + cfg.num_experts * H * wbytes)
    dense_mlp = (L - n_moe) * 3 * cfg.intermediate_size * H * wbytes
    proj = (cfg.q_size + 2 * cfg.kv_size) * H + cfg.q_size * H  # qkv rows, o_proj
    kv = cfg.kv_bytes_per_token_per_layer(_dtype(wbytes))
    act = batch * (6 * H + 2 * (cfg.q_size + cfg.kv_size)) * wbytes  # norms' reads and writes per layer
    return {
        "attention": L * batch * context * kv,
        "moe": moe,
        "dense": L * proj * wbytes + dense_mlp,
        "norm_rope": L * act,
        "lm_head": V * H * wbytes + batch * V * wbytes,
        "sampler": batch * V * logits_bytes,
        # the engine's decode path: the logits cast to fp32 in the graph (read bf16, write fp32); the
        # sampler reads them in place (StageWorker.forward: no copy out of the graph on the last stage)
        "copies": batch * V * (wbytes + logits_bytes),
    }


def floor_flops(cfg, prompts: list[int]) -> dict:
    """FLOPs the prefill of fresh prompts (their token counts) must compute per group: each MoE
    token through its k experts (gate/up, down) and the router; the qkv and o projections (and dense
    MLPs); causal attention, QK^T and PV over each query's keys (position j sees j + 1), so
    4 * Hq * D * t(t + 1)/2 a layer for a prompt of t whatever its chunking; the head's one row a
    prompt."""
    H, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    T = sum(prompts)
    n_moe = sum(cfg.is_sparse(i) for i in range(L))
    moe = n_moe * T * 2 * (cfg.num_experts_per_tok * 3 * cfg.moe_intermediate_size + cfg.num_experts) * H
    dense_mlp = (L - n_moe) * T * 2 * 3 * cfg.intermediate_size * H
    proj = L * T * 2 * (2 * cfg.q_size + 2 * cfg.kv_size) * H
    attn = L * sum(4 * cfg.q_size * t * (t + 1) / 2 for t in prompts)
    return {"attention": attn, "moe": moe, "dense": proj + dense_mlp + len(prompts) * 2 * V * H}


def _dtype(nbytes: int):
    import torch
    return {2: torch.bfloat16, 4: torch.float32}[nbytes]


def table(m: Measured, floors: dict | None, bw_gbs: float, per_ms: float | None = None) -> list[dict]:
    """Rows per step: each group's ms, its % of the step, its floor's ms and the floor's share of the
    measured time; then host (step wall - device busy) and the step. Floors are bytes at bw_gbs, or
    any unit at per_ms of it a millisecond (FLOPs: the matmul rate in TFLOP/s * 1e9)."""
    step = m.wall_ms / m.steps
    rate = per_ms if per_ms is not None else bw_gbs * 1e6
    rows = []
    for g in GROUPS:
        ms = m.group_ms[g] / m.steps
        fl = floors.get(g) if floors else None
        fl_ms = fl / rate if fl is not None and rate > 0 else None
        rows.append({"group": g, "ms": ms, "pct_step": 100 * ms / step if step else 0.0,
                     "floor_ms": fl_ms, "pct_floor": 100 * fl_ms / ms if fl_ms and ms > 0 else None})
    host = step - m.busy_ms / m.steps
    rows.append({"group": "host", "ms": host, "pct_step": 100 * host / step if step else 0.0,
                 "floor_ms": None, "pct_floor": None})
    return rows


def format_table(batch: int, rows: list[dict], step_ms: float, overlap_ms: float, title: str | None = None) -> str:
    out = [title or f"batch {batch}: step {step_ms:.3f} ms (device kernels overlapping each other: {overlap_ms:.3f} ms/step)",
           f"{'group':<11}{'ms/step':>9}{'% step':>8}{'floor ms':>10}{'% floor':>9}"]
    for r in rows:
        fl = f"{r['floor_ms']:.3f}" if r["floor_ms"] is not None else "-"
        pf = f"{r['pct_floor']:.0f}%" if r["pct_floor"] is not None else "-"
        out.append(f"{r['group']:<11}{r['ms']:>9.3f}{r['pct_step']:>7.1f}%{fl:>10}{pf:>9}")
    layers = sum(r["ms"] for r in rows if r["group"] in LAYER_GROUPS)
    out.append(f"{'(layers)':<11}{layers:>9.3f}{100 * layers / step_ms if step_ms else 0:>7.1f}%"
               f"   outside the layers: {step_ms - layers:.3f} ms")
    return "\n".join(out)


def summary(results: list[dict]) -> str:
    """One line per run: the step, each group's ms per step, host, and the time outside the layers."""
    short = {"attention": "attn", "moe": "moe", "dense": "dense", "norm_rope": "norm", "lm_head": "head",
             "sampler": "sampl", "copies": "copy", "other": "other", "host": "host"}
    out = [f"{'run':<14}{'step':>8}" + "".join(f"{v:>7}" for v in short.values()) + f"{'outside':>9}"]
    for r in results:
        ms = {x["group"]: x["ms"] for x in r["rows"]}
        layers = sum(ms[g] for g in LAYER_GROUPS)
        out.append(f"{r['sampling'][:6] + ' b' + str(r['batch']):<14}{r['step_ms']:>8.2f}"
                   + "".join(f"{ms[g]:>7.2f}" for g in short) + f"{r['step_ms'] - layers:>9.2f}")
    return "\n".join(out)
