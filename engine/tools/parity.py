"""Layer parity of any checkpoint against transformers: every sub-layer of the chosen layers, then
the final norm and logits, as max abs / max rel error with a pass or fail per row.

The reference is transformers' Qwen3MoeForCausalLM (eager attention and experts) loaded by its own
loader from the same safetensors; the engine side is this project's loader and Stage on its
reference maths path. Only the chosen layers, the embedding and the head are loaded: transformers
gets a model of just those layers (their tensors renamed into a temporary checkpoint unless every
layer is chosen), the engine loads one piece at a time. Each chosen layer of the engine is fed the
reference's hidden state at that layer's input, so errors do not compound from layer to layer.

Letters: T tokens (one sequence), H hidden, V vocabulary."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loader.checkpoint import CheckpointIndex
from loader.load import load_stage
from loader.partition import StageSpec
from model.batch import AttnBatch
from model.config import ModelConfig

INSTALL_HINT = "pip install moepipe[parity]"
# max |engine - reference| / max |reference| that passes, per dtype. fp32: both sides run the same
# ops in the same order, only summation order inside a kernel may differ. bf16/fp16: one rounding
# step of the element in 2^-8 (2^-11) at the largest values, with room for a second one.
REL_BOUND = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Fraction of tokens whose top-k expert set must equal the reference's; a low-precision near-tie
# between the k-th and (k+1)-th expert may legitimately flip.
TOPK_AGREEMENT = {torch.float32: 1.0, torch.float16: 0.97, torch.bfloat16: 0.95}
# (key in the recorded traces, label), in the order a layer computes them
SUBLAYERS = (("input_norm", "input norm"), ("q_norm", "q after norm"), ("k_norm", "k after norm"),
             ("q_rope", "q after rope"), ("k_rope", "k after rope"), ("attn_out", "attention output"),
             ("post_norm", "post-attention norm"), ("router_logits", "router logits"),
             ("topk_ids", "top-k expert ids"), ("mlp_out", "MoE output"), ("out", "layer output"))
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")


class ParityUnavailable(RuntimeError):
    """transformers (the reference) is not installed."""


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
        from transformers import Qwen3MoeForCausalLM  # noqa: F401
    except ImportError:
        raise ParityUnavailable("the parity report needs transformers as its reference: "
                                f"{INSTALL_HINT}") from None


@dataclass
class Row:
    layer: int | None  # None: embedding, final norm, logits
    key: str
    label: str
    max_abs: float | None
    max_rel: float | None
    bound: float
    passed: bool
    note: str = ""


@dataclass
class ParityReport:
    model: str
    device: str
    dtype: str
    tokens: int
    layers: list[int]
    rel_bound: float
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def first_failure(self) -> Row | None:
        return next((r for r in self.rows if not r.passed), None)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        d = asdict(self)
        f = self.first_failure
        d["passed"] = self.passed
        d["first_failure"] = None if f is None else {"layer": f.layer, "key": f.key, "label": f.label}
        return d


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """'0,1,47' -> [0, 1, 47] (sorted, unique; negative counts from the end). None: every layer
    of a model of up to 8 layers, else the first two and the last."""
    if text is None:
        return list(range(num_layers)) if num_layers <= 8 else [0, 1, num_layers - 1]
    try:
        raw = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected comma-separated layer indices such as '0,1,47'") from None
    if not raw:
        raise ValueError(f"--layers {text!r}: name at least one layer")
    out = sorted({i + num_layers if i < 0 else i for i in raw})
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"--layers: layer {bad[0]} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    return out


# ---- reference: transformers ---------------------------------------------------------------------
def hf_trace(model, ids: torch.Tensor) -> dict:
    """Run a transformers Qwen3-MoE on ids [T] (one sequence) and record every sub-layer's output,
    keyed '{j}.name' by the model's own layer position j."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import apply_rotary_pos_emb
    rec: dict = {}
    hooks = []

    def save(key, fn=lambda o: o):
        return lambda mod, inp, out: rec.__setitem__(key, fn(out))

    m = model.model
    hooks.append(m.embed_tokens.register_forward_hook(save("embed", lambda o: o[0])))
    hooks.append(m.rotary_emb.register_forward_hook(save("cos_sin", lambda o: (o[0][0], o[1][0]))))
    for i, layer in enumerate(m.layers):
        hooks.append(layer.input_layernorm.register_forward_hook(save(f"{i}.input_norm", lambda o: o[0])))
        hooks.append(layer.self_attn.q_norm.register_forward_hook(save(f"{i}.q_norm", lambda o: o[0])))
        hooks.append(layer.self_attn.k_norm.register_forward_hook(save(f"{i}.k_norm", lambda o: o[0])))
        hooks.append(layer.self_attn.register_forward_hook(save(f"{i}.attn_out", lambda o: o[0][0])))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(save(f"{i}.post_norm", lambda o: o[0])))
        hooks.append(layer.mlp.register_forward_hook(save(f"{i}.mlp_out", lambda o: (o[0] if isinstance(o, tuple) else o)[0])))
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
            hooks.append(layer.mlp.gate.register_forward_hook(save(f"{i}.router", lambda o: o)))
        hooks.append(layer.register_forward_hook(save(f"{i}.out", lambda o: (o[0] if isinstance(o, tuple) else o)[0])))
    hooks.append(m.norm.register_forward_hook(save("final_norm", lambda o: o[0])))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
    finally:
        for h in hooks:
            h.remove()
    rec["logits"] = logits
    cos, sin = rec.pop("cos_sin")
    for i in range(len(m.layers)):
        if f"{i}.router" in rec:
            rec[f"{i}.router_logits"], rec[f"{i}.topk_w"], rec[f"{i}.topk_ids"] = rec.pop(f"{i}.router")
        q, k = rec[f"{i}.q_norm"], rec[f"{i}.k_norm"]  # [T, heads, D]
        qr, kr = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
        rec[f"{i}.q_rope"], rec[f"{i}.k_rope"] = qr[0].transpose(0, 1), kr[0].transpose(0, 1)
    return rec


