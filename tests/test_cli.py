import json
import subprocess
import sys

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
