"""The C++ kernels of this package, compiled on the machine that runs them and registered with jax.ffi once per process.

The first call that needs a kernel compiles SOURCES with the system C++ compiler into a shared library in the cache
directory, named by a hash of everything that went into it (sources, flags, the compiler's version, the running
jaxlib's version: each jaxlib builds against its own FFI headers, since a library built with newer headers failed to
register on an older jaxlib and took the CPU backend down with it). A file lock and an atomic rename keep two
processes from building at once or seeing half a file; a later process loads the library it finds.

    JAXINFER_CPU_KERNELS=auto|on|off   auto (default): use the kernels where they built; off: never;
                                       on: a failed build is an error
    JAXINFER_CPU_KERNELS_DIR=DIR       where the libraries are cached
                                       (default: $XDG_CACHE_HOME/jaxinfer/cpu_kernels, else ~/.cache/...)
    CXX=COMPILER                       the C++ compiler (default: g++)
    JAXINFER_CPU_KERNELS_SPIN_US=N     how long the kernels' helper threads spin for the next call before they
                                       sleep (default 200); 0: no helpers of their own, XLA's pool only

Under auto a failure (no compiler, a compile error, a library that will not load) is one logged line, the first
error line of the compiler included, and `available()` is False: the caller keeps its XLA path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import jax
import jaxlib

MODE_ENV = "JAXINFER_CPU_KERNELS"
DIR_ENV = "JAXINFER_CPU_KERNELS_DIR"
CXX_ENV = "CXX"
ISA_ENV = "JAXINFER_CPU_KERNELS_ISA"
# Compiled, but never yet run on a CPU that has them (the machines so far had AVX2 only): used only where
# $JAXINFER_CPU_KERNELS_ISA names one, so that a machine with AVX-512 runs the AVX2 code the tests have checked.
UNVERIFIED_ISAS = ("avx512",)


def usable_isas(isas: tuple[str, ...], best: int) -> tuple[str, ...]:
    """The instruction sets a kernel may use, lowest first: isas[:best] (what the CPU runs), less UNVERIFIED_ISAS
    unless the environment asks for one by name."""
    runs = isas[:best]
    if os.environ.get(ISA_ENV) in UNVERIFIED_ISAS:
        return runs
    return tuple(isa for isa in runs if isa not in UNVERIFIED_ISAS)
MODES = ("auto", "on", "off")

SOURCE_DIR = Path(__file__).resolve().parent
# every file the build reads: all of them go into the hash
SOURCES = ("parallel_for.h", "qmatmul.cc", "qmatmul_x86.inc", "fmatmul.cc", "paged_attention.cc",
           "paged_attention_tile.inc")
MAIN_SOURCES = ("qmatmul.cc", "fmatmul.cc", "paged_attention.cc")  # the translation units
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# FFI handler symbol -> the target name jax.ffi.ffi_call uses.
HANDLERS = {
    "jaxinfer_qmatmul_q8_0": "jaxinfer_qmatmul_q8_0",
    "jaxinfer_qmatmul_q4_0": "jaxinfer_qmatmul_q4_0",
    "jaxinfer_qmatmul_int4_g32_min": "jaxinfer_qmatmul_int4_g32_min",
    "jaxinfer_qmatmul_many_q8_0": "jaxinfer_qmatmul_many_q8_0",
    "jaxinfer_qmatmul_many_q4_0": "jaxinfer_qmatmul_many_q4_0",
    "jaxinfer_qmatmul_many_int4_g32_min": "jaxinfer_qmatmul_many_int4_g32_min",
    "jaxinfer_fmatmul": "jaxinfer_fmatmul",
    "jaxinfer_fmatmul_many": "jaxinfer_fmatmul_many",
    "jaxinfer_paged_attention": "jaxinfer_paged_attention",
}
BUILD_TIMEOUT_S = 600

log = logging.getLogger(__name__)
_state_lock = threading.Lock()  # one build and one registration per process, whichever thread asks first


class KernelsUnavailable(RuntimeError):
    """The kernels could not be built or loaded (raised to the caller only under JAXINFER_CPU_KERNELS=on)."""


@dataclasses.dataclass(frozen=True)
class Library:
    """The loaded kernels: the library, where it lies, the best instruction set its CPU checks found."""

    path: Path
    handle: ctypes.CDLL
    best_isa: int  # qmatmul.cc's Isa: 1 scalar, 2 avx2, 3 avx512
    built_s: float | None  # seconds this process spent compiling it; None: found in the cache


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r} must be one of {MODES}")
    return value


def cache_dir() -> Path:
    """Where built libraries are kept: beside jaxinfer's XLA compilation cache unless DIR_ENV says otherwise."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxinfer" / "cpu_kernels"


