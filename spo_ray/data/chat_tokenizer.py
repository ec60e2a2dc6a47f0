"""The tokenizer Ray Data workers template and tokenize with, loaded without importing transformers.

All the work of tokenizing is done by the Rust tokenizer (`tokenizers`) and the chat template (jinja2);
transformers only reads the files and holds the pieces together. Importing it costs each fresh worker
process about 0.8 s of CPU, which on a small dataset is a sixth of the whole preparation. `load_chat_tokenizer`
reads tokenizer.json, tokenizer_config.json and chat_template.jinja itself where transformers'
`PreTrainedTokenizerFast.from_pretrained` would take them as they are, and returns None (load it with
transformers) wherever transformers would change something first: tokens it would add to the Rust
tokenizer, a legacy special_tokens_map.json or added_tokens.json, several named templates, split special
tokens, or a vocabulary large enough for its pre-tokenizer patch. `tests/test_chat_tokenizer.py` checks the
two give the same special tokens, templates and ids.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from typing import Any

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
MAX_VOCAB = 100_000  # above it transformers may rewrite the pre-tokenizer (its Mistral regex patch)
LEGACY_FILES = ("special_tokens_map.json", "added_tokens.json")


class ChatTokenizer:
    """The Rust tokenizer, its named special tokens and its chat template: what `Templater` uses of a
    transformers tokenizer (`apply_chat_template` renders text only)."""

    def __init__(self, backend: Any, special_tokens: dict[str, str], chat_template: str | None):
        self.backend_tokenizer = backend
        self.special_tokens_map = special_tokens  # as transformers passes them to the template
        self.chat_template = chat_template
        for name in SPECIAL_TOKENS:
            token = special_tokens.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", backend.token_to_id(token) if token is not None else None)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tokenize: bool = False,
        add_generation_prompt: bool = False,
    ) -> str | list[str]:
        """The conversation rendered as transformers renders it (a list of them: a list of texts); text only."""
        if tokenize:
            raise ValueError("ChatTokenizer.apply_chat_template renders text: call it with tokenize=False")
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if not conversation:
            raise ValueError(
                "Cannot apply chat template to an empty conversation. Provide at least one message."
            )
        batched = isinstance(conversation[0], (list, tuple))
        template = compile_template(self.chat_template)
        rendered = [
            template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens_map,
            )
            for messages in (conversation if batched else [conversation])
        ]
        return rendered if batched else rendered[0]

    def decode(self, ids: Any) -> str:
        """The text of token ids, special tokens kept (for display: without transformers' optional
        `clean_up_tokenization_spaces`)."""
        return self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The template compiled in the environment transformers renders chat templates in (its
    `_compile_jinja_template`: sandboxed, trim_blocks, lstrip_blocks, loop controls, the `generation` tag,
    its `tojson`, `raise_exception` and `strftime_now`)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask tag) renders its body."""

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
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _content(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_chat_tokenizer(path: str) -> ChatTokenizer | None:
    """The tokenizer of a model folder without transformers, or None where transformers would not take the
    files as they are (see the module docstring); the caller then loads it with transformers."""
    files = {name: os.path.join(path, name) for name in ("tokenizer.json", "tokenizer_config.json")}
    if not all(os.path.isfile(f) for f in files.values()):
        return None
    if any(os.path.exists(os.path.join(path, name)) for name in LEGACY_FILES):
        return None
    if os.path.exists(os.path.join(path, "additional_chat_templates")):
        return None  # several named templates: transformers picks one per call
    try:
        config = _read_json(files["tokenizer_config.json"])
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(files["tokenizer.json"])
    except Exception:  # unreadable here: transformers says what is wrong
        return None
    if config.get("split_special_tokens") or backend.get_vocab_size() > MAX_VOCAB:
        return None
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as fh:
            chat_template = fh.read()
    else:
        chat_template = config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            return None
    special = {name: _content(config.get(name)) for name in SPECIAL_TOKENS}
    if backend.padding is not None and special["pad_token"] is None:
        special["pad_token"] = backend.padding["pad_token"]  # as transformers takes it
    special = {name: token for name, token in special.items() if token is not None}
    if not _adds_nothing(backend, config, special):
        return None
    return ChatTokenizer(backend, special, chat_template)


def _adds_nothing(backend: Any, config: dict, special: dict[str, str]) -> bool:
    """Whether transformers would load the Rust tokenizer unchanged: every token tokenizer_config.json
    names (special tokens, model-specific `*_token`s, extra special tokens, `added_tokens_decoder`) is
    already an added token of tokenizer.json, with the same id and flags."""
    added = backend.get_added_tokens_decoder()
    by_content = {token.content: token for token in added.values()}
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        token = added.get(int(index))
        if not isinstance(entry, dict) or token is None:
            return False
        if any(
            entry.get(field, getattr(token, field)) != getattr(token, field) for field in ADDED_TOKEN_FIELDS
        ):
            return False
    named = list(special.values())
    named += [_content(v) for k, v in config.items() if k.endswith("_token") and k not in SPECIAL_TOKENS]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = config.get(key) or []
        named += [_content(v) for v in (extra.values() if isinstance(extra, dict) else extra)]
    return all(token is None or token in by_content for token in named)
