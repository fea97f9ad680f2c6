"""The `jaxinfer` command: generate runs and prints tokens; bad flags exit 2 with a usage message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxinfer import cli


def test_generate_from_a_random_preset(capsys):
    assert cli.main(["generate", "--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5 and "finish_reason=length" in captured.err


def test_bad_request_exits_2_naming_the_value(capsys):
    assert cli.main(["generate", "--preset", "tiny", "--prompt-ids", "1,999"]) == 2
    assert "token id 999" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate"], ["generate", "--preset", "tiny", "--prompt-ids", "a,b"], ["nope"]])
def test_bad_flags_exit_2_with_usage(argv):
    result = subprocess.run([sys.executable, "-m", "jaxinfer.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
