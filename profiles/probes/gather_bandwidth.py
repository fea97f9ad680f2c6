"""Probe (not a test): XLA:CPU reading 4,000 keys of K (30 layers, 92 MB) gathered from the paged pool in several
ways, each followed by a small GEMM, against a contiguous slice and numpy's take:

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/gather_bandwidth.py
"""
import time, statistics, numpy as np, jax, jax.numpy as jnp
L, K, ps, H, P = 30, 3, 16, 64, 4001
n = 250  # 4000 keys
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.permutation(np.arange(1, P))[:n], jnp.int32)
kmk = jnp.asarray(rng.standard_normal((L, K, P, ps, H)), jnp.float32)
kpm = jnp.asarray(np.ascontiguousarray(np.transpose(np.asarray(kmk), (0, 2, 1, 3, 4))))
w = jnp.ones((H, 16), jnp.float32)
def cons(x):  # cheap consumer: matvec over H (fast dot)
    return jnp.einsum("...h,hj->...j", x.reshape(-1, H), w)[:1]
dn = jax.lax.GatherDimensionNumbers(offset_dims=(0, 2, 3), collapsed_slice_dims=(0, 2), start_index_map=(0, 2))
def kfirst(pool, ids):
    outs = []
    for l in range(L):
        idx = jnp.stack([jnp.full(ids.shape, l), ids], -1)
        outs.append(cons(jax.lax.gather(pool, idx, dn, (1, K, 1, ps, H), mode="promise_in_bounds")))
    return jnp.stack(outs)
def numpy_style(pool, ids):
    return jnp.stack([cons(pool[l, :, ids]) for l in range(L)])
def page_major(pool, ids):
    return jnp.stack([cons(pool[l][ids]) for l in range(L)])
def page_major_take(pool, ids):
    return jnp.stack([cons(jnp.take(pool[l], ids, axis=0, mode="clip")) for l in range(L)])
def dyn_slices(pool, ids):
    def one(l):
        def body(i, buf):
            pg = jax.lax.dynamic_slice(pool, (l, 0, ids[i], 0, 0), (1, K, 1, ps, H)).reshape(K, 1, ps, H)
            return jax.lax.dynamic_update_slice(buf, pg, (0, i, 0, 0))
        return cons(jax.lax.fori_loop(0, n, body, jnp.zeros((K, n, ps, H))))
    return jnp.stack([one(l) for l in range(L)])
def contiguous(pool, ids):
    return jnp.stack([cons(pool[l, :, 1:n+1]) for l in range(L)])
fns = {"kfirst lax.gather": (kfirst, kmk), "pool[l,:,ids]": (numpy_style, kmk), "page-major pool[l][ids]": (page_major, kpm),
       "page-major take clip": (page_major_take, kpm), "fori dynamic_slice": (dyn_slices, kmk), "contiguous slice": (contiguous, kmk)}
fns = {k: (jax.jit(f), p) for k, (f, p) in fns.items()}
for f, p in fns.values(): f(p, ids).block_until_ready()
ts = {k: [] for k in fns}
for _ in range(5):
    for k, (f, p) in fns.items():
        t = time.perf_counter(); f(p, ids).block_until_ready(); ts[k].append(time.perf_counter() - t)
mb = L * K * n * ps * H * 4 / 1e6
for k, v in ts.items():
    m = statistics.median(v); print(f"{k:26s} {1000*m:6.1f} ms {mb/1000/m:5.1f} GB/s ({mb:.0f} MB)")
npool = np.asarray(kpm); nid = np.asarray(ids)
t = time.perf_counter()
for l in range(L): np.take(npool[l], nid, axis=0)
print("numpy take page-major", round(1000*(time.perf_counter()-t), 1), "ms")
