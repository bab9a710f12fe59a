"""Helpers for the parity tests: build and save small transformers Qwen3-MoE models, run them with
hooks that record every sub-layer, and run this engine's Stage on the same checkpoint."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch

from engine.tools import parity
from loader.load import load_stage
from loader.partition import partition
from model.batch import AttnBatch
from model.config import ModelConfig

BASE = dict(model_type="qwen3_moe", vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=4096, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=1)


def hf_config(**over) -> dict:
    d = copy.deepcopy(BASE)
    d.update(over)
    return d


def save_hf_model(cfg: dict, out: Path, seed: int = 0, fused: bool = False) -> Path:
    """Random transformers model saved with save_pretrained (original per-expert names, or fused)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(out, save_original_format=not fused)
    return out


def load_hf(path: Path, dtype=torch.float32):
    return parity.load_hf(path, dtype)


hf_trace = parity.hf_trace  # one recorder for the tests and the `parity` command


def engine_trace(path: Path, ids: torch.Tensor, dtype=torch.float32, moe: str = "torch",
                 block_size: int = 16) -> dict:
    """Run this engine's whole model as one Stage on ids [T] and record the same points. moe: the
    Backend's expert path ('torch': sort + grouped GEMM; 'loop': the per-expert reference loop)."""
    cfg = ModelConfig.from_file(path)
    spec = partition(cfg.num_hidden_layers, 1)[0]
    stage = load_stage(path, cfg, spec, "cpu", dtype)
    stage.backend = replace(stage.backend, moe=moe)
    T = ids.shape[0]
    nblocks = (T + block_size - 1) // block_size
    stage.allocate_kv(nblocks + 3, block_size)
    table = torch.randperm(nblocks + 3)[:nblocks].tolist()
    batch = AttnBatch.build([T], [T], [table], block_size, [True], "cpu")
    batch.logits_indices = torch.arange(T)  # every row, to compare all logits
    trace: dict = {}
    stage(ids, batch, trace)
    return trace
