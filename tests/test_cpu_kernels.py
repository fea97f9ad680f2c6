"""jaxinfer.cpu_kernels: the quantized matmul against its plain-jnp reference, every layout and instruction set,
under jit / scan / vmap / shard_map; the build cache and its fallback, in subprocesses."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels import qmatmul as qm

LAYOUTS = tuple(qm.LAYOUTS)
K = 96  # three blocks


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if build.mode() == "off":
        pytest.skip("JAXINFER_CPU_KERNELS=off")
    assert build.available(), f"the CPU kernels did not build: {build.unavailable_reason()}"


def random_parts(layout: str, n: int, k: int, seed: int = 0, lead: tuple[int, ...] = ()) -> dict[str, jax.Array]:
    """A layout's parts [*lead, N, k / per] with every code value and realistic scales (q8_0 codes reach -128)."""
    rng = np.random.default_rng(seed)
    parts = {}
    for name, dtype, per in qm.LAYOUTS[layout]:
        shape = (*lead, n, k // per)
        if name == "values":
            info = np.iinfo(dtype)
            parts[name] = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        elif name == "scales":
            parts[name] = (rng.uniform(0.002, 0.02, shape) * rng.choice([-1, 1], shape)).astype(np.float16)
        else:  # mins
            parts[name] = rng.normal(0, 0.05, shape).astype(np.float16)
    return {name: jnp.asarray(p) for name, p in parts.items()}


def random_x(m: int, k: int = K, seed: int = 1) -> jax.Array:
    x = np.random.default_rng(seed).normal(size=(m, k)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0
    return jnp.asarray(x)


def assert_close(y, want, rel: float):
    """|y - want| <= rel * max|want| elementwise: a matmul's errors scale with its outputs, not with each one."""
    y, want = np.asarray(y), np.asarray(want)
    assert y.shape == want.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=0, atol=rel * float(np.abs(want).max()))


# The kernel against the reference that rounds x as it does: float sums in another order, nothing else.
SAME_ARITHMETIC = 1e-5
# int8 activations against the float reference (random data; the figure depends on the data, reported by the probe).
INT8_VS_FLOAT = 2e-2
INT16_VS_FLOAT = 2e-4  # a 256 times finer step


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 3, 17, 64, 130])
def test_matches_reference(layout, m):
    n = 37  # odd: a partial row tile
    parts, x = random_parts(layout, n, K), random_x(m)
    y = qm.qmatmul(x, layout, parts)
    assert_close(y, qm.qmatmul_reference(x, layout, parts, activations="int8"), SAME_ARITHMETIC)
    assert_close(y, qm.qmatmul_reference(x, layout, parts), INT8_VS_FLOAT)
    y_float = qm.qmatmul(x, layout, parts, activations="float32")
    assert_close(y_float, qm.qmatmul_reference(x, layout, parts), SAME_ARITHMETIC)
    y16 = qm.qmatmul(x, layout, parts, activations="int16")  # M = 1 integer dots, M > 1 float dots on round16(x)
    assert_close(y16, qm.qmatmul_reference(x, layout, parts, activations="int16"), SAME_ARITHMETIC)
    assert_close(y16, qm.qmatmul_reference(x, layout, parts), INT16_VS_FLOAT)
    assert not np.array_equal(np.asarray(y16), np.asarray(y_float))  # rounded: not float's numbers


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("isa", qm.ISAS)
@pytest.mark.parametrize("activations", ["int8", "int16", "float32"])
def test_every_instruction_set(layout, isa, activations):
    if isa not in qm.supported_isas():
        pytest.skip(f"this CPU runs {qm.supported_isas()}, not {isa}")
    parts, x = random_parts(layout, 19, 160, seed=2), random_x(9, 160, seed=3)
    y = qm.qmatmul(x, layout, parts, isa=isa, activations=activations)
    assert_close(y, qm.qmatmul_reference(x, layout, parts, activations=activations), SAME_ARITHMETIC)
    for m in (1, 2):  # the streamed row and the smallest tile
        assert_close(qm.qmatmul(x[:m], layout, parts, isa=isa, activations=activations), y[:m], SAME_ARITHMETIC)


def test_auto_activations_by_rows():
    parts = random_parts("q8_0", 9, K)
    threshold = qm.FLOAT_ACTIVATIONS_FROM_M["q8_0"]
    for m in (threshold - 1, threshold):
        x = random_x(m)
        want = qm.qmatmul(x, "q8_0", parts, activations="int8" if m < threshold else "float32")
        np.testing.assert_array_equal(np.asarray(qm.qmatmul(x, "q8_0", parts, activations="auto")), np.asarray(want))


