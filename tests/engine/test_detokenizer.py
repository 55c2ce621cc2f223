import pytest
from transformers import AutoTokenizer

from specrouter.engine.detokenizer import TextStream


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _stream_blocks(tokenizer, text: str, stop=(), block=1) -> tuple[str, TextStream]:
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer, tuple(stop))
    out = "".join(stream.push(ids[i:i + block]) for i in range(0, len(ids), block))
    return out + stream.finish(), stream


@pytest.mark.parametrize("text", ["def f(x):\n    return x  # ok", "naïve café 😀 emoji", "中文字符 and 日本語", "3.14159 + 2e10"])
def test_incremental_text_equals_full_decode(tokenizer, text):
    out, stream = _stream_blocks(tokenizer, text)
    assert out == tokenizer.decode(tokenizer(text)["input_ids"])
    assert not stream.stopped


def test_partial_utf8_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer("😀")["input_ids"]
    assert len(ids) > 1  # the emoji spans several byte tokens
    stream = TextStream(tokenizer)
    assert stream.push(ids[:1]) == ""
    assert stream.push(ids[1:]) == "😀"


def test_stop_string_cuts_the_text_and_is_not_emitted(tokenizer):
    out, stream = _stream_blocks(tokenizer, "alpha beta\n\ngamma delta", stop=["\n\n"])
    assert out == "alpha beta"
    assert stream.stopped


def test_stop_string_split_across_blocks_is_never_partly_emitted(tokenizer):
    stream = TextStream(tokenizer, ("END",))
    emitted = ""
    for piece in ["hello E", "N", "D world"]:
        emitted += stream.push(tokenizer(piece, add_special_tokens=False)["input_ids"])
        assert "E" not in emitted.removeprefix("hello")  # a possible stop prefix is held back
    assert emitted == "hello " and stream.stopped
    assert stream.finish() == ""


def test_held_back_prefix_is_released_when_it_cannot_become_a_stop(tokenizer):
    stream = TextStream(tokenizer, ("STOP",))
    first = stream.push(tokenizer("go ST", add_special_tokens=False)["input_ids"])
    assert first == "go "
    assert stream.push(tokenizer("AY", add_special_tokens=False)["input_ids"]) == "STAY"
    assert not stream.stopped
