"""The request front end in-process: text streams, stop strings, chat template, bad input."""

import pytest

from specrouter.engine.engine import Engine
from specrouter.engine.frontend import Frontend
from specrouter.engine.request import GenerationRequest


@pytest.fixture(scope="module")
def frontend(tiny_dirs):
    return Frontend(Engine(f"{tiny_dirs['draft']},{tiny_dirs['target']}", dtype="float32"), default_max_tokens=24)


def test_stream_text_is_the_decoded_target_output(frontend):
    tok = frontend.engine.tokenizer
    want = frontend.engine.generate(tok("Once upon")["input_ids"], 20, ignore_eos=True).token_ids
    items = list(frontend.stream(GenerationRequest(prompt="Once upon", max_tokens=20, ignore_eos=True)))
    assert items[0] == {"prompt_tokens": len(tok("Once upon")["input_ids"])}
    streamed_ids = [t for item in items if "token_ids" in item for t in item["token_ids"]]
    assert streamed_ids == want
    assert "".join(i["text"] for i in items if "text" in i) == tok.decode(want, skip_special_tokens=True)
    final = items[-1]
    assert (final["finish_reason"], final["completion_tokens"]) == ("length", 20)
    assert final["stats"]["levels"][0]["num_draft_tokens"] > 0


def test_stop_string_ends_generation_early_with_text_cut(frontend):
    full = frontend.generate(GenerationRequest(prompt="Once upon", max_tokens=40, ignore_eos=True))
    stop = full["text"][10:14]
    assert stop.strip()
    out = frontend.generate(GenerationRequest(prompt="Once upon", max_tokens=40, ignore_eos=True, stop=(stop,)))
    assert out["text"] == full["text"][: full["text"].index(stop)]
    assert out["finish_reason"] == "stop"
    assert out["completion_tokens"] < 40  # the engine stopped, it did not run to the budget


def test_chat_messages_use_the_tokenizer_chat_template(frontend):
    tok = frontend.engine.tokenizer
    messages = (("system", "Be brief."), ("user", "Hi!"))
    templated = tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True, tokenize=False)
    assert frontend.prompt_ids(GenerationRequest(messages=messages)) == tok(templated, add_special_tokens=False)["input_ids"]
    out = frontend.generate(GenerationRequest(messages=messages, ignore_eos=True))
    assert out["completion_tokens"] == 24  # default_max_tokens when the request names none


@pytest.mark.parametrize("request_, message", [
    (GenerationRequest(prompt=[10**7]), "token ids"),
    (GenerationRequest(prompt="x " * 600, max_tokens=8), "context window"),
    (GenerationRequest(prompt="hi", max_tokens=512), "context window"),
])
def test_bad_input_fails_before_any_work(frontend, request_, message):
    with pytest.raises(ValueError, match=message):
        next(frontend.stream(request_))


def test_request_needs_exactly_one_of_prompt_and_messages():
    with pytest.raises(ValueError):
        GenerationRequest()
    with pytest.raises(ValueError):
        GenerationRequest(prompt="a", messages=(("user", "b"),))
