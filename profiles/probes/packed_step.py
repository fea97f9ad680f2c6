"""Probe (not a test): one engine step of random smollm2-135m float32, a decode row at 100 tokens beside a 16-token
chunk of a prompt at C keys, as two steps.compute_and_sample calls against one packed call (both groups in one
forward), interleaved in one process:

    JAXINFER_COMPILATION_CACHE=off python profiles/probes/packed_step.py 0 2000 4000
"""
import time, statistics, numpy as np, jax, jax.numpy as jnp, sys
import jaxinfer
from jaxinfer import steps, kv_cache
from jaxinfer.runtime import Runtime
from jaxinfer.config import ModelConfig
cfg = ModelConfig.preset("smollm2-135m").replace(dtype="float32")
m = jaxinfer.random_model(cfg)
pps = 300
cache = kv_cache.init_cache(cfg, num_pages=1 + 2 * pps, page_size=16, max_seqs=16, pages_per_seq=pps)
slots = steps.init_slot_rows(16, 4, cfg.vocab_size)
pt = np.zeros((16, pps), np.int32); pt[0] = np.arange(pps) + 1; pt[1] = np.arange(pps) + 1 + pps
rt = Runtime()
def rows(tokens, positions, seq):
    B = tokens.shape[0]
    return steps.StepRows(tokens, positions, np.asarray(seq, np.int32), np.ones(B, bool), np.zeros(B, np.int32))
for C in [int(x) for x in sys.argv[1:]]:
    lengths = np.zeros(16, np.int32); lengths[0] = 100; lengths[1] = C
    dec = rows(np.full((1, 1), 5, np.int32), np.full((1, 1), 100, np.int32), [0])
    ch = rows(np.full((1, 16), 5, np.int32), (C + np.arange(16, dtype=np.int32))[None], [1])
    def sep():
        global cache, slots
        t1, _, _, cache, slots = steps.compute_and_sample(m.params, cfg, cache, slots, pt, lengths, (dec,), False,
                                                          runtime=rt)
        t2, _, _, cache, slots = steps.compute_and_sample(m.params, cfg, cache, slots, pt, lengths, (ch,), False,
                                                          runtime=rt)
        return t2
    def packed():
        global cache, slots
        t, _, _, cache, slots = steps.compute_and_sample(m.params, cfg, cache, slots, pt, lengths, (dec, ch), False,
                                                         runtime=rt)
        return t
    ts = {"separate": [], "packed": []}
    for f in (sep, packed): jax.block_until_ready(f())
    for _ in range(5):
        for name, f in (("separate", sep), ("packed", packed)):
            t = time.perf_counter(); jax.block_until_ready(f()); ts[name].append(1000 * (time.perf_counter() - t))
    print(f"C={C}", {k: round(statistics.median(v), 1) for k, v in ts.items()}, flush=True)
