"""jaxinfer.cpu_kernels.fmatmul: the float32 matmul against its plain-jnp reference, both orientations, every
instruction set, 1 and 2 threads, stacked layers under scan, vmap; and the shapes it refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.cpu_kernels import build
from jaxinfer.cpu_kernels import fmatmul as fm


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if build.mode() == "off":
        pytest.skip("JAXINFER_CPU_KERNELS=off")
    assert build.available(), f"the CPU kernels did not build: {build.unavailable_reason()}"


# Float sums in another order than XLA's: relative to the largest output.
SAME_FUNCTION = 1e-5


def random_w(k: int, n: int, contract_first: bool, seed: int = 0, lead: tuple[int, ...] = ()) -> jax.Array:
    shape = (*lead, k, n) if contract_first else (*lead, n, k)
    return jnp.asarray(np.random.default_rng(seed).normal(0, 0.05, shape).astype(np.float32))


def random_x(m: int, k: int, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(m, k)).astype(np.float32))


def assert_close(y, want):
    y, want = np.asarray(y), np.asarray(want)
    assert y.shape == want.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=0, atol=SAME_FUNCTION * float(np.abs(want).max()))


@pytest.mark.parametrize("contract_first", [True, False])
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize(("k", "n"), [(96, 40), (37, 13), (5, 3), (576, 300)])
def test_matches_reference(contract_first, m, k, n):
    """Shapes that are not multiples of the 8-wide vectors or the 4-row steps; every instruction set."""
    w, x = random_w(k, n, contract_first), random_x(m, k)
    want = fm.fmatmul_reference(x, w, contract_first=contract_first)
    for isa in fm.supported_isas():
        assert_close(fm.fmatmul(x, w, contract_first=contract_first, isa=isa), want)


@pytest.mark.parametrize("contract_first", [True, False])
def test_threads_give_the_same_bits(contract_first):
    """Chunks are summed in their order whatever thread ran them."""
    w, x = random_w(300, 520, contract_first), random_x(2, 300)
    one = fm.fmatmul(x, w, contract_first=contract_first, threads=1)
    two = fm.fmatmul(x, w, contract_first=contract_first, threads=2)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(two))


@pytest.mark.parametrize("contract_first", [True, False])
def test_stacked_weights_and_a_layer_index(contract_first):
    """layer= reads one layer of the whole stack: under scan the stack goes in unsliced."""
    layers = 3
    stack, x = random_w(64, 24, contract_first, lead=(layers,)), random_x(2, 64)

    def step(carry, i):
        return carry, fm.fmatmul(x, stack, contract_first=contract_first, layer=i)

    _, ys = jax.jit(lambda: jax.lax.scan(step, 0, jnp.arange(layers)))()
    for i in range(layers):
        assert_close(ys[i], fm.fmatmul_reference(x, stack[i], contract_first=contract_first))
    with pytest.raises(Exception, match="outside the stack"):
        jax.block_until_ready(fm.fmatmul(x, stack, contract_first=contract_first, layer=jnp.int32(layers)))


def test_many_weights_in_one_call_give_each_ones_bits():
    """fmatmul_many (a layer's q, k and v): each result is fmatmul's of its weight, bit for bit; stacked with layer=."""
    x = random_x(3, 160)
    ws = [random_w(160, n, True, seed=n) for n in (37, 5, 300)]
    many = jax.jit(lambda x, ws: fm.fmatmul_many(x, ws))(x, ws)
    for w, y in zip(ws, many):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(fm.fmatmul(x, w, contract_first=True)))
    stacks = [random_w(160, n, True, seed=n, lead=(2,)) for n in (8, 24)]
    for y, stack in zip(fm.fmatmul_many(x, stacks, layer=1), stacks):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(fm.fmatmul(x, stack[1], contract_first=True)))
    with pytest.raises(ValueError, match="at least one weight"):
        fm.fmatmul_many(x, [])
    with pytest.raises(ValueError, match=r"x's last dim 160 does not match w \(96, 8\)"):
        fm.fmatmul_many(x, [ws[0], random_w(96, 8, True)])


def test_leading_dims_vmap_and_empty():
    w = random_w(32, 8, True)
    x = random_x(6, 32).reshape(2, 3, 32)
    y = fm.fmatmul(x, w, contract_first=True)
    assert y.shape == (2, 3, 8)
    assert_close(y, fm.fmatmul_reference(x, w, contract_first=True))
    ws = random_w(32, 8, True, lead=(2,))
    batched = jax.vmap(lambda x, w: fm.fmatmul(x, w, contract_first=True))(x, ws)
    assert_close(batched, jnp.stack([fm.fmatmul_reference(x[i], ws[i], contract_first=True) for i in range(2)]))
    assert fm.fmatmul(jnp.ones((0, 32)), w, contract_first=True).shape == (0, 8)


def test_refuses_what_does_not_fit():
    w, x = random_w(32, 8, True), random_x(2, 32)
    with pytest.raises(ValueError, match="float32 x and w, got float32 and bfloat16"):
        fm.fmatmul(x, w.astype(jnp.bfloat16), contract_first=True)
    with pytest.raises(ValueError, match=r"x's last dim 32 does not match w \(8, 32\)"):
        fm.fmatmul(x, w.T, contract_first=True)
    with pytest.raises(ValueError, match=r"expected \[L, K, N\] / \[L, N, K\] \(layer= given\)"):
        fm.fmatmul(x, w, contract_first=True, layer=0)
    with pytest.raises(ValueError, match="layer must be an integer scalar"):
        fm.fmatmul(x, w[None], contract_first=True, layer=jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="threads=0"):
        fm.fmatmul(x, w, contract_first=True, threads=0)
    with pytest.raises(ValueError, match="isa='avx512' must be one of"):
        fm.fmatmul(x, w, contract_first=True, isa="avx512")