def load_hf(path: str | Path, dtype: torch.dtype, device: str = "cpu"):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    # loaded on the host, then moved: device_map would need accelerate, which the extra does not pull
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager",
                                                 experts_implementation="eager")
    return model.to(device).eval()


def _sub_checkpoint(folder: Path, raw_cfg: dict, cfg: ModelConfig, layers: list[int], out: Path) -> Path:
    """A checkpoint of just `layers` (renumbered 0..n-1), the embedding and the head, tensors copied
    byte for byte under their own names: one shard per layer, so host memory holds one layer."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    index = CheckpointIndex(folder)
    new_index = {i: j for j, i in enumerate(layers)}
    groups: dict[str, list[tuple[str, str]]] = {}  # shard -> [(old name, new name)]
    for name in index.names:
        m = _LAYER_NAME.match(name)
        if m is None:
            groups.setdefault("outer.safetensors", []).append((name, name))
        elif int(m.group(1)) in new_index:
            j = new_index[int(m.group(1))]
            groups.setdefault(f"layer{j}.safetensors", []).append((name, f"model.layers.{j}." + name[m.end():]))
    weight_map = {}
    for shard, pairs in groups.items():
        tensors = {}
        for old, new in pairs:
            with safe_open(str(index.weight_map[old]), framework="pt", device="cpu") as f:
                tensors[new] = f.get_tensor(old)
            weight_map[new] = shard
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sub = dict(raw_cfg)
    sub["num_hidden_layers"] = len(layers)
    # which layers are MoE is decided by index: state it per new index
    sub["decoder_sparse_step"] = 1
    sub["mlp_only_layers"] = [j for j, i in enumerate(layers) if not cfg.is_sparse(i)]
    for k in ("layer_types", "max_window_layers"):
        sub.pop(k, None)
    (out / "config.json").write_text(json.dumps(sub))
    return out


def reference_trace(folder: Path, cfg: ModelConfig, layers: list[int], ids: torch.Tensor,
                    dtype: torch.dtype, device: str) -> dict:
    """transformers' record on CPU, keyed by the original layer index."""
    require_transformers()
    raw = json.loads((folder / "config.json").read_text())
    tmp = None
    try:
        if layers == list(range(cfg.num_hidden_layers)):
            path = folder
        else:
            tmp = Path(tempfile.mkdtemp(prefix="moepipe-parity-"))
            path = _sub_checkpoint(folder, raw, cfg, layers, tmp)
        model = load_hf(path, dtype, device)
        rec = hf_trace(model, ids.to(model.device))
        del model
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    for key, v in rec.items():
        head, _, rest = key.partition(".")
        k = f"{layers[int(head)]}.{rest}" if head.isdigit() else key
        out[k] = v.detach().cpu()
    return out


