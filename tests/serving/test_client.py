"""The gRPC SDK against a live server: sync and async, streaming, deadlines, errors as exceptions."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from specrouter.serving import client as sdk
from specrouter.engine.engine import Engine
from specrouter.v1 import specrouter_pb2 as pb
from specrouter.v1.specrouter_pb2_grpc import SpecRouterServicer, add_SpecRouterServicer_to_server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def want(tiny_dirs):
    engine = Engine(tiny_dirs["target"], dtype="float32")
    return engine.generate(engine.tokenizer(PROMPT)["input_ids"], 16, ignore_eos=True).token_ids


def test_sync_generate_and_stream_give_the_target_alone_tokens(live_server, want):
    with sdk.Client(live_server["grpc"], timeout=300) as client:
        assert client.health()
        card = client.list_models()[0]
        assert card["id"] == live_server["model"] and card["chain"] == live_server["config"].chain
        assert card["bit_exact_block"] is None  # an fp32 torch target verifies blocks of any length
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


class _Refusing(SpecRouterServicer):
    """A gRPC server whose calls fail with `code` (and the `pushback_ms` trailer, if given), after
    `replies` streamed replies; it records the time of every attempt."""

    def __init__(self, code, pushback_ms=None, replies=0):
        self.code, self.pushback_ms, self.replies, self.attempts = code, pushback_ms, replies, []

    def _refuse(self, context):
        self.attempts.append(time.monotonic())
        if self.pushback_ms is not None:
            context.set_trailing_metadata(((sdk.PUSHBACK_KEY, str(self.pushback_ms)),))
        context.abort(self.code, "refused")

    def Health(self, request, context):
        self._refuse(context)

    def Generate(self, request, context):
        for _ in range(self.replies):
            yield pb.GenerateResponse(text="a", token_ids=[1])
        self._refuse(context)


@pytest.fixture
def refusing():
    servers = []

    def start(servicer: _Refusing) -> str:
        server = grpc.server(ThreadPoolExecutor(2))
        add_SpecRouterServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_a_full_queue_is_retried_after_the_servers_pushback_and_then_raised_as_overloaded(refusing):
    busy = _Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=1500)
    with sdk.Client(refusing(busy), timeout=30, retry=sdk.RetryPolicy(attempts=2, first_backoff_s=0.01)) as client:
        with pytest.raises(sdk.Overloaded) as err:
            client.health()  # attempts spent
    assert len(busy.attempts) == 2
    assert busy.attempts[1] - busy.attempts[0] >= 1.4  # the server's advice, not the policy's backoff
    assert err.value.retry_after_s == 1.5 and err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_resource_exhausted_without_pushback_is_not_called_overloaded(refusing):
    too_large = _Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED)  # e.g. a message over the server's size limit
    with sdk.Client(refusing(too_large), timeout=30, retry=sdk.RetryPolicy(first_backoff_s=0.01)) as client:
        with pytest.raises(sdk.SpecRouterError) as err:
            client.generate("hi")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not isinstance(err.value, sdk.Overloaded)


def test_a_reply_already_received_is_never_retried(refusing):
    busy = _Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=10, replies=1)
    with sdk.Client(refusing(busy), timeout=30, retry=sdk.RetryPolicy(first_backoff_s=0.01)) as client:
        chunks = client.stream("hi")
        assert next(chunks).text == "a"
        with pytest.raises(sdk.Overloaded):
            next(chunks)
    assert len(busy.attempts) == 1


def test_the_retry_policy_is_bounded_by_grpcs_limit():
    with pytest.raises(ValueError):
        sdk.RetryPolicy(attempts=6)
    assert "retryPolicy" not in sdk.RetryPolicy(attempts=1).service_config()
