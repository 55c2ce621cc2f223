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


def test_models_lists_the_catalog(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in out and "smollm2-135m" in out


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


def test_serve_starts_its_own_ray_answers_with_its_key_and_stops_cleanly_on_sigint(tiny_dirs, tmp_path):
    """The main job end to end: `specrouter serve` on an embedded local Ray with a key from the
    environment, then Ctrl-C; the key shows nowhere in its output or its Ray's logs."""
    import os
    import secrets
    import shutil
    import signal
    import tempfile
    import urllib.error
    import urllib.request
    from pathlib import Path

    import psutil
    from conftest import free_port

    http_port, grpc_port = free_port(), free_port()
    key = f"sk-cli-{secrets.token_urlsafe(18)}"
    ray_dir = tempfile.mkdtemp(prefix="sr-", dir="/tmp")  # short: Ray's socket paths live under it
    config = tmp_path / "serve.yaml"
    config.write_text(f"chain: {tiny_dirs['draft']},{tiny_dirs['target']}\ndtype: float32\ngrpc_port: {grpc_port}\n")
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
        children = psutil.Process(proc.pid).children(recursive=True)
        body = json.dumps({"model": tiny_dirs["target"], "prompt": "Hello", "max_tokens": 4}).encode()
        url = f"http://127.0.0.1:{http_port}/v1/completions"
        for headers, want in (({}, 401), ({"Authorization": "Bearer not-the-key"}, 401), ({"Authorization": f"Bearer {key}"}, 200)):
            request = urllib.request.Request(url, body, {"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    assert (response.status, json.loads(response.read())["usage"]["completion_tokens"]) == (want, 4)
            except urllib.error.HTTPError as err:
                assert err.code == want
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=60) as response:
            assert response.status == 200  # open on loopback by default
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        gone, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [p.info if hasattr(p, "info") else p.pid for p in alive]  # it stopped all the Ray it started
        output = "".join(lines) + proc.stdout.read()
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
    from specrouter.config import ServeConfig
    from specrouter.serve import exposure_warning

    warning = exposure_warning(ServeConfig(grpc_host=grpc_host, api_key=keys), host)
    assert bool(warning) == warns
    if warns:
        assert "no API key" in warning and "--api-key" in warning