def compiler() -> list[str]:
    return shlex.split(os.environ.get(CXX_ENV) or "g++")


def compiler_version(cxx: list[str]) -> str:
    """`cxx --version`'s output; KernelsUnavailable when the compiler is missing or fails."""
    try:
        done = subprocess.run([*cxx, "--version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelsUnavailable(f"no C++ compiler {shlex.join(cxx)!r} ({e})") from None
    if done.returncode != 0:
        raise KernelsUnavailable(f"C++ compiler {shlex.join(cxx)!r} failed: {_first_error(done.stderr + done.stdout)}")
    return done.stdout


def build_flags() -> list[str]:
    return [*FLAGS, f"-I{jax.ffi.include_dir()}"]


def library_key(cxx: list[str], version: str) -> str:
    """A hash of everything the build reads: the sources, the command, the compiler, jaxlib, the machine."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    for part in (*cxx, *FLAGS, version, jaxlib.__version__, platform.machine()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def _first_error(output: str) -> str:
    """The compiler's first error line (else its last line): the one line a fallback notice shows."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]  # gcc's and clang's "file:line: error: ..."
    return (errors or lines or ["no output"])[0][:300]


def _compile(cxx: list[str], target: Path) -> None:
    """Compile into a temporary file beside target, then rename it into place (atomic on one file system)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    command = [*cxx, *build_flags(), *(str(SOURCE_DIR / s) for s in MAIN_SOURCES), "-o", tmp]
    try:
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KernelsUnavailable(f"{shlex.join(cxx)} could not build the kernels ({e})") from None
        if done.returncode != 0:
            raise KernelsUnavailable(f"{shlex.join(cxx)} failed to build the kernels: "
                                     f"{_first_error(done.stderr + done.stdout)}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def built_library() -> tuple[Path, float | None]:
    """The library for this machine and jaxlib, built under a file lock unless the cache has it -> (path, seconds
    spent building, None when found)."""
    cxx = compiler()
    version = compiler_version(cxx)
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelsUnavailable(f"cannot create {directory} ({e})") from None
    target = directory / f"jaxinfer_cpu_kernels-{library_key(cxx, version)}.so"
    if target.exists():
        return target, None
    with open(directory / f"{target.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this very library
        if target.exists():
            return target, None
        start = time.perf_counter()
        _compile(cxx, target)
        return target, time.perf_counter() - start


def _load() -> Library:
    path, built_s = built_library()
    try:
        handle = ctypes.cdll.LoadLibrary(str(path))
        handle.jaxinfer_cpu_kernels_best_isa.restype = ctypes.c_int64
        for symbol, target in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:
        raise KernelsUnavailable(f"cannot load {path} ({e})") from None
    if built_s is not None:
        log.info("built the CPU kernels in %.1f s: %s", built_s, path)
    return Library(path, handle, int(handle.jaxinfer_cpu_kernels_best_isa()), built_s)


@functools.cache
def _state() -> tuple[Library | None, str]:
    """(the library, "") or (None, why not): built, loaded and registered at most once per process."""
    chosen = mode()
    if chosen == "off":
        return None, f"{MODE_ENV}=off"
    try:
        return _load(), ""
    except KernelsUnavailable as e:
        if chosen == "on":
            raise
        reason = str(e)
    log.warning("jaxinfer CPU kernels off, using XLA: %s", reason)
    return None, reason


def _locked_state() -> tuple[Library | None, str]:
    with _state_lock:
        return _state()


def available() -> bool:
    """Whether the kernels are built and registered (building them on first call; the mode is read then, once per
    process). Under JAXINFER_CPU_KERNELS=on a failed build raises KernelsUnavailable."""
    return _locked_state()[0] is not None


def unavailable_reason() -> str:
    """One line: why available() is False ("" when it is True)."""
    return _locked_state()[1]


def library() -> Library:
    """The loaded library; KernelsUnavailable naming the reason when there is none."""
    lib, reason = _locked_state()
    if lib is None:
        raise KernelsUnavailable(f"jaxinfer CPU kernels unavailable: {reason}")
    return lib
