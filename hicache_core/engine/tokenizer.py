"""Text <-> token ids for the server: a checkpoint's ``tokenizer.json`` (``tokenizers``) or a GGUF file's
tokenizer (engine/gguf.py), else bytes.

``HFTokenizer`` reads ``tokenizer.json`` with the ``tokenizers`` package and ``tokenizer_config.json`` for the
special tokens and the chat template (rendered with jinja2 as transformers does: sandboxed, ``trim_blocks`` and
``lstrip_blocks``; the rendered text is encoded without adding special tokens again). ``ByteTokenizer`` serves
the random model: token id = byte value; ids past 255 (the random model emits them) read as ``<|id|>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from hicache_core.engine import gguf
from hicache_core.errors import ConfigError


def _plain_chat(messages: list[dict]) -> str:
    """The prompt for a model without a chat template: one ``role: content`` line per message."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class ByteTokenizer:
    name = "bytes"
    eos_ids: frozenset = frozenset()
    chat_template: Optional[str] = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(f"<|{i}|>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.encode(_plain_chat(messages))


def _token_text(v: Any) -> Optional[str]:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its special tokens and chat template (from a directory: :meth:`from_dir`;
    from a GGUF file: :func:`load_tokenizer` with the parts of :func:`hicache_core.engine.gguf.tokenizer`)."""

    def __init__(
        self,
        tok: Any,
        name: str,
        *,
        bos_token: Optional[str],
        eos_token: Optional[str],
        chat_template: Optional[str],
        eos_ids: frozenset,
    ) -> None:
        self._tok, self.name = tok, name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template if isinstance(chat_template, str) else None
        eos = set(eos_ids)
        if eos_token is not None and tok.token_to_id(eos_token) is not None:
            eos.add(tok.token_to_id(eos_token))
        self.eos_ids = frozenset(eos)

    @classmethod
    def from_dir(cls, path: Path, eos_ids: frozenset) -> HFTokenizer:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("--model-path needs the tokenizers package: pip install 'hicache-core[serve]'") from None
        f = path / "tokenizer.json"
        if not f.exists():
            raise ConfigError(
                f"--model-path: {f} is missing (save the tokenizer with a fast tokenizer's save_pretrained)"
            )
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises plain Exception for a malformed file
            raise ConfigError(f"--model-path: cannot read {f}: {e}") from None
        cfg: dict = {}
        if (path / "tokenizer_config.json").exists():
            try:
                cfg = json.loads((path / "tokenizer_config.json").read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"--model-path: cannot read {path / 'tokenizer_config.json'}: {e}") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():  # where transformers >= 4.43 saves it
            template = (path / "chat_template.jinja").read_text()
        return cls(
            tok,
            path.name,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            chat_template=template,
            eos_ids=eos_ids,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.chat_template is None:
            return self.encode(_plain_chat(messages))
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(model_path: Optional[str | Path]) -> Any:
    """The tokenizer for a model directory (its EOS ids from config.json / generation_config.json too), or the
    byte tokenizer without one."""
    if model_path is None:
        return ByteTokenizer()
    path = Path(model_path).expanduser()
    if gguf.is_gguf(path):
        tok, special = gguf.tokenizer(path)
        return HFTokenizer(tok, path.stem, **special)
    eos: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        try:
            v = json.loads((path / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        eos |= {int(x) for x in (v if isinstance(v, list) else [v]) if isinstance(x, int)}
    return HFTokenizer.from_dir(path, frozenset(eos))
