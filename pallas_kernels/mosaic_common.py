"""What the Mosaic GPU (`plgpu.kernel`) attention bodies share: their input constraints, shared-memory
layout and budget, the choice between a Mosaic body and the generic (Triton) one, and the interpreter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # query rows per program: one wgmma tile, one warpgroup
SMEM_BYTES = 227 * 1024  # shared memory one block may take on an H100
IMPLEMENTATIONS = ("mosaic", "triton")
# Keys per ring step and ring slots, for both bodies. GUESSES until measured on the H100: 64 keys a step keeps
# q, K, V and p in 88 KB of shared memory at head_dim 128 with two slots, so two programs fit one SM.
DEFAULT_BLOCK_KEYS = 64
DEFAULT_STAGES = 2
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SWIZZLE_BYTES = 128


def unsupported_reason(q_dtype, head_dim: int, page_size: int, group: int) -> str | None:
    """Why the Mosaic bodies cannot take these inputs, or None when they can."""
    if jnp.dtype(q_dtype) not in _DTYPES:
        return f"dtype {jnp.dtype(q_dtype).name} is not 16-bit (bfloat16, float16)"
    if head_dim % 64:
        return f"head_dim={head_dim} is not a multiple of 64"
    if page_size % 8:
        return f"page_size={page_size} is not a multiple of 8"
    if group > ROWS:
        return f"num_heads // num_kv_heads = {group} exceeds {ROWS}"
    return None


def _jax_at_least_0_11() -> bool:
    return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def interpreter_available() -> bool:
    """Mosaic GPU's interpreter runs these bodies from jax 0.11 on (0.10's lacks `layout_cast`)."""
    return _jax_at_least_0_11()


def load(ref, layout):
    """The whole of a shared-memory ref into registers in `layout` (jax 0.10 wants an index, 0.11 deprecates it)."""
    if _jax_at_least_0_11():
        return plgpu.load(ref, layout=layout)
    return plgpu.load(ref, (), layout=layout)


def interpret_params(interpret: bool) -> dict:
    """plgpu.kernel's keyword for Mosaic GPU's own interpreter, or none."""
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return {"interpret": InterpretGPUParams()}


def pick_implementation(implementation: str | None, interpret: bool, q_dtype, head_dim: int, page_size: int,
                        group: int) -> str:
    """"mosaic" or "triton" for a wrapper's `implementation=`: None is "mosaic" on a GPU where the inputs
    allow it, else "triton" (the generic body, and the one the HLO interpreter runs on any jax)."""
    reason = unsupported_reason(q_dtype, head_dim, page_size, group)
    if implementation is None:
        on_gpu = not interpret and jax.default_backend() == "gpu"
        return "mosaic" if on_gpu and reason is None else "triton"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS} or None")
    if implementation == "mosaic":
        if reason is not None:
            raise ValueError(f"implementation='mosaic' cannot take these inputs: {reason}")
        if interpret and not interpreter_available():
            raise ValueError(f"implementation='mosaic' with interpret=True needs jax >= 0.11 "
                             f"(Mosaic GPU's interpreter); this is jax {jax.__version__}")
    return implementation


def ring_blocks(page_size: int, pages_per_block: int | None, num_stages: int | None, *,
                smem_bytes) -> tuple[int, int]:
    """(pages_per_block, num_stages) of a TMA ring, defaults filled in and checked.

    A block is whole wgmma tiles (a multiple of 64 keys): by default the fewest pages reaching
    DEFAULT_BLOCK_KEYS. smem_bytes(block_k, num_stages) -> bytes; more than an H100 SM holds is refused,
    naming both values.
    """
    if pages_per_block is None:
        pages_per_block = math.lcm(page_size, DEFAULT_BLOCK_KEYS) // page_size
    num_stages = DEFAULT_STAGES if num_stages is None else num_stages
    for name, value in (("pages_per_block", pages_per_block), ("num_stages", num_stages)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name}={value!r} must be a positive int")
    block_k = pages_per_block * page_size
    if block_k % 64:
        raise ValueError(f"pages_per_block={pages_per_block} x page_size={page_size} must be a multiple of 64 "
                         f"keys for implementation='mosaic' (a wgmma tile)")
    smem = smem_bytes(block_k, num_stages)
    if smem > SMEM_BYTES:
        raise ValueError(f"pages_per_block={pages_per_block}, num_stages={num_stages} need {smem // 1024} KiB of "
                         f"shared memory, more than the {SMEM_BYTES // 1024} KiB of a Hopper SM")
    return pages_per_block, num_stages


def smem_transforms(dtype) -> tuple:
    """Tiling and 128-byte swizzle of a [rows, cols] shared-memory tile that TMA fills and wgmma reads."""
    swizzle_elems = _SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(_SWIZZLE_BYTES)


def copy_block_to_ring(k_gmem, v_gmem, table_row, block, kv_head, slot, k_smem, v_smem, k_ready, v_ready):
    """TMA kv block `block` of one sequence, kv head `kv_head`, into ring slot `slot` of k_smem / v_smem
    [slots, block_k, H].

    table_row: the sequence's page-table row in GMEM (`table_gmem.at[b]`), its page indices read as scalars.
    One copy per page and per tensor; each slot's barrier was made with num_arrivals = pages per block, so
    it completes with the last page.
    """
    page_size = k_gmem.shape[2]
    pages_per_block = k_smem.shape[1] // page_size
    for j in range(pages_per_block):
        page = table_row[block * pages_per_block + j]
        dst = pl.ds(j * page_size, page_size)
        plgpu.copy_gmem_to_smem(k_gmem.at[kv_head, page], k_smem.at[slot, dst], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[kv_head, page], v_smem.at[slot, dst], v_ready.at[slot])


def fill_ring(fetch, first_block, num_iters, num_stages: int):
    """The prologue: fetch(block, slot) for the first num_stages of the num_iters blocks from first_block."""
    for i in range(num_stages):
        @pl.when(i < num_iters)
        def _prefetch():
            fetch(first_block + i, i)


def scores(q_smem, k_tile):
    """q_smem [64, H] @ k_tile [block_k, H]^T -> [64, block_k] float32 (wgmma, awaited)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC((q_smem.shape[0], k_tile.shape[0]), jnp.float32))


def weighted_values(p_smem, v_tile):
    """p_smem [64, block_k] @ v_tile [block_k, H] -> [64, H] float32 (wgmma, awaited: the slot may be refilled)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, p_smem, v_tile)
        return acc_ref[...]
    return pl.run_scoped(run, plgpu.ACC((p_smem.shape[0], v_tile.shape[1]), jnp.float32))
