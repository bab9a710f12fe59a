"""config.json dicts of the random-weight presets: tiny CPU ones and the published real shapes."""
from __future__ import annotations

import copy

_QWEN3_COMMON = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_act="silu",
    attention_bias=False, attention_dropout=0.0, decoder_sparse_step=1, mlp_only_layers=[],
    rms_norm_eps=1e-6, use_cache=True, use_sliding_window=False, sliding_window=None,
    output_router_logits=False, router_aux_loss_coef=0.001, initializer_range=0.02,
    torch_dtype="bfloat16",
)

PRESETS: dict[str, dict] = {
    # CPU tests: head_dim (32) != hidden/heads (16); 4k+ positions for long paged tests.
    "tiny": dict(_QWEN3_COMMON, vocab_size=512, hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
                 moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                 max_position_embeddings=8192, rope_theta=10000.0, rope_scaling=None,
                 tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, torch_dtype="float32"),
    # The user's reference head layout scaled down: 6 q heads per kv head, 16 experts top-4,
    # YaRN factor 4 over a 256-token original length; no norm_topk_prob key (HF default False).
    "user-mini": dict(_QWEN3_COMMON, vocab_size=512, hidden_size=96, num_hidden_layers=4,
                      num_attention_heads=12, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                      moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                      max_position_embeddings=1024, rope_theta=2000000.0,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, torch_dtype="float32"),
    "qwen3-30b-a3b": dict(_QWEN3_COMMON, vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          max_position_embeddings=40960, rope_theta=1000000.0, rope_scaling=None,
                          max_window_layers=48, tie_word_embeddings=False, bos_token_id=151643,
                          eos_token_id=151645),
    "qwen3-235b-a22b": dict(_QWEN3_COMMON, vocab_size=151936, hidden_size=4096, num_hidden_layers=94,
                            num_attention_heads=64, num_key_value_heads=4, head_dim=128, intermediate_size=12288,
                            moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8,
                            norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1000000.0,
                            rope_scaling=None, max_window_layers=94, tie_word_embeddings=False,
                            bos_token_id=151643, eos_token_id=151645),
}

# Qwen's documented long-context override (spec section 3), applied with `yarn_config`.
QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def yarn_config(cfg: dict, max_position_embeddings: int = 131072) -> dict:
    """The same config with Qwen's YaRN override (factor 4 over 32768 -> 131072 positions)."""
    out = copy.deepcopy(cfg)
    out["rope_scaling"] = dict(QWEN_YARN)
    out["max_position_embeddings"] = max_position_embeddings
    return out


# Qwen3's chat template (as shipped with Qwen3-30B-A3B): system/tools header, <think> blocks for the
# turns after the last user query, tool calls and responses, and the `enable_thinking` switch.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
