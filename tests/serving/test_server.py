"""The HTTP face, live: the official `openai` client against SpecRouter on Ray Serve (tiny fp32
models), and the bad-input matrix: each case a 4xx in OpenAI's error shape, the server still serving."""

import json
import socket
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from specrouter.engine.engine import Engine  # noqa: E402
from specrouter.serving import serve as specrouter_serve  # noqa: E402

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server["http"] + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def target_only(tiny_dirs):
    return Engine(tiny_dirs["target"], dtype="float32")


def post(live_server, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(live_server["http"] + path, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_completion_is_the_target_alone_output_with_usage_and_stats(client, live_server, target_only):
    ids = target_only.tokenizer(PROMPT)["input_ids"]
    want = target_only.generate(ids, 24, ignore_eos=True).token_ids
    out = client.completions.create(model=live_server["model"], prompt=PROMPT, max_tokens=24, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == target_only.tokenizer.decode(want, skip_special_tokens=True)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    stats = out.model_extra["specrouter"][0]
    assert stats["chain"] == [live_server["config"].chain.split(",")[0], live_server["config"].chain.split(",")[1]]
    assert stats["levels"][0]["num_draft_tokens"] > 0


def test_streamed_completion_concatenates_to_the_whole(client, live_server):
    kwargs = dict(model=live_server["model"], prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # it really streamed
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_completion_and_its_stream(client, live_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    out = client.chat.completions.create(model=live_server["model"], messages=messages, max_tokens=12, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert 0 < out.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model=live_server["model"], messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content


def test_sampling_with_seed_is_reproducible_and_n_gives_n_choices(client, live_server):
    kwargs = dict(model=live_server["model"], prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=7,
                  extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert first.choices[0].text == again.choices[0].text
    two = client.completions.create(n=2, **kwargs)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == first.choices[0].text  # choice i uses seed + i
    assert two.usage.completion_tokens == 32 and len(two.model_extra["specrouter"]) == 2


def test_stop_sequence_cuts_the_text(client, live_server):
    kwargs = dict(model=live_server["model"], prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    stop = whole[8:12]
    out = client.completions.create(stop=[stop], **kwargs)
    assert out.choices[0].text == whole[: whole.index(stop)] and out.choices[0].finish_reason == "stop"


def test_models_lists_the_served_model_and_its_chain(client, live_server, tiny_dirs):
    cards = client.models.list().data
    assert [m.id for m in cards] == [live_server["model"]]
    chain = f"{tiny_dirs['draft']},{tiny_dirs['target']}"
    assert cards[0].model_extra["chain"] == chain
    assert cards[0].model_extra["bit_exact_block"] is None  # an fp32 torch target verifies blocks of any length
    assert specrouter_serve.served_chain() == f"{tiny_dirs['draft']} -> {tiny_dirs['target']}"  # the console's line


def _body(live_server, **fields) -> bytes:
    return json.dumps({"model": live_server["model"], **fields}).encode()


BAD_INPUT = {
    "empty prompt": ("/v1/completions", dict(prompt="")),
    "prompt longer than the context": ("/v1/completions", dict(prompt="hello " * 700, max_tokens=4)),
    "max_tokens zero": ("/v1/completions", dict(prompt="hi", max_tokens=0)),
    "max_tokens negative": ("/v1/completions", dict(prompt="hi", max_tokens=-3)),
    "max_tokens absurd": ("/v1/completions", dict(prompt="hi", max_tokens=10**12)),
    "temperature negative": ("/v1/completions", dict(prompt="hi", temperature=-1)),
    "top_p zero": ("/v1/completions", dict(prompt="hi", top_p=0)),
    "top_p above one": ("/v1/completions", dict(prompt="hi", top_p=1.01)),
    "top_k negative": ("/v1/completions", dict(prompt="hi", top_k=-2)),
    "unknown model": ("/v1/completions", dict(prompt="hi", model="gpt-17")),
    "wrong field type": ("/v1/completions", dict(prompt="hi", max_tokens="ten")),
    "prompt of the wrong type": ("/v1/completions", dict(prompt={"text": "hi"})),
    "n too large": ("/v1/completions", dict(prompt="hi", n=100)),
    "too many stop sequences": ("/v1/completions", dict(prompt="hi", stop=list("abcdefg"))),
    "unknown role": ("/v1/chat/completions", dict(messages=[{"role": "wizard", "content": "hi"}])),
    "no messages": ("/v1/chat/completions", dict(messages=[])),
}


@pytest.mark.parametrize("path, fields", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_a_4xx_in_openai_shape_and_the_server_keeps_serving(live_server, path, fields):
    status, body = post(live_server, path, _body(live_server, **{"model": live_server["model"], **fields}))
    assert 400 <= status < 500, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert post(live_server, "/v1/completions", _body(live_server, prompt="hi", max_tokens=2))[0] == 200


@pytest.mark.parametrize("raw", [b'{"model": "x", "prompt": ', b'{"model": "x", "prompt": "\xff\xfe\xfd"}', b"\x00\x01", b""],
                         ids=["malformed json", "invalid utf-8", "binary", "empty body"])
def test_unparseable_bodies_are_400(live_server, raw):
    status, body = post(live_server, "/v1/completions", raw)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_a_12_mb_body_is_413_under_the_default_cap_before_it_is_sent(live_server):
    import http.client

    host, port = live_server["http"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(12 << 20))
        conn.endheaders()  # the 12 MB never follow: the server answers from the header alone
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())["error"]["code"]) == (413, "request_too_large")
    finally:
        conn.close()
    assert post(live_server, "/v1/completions", _body(live_server, prompt="hi", max_tokens=2))[0] == 200


def test_without_keys_every_route_is_open(live_server):
    """No key configured (the default): no Authorization header is needed anywhere."""
    for path in ("/v1/models", "/metrics", "/health"):
        with urllib.request.urlopen(live_server["http"] + path, timeout=60) as response:
            assert response.status == 200


def test_unknown_model_is_404_model_not_found(live_server):
    status, body = post(live_server, "/v1/completions", _body(live_server, prompt="hi", model="nope"))
    assert (status, body["error"]["code"]) == (404, "model_not_found")


def test_metrics_use_vllm_style_names(client, live_server):
    client.completions.create(model=live_server["model"], prompt=PROMPT, max_tokens=8, temperature=0)
    with urllib.request.urlopen(live_server["http"] + "/metrics", timeout=60) as response:
        text = response.read().decode()
    draft = live_server["config"].chain.split(",")[0]
    for name in ("specrouter:time_to_first_token_seconds_count", "specrouter:inter_token_latency_seconds_count",
                 "specrouter:generation_tokens_total", "specrouter:num_requests_waiting", "specrouter:num_requests_running",
                 f'specrouter:spec_decode_num_draft_tokens_total{{level="{draft}"}}',
                 f'specrouter:spec_decode_num_accepted_tokens_total{{level="{draft}"}}', "specrouter:chain_selected_total"):
        assert name in text, name
    line = next(x for x in text.splitlines() if x.startswith("specrouter:generation_tokens_total"))
    assert float(line.split()[-1]) >= 8


def _outward_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_servers_bind_to_loopback_only(live_server):
    ip = _outward_ip()
    if ip is None:
        pytest.skip("the host has no non-loopback address")
    for address in (live_server["http"].removeprefix("http://"), live_server["grpc"]):
        port = int(address.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex((ip, port)) != 0, f"port {port} answers on {ip}"


def test_the_deployment_class_serves_without_serve(local_ray, tiny_dirs, target_only):
    """SpecRouterServer is a plain class: constructed directly, it answers OpenAI bodies and gRPC."""
    import asyncio

    from specrouter.serving import client as sdk
    from specrouter.serving.server import SpecRouterServer

    server = SpecRouterServer({"chain": f"{tiny_dirs['draft']},{tiny_dirs['target']}", "dtype": "float32", "grpc_port": 0})
    try:
        body = json.dumps({"model": tiny_dirs["target"], "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                           "ignore_eos": True}).encode()
        out = asyncio.run(server.completions(body))
        want = target_only.generate(target_only.tokenizer(PROMPT)["input_ids"], 12, ignore_eos=True).token_ids
        assert out["choices"][0]["text"] == target_only.tokenizer.decode(want, skip_special_tokens=True)
        with sdk.Client(server.grpc.address, timeout=300) as client:
            assert client.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True).token_ids == want
    finally:
        server.close()


def test_a_served_request_is_classed_by_its_discovered_task(local_ray, tiny_dirs, target_only, tmp_path):
    """With a task model, the router's class for a request is its nearest discovered task (the target's
    input embeddings, from its GGUF), reported with its distance; an explicit prompt_class still wins."""
    import asyncio

    from specrouter.serving import client as sdk
    from specrouter.serving.server import SpecRouterServer
    from specrouter.tasks.discovery import fit_tasks
    from specrouter.tasks.encoders import encoder_for

    texts = [("def add(a, b):\n    return a + b\n", "code"), ("import os\nfor name in os.listdir('.'):\n    print(name)\n", "code"),
             ("class Stack:\n    def push(self, item):\n        self.items.append(item)\n", "code"),
             ("What should I cook for dinner tonight?", "chat"), ("Tell me a story about a cat.", "chat"),
             ("How do I ask my manager for a day off?", "chat")]
    encoder = encoder_for("embed:smollm2-135m")
    model = fit_tasks(encoder.encode([t for t, _ in texts]), [s for _, s in texts], encoder.name, "corpus", k_range=(2,), seed=0)
    path = model.save(tmp_path, "tasks")
    server = SpecRouterServer({"chain": f"{tiny_dirs['draft']},{tiny_dirs['target']}", "dtype": "float32", "grpc_port": 0,
                               "adaptive": True, "tasks": str(path)})
    try:
        prompt = "def mul(a, b):\n    return a * b\n"
        (routed, distance), = model.assign(encoder.encode([prompt]))
        body = {"model": tiny_dirs["target"], "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
        out = asyncio.run(server.completions(json.dumps(body).encode()))
        stats = out["specrouter"][0]
        assert stats["task"]["task"] == stats["routing"]["class"] == routed
        assert abs(stats["task"]["distance"] - distance) < 1e-3 and stats["task"]["ms"] > 0
        want = target_only.generate(target_only.tokenizer(prompt)["input_ids"], 10, ignore_eos=True).token_ids
        assert out["choices"][0]["text"] == target_only.tokenizer.decode(want, skip_special_tokens=True)  # still lossless
        out = asyncio.run(server.completions(json.dumps({**body, "prompt_class": "mine"}).encode()))
        assert out["specrouter"][0]["routing"]["class"] == "mine" and "task" not in out["specrouter"][0]
        with sdk.Client(server.grpc.address, timeout=300) as client:  # the same statistics over gRPC
            done = client.generate(prompt, max_tokens=10, temperature=0, ignore_eos=True)
        assert done.token_ids == want and done.stats["task"]["task"] == done.stats["routing"]["class"] == routed
    finally:
        server.close()
