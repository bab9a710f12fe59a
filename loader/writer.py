"""Random-weight Qwen3-MoE checkpoints in the exact HF layout, streamed tensor by tensor to disk.

Every value depends only on (seed, per-expert checkpoint name, row block, device type), so the
fused and per-expert layouts of one seed hold the same numbers and blocks can be made in parallel.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from loader.names import checkpoint_layout
from loader.presets import QWEN3_CHAT_TEMPLATE, preset_config
from loader.safetensors_stream import SafetensorsStreamWriter, TensorEntry
from model.config import ModelConfig, parse_dtype

ProgressFn = Callable[[int, int], None]  # (bytes written so far, total bytes)

BLOCK_ELEMS = 1 << 24  # values per generated block (64 MiB of fp32); fixed so values never depend on it
MAX_TOKENIZER_VOCAB = 4096
INDEX_NAME = "model.safetensors.index.json"
CACHE_VERSION = "v2"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
# Added but not special (kept by decode(skip_special_tokens=True)), as in Qwen3's tokenizer; the last ids.
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
QWEN_PAD_ID = 151643  # <|endoftext|> of the real Qwen3 tokenizer


# ---- plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """A [rows, ...] slab of a stored tensor; its values are seeded by `seed_name`."""
    seed_name: str
    shape: tuple[int, ...]
    kind: str  # "matrix": N(0, std); "norm": 1 + N(0, 0.1)

    @property
    def rows_per_block(self) -> int:
        return max(1, BLOCK_ELEMS // max(1, math.prod(self.shape[1:])))

    @property
    def num_blocks(self) -> int:
        return -(-self.shape[0] // self.rows_per_block)


@dataclass(frozen=True)
class PlannedTensor:
    entry: TensorEntry
    parts: tuple[Part, ...]  # concatenated along dim 0 (after flattening) they form the tensor


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CheckpointPlan:
    shards: tuple[ShardPlan, ...]
    single_file: bool
    dtype: torch.dtype

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def num_tensors(self) -> int:
        return sum(len(s.tensors) for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.entry.name: s.filename for s in self.shards for t in s.tensors}


def resolve_dtype(config: dict, dtype: str | torch.dtype | None = None) -> torch.dtype:
    if dtype is not None:
        return parse_dtype(dtype, "dtype")
    return ModelConfig.from_dict(config).dtype or torch.bfloat16


def plan_tensors(config: dict, dtype: torch.dtype, fused_experts: bool = False) -> list[PlannedTensor]:
    """All tensors in natural order (loader/names.py's checkpoint_layout): embed, layers 0..L-1,
    norm, lm_head (unless tied). A fused expert tensor is made of its per-expert parts, so both
    layouts of one seed hold the same numbers."""
    cfg = ModelConfig.from_dict(config)
    out: list[PlannedTensor] = []
    for name, p in checkpoint_layout(cfg, fused_experts).items():
        if cfg.tie_word_embeddings and p.param == "lm_head.weight":
            continue  # tied: the head is the embedding
        kind = "norm" if p.norm else "matrix"
        parts = tuple(Part(q.name, q.shape, kind) for q in p.parts)
        out.append(PlannedTensor(TensorEntry(name, p.shape, dtype), parts))
    return out


def plan_checkpoint(config: dict, *, dtype: str | torch.dtype | None = None, shard_bytes: int = 2 * 2**30,
                    fused_experts: bool = False, single_file: bool = False) -> CheckpointPlan:
    """Greedy sharding in natural order: a tensor opens a new shard if it would overflow shard_bytes."""
    dt = resolve_dtype(config, dtype)
    tensors = plan_tensors(config, dt, fused_experts)
    if single_file:
        return CheckpointPlan((ShardPlan("model.safetensors", tuple(tensors)),), True, dt)
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.entry.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.entry.nbytes
    n = len(groups)
    return CheckpointPlan(tuple(ShardPlan(f"model-{k + 1:05d}-of-{n:05d}.safetensors", tuple(g))
                                for k, g in enumerate(groups)), False, dt)


# ---- values --------------------------------------------------------------------------------------
def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generate_block(part: Part, block: int, *, seed: int, std: float, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Rows [block*rpb, (block+1)*rpb) of the part, made in fp32 on `device`, returned cast on CPU."""
    rows = min(part.rows_per_block, part.shape[0] - block * part.rows_per_block)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(_block_seed(seed, part.seed_name, block))
    t = torch.empty((rows, *part.shape[1:]), dtype=torch.float32, device=dev)
    if part.kind == "norm":
        t.normal_(1.0, 0.1, generator=g)
    else:
        t.normal_(0.0, std, generator=g)
    return t.to(dtype).cpu()


def generate_tensor(pt: PlannedTensor, *, seed: int = 0, std: float = 0.02,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """The whole tensor in memory (tests and small models); equals what write_checkpoint stores."""
    blocks = [generate_block(p, b, seed=seed, std=std, dtype=pt.entry.dtype, device=device)
              for p in pt.parts for b in range(p.num_blocks)]
    return torch.cat([b.reshape(-1) for b in blocks]).reshape(pt.entry.shape)


def _ordered_blocks(units: list[tuple[Part, int]], make: Callable[[Part, int], torch.Tensor],
                    workers: int) -> Iterator[torch.Tensor]:
    """make() over units on a thread pool, yielded in order with a bounded number in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for u in units:
            pending.append(pool.submit(make, *u))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---- writing -------------------------------------------------------------------------------------
_OWNED_GLOBS = ("model.safetensors", "model-*-of-*.safetensors", INDEX_NAME, "config.json",
                "generation_config.json", "tokenizer.json", "tokenizer_config.json", CHAT_TEMPLATE_FILE)


def generation_config(config: dict) -> dict:
    """eos list = config eos + <|endoftext|> (0 for our tokenizer, 151643 for the real vocabulary)."""
    eos = config.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else ([] if eos is None else [int(eos)])
    real = config.get("vocab_size", 0) > QWEN_PAD_ID and QWEN_PAD_ID + 2 in eos_ids
    pad = QWEN_PAD_ID if real else 0
    out: dict = {}
    if config.get("bos_token_id") is not None:
        out["bos_token_id"] = config["bos_token_id"]
    out["eos_token_id"] = eos_ids + ([pad] if pad not in eos_ids else [])
    out["pad_token_id"] = pad
    return out


def write_checkpoint(out_dir: str | Path, config: dict, *, seed: int = 0, dtype: str | torch.dtype | None = None,
                     shard_bytes: int = 2 * 2**30, fused_experts: bool = False, tokenizer: bool = True,
                     std: float = 0.02, progress: ProgressFn | None = None, single_file: bool = False,
                     device: str | torch.device = "cpu", workers: int | None = None) -> Path:
    """Write config, generation config, safetensors shards (+ index) and, for vocab <= 4096, a tokenizer.
    Host memory stays near 2*workers blocks of BLOCK_ELEMS values whatever the model size."""
    out = Path(out_dir)
    plan = plan_checkpoint(config, dtype=dtype, shard_bytes=shard_bytes, fused_experts=fused_experts,
                           single_file=single_file)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _OWNED_GLOBS:  # stale shards of an earlier, differently sharded write
        for f in out.glob(pattern):
            f.unlink()
    free = shutil.disk_usage(out).free
    if plan.total_size > free:
        raise OSError(f"{out}: needs {plan.total_size / 1e9:.1f} GB, only {free / 1e9:.1f} GB free")

    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(config), indent=2) + "\n")
    vocab = ModelConfig.from_dict(config).vocab_size
    if tokenizer and len(SPECIAL_TOKENS) + len(ADDED_TOKENS) + 256 <= vocab <= MAX_TOKENIZER_VOCAB:
        write_tokenizer(out, vocab, model_max_length=config.get("max_position_embeddings", 32768))

    dev = torch.device(device)
    if workers is None:
        workers = 4 if dev.type == "cuda" else max(1, min(16, os.cpu_count() or 1))

    def make(part: Part, block: int) -> torch.Tensor:
        return generate_block(part, block, seed=seed, std=std, dtype=plan.dtype, device=dev)

    units = [(p, b) for s in plan.shards for t in s.tensors for p in t.parts for b in range(p.num_blocks)]
    blocks = _ordered_blocks(units, make, workers)
    done, total = 0, plan.total_size
    try:
        for shard in plan.shards:
            with SafetensorsStreamWriter(out / shard.filename, [t.entry for t in shard.tensors]) as w:
                for t in shard.tensors:
                    for _ in range(sum(p.num_blocks for p in t.parts)):
                        done += w.write(next(blocks))
                    if progress is not None:
                        progress(done, total)
    finally:
        blocks.close()  # drains the pool's in-flight blocks
    if not plan.single_file:
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map()}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


# ---- tokenizer -----------------------------------------------------------------------------------
_CORPUS = """\
The river ran quietly past the old mill, and the miller's daughter watched the water turn the wheel.
Every morning she carried bread to the market, where merchants argued about the price of grain and
the weather. Some said the summer would be long and dry; others were certain that the rain would come
before the harvest. She listened, smiled, and said nothing, because she had learned that the river
knew more about the weather than any of them.

In the evening the village gathered in the square. Children played near the fountain, old men talked
about the war and the king, and the baker counted his coins twice before he closed the shop. A young
traveller arrived with a small bag and a large book. He asked where he could sleep, and the innkeeper
offered him a room above the stable for three silver pieces and a story.

The traveller told them about distant cities with towers of glass, about ships that crossed the ocean
in a single week, and about machines that could answer any question. "They read every book ever
written," he said, "and then they learn to write new ones." The children laughed. The old men shook
their heads. The miller's daughter asked him how a machine could learn anything at all.

"It guesses the next word," he answered, "and when it is wrong, it changes a little. After many
millions of guesses, it is wrong less often." She thought about the river, which also changed a
little every day, and about the wheel, which turned and turned without ever asking why.

Numbers matter too: 1, 2, 3, 10, 42, 100, 2024, 3.14159. Questions end with a question mark? Lists
use commas, semicolons; and colons: apples, pears, plums. Code looks like def main(): return 0.
Hello, world! How are you today? I am fine, thank you. What time is it? It is half past seven.
"""


def train_tokenizer(vocab_size: int):
    """Byte-level BPE with <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (special) and ADDED_TOKENS
    (not special) as the last ids; <= vocab_size tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(ADDED_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


def write_tokenizer(out_dir: str | Path, vocab_size: int, model_max_length: int = 32768) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens as in Qwen3's) and Qwen3's chat template."""
    out = Path(out_dir)
    train_tokenizer(vocab_size).save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": model_max_length,
           "add_bos_token": False, "clean_up_tokenization_spaces": False, "errors": "replace",
           "split_special_tokens": False}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / CHAT_TEMPLATE_FILE).write_text(QWEN3_CHAT_TEMPLATE)


# ---- cache ---------------------------------------------------------------------------------------
def cache_root() -> Path:
    env = os.environ.get("MOEPIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moepipe"


def ensure_cached_preset(name: str) -> Path:
    """<cache>/<name>-v1, written once; concurrent callers each build a temp dir and one rename wins."""
    config = preset_config(name)
    final = cache_root() / f"{name}-{CACHE_VERSION}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_checkpoint(tmp, config)
        try:
            os.rename(tmp, final)  # atomic; fails if another process already renamed its copy
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
