"""Orbax checkpoints: bit-exact round trips from HF, every corrupted tensor named, atomic saves."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

import jaxinfer  # noqa: E402
from conftest import random_prompts  # noqa: E402
from jaxinfer import model  # noqa: E402
from jaxinfer.checkpoints import orbax_ckpt  # noqa: E402
from jaxinfer.checkpoints.orbax_ckpt import is_orbax_checkpoint, load_orbax, named_leaves, save_orbax  # noqa: E402

TOKENIZER_BYTES = b'{"version": "1.0"}\r\n\x00\xff not utf-8, kept verbatim'


def assert_bit_exact(got: model.Params, want: model.Params) -> None:
    """Bit-equal weights, compared in the stored (stacked) layout whatever layout each was loaded in."""
    got, want = model.with_layout(got, "scanned"), model.with_layout(want, "scanned")
    assert jax.tree.structure(got) == jax.tree.structure(want)
    got, want = named_leaves(got), named_leaves(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert a.tobytes() == b.tobytes(), name


@pytest.fixture(scope="module")
def saved(hf_checkpoint, tmp_path_factory):
    """(orbax checkpoint of the llama3 HF model in float32, with a tokenizer.json; the loaded Model). Read only."""
    path, _ = hf_checkpoint("llama3")
    m = jaxinfer.load_model(path, layout="scanned")  # the stored layout, so its params compare with load_orbax's
    dst = tmp_path_factory.mktemp("orbax") / "llama3"
    save_orbax(m.cfg, m.params, dst, extra_files={"tokenizer.json": TOKENIZER_BYTES})
    return dst, m


@pytest.fixture
def copied(saved, tmp_path):
    """A private copy of the saved checkpoint to damage."""
    return shutil.copytree(saved[0], tmp_path / "ckpt")


def data_files(ckpt) -> list:
    """orbax's files under params/, largest first (the largest holds tensor data, not metadata)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt / orbax_ckpt.PARAMS_DIR) for f in fs]
    return sorted(files, key=os.path.getsize, reverse=True)


def raw_orbax_restore(ckpt, cfg) -> dict[str, np.ndarray]:
    """Straight through orbax, no manifest check: what a reader without checksums would get."""
    abstract = model.abstract_params(cfg)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    with ocp.PyTreeCheckpointer() as checkpointer:
        out = checkpointer.restore(
            ckpt / orbax_ckpt.PARAMS_DIR, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
        )
    return named_leaves(out)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama3", "qwen2"])  # qwen2: tied lm_head (None) and qkv biases
def test_hf_to_orbax_round_trip_is_bit_exact(hf_checkpoint, tmp_path, family, dtype):
    path, _ = hf_checkpoint(family)
    m = jaxinfer.load_model(path, dtype=dtype)
    assert save_orbax(m.cfg, m.params, tmp_path / "ckpt") == tmp_path / "ckpt"
    assert is_orbax_checkpoint(tmp_path / "ckpt")
    cfg, params = load_orbax(tmp_path / "ckpt")
    assert cfg == m.cfg
    assert_bit_exact(params, m.params)
    assert (params.lm_head is None) == (family == "qwen2")
    if family == "llama3":  # one compile per dtype is enough: equal params give equal logits
        (ids,) = random_prompts(m.cfg.vocab_size, [11])
        same_layout = model.with_layout(params, model.layout_of(m.params))  # one program: bit-equal logits
        np.testing.assert_array_equal(jaxinfer.score(jaxinfer.Model(cfg, same_layout), ids), jaxinfer.score(m, ids))


def test_load_with_dtype_casts_after_verification(saved, hf_checkpoint):
    path, _ = hf_checkpoint("llama3")
    cfg, params = load_orbax(saved[0], dtype="bfloat16")
    want = jaxinfer.load_model(path, dtype="bfloat16")
    assert cfg == want.cfg
    assert_bit_exact(params, want.params)
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_orbax(saved[0], dtype="int8")


def test_restore_onto_target_shardings(saved):
    dst, m = saved
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, m.params)
    shardings.embed = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
    _, params = load_orbax(dst, shardings=shardings)
    assert params.embed.sharding == shardings.embed and params.final_norm.sharding == replicated
    assert_bit_exact(params, m.params)


