"""Orbax checkpoints: convert a model once, then restore it fast, every tensor checked against a manifest.

A checkpoint is a directory:

    jaxinfer_config.json   ModelConfig.to_dict()
    manifest.json          per tensor (keyed by pytree path, e.g. "layers.wq"; a quantized weight's parts
                           "layers.wq.parts.values", ...): shape, dtype, sha256 of its raw bytes; per quantized
                           weight its jaxinfer.quant layout ("quantization": {"layers.wq": "int4_g32_min"}); per
                           extra file: size, sha256. Written last: it marks a complete checkpoint.
    params/                the Params pytree, written by orbax.checkpoint (OCDBT + zarr under tensorstore)
    tokenizer.json ...     extra files from the caller, verbatim

Orbax's stored data carries no checksum a reader checks: a flipped byte in a data file restores as a wrong
weight without any error. So load_orbax hashes every restored tensor and refuses any that differ from the
manifest. Saves are atomic: everything is written into a temporary sibling directory, fsync'd, and renamed
to the destination last, so a failed save leaves nothing at the destination.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model, quant, sharding
from jaxinfer.config import ModelConfig
from jaxinfer.errors import is_int

CONFIG_FILE = "jaxinfer_config.json"
MANIFEST_FILE = "manifest.json"
PARAMS_DIR = "params"
_FORMAT = "jaxinfer-orbax"
# 2: layer weights stacked on a leading layer axis ("layers.wq" [L, D, N, H]); 1: one tensor per layer
# ("layers.0.wq"), refused with a message to convert again (the source checkpoint converts in seconds).
_VERSION = 2
_RESERVED = (CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR)


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError("orbax checkpoints need the orbax-checkpoint package: pip install orbax-checkpoint") from e
    return ocp


# ---------------------------------------------------------------------------------------------
# Tensor names and checksums


def _key_name(key) -> str:
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    raise AssertionError(f"unexpected pytree key {key!r} in Params")


def named_leaves(tree, is_leaf=None) -> dict[str, Any]:
    """{"embed": leaf, "layers.wq": leaf, ...} in pytree order; None fields (tied lm_head) are not leaves.
    A QuantArray's parts are leaves ("layers.wq.parts.values"), unless is_leaf stops at it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def quantization(params) -> dict[str, str]:
    """{weight name: quant layout} of the QuantArrays in params (the manifest's "quantization" table)."""
    return {name: w.layout for name, w in named_leaves(params, is_leaf=quant.is_quant).items() if quant.is_quant(w)}


def abstract_params(cfg: ModelConfig, layouts: dict[str, str]) -> model.Params:
    """model.abstract_params with the weights named in layouts ({"layers.wq": "q8_0"}) as QuantArrays of
    ShapeDtypeStructs (stacked layers: what a checkpoint stores)."""
    specs = model.param_specs(cfg)
    named = named_leaves(specs, is_leaf=lambda x: isinstance(x, model.TensorSpec))
    unknown = sorted(set(layouts) - {n for n, s in named.items() if s.geometry is not None})
    bad = sorted({layout for layout in layouts.values() if layout not in quant.LAYOUTS})
    if unknown or bad:
        raise ValueError(f"quantization table names {unknown or bad}: not quantizable weights / layouts")

    def leaf(name: str, spec: model.TensorSpec):
        if name not in layouts:
            return jax.ShapeDtypeStruct(spec.shape, cfg.jnp_dtype)
        lead = 1 if spec.axes[0] == "layers" else 0
        return quant.abstract(layouts[name], spec.shape, spec.geometry, cfg.dtype, lead_ndim=lead)

    leaves = [leaf(n, s) for n, s in named.items()]
    return jax.tree.unflatten(jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, model.TensorSpec)), leaves)


def _sha256(a: np.ndarray) -> str:
    # The C-order bytes of the array: what a reader gets back whatever layout the writer had.
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _describe(x) -> tuple[list[int], str, str]:
    """(shape, dtype name, sha256) of one tensor, copied to the host if it is not there."""
    a = np.asarray(x)
    return list(a.shape), a.dtype.name, _sha256(a)


def _describe_all(arrays: list) -> Iterator[tuple[list[int], str, str]]:
    """_describe of each, in order, on a few threads: hashlib releases the GIL, one thread hashes ~2 GB/s."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        yield from pool.map(_describe, arrays)


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------------------------------------
# Save


def is_orbax_checkpoint(path: str | Path) -> bool:
    """A directory with our config and manifest (the manifest is written last, so a half-written save has none)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / MANIFEST_FILE).is_file()