def test_isa_from_the_environment(monkeypatch):
    parts, x = random_parts("q4_0", 5, K), random_x(2)
    monkeypatch.setenv(qm.ISA_ENV, "scalar")
    y = qm.qmatmul(x, "q4_0", parts)
    assert_close(y, qm.qmatmul_reference(x, "q4_0", parts, activations="int8"), SAME_ARITHMETIC)
    monkeypatch.setenv(qm.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="sse9"):
        qm.qmatmul(x, "q4_0", parts)


@pytest.mark.parametrize("m", [1, 64])
def test_threads_give_the_same_bits(m):
    """Rows are split between threads, never a row's sum: 1 and 2 threads agree bit for bit."""
    parts, x = random_parts("int4_g32_min", 301, 256), random_x(m, 256)
    one = qm.qmatmul(x, "int4_g32_min", parts, threads=1)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(qm.qmatmul(x, "int4_g32_min", parts, threads=2)))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(qm.qmatmul(x, "int4_g32_min", parts)))


def test_concurrent_calls_give_the_one_thread_bits():
    """Handlers running at once (Python threads here; 8 host devices under shard_map): one holds the spinning helpers
    (parallel_for.h), the others split their rows on XLA's pool; every answer is the one-thread answer, bit for bit."""
    parts, x = random_parts("q4_0", 2048, 256, seed=7), random_x(1, 256)  # 2048 rows: many chunks
    want = np.asarray(qm.qmatmul(x, "q4_0", parts, threads=1))
    f = jax.jit(lambda x, p: qm.qmatmul(x, "q4_0", p, threads=2))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: np.asarray(f(x, parts)), range(64)))
    for got in results:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activations", ["int8", "int16", "float32"])
def test_many_weights_in_one_call_give_each_ones_bits(layout, activations):
    """qmatmul_many (a layer's q, k and v in one call): each result is qmatmul's of its weight, bit for bit, for the
    streamed row, small tiles and a panel; sizes that split among the threads and that do not."""
    weights = [random_parts(layout, n, 160, seed=n) for n in (37, 5, 300)]
    for m in (1, 3, 70):
        x = random_x(m, 160)
        many = jax.jit(lambda x, ws: qm.qmatmul_many(x, layout, ws, activations=activations))(x, weights)
        for w, y in zip(weights, many):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(qm.qmatmul(x, layout, w, activations=activations)))


def test_many_weights_refuse_what_does_not_fit():
    x = random_x(2)
    with pytest.raises(ValueError, match="at least one weight"):
        qm.qmatmul_many(x, "q4_0", [])
    with pytest.raises(ValueError, match="q4_0 takes parts"):
        qm.qmatmul_many(x, "q4_0", [random_parts("q4_0", 4, K), random_parts("int4_g32_min", 4, K)])
    with pytest.raises(ValueError, match=r"shape \(4, 96\); expected \[N, n\] with n = 48 for K=96"):
        qm.qmatmul_many(x, "q4_0", [random_parts("q4_0", 4, K), random_parts("q4_0", 4, 2 * K)])


