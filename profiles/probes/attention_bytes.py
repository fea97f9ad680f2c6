"""Probe (not a test): XLA:CPU's throughput on one decode step's K (30 layers x 16 rows x 1,024 keys, 377 MB): the
gather in two pool layouts, with and without the scores' dot, against a plain contiguous sum in XLA and in numpy.

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/attention_bytes.py
"""
import time, statistics, numpy as np, jax, jax.numpy as jnp
L, K, G, H, ps, P, B, n = 30, 3, 3, 64, 16, 2049, 16, 64  # n pages = 1,024 keys per row
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.permutation(np.arange(1, P))[: B * n].reshape(B, n), jnp.int32)
q = jnp.asarray(rng.standard_normal((B, K, G, H)), jnp.float32)
kmk = jnp.asarray(rng.standard_normal((L, K, P, ps, H)), jnp.float32)  # ours: [L, K, P, ps, H]
kpm = jnp.asarray(np.ascontiguousarray(np.transpose(np.asarray(kmk), (0, 2, 1, 3, 4))))  # page-major [L, P, K, ps, H]

def ours(pool, q, ids):
    out = 0.0
    for l in range(L):
        k = pool[l, :, ids]  # [B, n, K, ps, H]
        out = out + jnp.einsum("BKGH,BnKpH->BKGnp", q, k, precision="highest").sum()
    return out

def page_major(pool, q, ids):
    out = 0.0
    for l in range(L):
        k = pool[l][ids]  # [B, n, K, ps, H]
        out = out + jnp.einsum("BKGH,BnKpH->BKGnp", q, k, precision="highest").sum()
    return out

def page_major_kfirst(pool, q, ids):
    out = 0.0
    for l in range(L):
        k = pool[l][ids].transpose(0, 2, 1, 3, 4).reshape(B, K, n * ps, H)  # [B, K, S, H]
        out = out + jnp.einsum("BKGH,BKSH->BKGS", q, k, precision="highest").sum()
    return out

def gather_only(pool, q, ids):
    out = 0.0
    for l in range(L):
        out = out + pool[l][ids].sum()
    return out

def gather_promise(pool, q, ids):
    out = 0.0
    for l in range(L):
        out = out + pool[l].at[ids].get(mode="promise_in_bounds", unique_indices=True).sum()
    return out

def gather_take(pool, q, ids):
    out = 0.0
    for l in range(L):
        out = out + jnp.take(pool[l], ids.reshape(-1), axis=0, mode="clip").sum()
    return out

fns = {"gather promise_in_bounds": (jax.jit(gather_promise), kpm), "take flat, clip": (jax.jit(gather_take), kpm),"ours [L,K,P,ps,H]": (jax.jit(ours), kmk), 
       "page-major, K-first dot": (jax.jit(page_major_kfirst), kpm), "page-major gather+sum only": (jax.jit(gather_only), kpm)}
for f, pool in fns.values():
    f(pool, q, ids).block_until_ready()
times = {k: [] for k in fns}
for _ in range(5):
    for name, (f, pool) in fns.items():
        t = time.perf_counter(); f(pool, q, ids).block_until_ready(); times[name].append(1000 * (time.perf_counter() - t))
mb = 30 * B * n * ps * K * H * 4 / 1e6
for name, v in times.items():
    m = statistics.median(v); print(f"{name:28s} {m:7.1f} ms  {mb / m:5.2f} GB/s of K ({mb:.0f} MB)")

npool = np.asarray(kpm)
flat = np.asarray(ids).reshape(-1)
t = time.perf_counter()
for l in range(L):
    npool[l][flat]
print(f"{'numpy fancy-index gather':28s} {1000 * (time.perf_counter() - t):7.1f} ms")
contiguous = jax.jit(lambda p: sum(p[l, : B * n].sum() for l in range(L)))
contiguous(kpm).block_until_ready()
t = time.perf_counter()
contiguous(kpm).block_until_ready()
print(f"{'xla contiguous sum':28s} {1000 * (time.perf_counter() - t):7.1f} ms")
t = time.perf_counter()
for l in range(L):
    npool[l, : B * n].sum()
print(f"{'numpy contiguous sum':28s} {1000 * (time.perf_counter() - t):7.1f} ms")
