"""Probe (not a test): one jitted [1, T] prompt chunk forward of random smollm2-135m float32 at C keys already written,
with xla_attention.DEFAULT_BLOCK_KEYS = $BK (default 256). A process per setting; an old checkout first on
PYTHONPATH runs its code:

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/chunk_forward.py 16 0 1000 2000 4000
"""
import time, statistics, numpy as np, jax, jax.numpy as jnp, dataclasses, sys, os
import jaxinfer
from jaxinfer import xla_attention
xla_attention.DEFAULT_BLOCK_KEYS = int(os.environ.get("BK", "256"))
from jaxinfer import model as M, kv_cache
from jaxinfer.config import ModelConfig
cfg = ModelConfig.preset("smollm2-135m").replace(dtype="float32")
m = jaxinfer.random_model(cfg)
T = int(sys.argv[1])
cache = kv_cache.init_cache(cfg, num_pages=1 + 16 * 300, page_size=16, max_seqs=16, pages_per_seq=300)
pt = np.zeros((16, 300), np.int32); pt[0, :] = np.arange(300) + 1
def fwd(params, cache, tokens, pos):
    h, c = M.forward_hidden(params, cfg, tokens, pos, cache, jnp.zeros((1,), jnp.int32))
    return h, c
f = jax.jit(fwd, donate_argnums=(1,))
for C in [int(x) for x in sys.argv[2:]]:
    cache = dataclasses.replace(cache, page_table=jnp.asarray(pt), lengths=jnp.asarray(np.r_[C, np.zeros(15)].astype(np.int32)))
    tokens = jnp.full((1, T), 5, jnp.int32); pos = jnp.asarray((C + np.arange(T))[None], jnp.int32)
    out, cache = f(m.params, cache, tokens, pos); jax.block_until_ready(out)
    ts = []
    for _ in range(5):
        t = time.perf_counter(); out, cache = f(m.params, cache, tokens, pos); jax.block_until_ready(out); ts.append(1000 * (time.perf_counter() - t))
    print(f"BK={xla_attention.DEFAULT_BLOCK_KEYS} T={T} C={C}: {statistics.median(ts):.1f} ms", flush=True)
