"""The checkpoint's tokenizer (`tokenizer.json`), through the `tokenizers` library only.

transformers' tokenizer classes change between versions; `tokenizers.Tokenizer` reads the same file and is all the
engine needs.

BOS choice: `encode` never adds EOS or other special tokens. It prepends BOS only when the checkpoint says so:
`add_bos_token` in tokenizer_config.json when present, otherwise whether the tokenizer's own post-processor puts
BOS first (Llama 2/3 and Mistral do; Qwen has no BOS). The choice is recorded in `add_bos` for metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """encode(str) -> list[int], decode(list[int]) -> str, with bos/eos ids and the BOS choice in `add_bos`."""

    def __init__(self, path: str | Path, model_config: dict[str, Any] | None = None):
        path = Path(path)
        directory = path.parent if path.is_file() else path
        self._tok = _HFTokenizer.from_file(str(path if path.is_file() else path / "tokenizer.json"))
        tok_cfg = _read_json(directory / "tokenizer_config.json")
        gen_cfg = _read_json(directory / "generation_config.json")
        model_config = model_config or {}

        self.bos_token_id = self._special_id(tok_cfg.get("bos_token"), model_config.get("bos_token_id"))
        eos = gen_cfg.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        named = self._special_id(tok_cfg.get("eos_token"), None)
        if named is not None and named not in eos_ids:
            eos_ids = [named, *eos_ids]
        self.eos_token_ids: list[int] = [int(e) for e in eos_ids]
        self.eos_token_id: int | None = self.eos_token_ids[0] if self.eos_token_ids else None

        if "add_bos_token" in tok_cfg:
            add_bos = bool(tok_cfg["add_bos_token"])
        else:  # the post-processor's own habit, probed on a short text
            probe = self._tok.encode("a", add_special_tokens=True).ids
            add_bos = bool(probe) and probe[0] == self.bos_token_id
        self.add_bos = add_bos and self.bos_token_id is not None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def describe(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "add_bos": self.add_bos, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id}

    def _special_id(self, token: Any, fallback: Any) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
            token = token.get("content")
        if isinstance(token, str):
            found = self._tok.token_to_id(token)
            if found is not None:
                return int(found)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return int(fallback) if fallback is not None else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)
