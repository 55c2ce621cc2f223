"""The gRPC SDK against a live server: sync and async, streaming, deadlines, errors as exceptions."""

import asyncio

import grpc
import pytest

from specrouter.serving import client as sdk
from specrouter.engine.engine import Engine

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def want(tiny_dirs):
    engine = Engine(tiny_dirs["target"], dtype="float32")
    return engine.generate(engine.tokenizer(PROMPT)["input_ids"], 16, ignore_eos=True).token_ids


def test_sync_generate_and_stream_give_the_target_alone_tokens(live_server, want):
    with sdk.Client(live_server["grpc"], timeout=300) as client:
        assert client.health()
        assert client.list_models()[0]["id"] == live_server["model"]
        done = client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
        assert done.token_ids == want
        assert (done.finish_reason, done.completion_tokens) == ("length", 16)
        assert done.stats["levels"][0]["num_draft_tokens"] > 0
        chunks = list(client.stream(PROMPT, max_tokens=16, temperature=0, ignore_eos=True))
        assert len(chunks) >= 2 and [t for c in chunks for t in c.token_ids] == want
        assert "".join(c.text for c in chunks) == done.text


def test_async_client_streams_and_generates(live_server, want):
    async def run():
        async with sdk.AsyncClient(live_server["grpc"], timeout=300) as client:
            assert await client.health()
            done = await client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
            chunks = [c async for c in client.stream(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)]
            chat = await client.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
            return done, chunks, chat

    done, chunks, chat = asyncio.run(run())
    assert done.token_ids == want == [t for c in chunks for t in c.token_ids]
    assert 0 < chat.completion_tokens <= 4 and chat.prompt_tokens > 5  # the chat template wrapped the message


@pytest.mark.parametrize("params, error", [
    (dict(prompt=""), sdk.InvalidRequest),
    (dict(prompt="hi", temperature=-1.0), sdk.InvalidRequest),
    (dict(prompt="hi", top_p=2.0), sdk.InvalidRequest),
    (dict(prompt="hi", top_k=-1), sdk.InvalidRequest),
    (dict(prompt="hi " * 700, max_tokens=4), sdk.InvalidRequest),
    (dict(prompt="hi", stop=["a", "b", "c", "d", "e"]), sdk.InvalidRequest),
    (dict(messages=[{"role": "wizard", "content": "x"}]), sdk.InvalidRequest),
    (dict(prompt="hi", model="gpt-17"), sdk.ModelNotFound),
], ids=["empty", "temperature", "top_p", "top_k", "too long", "stops", "role", "unknown model"])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(live_server, params, error):
    with sdk.Client(live_server["grpc"], timeout=300) as client:
        with pytest.raises(error):
            client.generate(**params)
        assert client.generate(PROMPT, max_tokens=2, temperature=0).completion_tokens == 2


def test_deadline_is_enforced_and_the_abandoned_generation_is_cancelled(live_server):
    with sdk.Client(live_server["grpc"]) as client:
        with pytest.raises(sdk.DeadlineExceeded):
            client.generate(PROMPT, max_tokens=480, temperature=0, ignore_eos=True, timeout=0.5)
        # The server stopped the abandoned request: the next one is answered well within its deadline.
        assert client.generate(PROMPT, max_tokens=4, temperature=0, timeout=120).completion_tokens == 4


def test_unavailable_is_retried_then_raised():
    retry = sdk.RetryPolicy(attempts=3, first_backoff_s=0.01)
    with sdk.Client("127.0.0.1:1", timeout=5, retry=retry) as client:
        with pytest.raises(sdk.Unavailable):
            client.health()


class _Refused(grpc.RpcError):
    """A failed call as grpc raises it: a code, details and trailing metadata."""

    def __init__(self, code, trailing=()):
        self._code, self._trailing = code, trailing

    def code(self):
        return self._code

    def details(self):
        return "refused"

    def trailing_metadata(self):
        return self._trailing


def test_a_full_queue_is_retried_after_the_servers_retry_after_and_then_raised_as_overloaded():
    backoffs = sdk.RetryPolicy(attempts=2, first_backoff_s=0.01).backoffs()
    busy = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "3"),))
    assert sdk._retry_delay(busy, backoffs) == 3.0  # the server's advice, not the policy's backoff
    with pytest.raises(sdk.Overloaded) as err:
        sdk._retry_delay(busy, backoffs)  # attempts spent
    assert err.value.retry_after_s == 3.0 and err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_resource_exhausted_without_retry_after_is_not_retried_nor_called_overloaded():
    too_large = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED)  # e.g. a message over the server's size limit
    with pytest.raises(sdk.SpecRouterError) as err:
        sdk._retry_delay(too_large, sdk.RetryPolicy().backoffs())
    assert not isinstance(err.value, sdk.Overloaded)


def test_a_reply_already_received_is_never_retried():
    busy = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after", "1"),))
    with pytest.raises(sdk.Overloaded):
        sdk._retry_delay(busy, sdk.RetryPolicy().backoffs(), started=True)