def test_extra_files_are_written_verbatim_and_progress_is_per_tensor(saved, tmp_path):
    dst, m = saved
    assert (dst / "tokenizer.json").read_bytes() == TOKENIZER_BYTES
    calls = []
    save_orbax(m.cfg, m.params, tmp_path / "p", progress=lambda done, total: calls.append((done, total)))
    n = len(named_leaves(m.params))
    assert calls == [(i, n) for i in range(1, n + 1)]
    calls.clear()
    load_orbax(tmp_path / "p", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, n) for i in range(1, n + 1)]
    manifest = json.loads((dst / "manifest.json").read_text())
    assert list(manifest["tensors"]) == list(named_leaves(m.params))  # keyed by pytree path: "layers.wq"
    assert jaxinfer.ModelConfig.from_dict(json.loads((dst / "jaxinfer_config.json").read_text())) == m.cfg


@pytest.mark.parametrize(
    "extra, error",
    [
        ({"manifest.json": b"x"}, "reserved"),
        ({"../escape": b"x"}, "plain file name"),
        ({"a/b": b"x"}, "plain file name"),
    ],
)
def test_bad_extra_file_names_are_refused(saved, tmp_path, extra, error):
    _, m = saved
    with pytest.raises(ValueError, match=error):
        save_orbax(m.cfg, m.params, tmp_path / "ckpt", extra_files=extra)
    assert os.listdir(tmp_path) == []


