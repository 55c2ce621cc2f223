"""The front door, live on loopback: API keys (HTTP with the official `openai` client, gRPC with the
SDK), bounded admission (429 / RESOURCE_EXHAUSTED with a retry time), request limits and deadlines.

The server is SpecRouterServer on tiny fp32 models, its HTTP app under uvicorn on a free loopback
port, its gRPC API on its own; a batch of 2 with 4 waiting places, so a burst overflows it at once.
"""

import io
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import free_port  # noqa: E402
from specrouter.serving import client as sdk  # noqa: E402
from specrouter.engine.engine import Engine  # noqa: E402

KEY, SECOND_KEY = f"sk-front-{secrets.token_urlsafe(18)}", f"sk-front-{secrets.token_urlsafe(18)}"
WRONG_KEY = f"sk-wrong-{secrets.token_urlsafe(18)}"
PROMPTS = ["The quick brown fox", "Once upon a time", "def fib(n):", "import os\n", "SELECT * FROM", "Hello there",
           "The three primary colors are", "for i in range(10):"]
SERVER_LOGGERS = ("uvicorn", "uvicorn.access", "uvicorn.error", "fastapi", "specrouter", "grpc")


@pytest.fixture(scope="module")
def front(local_ray, tiny_dirs):
    from specrouter.serving.http import build_http_app
    from specrouter.serving.server import SpecRouterServer

    logs = io.StringIO()
    handler = logging.StreamHandler(logs)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    levels = {name: logging.getLogger(name).level for name in SERVER_LOGGERS}
    for name in SERVER_LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.DEBUG)
    server = SpecRouterServer({
        "chain": f"{tiny_dirs['draft']},{tiny_dirs['target']}", "dtype": "float32", "draft_lens": [3], "grpc_port": 0,
        "placement": {"*": {"num_cpus": 1, "torch_threads": 1}},
        "api_key": [KEY, SECOND_KEY], "max_batch": 2, "max_waiting_requests": 4, "retry_after_s": 1,
        "max_body_bytes": 64 << 10, "max_request_tokens": 500,
    })
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(build_http_app(server), host="127.0.0.1", port=port, log_config=None,
                                         log_level="debug", access_log=True))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not http.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield {"http": f"http://127.0.0.1:{port}", "grpc": server.grpc.address, "server": server, "logs": logs,
               "model": tiny_dirs["target"]}
    finally:
        http.should_exit = True
        thread.join(30)
        server.close()
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="module")
def alone(tiny_dirs):
    """Each prompt's greedy tokens and text from the target alone."""
    engine = Engine(tiny_dirs["target"], dtype="float32")
    out = {}
    for prompt in PROMPTS:
        ids = engine.generate(engine.tokenizer(prompt)["input_ids"], 24, ignore_eos=True).token_ids
        out[prompt] = (ids, engine.tokenizer.decode(ids, skip_special_tokens=True))
    return out


def oai_client(front, key: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=front["http"] + "/v1", api_key=key, max_retries=0, timeout=120)


