import json

import pytest

from specrouter.serving import openai_protocol as oai


def _body(**fields) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


BAD_COMPLETIONS = {
    "empty prompt": (_body(prompt=""), "prompt"),
    "max_tokens zero": (_body(prompt="x", max_tokens=0), "max_tokens"),
    "max_tokens negative": (_body(prompt="x", max_tokens=-5), "max_tokens"),
    "temperature negative": (_body(prompt="x", temperature=-0.1), "temperature"),
    "top_p zero": (_body(prompt="x", top_p=0.0), "top_p"),
    "top_p above one": (_body(prompt="x", top_p=1.5), "top_p"),
    "top_k negative": (_body(prompt="x", top_k=-1), "top_k"),
    "n too large": (_body(prompt="x", n=oai.MAX_N + 1), "n"),
    "too many stops": (_body(prompt="x", stop=["a", "b", "c", "d", "e"]), "stop"),
    "max_tokens string": (_body(prompt="x", max_tokens="5"), "max_tokens"),
    "temperature string": (_body(prompt="x", temperature="hot"), "temperature"),
    "stream not bool": (_body(prompt="x", stream="yes"), "stream"),
    "missing prompt": (_body(), "prompt"),
    "missing model": (json.dumps({"prompt": "x"}).encode(), "model"),
    "penalty": (_body(prompt="x", presence_penalty=0.5), None),
    "logprobs": (_body(prompt="x", logprobs=2), None),
    "malformed json": (b'{"model": "m", "prompt": ', None),
    "invalid utf-8": (b'{"model": "m", "prompt": "\xff\xfe"}', None),
    "not an object": (b"[1, 2]", None),
    "tiered low above high": (_body(prompt="x", tiered={"tau_high": 0.5, "tau_low": 0.9}), "tiered"),
    "tiered above one": (_body(prompt="x", tiered={"tau_high": 1.5, "tau_low": 0.9}), "tiered"),
    "tiered missing tau_low": (_body(prompt="x", tiered={"tau_high": 0.9}), "tiered"),
    "tiered thresholds and budget": (_body(prompt="x", tiered={"tau_high": 0.9, "tau_low": 0.5, "max_disagreement": 0.1}), "tiered"),
    "tiered budget above one": (_body(prompt="x", tiered={"max_disagreement": 1.5}), "tiered"),
    "tiered unknown field": (_body(prompt="x", tiered={"tau_high": 0.9, "tau_low": 0.5, "tau": 1}), "tiered.tau"),
}


@pytest.mark.parametrize("body, param", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_completion_requests_are_400_naming_the_parameter(body, param):
    with pytest.raises(oai.APIError) as err:
        oai.parse(oai.CompletionRequest, body)
    assert err.value.status == 400
    assert err.value.body()["error"]["type"] == "invalid_request_error"
    assert err.value.body()["error"]["message"]
    if param is not None:
        assert err.value.param == param


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "hi"}], [{"role": "user"}], "hi"])
def test_bad_chat_messages_are_400(messages):
    with pytest.raises(oai.APIError) as err:
        oai.parse(oai.ChatCompletionRequest, _body(messages=messages))
    assert err.value.param and err.value.param.startswith("messages")


def test_good_requests_keep_their_values_and_ignore_unknown_fields():
    req = oai.parse(oai.CompletionRequest, _body(prompt=["only"], max_tokens=7, stop="\n", top_k=5, unknown_field=1))
    assert (req.prompt, req.max_tokens, req.stops, req.top_k, req.temperature) == ("only", 7, ("\n",), 5, 1.0)
    assert oai.parse(oai.CompletionRequest, _body(prompt=[1, 2, 3])).prompt == [1, 2, 3]
    chat = oai.parse(oai.ChatCompletionRequest, _body(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_completion_tokens=9))
    assert chat.messages[0].text == "ab" and chat.max_tokens == 9


def test_timeout_is_a_positive_number_of_seconds():
    assert oai.parse(oai.CompletionRequest, _body(prompt="x", timeout=2)).timeout == 2
    with pytest.raises(oai.APIError) as err:
        oai.parse(oai.CompletionRequest, _body(prompt="x", timeout=0))
    assert err.value.param == "timeout"


def test_tiered_verification_is_opt_in_and_names_its_thresholds():
    assert oai.parse(oai.CompletionRequest, _body(prompt="x")).tiered is None
    req = oai.parse(oai.CompletionRequest, _body(prompt="x", tiered={"tau_high": 0.9, "tau_low": 0.5}))
    assert (req.tiered.tau_high, req.tiered.tau_low, req.tiered.max_disagreement) == (0.9, 0.5, None)
    req = oai.parse(oai.CompletionRequest, _body(prompt="x", tiered={"max_disagreement": 0.02}))
    assert (req.tiered.tau_high, req.tiered.tau_low, req.tiered.max_disagreement) == (None, None, 0.02)
    with pytest.raises(oai.APIError, match="tau_low must be <= tau_high"):
        oai.parse(oai.ChatCompletionRequest, _body(messages=[{"role": "user", "content": "hi"}], tiered={"tau_high": 0.2, "tau_low": 0.3}))


def test_a_lossy_response_says_so():
    lossy = {"lossy": True, "tiers": {"tier1_tokens": 3, "tier2_tokens": 1, "tier3_tokens": 2, "slim_rejections": 0}}
    body = oai.completion_response(False, "cmpl-1", "m", [{"text": "a", "finish_reason": "stop"}], oai.usage(1, 6), [lossy])
    assert body["lossy"] is True and body["specrouter"][0]["tiers"]["tier1_tokens"] == 3
    assert "lossy" not in oai.completion_response(False, "cmpl-1", "m", [{"text": "a", "finish_reason": "stop"}], oai.usage(1, 1), [{}])
