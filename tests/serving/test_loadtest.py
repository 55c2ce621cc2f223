from specrouter.serving.loadtest import sse_events


def test_sse_events_yields_each_data_event_and_stops_at_done():
    stream = [b'data: {"choices": [{"text": "a"}]}\n', b"\n", b": keep-alive comment\n",
              b'data: {"usage": {"completion_tokens": 1}}\n', b"\n", b"data: [DONE]\n", b'data: {"after": "done"}\n']
    assert list(sse_events(iter(stream))) == [{"choices": [{"text": "a"}]}, {"usage": {"completion_tokens": 1}}]