def save_orbax(
    cfg: ModelConfig,
    params: model.Params,
    dst: str | Path,
    *,
    extra_files: dict[str, bytes] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write params (matching abstract_params(cfg), in either layer layout) as an orbax checkpoint at dst.

    extra_files: {file name: bytes} written verbatim beside the weights (tokenizer.json, ...).
    progress(done, total): called after each tensor is checksummed (orbax has written the data by then).
    overwrite: replace an existing jaxinfer orbax checkpoint (or empty directory) at dst; anything else is refused.
    Single process: multi-host saves are not handled yet.
    """
    dst = check_destination(dst, overwrite)
    params = model.with_layout(params, "scanned")  # the stored layout: stacked layers (a copy if unrolled)
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files)
    tensors = named_leaves(params)
    layouts = quantization(params)
    _check_params(cfg, tensors, layouts)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        ocp = _ocp()
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        manifest_tensors = {}
        for i, (name, (shape, dtype, digest)) in enumerate(
            zip(tensors, _describe_all(list(tensors.values())), strict=True)
        ):
            manifest_tensors[name] = {"shape": shape, "dtype": dtype, "sha256": digest}
            if progress is not None:
                progress(i + 1, len(tensors))
        _write_file(tmp / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2).encode())
        for name, data in extra_files.items():
            _write_file(tmp / name, data)
        manifest = {
            "format": _FORMAT,
            "version": _VERSION,
            "orbax_checkpoint_version": ocp.__version__,
            "tensors": manifest_tensors,
            "files": {name: _file_entry(data) for name, data in extra_files.items()},
        }
        if layouts:
            manifest["quantization"] = layouts
        _write_file(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        _fsync_tree(tmp)
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def check_destination(dst: str | Path, overwrite: bool = False) -> Path:
    """dst as save_orbax will write it, refused before any work if it cannot be: it exists (and not overwrite,
    or is not ours to replace), or nothing can be created where it would go. -> the absolute path."""
    dst = Path(dst).absolute()
    _check_dst(dst, overwrite)
    ancestor = dst.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot write {dst}: {ancestor} is not a directory")
    try:  # a real probe: os.access says yes to root on a read-only mount such as /proc
        os.rmdir(tempfile.mkdtemp(prefix=f".{dst.name}.probe-", dir=ancestor))
    except OSError as e:
        raise ValueError(f"cannot write {dst}: {ancestor}: {e.strerror or e}") from None
    return dst


def _check_dst(dst: Path, overwrite: bool) -> None:
    if not dst.exists():
        return
    if not overwrite:
        raise ValueError(f"{dst} already exists; pass overwrite=True to replace it")
    if not dst.is_dir() or not (is_orbax_checkpoint(dst) or not any(dst.iterdir())):
        raise ValueError(f"refusing to overwrite {dst}: it is not a jaxinfer orbax checkpoint or an empty directory")


def _check_extra_files(extra_files: dict[str, bytes]) -> None:
    for name, data in extra_files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"extra file name {name!r} must be a plain file name")
        if name in _RESERVED:
            raise ValueError(f"extra file name {name!r} is reserved (reserved: {list(_RESERVED)})")
        if not isinstance(data, bytes):
            raise TypeError(f"extra file {name!r} must be bytes, got {type(data).__name__}")


def _check_params(cfg: ModelConfig, tensors: dict[str, Any], layouts: dict[str, str]) -> None:
    expected = named_leaves(abstract_params(cfg, layouts))
    problems = [f"missing tensor {name}" for name in expected if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in expected]
    for name, x in tensors.items():
        if name in expected:
            want, got = expected[name], (tuple(np.shape(x)), jnp.dtype(x.dtype).name)
            if got != (want.shape, want.dtype.name):
                problems.append(f"tensor {name} is {got}, expected {(want.shape, want.dtype.name)}")
    if problems:
        raise ValueError("params do not match the config:\n  " + "\n  ".join(problems))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file, then every directory bottom-up: the data is on disk before the rename publishes it."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def _move_into_place(tmp: Path, dst: Path) -> None:
    old = None
    if dst.exists():  # overwrite, checked by _check_dst: move the old one aside, put the new one in
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.replace(old / dst.name, dst)
            old.rmdir()
        raise
    _fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Load


def load_orbax(
    path: str | Path,
    dtype: str | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    shardings: model.Params | None = None,
    mesh=None,
) -> tuple[ModelConfig, model.Params]:
    """-> (cfg, params), every tensor's bytes verified against the manifest before anything is returned.

    dtype: "float32" | "bfloat16" | "float16", cast after verification; None keeps the saved dtype.
    progress(done, total): called after each tensor is verified (orbax has read them all by then).
    shardings: a Params pytree of jax.sharding.Sharding passed to orbax, which restores each tensor straight
    onto them; None restores to host memory and puts each tensor on the default device. Verification reads
    every tensor back to the host, so the arrays must be fully addressable (single process).
    mesh: a tensor-parallel mesh to restore onto, its shardings derived from the stored (maybe quantized) params.
    Quantized weights (the manifest's "quantization" table) come back as QuantArrays in their stored layout.
    """
    path = Path(path).absolute()
    cfg, manifest = _read_metadata(path)
    out_cfg = cfg if dtype is None else cfg.replace(dtype=dtype)  # validates dtype before the slow part
    try:
        abstract = abstract_params(cfg, manifest.get("quantization", {}))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"orbax checkpoint {path}: garbled {MANIFEST_FILE}: {e}") from e
    if mesh is not None:
        pspecs = sharding.pspecs_like(abstract, cfg, sharding.tp_size(mesh))
        shardings = jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), pspecs)
    expected = named_leaves(abstract)

    listed = manifest["tensors"]
    problems = _manifest_problems(expected, listed)
    problems += _extra_file_problems(path, manifest["files"])
    if not (path / PARAMS_DIR).is_dir():
        problems.append(f"missing orbax data directory {PARAMS_DIR}/")
        raise ValueError(f"orbax checkpoint {path} is incomplete:\n  " + "\n  ".join(problems))

    # Restore and verify even when the manifest has problems, so that one error names every bad tensor.
    arrays, unreadable = _restore(path / PARAMS_DIR, abstract, shardings)
    problems += unreadable
    # Tensors whose manifest entry is missing or disagrees with the config are named already.
    checkable = {name: a for name, a in arrays.items() if name in listed and _agrees(listed[name], expected[name])}
    described = zip(checkable, _describe_all(list(checkable.values())), strict=True)
    for i, (name, (shape, stored_dtype, digest)) in enumerate(described):
        entry = listed[name]
        if (shape, stored_dtype) != (entry["shape"], entry["dtype"]):
            stored, listed_as = f"{tuple(shape)} {stored_dtype}", f"{tuple(entry['shape'])} {entry['dtype']}"
            problems.append(f"tensor {name}: stored as {stored}, manifest says {listed_as}")
        elif digest != entry["sha256"]:
            problems.append(f"tensor {name}: sha256 mismatch, its stored bytes are corrupted")
        if progress is not None:
            progress(i + 1, len(checkable))
    if problems:
        raise ValueError(f"orbax checkpoint {path} is corrupted or incomplete:\n  " + "\n  ".join(problems))

    def finish(a, want):
        a = jnp.asarray(a) if shardings is None else a
        return a.astype(out_cfg.jnp_dtype) if want.dtype == cfg.jnp_dtype else a  # float weights take dtype

    leaves = [finish(arrays[name], want) for name, want in expected.items()]
    params = jax.tree.unflatten(jax.tree.structure(abstract), leaves)
    return out_cfg, jax.tree.map(lambda w: _with_dtype(w, out_cfg.dtype), params, is_leaf=quant.is_quant)


def _with_dtype(w, dtype: str):
    """A restored QuantArray dequantizes to the loaded dtype; anything else as it is."""
    return dataclasses.replace(w, dtype=dtype) if quant.is_quant(w) else w


def stored_bytes(path: str | Path, cfg: ModelConfig) -> int:
    """Bytes of the weights as load_orbax(path, cfg.dtype) holds them: a quantized weight's parts as stored (the
    manifest's shapes and dtypes), float weights in cfg.dtype."""
    _, manifest = _read_metadata(Path(path).absolute())
    total = 0
    for name, entry in manifest["tensors"].items():
        quantized = ".parts." in name
        itemsize = np.dtype(quant.numpy_dtype(entry["dtype"])).itemsize if quantized else cfg.jnp_dtype.itemsize
        total += int(np.prod(entry["shape"])) * itemsize
    return total


def read_orbax_config(path: str | Path, dtype: str | None = None) -> ModelConfig:
    """The checkpoint's ModelConfig alone, no tensor restored (load_config; the shardings a sharded load_orbax
    restores onto). dtype as for load_orbax."""
    cfg = _read_metadata(Path(path).absolute())[0]
    return cfg if dtype is None else cfg.replace(dtype=dtype)


def _read_metadata(path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    if not path.is_dir():
        raise ValueError(f"orbax checkpoint {path} does not exist or is not a directory")
    missing = [name for name in (CONFIG_FILE, MANIFEST_FILE) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path} is not a complete jaxinfer orbax checkpoint: missing {missing}")
    try:
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"orbax checkpoint {path}: unreadable {CONFIG_FILE}: {e}") from e
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except ValueError as e:
        raise ValueError(f"orbax checkpoint {path}: garbled {MANIFEST_FILE}: {e!r}") from e
    _check_version(path, manifest)
    try:
        _check_manifest_format(manifest)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"orbax checkpoint {path}: garbled {MANIFEST_FILE}: {e!r}") from e
    return cfg, manifest


def _check_version(path: Path, manifest) -> None:
    """An older layout of ours is refused with what to do; a newer one with which version reads it."""
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        return  # not ours: _check_manifest_format names it
    version = manifest.get("version")
    if is_int(version) and version < _VERSION:
        raise ValueError(
            f"orbax checkpoint {path} has layout version {version} (one tensor per layer), written by an older "
            f"jaxinfer; this one reads version {_VERSION} (layers stacked). Convert the original checkpoint again: "
            f"jaxinfer convert SRC {path} --overwrite"
        )
    if is_int(version) and version > _VERSION:
        raise ValueError(
            f"orbax checkpoint {path} has layout version {version}, newer than this jaxinfer reads ({_VERSION}); "
            "upgrade jaxinfer"
        )


def _check_manifest_format(manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise ValueError(f"not a {_FORMAT} manifest")
    if manifest.get("version") != _VERSION:
        raise ValueError(f"manifest version {manifest.get('version')!r}, this reader knows version {_VERSION}")
    for section, fields in (("tensors", ("shape", "dtype", "sha256")), ("files", ("size", "sha256"))):
        entries = manifest.get(section)
        if not isinstance(entries, dict):
            raise TypeError(f"manifest has no {section!r} table")
        for name, entry in entries.items():
            if not (isinstance(entry, dict) and all(f in entry for f in fields)):
                raise ValueError(f"manifest {section} entry {name!r} lacks one of {fields}")


def _manifest_problems(expected: dict[str, jax.ShapeDtypeStruct], listed: dict[str, Any]) -> list[str]:
    problems = [f"missing tensor {name} (not in the manifest)" for name in expected if name not in listed]
    problems += [f"unexpected tensor {name} in the manifest" for name in listed if name not in expected]
    for name, want in expected.items():
        entry = listed.get(name)
        if entry is not None and not _agrees(entry, want):
            listed_as, wanted = f"{tuple(entry['shape'])} {entry['dtype']}", f"{want.shape} {want.dtype.name}"
            problems.append(f"tensor {name}: manifest says {listed_as}, the config expects {wanted}")
    return problems


def _agrees(entry: dict[str, Any], want: jax.ShapeDtypeStruct) -> bool:
    return (entry["shape"], entry["dtype"]) == (list(want.shape), want.dtype.name)


def _extra_file_problems(path: Path, files: dict[str, Any]) -> list[str]:
    problems = []
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"missing file {name}")
        elif _file_entry(f.read_bytes()) != {"size": entry["size"], "sha256": entry["sha256"]}:
            problems.append(f"file {name}: size or sha256 differs from the manifest")
    return problems


def _restore(params_dir: Path, abstract: model.Params, shardings) -> tuple[dict[str, Any], list[str]]:
    """-> ({name: array} of the tensors that could be read, problems). One orbax call; per tensor if that fails."""
    ocp = _ocp()
    leaves, treedef = jax.tree.flatten(abstract)
    names = list(named_leaves(abstract))
    if shardings is None:
        restore_args = [ocp.RestoreArgs(restore_type=np.ndarray) for _ in leaves]
    else:
        sharding_leaves, sharding_treedef = jax.tree.flatten(shardings)
        if sharding_treedef != treedef:
            raise ValueError(f"shardings must have the structure of the params: {sharding_treedef} != {treedef}")
        restore_args = [ocp.ArrayRestoreArgs(sharding=s) for s in sharding_leaves]

    def restore(keep: Callable[[int], bool]) -> list[Any]:
        item = [leaf if keep(i) else ocp.PLACEHOLDER for i, leaf in enumerate(leaves)]
        args = [arg if keep(i) else ocp.PLACEHOLDER for i, arg in enumerate(restore_args)]
        with ocp.PyTreeCheckpointer() as checkpointer:
            out = checkpointer.restore(
                params_dir,
                args=ocp.args.PyTreeRestore(
                    item=jax.tree.unflatten(treedef, item), restore_args=jax.tree.unflatten(treedef, args)
                ),
            )
        return treedef.flatten_up_to(out)

    try:
        return dict(zip(names, restore(lambda i: True), strict=True)), []
    except Exception as whole_error:  # orbax / tensorstore raise many types; find out which tensors fail
        arrays, problems = {}, []
        for i, name in enumerate(names):
            try:
                arrays[name] = restore(lambda j, i=i: j == i)[i]
            except Exception as e:
                problems.append(f"tensor {name}: could not be read: {_first_line(e)}")
        if not problems:
            problems.append(f"orbax restore failed: {_first_line(whole_error)}")
        return arrays, problems


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."
