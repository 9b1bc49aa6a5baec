"""Tokenizer: a model directory's tokenizer.json (the `tokenizers` library) plus its jinja2 chat template.

Chat templates render with transformers' semantics (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `tojson`, `strftime_now`, a no-op `{% generation %}` block, special tokens as
variables) so mlc needs no transformers at run time and produces the same prompt text.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

from mlc.errors import InputError, MlcError

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialised AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno})", "fix or re-download the file") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Encode, decode and render chat prompts for one model directory."""

    def __init__(self, backend: Any, config: dict[str, Any], chat_template: str | None, extra_eos_ids: Iterable[int] = ()):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = {k: _token_text(config.get(k)) for k in SPECIAL_KEYS if _token_text(config.get(k)) is not None}
        self.bos_token_id = self.token_to_id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self.token_to_id(self.special_tokens.get("eos_token"))
        self.pad_token_id = self.token_to_id(self.special_tokens.get("pad_token"))
        ids = [self.eos_token_id, *extra_eos_ids]
        self.eos_token_ids: list[int] = sorted({i for i in ids if i is not None})

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens (e.g. BOS) are added as the tokenizer.json post-processor says."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self) -> Any:
        if not self.chat_template:
            raise MlcError("this model's tokenizer has no chat template", "use a plain prompt, or add chat_template to tokenizer_config.json")
        return compile_chat_template(self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """The prompt text (or its ids, with tokenize=True) for a chat, as transformers renders it."""
        import jinja2

        try:
            text = self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs
            )
        except jinja2.TemplateError as e:
            raise MlcError(f"chat template error: {e}", "check the messages' roles and order") from None
        # The template writes special tokens such as BOS itself, so none are added when tokenizing.
        return self.encode(text, add_special_tokens=False) if tokenize else text


def compile_chat_template(source: str) -> Any:
    """A jinja2 template configured as transformers configures chat templates."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers marks assistant text with {% generation %} for masks; rendering just outputs it.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"the chat template does not parse: {e.message} (line {e.lineno})", "fix the chat template") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory: tokenizer.json, tokenizer_config.json, chat template, stop tokens."""
    from tokenizers import Tokenizer as Backend

    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise InputError(f"{path} has no tokenizer.json", "mlc reads fast (tokenizers) tokenizers; save one with the model")
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise InputError(f"{file} could not be read: {str(e).splitlines()[0]}", "re-export the tokenizer") from None
    config = _read_json(path / "tokenizer_config.json")
    template = config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template", template)
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    special_map = _read_json(path / "special_tokens_map.json")
    for key in SPECIAL_KEYS:
        if config.get(key) is None and special_map.get(key) is not None:
            config[key] = special_map[key]
    eos = _read_json(path / "generation_config.json").get("eos_token_id")
    if eos is None:
        eos = _read_json(path / "config.json").get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return Tokenizer(backend, config, template, extra)