# ---- engine side -----------------------------------------------------------------------------
def _reference_maths(stage) -> None:
    """The engine's reference path: torch attention, the per-expert loop in transformers' order,
    unfused norms and rope."""
    from model.backend import pick_backend
    stage.backend = pick_backend(stage.device, attention="ref", moe="loop", fused=False)


def _run_piece(folder: Path, cfg: ModelConfig, spec: StageSpec, x: torch.Tensor, T: int,
               dtype: torch.dtype, device: torch.device, block_size: int = 16) -> dict:
    """Load one piece (a layer, the embedding or the head) as a Stage and run it on x, recording."""
    stage = load_stage(folder, cfg, spec, device, dtype, attention="ref")
    _reference_maths(stage)
    nblocks = -(-T // block_size)
    stage.allocate_kv(nblocks, block_size)
    batch = AttnBatch.build([T], [T], [list(range(nblocks))], block_size, [True], device)
    batch.logits_indices = torch.arange(T, device=device)  # every row's logits, to compare them all
    trace: dict = {}
    stage(x.to(device), batch, trace)
    del stage
    return {k: v.detach().cpu() for k, v in trace.items()}


def engine_trace(folder: Path, cfg: ModelConfig, layers: list[int], ids: torch.Tensor, ref: dict,
                 dtype: torch.dtype, device: str) -> dict:
    """The engine's record: the embedding, each chosen layer fed the reference's input hidden state,
    and the head fed the reference's last chosen layer output."""
    dev = torch.device(device)
    L, T = cfg.num_hidden_layers, ids.shape[0]
    got = _run_piece(folder, cfg, StageSpec(0, 1, 0, 0, True, False), ids, T, dtype, dev)
    prev = "embed"
    for i in layers:
        got.update(_run_piece(folder, cfg, StageSpec(0, 1, i, i + 1, False, False), ref[prev], T, dtype, dev))
        prev = f"{i}.out"
    got.update(_run_piece(folder, cfg, StageSpec(0, 1, L, L, False, True), ref[prev], T, dtype, dev))
    return got


# ---- comparison ------------------------------------------------------------------------------
def _errors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = a.abs().max().item() if a.numel() else 0.0
    return err, err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def compare(ref: dict, got: dict, layers: list[int], dtype: torch.dtype) -> list[Row]:
    bound, agree_min = REL_BOUND[dtype], TOPK_AGREEMENT[dtype]
    rows: list[Row] = []

    def add(layer, key, label, a, b, keep=None, note=""):
        if a.shape != b.shape:
            rows.append(Row(layer, key, label, None, None, bound, False,
                            f"shape {tuple(b.shape)} != reference {tuple(a.shape)}"))
            return
        if keep is not None:
            a, b = a[keep], b[keep]
        err, rel = _errors(a, b)
        rows.append(Row(layer, key, label, err, rel, bound, rel <= bound, note))

    add(None, "embed", "embedding", ref["embed"], got["embed"])
    for i in layers:
        keep, note = None, ""
        for key, label in SUBLAYERS:
            k = f"{i}.{key}"
            if k not in ref:
                continue  # a dense layer has no router
            if k not in got:
                rows.append(Row(i, key, label, None, None, bound, False, "not recorded by the engine"))
                continue
            if key == "topk_ids":
                ra, ga = ref[k].sort(-1).values, got[k].sort(-1).values
                same = (ra == ga).all(-1) if ra.shape == ga.shape else torch.zeros(ra.shape[0], dtype=torch.bool)
                frac = same.float().mean().item()
                rows.append(Row(i, key, label, None, None, agree_min, frac >= agree_min,
                                f"{int(same.sum())}/{same.numel()} tokens pick the same experts"))
                if frac < 1.0:
                    keep, note = same, f"over the {int(same.sum())} tokens with the same experts"
                continue
            label = label if key != "mlp_out" or f"{i}.topk_ids" in ref else "MLP output"
            add(i, key, label, ref[k], got[k], keep if key in ("mlp_out", "out") else None,
                note if key in ("mlp_out", "out") else "")
    add(None, "final_norm", "final norm", ref["final_norm"], got["final_norm"])
    add(None, "logits", "logits", ref["logits"].float(), got["logits"].float())
    if rows[-1].max_abs is not None:
        top1 = (ref["logits"].argmax(-1) == got["logits"].argmax(-1)).float().mean().item()
        rows[-1].note = f"greedy token equal at {100 * top1:.0f}% of positions"
    return rows


# ---- entry -----------------------------------------------------------------------------------
def prompt_ids(folder: Path, vocab_size: int, prompt: str | None, tokens: int, seed: int = 0) -> torch.Tensor:
    if prompt is not None:
        from loader.model_files import load_tokenizer
        tok = load_tokenizer(folder)
        if tok is None:
            raise ValueError(f"{folder}: no tokenizer.json to encode --prompt; use --tokens N instead")
        ids = tok.encode(prompt)
        if not ids:
            raise ValueError("--prompt encodes to no tokens")
        return torch.tensor(ids, dtype=torch.int64)
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    return torch.randint(0, vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed))


