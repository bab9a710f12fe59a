"""engine.tools.chat_template renders conversations exactly as transformers' apply_chat_template does,
with the Qwen3 template the presets ship and with templates that use the sandbox's extras."""
import json
import shutil
from pathlib import Path

import pytest

from engine.tools.chat_template import ChatTemplate, ChatTemplateError, render_chat
from loader.presets import preset_config
from loader.writer import write_checkpoint

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello there"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 日本"}],
    "reasoning_content": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "Done.", "reasoning_content": "\nLet me think.\n"}],
    "reasoning_in_old_turn": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "dropped, before the last query"},
        {"role": "user", "content": "q2"}],
    "inline_think": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nhello"},
        {"role": "assistant", "content": "again", "reasoning": "alias of reasoning_content"}],
    "none_fields": [
        {"role": "user", "content": "x", "name": None},
        {"role": "assistant", "content": "y", "tool_calls": None}],
    "tools": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18"},
        {"role": "tool", "tool_call_id": "c2", "content": "9"}],
    # an agent loop: thinking + text + calls, results, then the final answer after the tool turn
    "tools_multi_step": [
        {"role": "user", "content": "Weather in Paris? Answer in °F."},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "\nNeed the tool.\n", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "note": "日本 \\"q\\""}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "", "reasoning_content": "18C is 64F.", "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Oslo", "nested": {"k": [1, "é"]}}}}]},
        {"role": "tool", "tool_call_id": "c2", "content": "9"},
        {"role": "assistant", "content": "64°F in Paris.", "reasoning_content": "done"}],
    "tool_role_first_and_openai_nulls": [
        {"role": "tool", "tool_call_id": "c0", "content": "stale result"},
        {"role": "user", "content": "hi", "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c9", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
         "reasoning_content": None}],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny_chat"), preset_config("tiny"), seed=0)


@pytest.fixture(scope="module")
def hf_tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny))


def hf_render(tok, messages, **kw) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kw)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen3_template_equals_transformers(tiny, hf_tok, name, gen, thinking):
    msgs = CONVERSATIONS[name]
    tools = [WEATHER_TOOL] if name.startswith("tools") else None
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    want = hf_render(hf_tok, msgs, add_generation_prompt=gen, tools=tools, **kwargs)
    got = ChatTemplate.from_folder(tiny).render(msgs, add_generation_prompt=gen, tools=tools,
                                                chat_template_kwargs=kwargs)
    assert got == want


def test_rendered_ids_equal_and_thinking_switch(tiny, hf_tok):
    from loader.model_files import load_tokenizer
    msgs = CONVERSATIONS["system_multi_turn"]
    off = render_chat(tiny, msgs, chat_template_kwargs={"enable_thinking": False})
    on = render_chat(tiny, msgs)
    assert off == on + "<think>\n\n</think>\n\n" and on.endswith("<|im_start|>assistant\n")
    want = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, return_dict=False)
    ids = load_tokenizer(tiny).encode(off)
    assert ids == list(want)
    # the template's control tokens are single added tokens, as in Qwen3's tokenizer
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>"):
        assert len(hf_tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert hf_tok.convert_ids_to_tokens(ids).count("<think>") == 1


EXTRAS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
    "{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
    "{% set ns = namespace(n=loop.index) %}{% set d = dict(a=1) %}"
    "<{{ m.role }}:{{ ns.n }}:{{ d.a }}>{{ m.content }}{{ eos_token }}\n"
    "    {% generation %}{{ m | tojson }}{% endgeneration %}\n"
    "{% endfor %}{% if add_generation_prompt %}[{{ strftime_now('%Y') }}|{{ flavour }}]{% endif %}")


def test_template_from_tokenizer_config_with_sandbox_extras(tiny, tmp_path):
    """tokenizer_config.json's chat_template (no .jinja file), bos/eos from AddedToken dicts, and the
    globals/filters/extensions transformers adds: raise_exception, strftime_now, namespace, dict,
    tojson (no HTML escaping, non-ASCII kept), loopcontrols and {% generation %}."""
    from transformers import AutoTokenizer
    d = tmp_path / "cfg_template"
    d.mkdir()
    shutil.copy(tiny / "tokenizer.json", d)
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    cfg.update(chat_template=EXTRAS_TEMPLATE, bos_token="<|endoftext|>",
               eos_token={"__type": "AddedToken", "content": "<|im_end|>", "special": True})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(str(d))
    msgs = [{"role": "user", "content": "<b>&é</b>"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "3"}, {"role": "user", "content": "past the break"}]
    ct = ChatTemplate.from_folder(d)
    for gen in (True, False):
        got = ct.render(msgs, add_generation_prompt=gen, chat_template_kwargs={"flavour": "x"})
        assert got == hf_render(tok, msgs, add_generation_prompt=gen, flavour="x")
    assert "past the break" not in got and "<b>&é</b>" in got
    with pytest.raises(ChatTemplateError, match="no bad roles"):
        ct.render([{"role": "bad", "content": ""}])
    assert ct.render(msgs, chat_template_kwargs={"eos_token": "E"}).count("E\n") == 3  # kwargs win


def test_bad_conversations_and_missing_template(tiny, tmp_path):
    ct = ChatTemplate.from_folder(tiny)
    with pytest.raises(ChatTemplateError, match="non-empty"):
        ct.render([])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\]"):
        ct.render([{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ChatTemplateError, match="may not set 'messages'"):
        ct.render([{"role": "user", "content": "a"}], chat_template_kwargs={"messages": []})
    shutil.copy(tiny / "tokenizer_config.json", tmp_path)
    assert ChatTemplate.from_folder(tmp_path) is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(tmp_path, [{"role": "user", "content": "a"}])
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat(tmp_path, [{"role": "user", "content": "a"}])