def get(front, path: str, key: str | None = None, body: bytes | None = None) -> tuple[int, dict, str]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(front["http"] + path, body, headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def worker_sequences(server) -> list[int]:
    """KV-cached sequences each model's worker process holds now."""
    import ray

    from specrouter.v1 import worker_pb2, worker_pb2_grpc

    counts = []
    for label in server.info["chain"].split(","):
        address = ray.get(ray.get(server.router.actor.remote(label)).address.remote())
        with grpc.insecure_channel(address) as channel:
            counts.append(worker_pb2_grpc.WorkerStub(channel).Health(worker_pb2.HealthRequest(), timeout=30).sequences)
    return counts


def test_http_routes_need_the_key_but_health(front):
    for path in ("/v1/models", "/metrics"):
        status, headers, body = get(front, path)
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert get(front, path, WRONG_KEY)[0] == 401
        assert get(front, path, KEY)[0] == 200
    status, _, body = get(front, "/v1/completions", body=json.dumps({"model": front["model"], "prompt": "hi"}).encode())
    assert status == 401 and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert get(front, "/health")[0] == 200  # probes need no key


def test_openai_client_without_or_with_a_wrong_key_is_401_with_either_right_key_200_streaming_too(front, alone):
    prompt = PROMPTS[0]
    kwargs = dict(model=front["model"], prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    no_key = {"extra_headers": {"Authorization": openai.omit}}  # the client sends no Authorization header
    for key, extra in ((KEY, no_key), (WRONG_KEY, {})):
        client = oai_client(front, key)
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(**kwargs, **extra)
        with pytest.raises(openai.AuthenticationError):
            list(client.completions.create(stream=True, **kwargs, **extra))
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=front["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                           **extra)
    for key in (KEY, SECOND_KEY):
        client = oai_client(front, key)
        assert client.completions.create(**kwargs).choices[0].text == alone[prompt][1]
        chunks = list(client.completions.create(stream=True, **kwargs))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == alone[prompt][1]
    chat = oai_client(front, KEY).chat.completions.create(model=front["model"], messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=4, temperature=0)
    assert 0 < chat.usage.completion_tokens <= 4


def test_grpc_needs_the_key_in_metadata_but_health(front, alone):
    ids, text = alone[PROMPTS[0]]
    kwargs = dict(max_tokens=24, temperature=0, ignore_eos=True)
    for key in (None, WRONG_KEY):
        with sdk.Client(front["grpc"], timeout=120, api_key=key) as client:
            with pytest.raises(sdk.Unauthenticated):
                client.generate(PROMPTS[0], **kwargs)
            with pytest.raises(sdk.Unauthenticated):
                list(client.stream(PROMPTS[0], **kwargs))
            with pytest.raises(sdk.Unauthenticated):
                client.list_models()
            assert client.health()  # probes need no key
    with sdk.Client(front["grpc"], timeout=120, api_key=KEY) as client:
        assert client.generate(PROMPTS[0], **kwargs).token_ids == ids
        assert [t for chunk in client.stream(PROMPTS[0], **kwargs) for t in chunk.token_ids] == ids
        assert client.list_models()[0]["id"] == front["model"]


def test_keys_never_appear_in_logs_or_metrics(front, local_ray):
    client = oai_client(front, KEY)
    client.completions.create(model=front["model"], prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        oai_client(front, WRONG_KEY).completions.create(model=front["model"], prompt="hi", max_tokens=2)
    with sdk.Client(front["grpc"], api_key=WRONG_KEY) as wrong, pytest.raises(sdk.Unauthenticated):
        wrong.generate("hi", max_tokens=2)
    status, _, metrics = get(front, "/metrics", KEY)
    assert status == 200 and metric(metrics, 'specrouter:request_rejected_total{reason="unauthenticated"}') >= 2
    server_logs = front["logs"].getvalue()
    assert "POST /v1/completions" in server_logs and " 401" in server_logs  # the logs were captured
    session_logs = Path(local_ray._private.worker._global_node.get_session_dir_path()) / "logs"
    ray_logs = "".join(f.read_text(errors="replace") for f in session_logs.rglob("*") if f.is_file())
    for key in (KEY, SECOND_KEY, WRONG_KEY):
        assert key not in server_logs and key not in ray_logs and key not in metrics
    assert KEY not in repr(front["server"].config) and KEY not in str(front["server"].config.model_dump())


def test_a_burst_past_the_waiting_limit_gets_only_200s_and_429s_and_every_200_is_exact(front, alone):
    client = oai_client(front, KEY)
    rejected_before = metric(get(front, "/metrics", KEY)[2], "specrouter:request_rejected_total{reason=\"waiting_requests\"}")

    def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            out = client.completions.create(model=front["model"], prompt=prompt, max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True})
            return prompt, 200, out, None
        except openai.RateLimitError as err:
            return prompt, 429, None, err.response.headers.get("retry-after")

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert time.monotonic() - t0 < 120
    statuses = [status for _, status, _, _ in results]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 6  # a batch of 2 and 4 waiting, at least
    for prompt, status, out, retry_after in results:
        if status == 200:
            assert out.choices[0].text == alone[prompt][1] and out.usage.completion_tokens == 24
        else:
            assert retry_after == "1"
    metrics = get(front, "/metrics", KEY)[2]
    assert metric(metrics, "specrouter:request_rejected_total{reason=\"waiting_requests\"}") - rejected_before == statuses.count(429)
    assert get(front, "/health")[0] == 200  # healthy after
    assert client.completions.create(model=front["model"], prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text == alone[PROMPTS[1]][1]


def test_a_grpc_burst_is_resource_exhausted_with_pushback_and_the_sdk_waits_it_out(front, alone):
    ids = alone[PROMPTS[2]][0]
    kwargs = dict(max_tokens=24, temperature=0, ignore_eos=True)

    def one(retry: sdk.RetryPolicy):
        with sdk.Client(front["grpc"], timeout=120, api_key=KEY, retry=retry) as client:
            try:
                return client.generate(PROMPTS[2], **kwargs).token_ids
            except sdk.Overloaded as err:
                return err

    with ThreadPoolExecutor(16) as pool:
        once = list(pool.map(one, [sdk.RetryPolicy(attempts=1)] * 16))
    refused = [r for r in once if isinstance(r, sdk.Overloaded)]
    assert refused and all(r.retry_after_s == 1.0 for r in refused)
    assert all(r == ids for r in once if not isinstance(r, sdk.Overloaded))
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        patient = list(pool.map(one, [sdk.RetryPolicy(attempts=5)] * 16))
    assert patient == [ids] * 16  # every call got through, retrying after the server's advice
    assert time.monotonic() - t0 >= 1.0  # some waited the second they were told to


def test_a_request_past_its_deadline_is_cancelled_and_frees_its_state_on_every_worker(front):
    client = oai_client(front, KEY)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=front["model"], prompt=PROMPTS[0], max_tokens=480, temperature=0,
                                  extra_body={"ignore_eos": True, "timeout": 0.3})
    assert err.value.status_code == 408 and err.value.code == "timeout"
    assert worker_sequences(front["server"]) == [0, 0]
    with sdk.Client(front["grpc"], api_key=KEY) as grpc_client:
        with pytest.raises(sdk.DeadlineExceeded):
            grpc_client.generate(PROMPTS[0], max_tokens=480, temperature=0, ignore_eos=True, timeout=0.3)
    deadline = time.monotonic() + 10  # the client gave up at its deadline; the batch retires the work by its own
    while worker_sequences(front["server"]) != [0, 0] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_sequences(front["server"]) == [0, 0]


def test_request_limits_body_size_and_n_times_max_tokens(front):
    status, _, body = get(front, "/v1/completions", KEY, json.dumps({"model": front["model"], "prompt": "a" * (80 << 10)}).encode())
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, _, body = get(front, "/v1/completions", KEY,
                          json.dumps({"model": front["model"], "prompt": "hi", "n": 2, "max_tokens": 300}).encode())
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"
    with sdk.Client(front["grpc"], api_key=KEY, timeout=60) as client:
        with pytest.raises(sdk.SpecRouterError) as err:
            client.generate("a" * (80 << 10), max_tokens=2)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not isinstance(err.value, sdk.Overloaded)
        assert client.generate("hi", max_tokens=2).completion_tokens == 2  # still serving
