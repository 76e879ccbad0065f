"""The server's text handling: chat templates rendered as transformers renders them (MiniMax-M1's published template
and templates exercising jinja2's settings), streamed detokenization, stop strings."""
import json
import subprocess

import numpy as np
import pytest

from m1jax.serve.chat import ChatTemplate, content_format
from m1jax.serve.text import IncrementalDecoder, StopStrings, TokenizerText, load_tokenizer
from tests.parity import hf_runner as hr
from tests.serve import server_harness as h

# Runs in the transformers environment: renders and tokenizes each case with apply_chat_template.
TRANSFORMERS_RENDER = r"""
import json, sys
from transformers import AutoTokenizer
job = json.load(sys.stdin)
tokenizer = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
out = []
for case in job["cases"]:
    kw = dict(tools=case.get("tools"), add_generation_prompt=case["add_generation_prompt"],
              chat_template=case.get("template"), **case.get("kwargs", {}))
    text = tokenizer.apply_chat_template(case["hf_messages"], tokenize=False, **kw)
    ids = tokenizer.apply_chat_template(case["hf_messages"], tokenize=True, return_dict=True, **kw)["input_ids"]
    out.append({"text": text, "ids": list(ids)})
print(json.dumps(out))
"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def parts(text):
    return [{"type": "text", "text": text}]


# (our messages, the messages a transformers user passes to that template, tools, add_generation_prompt, template)
M1_CASES = [
    ([{"role": "user", "content": "w1 w2"}], [{"role": "user", "content": parts("w1 w2")}], None, True),
    ([{"role": "system", "content": "w3"}, {"role": "user", "content": parts("w1")},
      {"role": "assistant", "content": "w4 w5"}, {"role": "user", "content": "w6"}],
     [{"role": "system", "content": parts("w3")}, {"role": "user", "content": parts("w1")},
      {"role": "assistant", "content": parts("w4 w5")}, {"role": "user", "content": parts("w6")}], None, True),
    ([{"role": "user", "content": "w1", "name": None}, {"role": "assistant", "content": parts("w2")}],
     [{"role": "user", "content": parts("w1")}, {"role": "assistant", "content": parts("w2")}], None, False),
    ([{"role": "user", "content": "w7"},
      {"role": "tool", "content": [{"type": "text", "name": "get_weather", "text": "w8"}]}],
     [{"role": "user", "content": parts("w7")},
      {"role": "tool", "content": [{"type": "text", "name": "get_weather", "text": "w8"}]}], [WEATHER], True),
]

# A template written as chat templates are: indented blocks (trim_blocks and lstrip_blocks matter), a namespace,
# loop controls, a {% generation %} block, tojson with arguments, the special tokens, dict().
STRING_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{- '[SYS] ' + message['content'] + '\\n' }}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ '[A] ' + message['content'] + eos_token }}{% endgeneration %}
    {% else %}
        {{ '[U' ~ ns.turns ~ '] ' + message['content'] }}
    {% endif %}
{% endfor %}
{% if tools %}{{ tools | tojson(indent=1, sort_keys=True) }}{% endif %}
{{ dict(a=1) | tojson }}
{% if add_generation_prompt %}[A] {% endif %}"""

