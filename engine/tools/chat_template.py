"""The checkpoint's chat template, rendered as transformers' `apply_chat_template` renders it: the
same jinja2 sandbox, settings, globals and filters, messages normalised the same way, and the
tokenizer's named special tokens (bos_token, eos_token, ...) passed as template variables."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from model.config import ConfigError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the names a template sees as variables
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read `reasoning_content` (gpt-oss: `thinking`)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render, or a template that does not compile."""


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' override: no HTML escaping, json.dumps options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild what the template sees from plain JSON types (pydantic models and dataclasses become
    dicts, anything else an inert '<TypeName>'), as transformers does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any) -> list[dict]:
    """Plain dicts with the keys whose value is None dropped (OpenAI clients send content=None,
    tool_calls=None), and reasoning aliased to both `reasoning_content` and `thinking`."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(_plain(list(messages))):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object with a role, got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        if not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] has no string 'role'")
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", "__type": "AddedToken", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    templates: dict[str, str]  # name -> jinja source; "default" for a single template
    special_tokens: dict[str, str]  # bos_token, eos_token, ... (only those set)
    source: str = ""

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTemplate | None":
        """chat_template.jinja (+ additional_chat_templates/*.jinja) first, else tokenizer_config.json's
        `chat_template` (a string, or a list of {name, template}); None when the checkpoint has none."""
        folder = Path(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.exists() else {}
        special: dict[str, str] = {}
        map_path = folder / "special_tokens_map.json"
        sources = ([_read_json(map_path)] if map_path.exists() else []) + [cfg]
        for src in sources:
            for name in SPECIAL_TOKEN_NAMES:
                if name in src:
                    text = _token_text(src[name])
                    if text is None:
                        special.pop(name, None)
                    else:
                        special[name] = text
        templates: dict[str, str] = {}
        jinja = folder / TEMPLATE_FILE
        if jinja.exists():
            templates["default"] = jinja.read_text(encoding="utf-8")
        extra = folder / TEMPLATE_DIR
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        where = str(jinja if jinja.exists() else cfg_path)
        if not templates:
            t = cfg.get("chat_template")
            if isinstance(t, str):
                templates["default"] = t
            elif isinstance(t, list):
                for item in t:
                    if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                            and isinstance(item.get("template"), str)):
                        raise ConfigError(f"{cfg_path}: chat_template list entries need 'name' and 'template'")
                    templates[item["name"]] = item["template"]
            elif t is not None:
                raise ConfigError(f"{cfg_path}: chat_template must be a string or a list, got {type(t).__name__}")
        return cls(templates, special, where) if templates else None

    def pick(self, tools: list | None) -> str:
        """transformers' choice: the only template; else 'tool_use' when tools are given, else 'default'."""
        if set(self.templates) == {"default"}:
            return self.templates["default"]
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise ChatTemplateError(f"{self.source}: several chat templates ({', '.join(sorted(self.templates))}) "
                                "and no 'default'")

    def render(self, messages: Any, add_generation_prompt: bool = True, tools: list | None = None,
               documents: list | None = None, chat_template_kwargs: dict | None = None) -> str:
        """The prompt text; chat_template_kwargs (e.g. enable_thinking) override the special tokens."""
        import jinja2
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ChatTemplateError("tools must be a list of JSON-schema objects")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise ChatTemplateError("documents must be a list of objects")
        kwargs = dict(chat_template_kwargs or {})
        for reserved in ("messages", "tools", "documents", "add_generation_prompt"):
            if reserved in kwargs:
                raise ChatTemplateError(f"chat_template_kwargs may not set {reserved!r}")
        variables = _plain({**self.special_tokens, **kwargs})
        try:
            template = _compile(self.pick(tools))
            return template.render(messages=normalize_messages(messages), tools=_plain(tools),
                                   documents=_plain(documents), add_generation_prompt=add_generation_prompt,
                                   **variables)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{self.source}: chat template does not compile: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None


def render_chat(folder: str | Path, messages: Any, add_generation_prompt: bool = True, tools: list | None = None,
                chat_template_kwargs: dict | None = None) -> str:
    """One-shot render from a checkpoint folder (LLM.chat keeps a loaded ChatTemplate instead)."""
    ct = ChatTemplate.from_folder(folder)
    if ct is None:
        raise ChatTemplateError(f"{folder}: the checkpoint has no chat template "
                                f"({TEMPLATE_FILE} or tokenizer_config.json's chat_template)")
    return ct.render(messages, add_generation_prompt, tools, chat_template_kwargs=chat_template_kwargs)
