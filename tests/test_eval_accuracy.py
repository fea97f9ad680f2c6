"""scripts/eval_accuracy.py on a tiny random Llama with a character tokenizer, against transformers' own logits."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_hf_model

torch = pytest.importorskip("torch")  # the CI stage on jax 0.11.2 has no torch

import jaxinfer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "eval_accuracy.py"
TEXT = Path(jaxinfer.__file__).parent / "data" / "botchan.txt"
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
CHARS = ["\n", *map(chr, range(32, 127))]  # the shipped text is ASCII
TINY = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
CTX = 64


def eval_accuracy():
    spec = importlib.util.spec_from_file_location("eval_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_char_tokenizer(path: Path) -> None:
    """tokenizer.json: one token per character (no merges), BOS added by tokenizer_config's add_bos_token."""
    from tokenizers import Tokenizer, models

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), TINY["vocab_size"])})
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint directory, the transformers model, a text of 10 windows and a bit)."""
    path = tmp_path_factory.mktemp("eval-accuracy")
    hf = random_hf_model("LlamaForCausalLM", TINY)
    hf.save_pretrained(path / "model")
    write_char_tokenizer(path / "model")
    text = path / "text.txt"
    text.write_text(TEXT.read_text()[: 10 * CTX + 20])  # one character per token, BOS first: 10 windows
    return path / "model", hf, text


def run(argv, tmp_path):
    out = tmp_path / "out.json"
    returned = eval_accuracy().main([*argv, "--json", str(out)])
    assert json.loads(out.read_text()) == returned
    return returned


def perplexity_in_numpy(hf, text: str) -> tuple[float, int]:
    """llama-perplexity's scheme written out over transformers' logits: windows of CTX characters headed by BOS, each
    scored from scratch, the NLL of the second half's next tokens."""
    ids = [1] + [SPECIALS.__len__() + CHARS.index(c) for c in text]
    nll = []
    for start in range(0, len(ids) // CTX * CTX, CTX):
        window = [1] + ids[start + 1 : start + CTX]
        with torch.no_grad():
            logits = hf(torch.tensor([window])).logits[0].double().numpy()  # [CTX, V]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for j in range(CTX // 2, CTX - 1):
            nll.append(-logp[j, window[j + 1]])
    return float(np.exp(np.mean(nll))), len(nll)


def test_reference_against_itself(tiny, tmp_path, capsys):
    path, hf, text = tiny
    r = run(["--model", str(path), "--quantize", "none", "--text", str(text), "--ctx", str(CTX)], tmp_path)
    assert (r["add_bos"], r["windows"], r["reference"]) == (True, 10, str(path))
    assert r["kld_mean"] == 0 and r["kld_p99"] == 0 and r["same_top1"] == 1 and r["dlogit_max"] == 0
    ppl, positions = perplexity_in_numpy(hf, text.read_text())
    assert r["positions"] == positions == 10 * (CTX - 1 - CTX // 2)
    np.testing.assert_allclose(r["ppl"], ppl, rtol=1e-4)
    assert r["ppl_reference"] == r["ppl"]
    assert r["held_bytes"] == r["reference_held_bytes"] == 4 * sum(p.numel() for p in hf.parameters())
    out = capsys.readouterr().out
    assert f"PPL {r['ppl']:.4f}" in out and "mean KLD 0.000000" in out and "same top-1 100.00%" in out


def test_int8_moves_a_little(tiny, tmp_path):
    path, _, text = tiny
    r = run(["--model", str(path), "--quantize", "int8", "--text", str(text), "--ctx", str(CTX)], tmp_path)
    assert 0 < r["kld_mean"] < 1e-2 and r["kld_p99"] >= r["kld_mean"]
    assert 0 < r["dlogit_rms"] <= r["dlogit_max"] and r["same_top1"] > 0.9
    assert abs(np.log(r["ppl"] / r["ppl_reference"])) < 0.05
    assert r["held_bytes"] < r["reference_held_bytes"] / 2


def test_reference_logits_saved_then_read(tiny, tmp_path, monkeypatch, capsys):
    """The first run writes the reference's logits; the next reads them, loading only the model, to the same
    results; a run over other tokens is refused in one line."""
    path, _, text = tiny
    argv = ["--model", str(path), "--quantize", "int8", "--text", str(text), "--ctx", str(CTX),
            "--reference-logits", str(tmp_path / "ref.npy")]
    first = run(argv, tmp_path)
    assert np.load(tmp_path / "ref.npy").shape == (10, CTX - 1 - CTX // 2, TINY["vocab_size"])
    loads = []
    load_model = jaxinfer.load_model
    monkeypatch.setattr(jaxinfer, "load_model", lambda *a, **k: loads.append(k["quantize"]) or load_model(*a, **k))
    again = run(argv, tmp_path)
    assert loads == ["int8"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    err = one_line_error([*argv[:-4], "--ctx", str(CTX // 2), *argv[-2:]], capsys)
    assert err.endswith(f"was written for ctx {CTX} (this run: {CTX // 2})\n")


@pytest.mark.skipif("kv_cache_dtype" not in inspect.signature(jaxinfer.load_model).parameters,
                    reason="load_model has no kv_cache_dtype yet")
def test_int8_kv_cache(tiny, tmp_path):
    path, _, text = tiny
    r = run(["--model", str(path), "--quantize", "none", "--kv-cache-dtype", "int8", "--text", str(text),
             "--ctx", str(CTX)], tmp_path)
    assert 0 < r["kld_mean"] < 1e-2 and r["held_bytes"] == r["reference_held_bytes"]


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        eval_accuracy().main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval_accuracy: error: "), err
    return err


def test_bad_inputs_are_one_line(tiny, tmp_path, capsys):
    path, _, text = tiny
    common = ["--text", str(text), "--ctx", str(CTX)]
    err = one_line_error(["--model", str(tmp_path / "nope.gguf"), *common], capsys)
    assert "--model" in err and "nope.gguf" in err and "no such file" in err
    err = one_line_error(["--model", str(path), "--reference", str(tmp_path / "ref"), *common], capsys)
    assert "--reference" in err and "no such file" in err
    err = one_line_error(["--model", str(path), "--text", str(tmp_path / "missing.txt")], capsys)
    assert "--text" in err and "missing.txt" in err
    err = one_line_error(["--model", str(path), "--quantize", "int3", *common], capsys)
    assert "--quantize 'int3' is not one of auto, none, int8" in err
    err = one_line_error(["--model", str(path), "--reference-quantize", "q2", *common], capsys)
    assert "--reference-quantize 'q2'" in err
    short = tmp_path / "short.txt"
    short.write_text("x" * (CTX - 2))  # with BOS: one token short of a window
    err = one_line_error(["--model", str(path), "--text", str(short), "--ctx", str(CTX)], capsys)
    assert f"is {CTX - 1} tokens, shorter than one window of --ctx {CTX}" in err
    err = one_line_error(["--model", str(path), "--ctx", "2", *common[:2]], capsys)
    assert "--ctx 2 must be at least 4" in err
    if "kv_cache_dtype" not in inspect.signature(jaxinfer.load_model).parameters:
        err = one_line_error(["--model", str(path), "--kv-cache-dtype", "int8", *common], capsys)
        assert "no kv_cache_dtype" in err


def test_command_line_exit_status(tmp_path):
    """The script run as a program: exit status 2 and one line on stderr, before any weight is read."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "default", "--quantize",
                           "int3"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--quantize 'int3'" in done.stderr
