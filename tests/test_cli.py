import json
import subprocess
import sys

import pytest

from specrouter.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specrouter.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_json_reports_text_tokens_speed_and_levels(tiny_dirs):
    chain = f"ngram,{tiny_dirs['draft']},{tiny_dirs['target']}"
    proc = run_cli("generate", "--chain", chain, "--prompt", "Hello there", "--max-tokens", "12", "--dtype", "float32",
                   "--draft-lens", "2,3", "--ignore-eos", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 12 and isinstance(out["text"], str)
    assert out["tokens_per_s"] > 0 and out["draft_lens"] == [2, 3]
    assert [level["name"] for level in out["levels"]] == ["ngram", tiny_dirs["draft"], tiny_dirs["target"]]
    assert {"num_draft_tokens", "num_accepted_tokens", "num_recovered_tokens", "num_bonus_tokens", "time_s"} <= set(out["levels"][1])


def test_generate_with_bad_chain_exits_with_clear_error(tiny_dirs, capsys):
    assert main(["generate", "--chain", f"{tiny_dirs['target']},ngram", "--prompt", "x"]) == 2
    assert "target (last level) must be a full model" in capsys.readouterr().err


def test_models_lists_the_catalog_and_its_aligned_drafters(capsys, tmp_path, monkeypatch):
    from specrouter.core import adapters

    monkeypatch.setenv("SPECROUTER_CACHE", str(tmp_path))
    sealed = adapters.adapter_dir("qwen2.5-coder-0.5b", "code")
    sealed.mkdir(parents=True)
    (sealed / adapters.WEIGHTS).write_bytes(b"weights")
    adapters.seal(sealed, {"task": "code"})
    adapters.adapter_dir("qwen2.5-coder-0.5b", "unfinished").mkdir()  # no weights: not a level
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in out and "smollm2-135m" in out
    assert "aligned drafters: qwen2.5-coder-0.5b+task:code\n" in out and "unfinished" not in out


def test_bench_reports_throughput_and_latency_of_a_live_server(live_server):
    proc = run_cli("bench", "--url", live_server["http"], "--num-prompts", "3", "--concurrency", "2", "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests"] == 3 and report["output_tokens"] > 0 and report["output_tokens_per_s"] > 0
    assert report["mean_ttft_ms"] > 0


def test_serve_with_a_bad_config_exits_with_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("chain: a,b\ndraft_lens: [1, 2, 3]\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "draft_lens" in capsys.readouterr().err


def test_serve_kv_cache_flag_sizes_every_models_cache_over_the_config(tmp_path):
    from specrouter.cli import build_parser, serve_config

    config = tmp_path / "placement.yaml"
    config.write_text("placement:\n  qwen2.5-coder-1.5b: {num_cpus: 2, kv_cache_tokens: 4096}\n")
    from_file = serve_config(build_parser().parse_args(["serve", "--config", str(config)]))
    assert from_file.placement["qwen2.5-coder-1.5b"].kv_cache_tokens == 4096 and "*" not in from_file.placement
    flagged = serve_config(build_parser().parse_args(["serve", "--config", str(config), "--kv-cache-tokens", "8192"]))
    assert flagged.placement["qwen2.5-coder-1.5b"].kv_cache_tokens == 8192 and flagged.placement["qwen2.5-coder-1.5b"].num_cpus == 2
    assert flagged.placement["*"].kv_cache_tokens == 8192


def test_serve_prefill_chunk_flag_overrides_the_config_and_bad_sizes_exit_with_the_field_named(tmp_path, capsys):
    from specrouter.cli import build_parser, serve_config

    config = tmp_path / "chunk.yaml"
    config.write_text("prefill_chunk_tokens: 256\n")
    assert serve_config(build_parser().parse_args(["serve", "--config", str(config)])).prefill_chunk_tokens == 256
    flagged = build_parser().parse_args(["serve", "--config", str(config), "--prefill-chunk-tokens", "64"])
    assert serve_config(flagged).prefill_chunk_tokens == 64
    assert main(["serve", "--prefill-chunk-tokens", "0"]) == 2
    assert "prefill_chunk_tokens" in capsys.readouterr().err


def test_serve_not_bit_exact_flag_overrides_the_config_and_leaves_it_alone_when_absent(tmp_path):
    from specrouter.cli import build_parser, serve_config

    assert serve_config(build_parser().parse_args(["serve"])).bit_exact
    assert not serve_config(build_parser().parse_args(["serve", "--not-bit-exact"])).bit_exact
    config = tmp_path / "wide.yaml"
    config.write_text("chain: ngram:8,qwen2.5-coder-1.5b@gguf\nbit_exact: false\n")
    from_file = serve_config(build_parser().parse_args(["serve", "--config", str(config)]))
    assert not from_file.bit_exact and from_file.chain == "ngram:8,qwen2.5-coder-1.5b@gguf"


def test_serve_tasks_flag_names_the_task_model_alone_or_the_default():
    from specrouter.cli import build_parser, serve_config

    assert serve_config(build_parser().parse_args(["serve"])).tasks is None  # the lexical classifier
    assert serve_config(build_parser().parse_args(["serve", "--tasks"])).tasks == "default"
    assert serve_config(build_parser().parse_args(["serve", "--tasks", "/m/tasks.json"])).tasks == "/m/tasks.json"


def test_serve_with_a_missing_task_model_exits_before_starting_anything(tmp_path, capsys):
    missing = tmp_path / "none.json"
    assert main(["serve", "--tasks", str(missing)]) == 2
    assert f"no task model at {missing}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_serve_on_a_port_another_server_holds_exits_with_clear_error_before_starting(capsys, flag):
    """Serve's proxy would fail to bind a taken HTTP port and retry in the background, so the command
    refuses at once, naming the port, and starts nothing."""
    import socket

    from conftest import free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--grpc-port" if flag == "--port" else "--port"
        assert main(["serve", flag, str(port), other, str(free_port())]) == 2
    err = capsys.readouterr().err
    assert main(["serve", "--host", "no-such-host.invalid", "--port", str(free_port())]) == 2
    assert "does not resolve" in capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "in use" in err and flag in err


def test_the_public_grpc_api_refuses_a_port_another_server_holds():
    from specrouter.runtime.grpc_server import BackgroundServer

    first = BackgroundServer(object(), add=lambda servicer, server: None)
    try:
        with pytest.raises(OSError, match="cannot bind"):
            BackgroundServer(object(), port=int(first.address.rsplit(":", 1)[1]), add=lambda servicer, server: None)
    finally:
        first.stop()


def _listeners(procs) -> list[tuple[str, int, str]]:
    """The TCP sockets the given processes listen on: (address, port, process name)."""
    import psutil

    pids = {p.pid: p for p in procs}
    return [(c.laddr.ip, c.laddr.port, pids[c.pid].name()) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def test_serve_runs_the_default_chain_shape_on_loopback_answers_openai_and_stops_on_sigint(tiny_gguf_dirs, tmp_path):
    """The main job end to end, in the default chain's shape (prompt lookup below a GGUF target on
    llama.cpp, in its own actor) with a torch int8 drafter in its own actor between them, verifying whole
    blocks: `specrouter serve` on an embedded local Ray with a key from the
    environment; through the official openai client no key and a wrong key get 401, the key gets a
    completion and a streamed chat; nothing listens beyond loopback; Ctrl-C stops every process it
    started, quietly; the key shows nowhere in its output or its Ray's logs."""
    import ipaddress
    import os
    import secrets
    import shutil
    import signal
    import tempfile
    import urllib.error
    import urllib.request
    from pathlib import Path

    import openai
    import psutil
    from conftest import free_port

    http_port, grpc_port = free_port(), free_port()
    key = f"sk-cli-{secrets.token_urlsafe(18)}"
    ray_dir = tempfile.mkdtemp(prefix="sr-", dir="/tmp")  # short: Ray's socket paths live under it
    config = tmp_path / "serve.yaml"
    draft, target = f"{tiny_gguf_dirs['draft']}@int8", f"{tiny_gguf_dirs['target']}@gguf"
    config.write_text(f"chain: ngram,{draft},{target}\nbit_exact: false\ngrpc_port: {grpc_port}\n")
    proc = subprocess.Popen([sys.executable, "-m", "specrouter.cli", "serve", "--config", str(config), "--port", str(http_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "SPECROUTER_API_KEY": key, "RAY_TMPDIR": ray_dir})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        assert f"http://127.0.0.1:{http_port}/v1" in "".join(lines), "".join(lines)
        assert f"  chain        ngram -> {draft} -> {target}\n" in lines  # whole blocks: no cap to report

        def client(api_key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=api_key, timeout=120, max_retries=0)

        request = dict(model=tiny_gguf_dirs["target"], prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        no_key = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", json.dumps(
            {"model": tiny_gguf_dirs["target"], "prompt": "Hello", "max_tokens": 4}).encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(no_key, timeout=120)
        assert refused.value.code == 401
        with pytest.raises(openai.AuthenticationError):
            client("not-the-key").completions.create(**request)
        completion = client(key).completions.create(**request)
        assert completion.usage.completion_tokens == 4
        assert [level["name"] for level in completion.model_extra["specrouter"][0]["levels"]] == ["ngram", draft, target]
        chunks = list(client(key).chat.completions.create(model=tiny_gguf_dirs["target"], max_tokens=6, temperature=0, stream=True,
                                                          messages=[{"role": "user", "content": "Hi"}],
                                                          extra_body={"ignore_eos": True}))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=60) as response:
            assert response.status == 200  # open on loopback by default

        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        listening = _listeners(tree)
        assert ("127.0.0.1", http_port) in {(ip, port) for ip, port, _ in listening}, listening
        exposed = [entry for entry in listening if not ipaddress.ip_address(entry[0].removeprefix("::ffff:")).is_loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        gone, alive = psutil.wait_procs(tree[1:], timeout=60)
        assert not alive, [p.pid for p in alive]  # it stopped all the Ray it started
        stopping = proc.stdout.read()
        assert "failed" not in stopping and "Error" not in stopping, stopping  # a quiet stop: no actor errors
        output = "".join(lines) + stopping
        ray_logs = "".join(f.read_text(errors="replace") for f in Path(ray_dir).rglob("*.log") if f.is_file())
        assert "POST /v1/completions" in ray_logs  # Serve's access log was captured
        assert key not in output and key not in ray_logs
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.parametrize("host, grpc_host, keys, warns", [
    ("127.0.0.1", "127.0.0.1", [], False),
    ("localhost", "127.0.0.1", [], False),
    ("0.0.0.0", "127.0.0.1", [], True),
    ("127.0.0.1", "0.0.0.0", [], True),
    ("0.0.0.0", "0.0.0.0", ["k"], False),
    ("my-host.example", "127.0.0.1", [], True),
])
def test_serving_beyond_loopback_without_a_key_warns(host, grpc_host, keys, warns):
    from specrouter.serving.config import ServeConfig
    from specrouter.serving.serve import exposure_warning

    warning = exposure_warning(ServeConfig(grpc_host=grpc_host, api_key=keys), host)
    assert bool(warning) == warns
    if warns:
        assert "no API key" in warning and "--api-key" in warning



def test_generate_in_tiered_mode_says_it_is_lossy_and_counts_tiers(tiny_dirs, capsys):
    chain = f"{tiny_dirs['draft']},{tiny_dirs['target']}"
    assert main(["generate", "--chain", chain, "--prompt", "Hello there", "--max-tokens", "10", "--dtype", "float32",
                 "--ignore-eos", "--json", "--tau-high", "0.5", "--tau-low", "0", "--slim-verifier", "@skip:1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lossy"] is True and out["verification"] == "tiered" and (out["tau_high"], out["tau_low"]) == (0.5, 0.0)
    assert sum(out["tiers"][f"tier{i}_tokens"] for i in (1, 2, 3)) == len(out["token_ids"]) == 10


def test_generate_by_a_quality_budget_says_it_is_lossy_and_names_the_budget(tiny_dirs, capsys):
    chain = f"{tiny_dirs['draft']},{tiny_dirs['target']}"
    assert main(["generate", "--chain", chain, "--prompt", "Hello there", "--max-tokens", "10", "--dtype", "float32",
                 "--ignore-eos", "--json", "--max-disagreement", "0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lossy"] is True and out["verification"] == "tiered" and out["max_disagreement"] == 0.05
    # nothing measured before this request's own verifications: its thresholds stay lossless, the target checks every token
    assert (out["tau_high"], out["tau_low"]) == (1.0, 1.0) and out["tiers"]["tier3_tokens"] == 10


@pytest.mark.parametrize("flags, message", [(["--tau-high", "0.2", "--tau-low", "0.5"], "tau_low must be <= tau_high"),
                                            (["--tau-high", "1.5"], "tau_high must be in [0, 1]"),
                                            (["--tau-low", "0.5"], "--tau-low needs --tau-high"),
                                            (["--max-disagreement", "1.5"], "max_disagreement must be in [0, 1]"),
                                            (["--tau-high", "0.9", "--max-disagreement", "0.1"], "not both")])
def test_generate_rejects_bad_thresholds(tiny_dirs, capsys, flags, message):
    assert main(["generate", "--chain", tiny_dirs["target"], "--prompt", "x", *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2", "four"])
def test_align_refuses_a_teacher_batch_below_one_before_loading_anything(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["align", "--task", "code", "--loss", "seqkd", "--teacher-batch", value])
    assert exit_info.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err
