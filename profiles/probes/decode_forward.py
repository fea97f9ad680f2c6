"""Probe (not a test): one jitted decode forward (T = 1) of random smollm2-135m float32, B rows each at length L,
with xla_attention.DEFAULT_BLOCK_KEYS = $BK (default 256; before 2026-12-01 decode had its own, 2,048). A process per setting:

    BK=2048 JAXINFER_COMPILATION_CACHE=off python profiles/probes/decode_forward.py 16 1024
"""
import time, statistics, numpy as np, jax, jax.numpy as jnp, dataclasses, sys
import jaxinfer, os
from jaxinfer import xla_attention
xla_attention.DEFAULT_BLOCK_KEYS = int(os.environ.get("BK", "256"))

from jaxinfer import sharding, steps, model as M, kv_cache
from jaxinfer.config import ModelConfig
cfg = ModelConfig.preset("smollm2-135m").replace(dtype="float32")
m = jaxinfer.random_model(cfg)
B = int(sys.argv[1]); L = int(sys.argv[2]) if len(sys.argv) > 2 else 20
cache = kv_cache.init_cache(cfg, num_pages=1 + 16 * 128, page_size=16, max_seqs=16, pages_per_seq=256)
n = -(-(L+1) // 16); pt = np.zeros((16, 256), np.int32); pt[:, :n] = (np.arange(16 * n).reshape(16, n) % 2048) + 1
cache = dataclasses.replace(cache, page_table=jnp.asarray(pt), lengths=jnp.full((16,), L, jnp.int32))
tokens = jnp.full((B, 1), 5, jnp.int32); pos = jnp.full((B, 1), L, jnp.int32); seq = jnp.arange(B, dtype=jnp.int32)
def fwd(params, cache):
    h, c = M.forward_hidden(params, cfg, tokens, pos, cache, seq)
    return h, c
def fwd_logits(params, cache):
    h, c = M.forward_hidden(params, cfg, tokens, pos, cache, seq)
    return M.logits(params, cfg, h[:, 0]), c
def timeit(f, name):
    f = jax.jit(f, donate_argnums=(1,))
    global cache
    out, cache = f(m.params, cache); jax.block_until_ready(out)
    ts = []
    for _ in range(7):
        t = time.perf_counter(); out, cache = f(m.params, cache); jax.block_until_ready(out); ts.append(1000 * (time.perf_counter() - t))
    print(f"B={B} L={L} {name}: {statistics.median(ts):.1f} ms")
timeit(fwd, "forward_hidden")
