"""The checkpoint's chat template (`chat_template` in tokenizer_config.json), rendered with jinja2 as Hugging Face
does: a sandboxed environment, `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`.

The rendered text is tokenized with the engine's tokenizer; a template that writes the BOS token itself is not
given a second one by a tokenizer that prepends BOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception), or it does not render."""


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters.setdefault("tojson", lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent))
        self.source = source
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not render these messages: {e}") from None

    def encode(self, tokenizer, messages: list[dict[str, Any]]) -> list[int]:
        """Render (with the assistant's turn opened) and tokenize."""
        text = self.render(messages)
        if getattr(tokenizer, "add_bos", False) and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return tokenizer.encode(text)


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def load_chat_template(directory: str | Path | None) -> ChatTemplate | None:
    """The template of a checkpoint directory, or None when it has none (or no tokenizer_config.json)."""
    if directory is None:
        return None
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    source = cfg.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": ...}, ...] in some checkpoints
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if not isinstance(source, str) or not source:
        side = Path(directory) / "chat_template.jinja"  # newer checkpoints keep it in its own file
        source = side.read_text() if side.is_file() else None
    if not source:
        return None
    return ChatTemplate(source, bos_token=_token(cfg.get("bos_token")), eos_token=_token(cfg.get("eos_token")))


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
