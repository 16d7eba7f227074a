"""Chat templates: the model's own Jinja template (`chat_template` in tokenizer_config.json, or
chat_template.jinja), or a file given with --chat-template, rendered as HuggingFace transformers renders it: a
sandboxed, immutable Jinja environment with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a
`tojson` that keeps non-ASCII text and the `{% generation %}` block, given `messages`, `add_generation_prompt` and
the special tokens. The rendered text is tokenized without the tokenizer's own special tokens, as transformers'
apply_chat_template(tokenize=True) and vLLM do: the template writes whatever BOS the model wants."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.tokenizer import Tokenizer

# Names chat_template_kwargs may not set: the arguments and helpers every render has (transformers passes its own
# arguments over the caller's too).
RESERVED = frozenset({"messages", "add_generation_prompt", "raise_exception", "strftime_now"})


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' AssistantTracker tags, which mark the assistant's
    tokens for training masks (return_assistant_tokens_mask). Serving needs only the text: the body renders as
    if the tags were not there."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> list[nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled template and the special tokens it may use. Mutates nothing."""

    def __init__(self, source: str, origin: str, special_tokens: dict[str, str]) -> None:
        self.origin = origin  # where it came from, for messages
        self.special_tokens = special_tokens
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template in {origin} does not compile: {e} (line {e.lineno})") from None

    @classmethod
    def load(cls, model_dir: str, override: str | None, tokenizer: Tokenizer | None, bos_token_id: int | None,
             eos_token_ids: tuple[int, ...]) -> ChatTemplate | None:
        """The override file, else the model's template; None when the model has none."""
        cfg: dict[str, Any] = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        source, origin = None, ""
        if override is not None:
            with open(override) as f:
                source, origin = f.read(), override
        elif os.path.isfile(jinja := os.path.join(model_dir, "chat_template.jinja")):
            with open(jinja) as f:
                source, origin = f.read(), jinja
        elif cfg.get("chat_template"):
            source, origin = cfg["chat_template"], cfg_path
            if isinstance(source, list):  # named templates: the "default" one serves chat
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        tokens = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                  if (t := _token_text(cfg.get(k))) is not None}
        if tokenizer is not None:  # a directory without tokenizer_config.json: name them from config.json's ids
            if "bos_token" not in tokens and bos_token_id is not None:
                tokens["bos_token"] = tokenizer.decode([bos_token_id], skip_special_tokens=False)
            if "eos_token" not in tokens and eos_token_ids:
                tokens["eos_token"] = tokenizer.decode([eos_token_ids[0]], skip_special_tokens=False)
        return cls(source, origin, tokens)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
               extra: dict[str, Any] | None = None) -> str:
        """The prompt text. ValueError saying why for a conversation the template refuses or fails on: whatever
        a template raises comes from the request's messages or `extra` (chat_template_kwargs), so it is the
        client's 400, never the server's 500. `extra` cannot replace the arguments the template is given."""
        kwargs = {k: v for k, v in (extra or {}).items() if k not in RESERVED}
        kwargs.update(self.special_tokens)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # e.g. a template adding a string to a chat_template_kwargs number
            raise ValueError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def chat_prompt_ids(text: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a rendered chat prompt: exactly the text's tokens, no BOS added (the template writes it)."""
    return tokenizer.encode(text, add_special_tokens=False)