def run_parity(model: str, layers: str | list[int] | None = None, device: str | None = None,
               dtype: str | torch.dtype | None = None, prompt: str | None = None, tokens: int = 32,
               revision: str | None = None) -> ParityReport:
    """Load the checkpoint (folder or hub id) in transformers and in the engine, compare every
    sub-layer of the chosen layers; see ParityReport.passed / first_failure."""
    from model.config import parse_dtype

    from loader.model_files import resolve_model
    require_transformers()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device {device!r}: expected 'cuda' or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    dt = parse_dtype(dtype, "--dtype") or (torch.bfloat16 if device == "cuda" else torch.float32)
    folder, hub_repo = resolve_model(model, revision)
    cfg = ModelConfig.from_file(folder)
    L = cfg.num_hidden_layers
    chosen = layers if isinstance(layers, list) else parse_layers(layers, L)
    if hub_repo is not None:
        from loader.hub import fetch_stage_shards
        specs = [StageSpec(0, 1, 0, 0, True, False), StageSpec(0, 1, L, L, False, True)]
        specs += [StageSpec(0, 1, i, i + 1, False, False) for i in chosen]
        for s in specs:
            fetch_stage_shards(hub_repo, folder, cfg, s, revision)
    ids = prompt_ids(folder, cfg.vocab_size, prompt, tokens)
    ref = reference_trace(folder, cfg, chosen, ids, dt, device)
    got = engine_trace(folder, cfg, chosen, ids, ref, dt, device)
    report = ParityReport(str(model), device, str(dt).removeprefix("torch."), int(ids.shape[0]), chosen, REL_BOUND[dt])
    report.rows = compare(ref, got, chosen, dt)
    return report


def _num(x: float | None) -> str:
    return f"{x:10.3e}" if x is not None else f"{'-':>10}"


def format_report(r: ParityReport) -> str:
    lines = [f"parity: {r.model} on {r.device} in {r.dtype}, {r.tokens} tokens, layers "
             f"{','.join(map(str, r.layers))}; pass when max rel (max abs err / max |reference|) <= {r.rel_bound:g}",
             f"{'layer':>5}  {'sub-layer':<20} {'max abs':>10} {'max rel':>10} {'bound':>8}  result"]
    for row in r.rows:
        lay = "-" if row.layer is None else str(row.layer)
        res = "pass" if row.passed else "FAIL"
        lines.append(f"{lay:>5}  {row.label:<20} {_num(row.max_abs)} {_num(row.max_rel)} {row.bound:>8.2g}  {res}"
                     + (f"  ({row.note})" if row.note else ""))
    f = r.first_failure
    if f is None:
        lines.append(f"all {len(r.rows)} rows pass")
    else:
        where = "" if f.layer is None else f"layer {f.layer} "
        lines.append(f"FAIL: {sum(not x.passed for x in r.rows)} of {len(r.rows)} rows; first failing sub-layer: "
                     f"{where}{f.label} ({f.key})")
    return "\n".join(lines)
