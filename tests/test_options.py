"""EngineOptions: one declaration drives LLM keyword arguments, CLI flags and the torchrun path, with
the same checks everywhere, all before any process starts."""
import argparse
from dataclasses import fields

import pytest

from engine import LLM
from engine.__main__ import main
from engine.options import EngineOptions, add_option_flags, options_from_args, options_from_kwargs

BAD = [
    (dict(stages=0), "stages must be an integer >= 1"),
    (dict(stages=-2), "stages must be an integer >= 1"),
    (dict(max_num_seqs=0), "max_num_seqs must be an integer >= 1"),
    (dict(max_num_seqs=-1), "max_num_seqs must be an integer >= 1"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens must be an integer >= 1"),
    (dict(max_num_batched_tokens=-5), "max_num_batched_tokens must be an integer >= 1"),
    (dict(max_model_len=0), "max_model_len must be an integer >= 1"),
    (dict(block_size=12), "block_size must be a power of two"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(kv_cache_gib=0), "kv_cache_gib must be a number > 0"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(load_timeout_s=-1), "load_timeout_s must be a number > 0"),
    (dict(max_step_ms=-1), r"max_step_ms must be a number >= 0"),
    (dict(max_step_ms=float("nan")), r"max_step_ms must be a number >= 0"),
    (dict(max_step_ms="fast"), r"max_step_ms"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(attention="flash"), "attention 'flash'"),
    (dict(load_format="pt"), "load_format 'pt'"),
    (dict(layers=[2, 0], stages=2), "layers must be a list of integers >= 1"),
    (dict(layers=[2, 2], stages=3), "layers gives 2 stages but stages=3"),
    (dict(dtype="int3"), "dtype 'int3'"),
]


@pytest.mark.parametrize("kw,msg", BAD)
def test_validate_names_the_option_and_limit(kw, msg):
    with pytest.raises(ValueError, match=msg):
        options_from_kwargs(**kw)


def test_good_options_and_layers_forms():
    assert options_from_kwargs().stages == 1
    assert options_from_kwargs(stages=2, layers=(3, 1)).layers == [3, 1]
    assert options_from_kwargs(stages=2, layers="auto").layers == "auto"
    with pytest.raises(TypeError):
        options_from_kwargs(max_num_seq=4)  # a misspelt option is an error, not ignored


def test_serve_and_the_offline_engine_take_16k_steps():
    """`serve`, the LLM and `generate`: 16k-token steps and 512 sequences by default; a flag overrides."""
    from engine.cli import serve
    ap = argparse.ArgumentParser()
    serve.add_parser(ap.add_subparsers())
    a = ap.parse_args(["serve"])
    assert a.max_num_batched_tokens == 16384 and a.max_num_seqs == 512
    assert EngineOptions().max_num_batched_tokens == 16384 and EngineOptions().max_num_seqs == 512
    assert ap.parse_args(["serve", "--max-num-batched-tokens", "4096"]).max_num_batched_tokens == 4096


def test_every_field_has_a_flag_with_help_and_default():
    ap = argparse.ArgumentParser()
    add_option_flags(ap)
    text = ap.format_help()
    for f in fields(EngineOptions):
        assert f.metadata["help"]
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert flag in text
    text = " ".join(text.split())
    assert "(the prefill chunk) [default: 16384]" in text and "(a power of two) [default: 64]" in text
    a = ap.parse_args(["--stages", "2", "--layers", "3,1", "--quiet", "--max-num-seqs", "7", "--load-format", "dummy"])
    o = options_from_args(a)
    assert (o.stages, o.layers, o.verbose, o.max_num_seqs, o.load_format) == (2, [3, 1], False, 7, "dummy")
    assert options_from_args(ap.parse_args([])) == EngineOptions()


def test_llm_refuses_bad_options_before_starting(tmp_path):
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(tmp_path / "nowhere"), max_num_seqs=0)  # checked before the model is even looked at
    with pytest.raises(TypeError, match="either"):
        LLM(str(tmp_path), options=EngineOptions(), stages=2)


@pytest.mark.parametrize("argv,msg", [
    (["--stages", "0"], "stages must be an integer >= 1"),
    (["--max-num-seqs", "0"], "max_num_seqs"),
    (["--max-num-seqs", "-1"], "max_num_seqs"),
    (["--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
    (["--max-num-batched-tokens", "-5"], "max_num_batched_tokens"),
    (["--prompt-ids", ""], "--prompt-ids is empty"),
    (["--prompt-ids", "5,x"], "--prompt-ids '5,x'"),
])
def test_cli_prints_one_error_line(argv, msg, capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