def test_params_that_do_not_match_the_config_are_refused(saved, tmp_path):
    _, m = saved
    with pytest.raises(ValueError, match=r"tensor embed is \(\(256, 64\), 'float32'\), expected .*'bfloat16'"):
        save_orbax(m.cfg.replace(dtype="bfloat16"), m.params, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="unexpected tensor lm_head"):
        save_orbax(m.cfg.replace(tie_embeddings=True), m.params, tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


# When one read of a multi-tensor restore fails, orbax closes its event loop while tensorstore still completes
# the other reads, whose callbacks then print "RuntimeError: Event loop is closed". Noise, not our error.
orbax_closed_loop_noise = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@orbax_closed_loop_noise
def test_flipped_byte_in_a_data_file_is_named(copied, saved):
    _, m = saved
    tensors = {name: np.asarray(x).tobytes() for name, x in named_leaves(m.params).items()}
    data_file = data_files(copied)[0]
    original = open(data_file, "rb").read()
    # orbax zstd-compresses each tensor without a content checksum, so most flipped bytes restore as wrong
    # weights without any error. Find such a byte: orbax alone returns changed tensor bytes and says nothing.
    for at in [len(original) * k // 8 for k in range(1, 8)]:
        data = bytearray(original)
        data[at] ^= 0x10
        with open(data_file, "wb") as f:
            f.write(data)
        try:
            raw = raw_orbax_restore(copied, m.cfg)
        except Exception:  # this byte broke a zstd frame, which orbax does notice; try another
            continue
        changed = [name for name in tensors if raw[name].tobytes() != tensors[name]]
        if changed:
            break
    else:
        pytest.fail(f"no flipped byte in {data_file} changed a tensor silently")

    with pytest.raises(ValueError) as err:
        load_orbax(copied)
    msg = str(err.value)
    assert str(copied) in msg
    assert msg.count("sha256 mismatch") == len(changed)
    for name in changed:
        assert f"tensor {name}: sha256 mismatch" in msg


@orbax_closed_loop_noise
def test_truncated_data_file_is_named(copied):
    data_file = data_files(copied)[0]
    data = open(data_file, "rb").read()
    with open(data_file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"(?s)ckpt is corrupted.*tensor \S+: could not be read"):
        load_orbax(copied)


def test_deleted_manifest(copied):
    (copied / "manifest.json").unlink()
    assert not is_orbax_checkpoint(copied)
    with pytest.raises(
        ValueError, match=r"ckpt is not a complete jaxinfer orbax checkpoint: missing \['manifest.json'\]"
    ):
        load_orbax(copied)


def _edit_manifest(edit):
    def apply(ckpt):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        edit(manifest)
        (ckpt / "manifest.json").write_text(json.dumps(manifest))

    return apply


def _garble(ckpt):
    (ckpt / "manifest.json").write_bytes(b'{"format": "jaxinfer-orbax", "tens')


@pytest.mark.parametrize(
    "damage, error",
    [
        (_garble, r"ckpt: garbled manifest.json"),
        (_edit_manifest(lambda m: m["tensors"].pop("layers.w_up")), r"missing tensor layers.w_up"),
        (_edit_manifest(lambda m: m["tensors"]["final_norm"].update(sha256="0" * 64)), r"tensor final_norm: sha256"),
        (_edit_manifest(lambda m: m["tensors"]["embed"].update(dtype="float16")), r"tensor embed: manifest says"),
        (_edit_manifest(lambda m: m.update(version=99)), r"layout version 99, newer than this jaxinfer reads \(2\)"),
        (_edit_manifest(lambda m: m.update(version="2")), r"manifest version '2', this reader knows version 2"),
        (lambda ckpt: (ckpt / "tokenizer.json").write_bytes(b"{}"), r"file tokenizer.json: size or sha256 differs"),
        (lambda ckpt: shutil.rmtree(ckpt / "params"), r"missing orbax data directory"),
    ],
    ids=["garbled", "missing-entry", "wrong-sha", "wrong-dtype", "version", "version-str", "extra-file", "no-params"],
)
def test_damaged_manifest_or_files(copied, damage, error):
    damage(copied)
    with pytest.raises(ValueError, match=error):
        load_orbax(copied)


def test_old_per_layer_layout_is_refused_with_what_to_do(copied):
    """A version-1 checkpoint (one tensor per layer, "layers.0.wq") names its version and the command to run."""
    def per_layer(m):
        m["version"] = 1
        stacked = [name for name in m["tensors"] if name.startswith("layers.")]
        for name in stacked:
            entry = m["tensors"].pop(name)
            for i in range(entry["shape"][0]):
                m["tensors"][name.replace("layers.", f"layers.{i}.")] = dict(entry, shape=entry["shape"][1:])

    _edit_manifest(per_layer)(copied)
    with pytest.raises(ValueError) as err:
        load_orbax(copied)
    assert str(err.value) == (
        f"orbax checkpoint {copied} has layout version 1 (one tensor per layer), written by an older jaxinfer; "
        f"this one reads version 2 (layers stacked). Convert the original checkpoint again: "
        f"jaxinfer convert SRC {copied} --overwrite"
    )


def test_every_bad_tensor_is_named_in_one_error(copied):
    _edit_manifest(lambda m: [m["tensors"][n].update(sha256="0" * 64) for n in ("embed", "layers.wq")])(copied)
    _edit_manifest(lambda m: m["tensors"].pop("lm_head"))(copied)
    with pytest.raises(ValueError) as err:
        load_orbax(copied)
    msg = str(err.value)
    for expected in ("tensor embed: sha256 mismatch", "tensor layers.wq: sha256 mismatch", "missing tensor lm_head"):
        assert expected in msg


# ---------------------------------------------------------------------------------------------
# Atomic saves


def _fail_in_progress(monkeypatch):
    def progress(done, total):
        if done == 3:
            raise KeyboardInterrupt  # BaseException too: the temporary directory must still go

    return {"progress": progress}


def _fail_after_orbax(monkeypatch):
    save = ocp.PyTreeCheckpointer.save

    def save_then_fail(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "save", save_then_fail)
    return {}


def _fail_writing_manifest(monkeypatch):
    write = orbax_ckpt._write_file

    def write_or_fail(path, data):
        if path.name == "manifest.json":
            raise OSError("disk full")
        write(path, data)

    monkeypatch.setattr(orbax_ckpt, "_write_file", write_or_fail)
    return {}


def _fail_before_rename(monkeypatch):
    def fail(root):
        raise OSError("fsync failed")

    monkeypatch.setattr(orbax_ckpt, "_fsync_tree", fail)
    return {}


@pytest.mark.parametrize("fail", [_fail_in_progress, _fail_after_orbax, _fail_writing_manifest, _fail_before_rename])
def test_interrupted_save_leaves_nothing(saved, tmp_path, monkeypatch, fail):
    _, m = saved
    kwargs = fail(monkeypatch)
    with pytest.raises((OSError, KeyboardInterrupt)):
        save_orbax(m.cfg, m.params, tmp_path / "ckpt", extra_files={"tokenizer.json": b"{}"}, **kwargs)
    assert os.listdir(tmp_path) == []  # no dst, no temporary sibling
    with pytest.raises(ValueError, match="does not exist"):
        load_orbax(tmp_path / "ckpt")


def test_existing_destination(saved, tmp_path, monkeypatch):
    dst, m = saved
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"{tmp_path / 'ckpt'} already exists; pass overwrite=True"):
        save_orbax(m.cfg, m.params, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="refusing to overwrite .*not a jaxinfer orbax checkpoint"):
        save_orbax(m.cfg, m.params, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"

    old = shutil.copytree(dst, tmp_path / "old")
    _fail_before_rename(monkeypatch)
    with pytest.raises(OSError):
        save_orbax(m.cfg, m.params, old, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "old"]
    assert (old / "tokenizer.json").read_bytes() == TOKENIZER_BYTES  # the old checkpoint is untouched
    monkeypatch.undo()
    save_orbax(m.cfg, m.params, old, overwrite=True)  # replaced, without the tokenizer this time
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "old"]
    assert not (old / "tokenizer.json").exists()
    assert_bit_exact(load_orbax(old)[1], m.params)