def test_refuses_what_the_layouts_cannot_hold():
    parts = random_parts("q8_0", 4, K)
    with pytest.raises(ValueError, match="K=80"):
        qm.qmatmul(jnp.ones((2, 80)), "q8_0", {k: v[:, : 80 // (32 if k == "scales" else 1)] for k, v in parts.items()})
    with pytest.raises(ValueError, match="'scales'"):
        qm.qmatmul(jnp.ones((2, K)), "q8_0", {**parts, "scales": parts["scales"].astype(jnp.float32)})
    with pytest.raises(ValueError, match="shape"):
        qm.qmatmul(jnp.ones((2, K + 32)), "q8_0", parts)
    with pytest.raises(ValueError, match="q5_k"):
        qm.qmatmul(jnp.ones((2, K)), "q5_k", parts)
    with pytest.raises(ValueError, match="mins"):
        qm.qmatmul(jnp.ones((2, K)), "int4_g32_min", random_parts("q4_0", 4, K))
    with pytest.raises(ValueError, match="threads=0"):
        qm.qmatmul(jnp.ones((2, K)), "q8_0", parts, threads=0)
    with pytest.raises(ValueError, match="int32"):
        qm.qmatmul(jnp.ones((2, K), jnp.int32), "q8_0", parts)


def test_leading_dims_bfloat16_and_empty():
    parts = random_parts("q4_0", 11, K)
    x = random_x(6).reshape(2, 3, K)
    y = qm.qmatmul(x.astype(jnp.bfloat16), "q4_0", parts)
    assert y.shape == (2, 3, 11)
    assert_close(y, qm.qmatmul_reference(x.astype(jnp.bfloat16), "q4_0", parts, activations="int8"), SAME_ARITHMETIC)
    assert qm.qmatmul(jnp.ones((0, K)), "q4_0", parts).shape == (0, 11)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_under_jit_and_scan(layout):
    """A stacked [L, N, K] weight sliced per layer by lax.scan, inside jit: each layer's kernel call as alone."""
    layers, n = 3, 24
    stacked = random_parts(layout, n, K, lead=(layers,))
    x = random_x(4, K)

    def step(h, layer_parts):
        y = qm.qmatmul(h, layout, layer_parts)  # [4, n]
        return jnp.tile(y, (1, K // n)) * 0.1, y  # back to [4, K]

    _, ys = jax.jit(lambda x, p: jax.lax.scan(step, x, p))(x, stacked)
    h = x
    for i in range(layers):
        layer = {k: v[i] for k, v in stacked.items()}
        want = qm.qmatmul_reference(h, layout, layer, activations="int8")
        assert_close(ys[i], want, 1e-4)  # the next layer's x rounds a little differently through the float sums
        h = jnp.tile(want, (1, K // n)) * 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stacked_weights_and_a_layer_index(layout):
    """layer= reads one layer of the whole stack: under scan the stack goes in unsliced (a sliced operand is copied)."""
    layers, n = 3, 21
    stacked = random_parts(layout, n, K, lead=(layers,))
    x = random_x(5)

    def step(carry, i):
        return carry, qm.qmatmul(x, layout, stacked, layer=i)

    _, ys = jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(layers)))()
    for i in range(layers):
        want = qm.qmatmul_reference(x, layout, {k: v[i] for k, v in stacked.items()}, activations="int8")
        assert_close(ys[i], want, SAME_ARITHMETIC)
    assert_close(qm.qmatmul(x, layout, stacked, layer=2), ys[2], SAME_ARITHMETIC)
    with pytest.raises(Exception, match="outside the stack"):
        jax.block_until_ready(qm.qmatmul(x, layout, stacked, layer=jnp.int32(layers)))
    with pytest.raises(ValueError, match=r"\[L, N, n\]"):
        qm.qmatmul(x, layout, {k: v[0] for k, v in stacked.items()}, layer=0)
    with pytest.raises(ValueError, match="layer must be an integer scalar"):
        qm.qmatmul(x, layout, stacked, layer=jnp.zeros(2, jnp.int32))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_stacked_weights_and_a_layer_index(layout):
    """qmatmul_many's layer=: one layer of every stack, under scan the stacks unsliced; each result is qmatmul's of
    that layer, bit for bit."""
    layers = 3
    stacks = [random_parts(layout, n, K, seed=n, lead=(layers,)) for n in (19, 40)]
    x = random_x(2)

    def step(carry, i):
        return carry, qm.qmatmul_many(x, layout, stacks, layer=i, activations="int16")

    _, ys = jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(layers)))()
    for i in range(layers):
        for stack, y in zip(stacks, ys):
            want = qm.qmatmul(x, layout, {k: v[i] for k, v in stack.items()}, activations="int16")
            np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(want))
    with pytest.raises(Exception, match="outside the stack"):
        jax.block_until_ready(qm.qmatmul_many(x, layout, stacks, layer=jnp.int32(-1)))
    with pytest.raises(ValueError, match="different numbers of layers"):
        qm.qmatmul_many(x, layout, [stacks[0], {k: v[:2] for k, v in stacks[1].items()}], layer=0)
    with pytest.raises(ValueError, match=r"\[L, N, n\]"):
        qm.qmatmul_many(x, layout, [{k: v[0] for k, v in stacks[0].items()}], layer=0)


def test_vmap():
    parts = random_parts("int4_g32_min", 13, K, lead=(3,))
    x = random_x(12, K).reshape(3, 4, K)

    def f(x, p):
        return qm.qmatmul(x, "int4_g32_min", p)

    one = {k: v[0] for k, v in parts.items()}
    want = qm.qmatmul_reference(x, "int4_g32_min", one, activations="int8")
    assert_close(jax.vmap(f, in_axes=(0, None))(x, one), want, SAME_ARITHMETIC)  # x's batch folds into M
    want_each = jnp.stack([qm.qmatmul_reference(x[i], "int4_g32_min", {k: v[i] for k, v in parts.items()},
                                                activations="int8") for i in range(3)])
    assert_close(jax.jit(jax.vmap(f))(x, parts), want_each, SAME_ARITHMETIC)  # a weight per batch element
    only_weights = jax.vmap(f, in_axes=(None, 0))(x[0], parts)  # [3, 4, 13]: x broadcast
    assert_close(only_weights[1], qm.qmatmul_reference(x[0], "int4_g32_min", {k: v[1] for k, v in parts.items()},
                                                       activations="int8"), SAME_ARITHMETIC)
    scales_only = jax.vmap(lambda s: f(x[0], {**one, "scales": s}))(parts["scales"])  # one part batched alone
    assert_close(scales_only[2], qm.qmatmul_reference(x[0], "int4_g32_min", {**one, "scales": parts["scales"][2]},
                                                      activations="int8"), SAME_ARITHMETIC)


def test_shard_map_over_output_rows():
    """W's rows split over 8 CPU devices, x replicated: each device runs the kernel on its local shard."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = Mesh(np.array(jax.devices()[:8]), ("tp",))
    parts = random_parts("q4_0", 8 * 5, K)
    x = random_x(3)

    def local(x, p):
        assert p["values"].shape == (5, K // 2), p["values"].shape
        return qm.qmatmul(x, "q4_0", p)

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("tp")), out_specs=P(None, "tp")))
    sharded = jax.device_put(parts, NamedSharding(mesh, P("tp")))
    assert_close(f(x, sharded), qm.qmatmul_reference(x, "q4_0", parts, activations="int8"), SAME_ARITHMETIC)


def test_reference_dequantizes_as_quant_does():
    """The kernels room cannot import jaxinfer.quant: its reference decoder is checked against quant's here."""
    from jaxinfer import quant

    for layout in LAYOUTS:
        parts = random_parts(layout, 7, K)
        np.testing.assert_array_equal(np.asarray(qm.dequantize_reference(layout, parts)),
                                      np.asarray(quant.LAYOUTS[layout].decode(parts)))
        assert [(p.name, np.dtype(quant.numpy_dtype(p.dtype)), p.per) for p in quant.LAYOUTS[layout].parts] == \
            list(qm.LAYOUTS[layout])


# --------------------------------------------------------------------------------------------
# The build: cache, lock, fallback (each in fresh processes: a process builds and registers once)

PROBE = textwrap.dedent("""
    import jax.numpy as jnp
    from jaxinfer.cpu_kernels import build, qmatmul as qm
    ok = build.available()
    lib = build._state()[0]
    print("RESULT", ok, None if lib is None else lib.built_s is not None, build.unavailable_reason() or "-")
    if ok:
        parts = {"values": jnp.ones((3, 32), jnp.int8), "scales": jnp.ones((3, 1), jnp.float16)}
        print("SUM", float(qm.qmatmul(jnp.ones((1, 32)), "q8_0", parts).sum()))
""")


def run_probe(env: dict[str, str], wait: bool = True):
    full = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.Popen([sys.executable, "-c", PROBE], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc.communicate(timeout=600) + (proc.returncode,) if wait else proc


def result_of(stdout: str) -> list[str]:
    return next(line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT"))


def test_second_process_finds_the_library(tmp_path):
    """Two processes started together: one builds under the lock, the other waits and loads its library; a third
    later finds it too. Each runs the kernel."""
    env = {build.DIR_ENV: str(tmp_path)}
    procs = [run_probe(env, wait=False) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    built = sorted(result_of(out)[1] for out, _ in outs)
    assert built == ["False", "True"], outs
    out, err, code = run_probe(env)
    assert code == 0 and result_of(out)[:2] == ["True", "False"], err
    assert "SUM 96.0" in out  # 3 rows of 32 ones
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))


SPIN_PROBE = textwrap.dedent("""
    import hashlib, numpy as np, jax.numpy as jnp
    from jaxinfer.cpu_kernels import qmatmul as qm
    rng = np.random.default_rng(7)
    parts = {"values": jnp.asarray(rng.integers(0, 256, (2048, 128), dtype=np.uint8)),
             "scales": jnp.asarray(rng.uniform(0.002, 0.02, (2048, 8)).astype(np.float16))}
    x = jnp.asarray(rng.normal(size=(1, 256)).astype(np.float32))
    y = np.asarray(qm.qmatmul(x, "q4_0", parts, threads=2, activations="int16"))
    print("BITS", hashlib.sha256(y.tobytes()).hexdigest())
    import os
    print("THREADS", len(os.listdir("/proc/self/task")))
""")


def test_spin_setting():
    """JAXINFER_CPU_KERNELS_SPIN_US=0 starts no helper threads of the kernels' own (one per core but the caller's
    otherwise) and splits the rows on XLA's pool instead; either way the bits are the one-thread answer's."""
    outs = {}
    for spin in ("0", "5"):
        run = subprocess.run([sys.executable, "-c", SPIN_PROBE], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "JAX_PLATFORMS": "cpu", "JAXINFER_CPU_KERNELS_SPIN_US": spin})
        assert run.returncode == 0, run.stderr
        outs[spin] = dict(line.split() for line in run.stdout.splitlines() if line.startswith(("BITS", "THREADS")))
    assert int(outs["5"]["THREADS"]) - int(outs["0"]["THREADS"]) == len(os.sched_getaffinity(0)) - 1, outs
    rng = np.random.default_rng(7)
    parts = {"values": jnp.asarray(rng.integers(0, 256, (2048, 128), dtype=np.uint8)),
             "scales": jnp.asarray(rng.uniform(0.002, 0.02, (2048, 8)).astype(np.float16))}
    x = jnp.asarray(rng.normal(size=(1, 256)).astype(np.float32))
    want = np.asarray(qm.qmatmul(x, "q4_0", parts, threads=1, activations="int16"))
    assert outs["0"]["BITS"] == outs["5"]["BITS"] == hashlib.sha256(want.tobytes()).hexdigest()


def test_changed_source_changes_the_key(tmp_path, monkeypatch):
    cxx = build.compiler()
    version = build.compiler_version(cxx)
    key = build.library_key(cxx, version)
    for name in build.SOURCES:
        (tmp_path / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    assert build.library_key(cxx, version) == key
    (tmp_path / "qmatmul_x86.inc").write_text((tmp_path / "qmatmul_x86.inc").read_text() + "\n// changed\n")
    assert build.library_key(cxx, version) != key
    assert build.library_key([*cxx, "-DX"], version) != key


@pytest.mark.parametrize("cxx", ["/bin/false", "/nonexistent/g++"])
def test_broken_compiler_falls_back_with_one_line(tmp_path, cxx):
    out, err, code = run_probe({build.DIR_ENV: str(tmp_path), build.CXX_ENV: cxx})
    assert code == 0, err
    ok, _, *reason = result_of(out)
    assert ok == "False" and cxx in " ".join(reason)
    assert "Traceback" not in err
    notices = [line for line in err.splitlines() if "CPU kernels off" in line]
    assert len(notices) == 1, err


def test_broken_compiler_under_on_is_an_error(tmp_path):
    _, err, code = run_probe({build.DIR_ENV: str(tmp_path), build.CXX_ENV: "/bin/false", build.MODE_ENV: "on"})
    assert code != 0 and "KernelsUnavailable" in err and "/bin/false" in err


def test_compile_error_names_the_first_error(tmp_path, monkeypatch):
    """A source that does not compile: available() False, the reason the compiler's first error line."""
    for name in build.SOURCES:
        (tmp_path / name).write_text("")
    (tmp_path / "qmatmul.cc").write_text("int f() { return undefined_name; }\n")
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    monkeypatch.setenv(build.DIR_ENV, str(tmp_path / "cache"))
    with pytest.raises(build.KernelsUnavailable, match="undefined_name"):
        build.built_library()
    assert not list((tmp_path / "cache").glob("*.so*"))


def test_off_means_off(tmp_path):
    out, err, code = run_probe({build.DIR_ENV: str(tmp_path), build.MODE_ENV: "off"})
    assert code == 0 and result_of(out) == ["False", "None", f"{build.MODE_ENV}=off"], err
    assert not list(tmp_path.iterdir())


def test_unverified_instruction_sets_run_only_when_named(monkeypatch):
    """AVX-512 code has not yet run on a CPU that has it: a machine with it uses AVX2 unless the environment names
    avx512 (build.UNVERIFIED_ISAS)."""
    from jaxinfer.cpu_kernels import build

    monkeypatch.delenv(build.ISA_ENV, raising=False)
    assert build.usable_isas(("scalar", "avx2", "avx512"), 3) == ("scalar", "avx2")
    assert build.usable_isas(("scalar", "avx2", "avx512"), 1) == ("scalar",)
    monkeypatch.setenv(build.ISA_ENV, "avx512")
    assert build.usable_isas(("scalar", "avx2", "avx512"), 3) == ("scalar", "avx2", "avx512")
    assert build.usable_isas(("scalar", "avx2", "avx512"), 2) == ("scalar", "avx2")