STRING_CASES = [
    ([{"role": "system", "content": parts("w1")}, {"role": "user", "content": [*parts("w2"), *parts("w3")]},
      {"role": "assistant", "content": "w4"}, {"role": "user", "content": "w5"}],
     [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2\nw3"},
      {"role": "assistant", "content": "w4"}, {"role": "user", "content": "w5"}], [WEATHER], True),
    ([{"role": "user", "content": "w6"}], [{"role": "user", "content": "w6"}], None, False),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    h.write_tokenizer(directory)
    return str(directory)


def _transformers(tokenizer_dir, cases, template=None):
    job = {"tokenizer_dir": tokenizer_dir,
           "cases": [{"hf_messages": hf, "tools": tools, "add_generation_prompt": gen, "template": template}
                     for _, hf, tools, gen in cases]}
    proc = subprocess.run([hr.parity_python(), "-c", TRANSFORMERS_RENDER], input=json.dumps(job),
                          capture_output=True, text=True, env=hr._clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cases,template", [(M1_CASES, None), (STRING_CASES, STRING_TEMPLATE)],
                         ids=["minimax-m1", "string-content"])
def test_chat_template_renders_as_transformers(tokenizer_dir, cases, template):
    text = load_tokenizer(tokenizer_dir)
    chat = ChatTemplate(template or text.chat_template, text.special_tokens)
    want = _transformers(tokenizer_dir, cases, template)
    for (ours, _, tools, gen), expected in zip(cases, want):
        rendered = chat.render(ours, add_generation_prompt=gen, tools=tools)
        assert rendered == expected["text"]
        assert text.encode(rendered, add_special_tokens=False) == expected["ids"]
    assert len({w["text"] for w in want}) == len(cases)  # the cases differ


def test_content_format_of_templates():
    m1 = json.loads(h.M1_TOKENIZER_CONFIG.read_text())["chat_template"]
    assert content_format(m1) == "parts"
    assert content_format(STRING_TEMPLATE) == "string"
    assert content_format("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}") \
        == "parts"
    assert content_format("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}") == "string"


def test_content_parts_must_be_text():
    chat = ChatTemplate(STRING_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(ValueError, match="text"):
        chat.render([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


# ------------------------------------------------------------------------------------------------ detokenization
@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer: characters outside ASCII span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox"] * 20, trainer)
    return TokenizerText(tok)


def test_incremental_decoding_equals_decoding_at_once(byte_bpe):
    text = "héllo wörld 世界🙂 the fox, ñ"
    ids = byte_bpe.encode(text)
    assert byte_bpe.decode(ids) == text and len(ids) > len(text)  # some characters span several tokens
    decoder = IncrementalDecoder(byte_bpe)
    deltas = [decoder.push(t) for t in ids]
    assert "".join(deltas) + decoder.flush() == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 3  # the tokens of a split character wait for the rest


def test_incremental_decoding_flushes_an_unfinished_character(byte_bpe):
    ids = byte_bpe.encode("ab🙂")[:-1]  # the emoji's last byte missing
    decoder = IncrementalDecoder(byte_bpe)
    shown = "".join(decoder.push(t) for t in ids)
    assert shown + decoder.flush() == byte_bpe.decode(ids)


def test_word_level_decoding_restores_spaces(tokenizer_dir):
    text = load_tokenizer(tokenizer_dir)
    ids = [12, 3, 13, 14, 0, 15]  # specials (3: end of sentence, 0: unknown) are left out of the text
    decoder = IncrementalDecoder(text)
    assert "".join(decoder.push(t) for t in ids) + decoder.flush() == text.decode(ids) == "w2 w3 w4 w5"


def test_stop_strings_against_cutting_the_whole_text():
    rng = np.random.default_rng(0)
    cases = [("abc STOP def", ["STOP", "xyz"]), ("aaab", ["aab"]), ("xbcd", ["bcd", "cd"]), ("no stop here", ["zz"]),
             ("ends with ST", ["STOP"]), ("abab", ["ba", "ab"]), ("", ["a"])]
    for text, stops in cases:
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(cuts)] if cuts else text
        for _ in range(20):
            bounds = sorted(rng.integers(0, len(text) + 1, rng.integers(0, 5)))
            chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
            matcher = StopStrings(stops)
            shown = [matcher.push(c) for c in chunks]
            out = "".join(shown) + matcher.flush()
            assert out == expected, (text, stops, chunks)
            assert matcher.stopped == bool(cuts)
            for i in range(len(shown)):  # nothing shown early is ever past the cut
                assert expected.startswith("".join(shown[:i + 1]))
