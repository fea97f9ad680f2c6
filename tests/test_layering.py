"""The rooms of DESIGN.md ("Rooms and the direction of imports") and the direction of imports between them.

Every import of ours (jaxinfer, pallas_kernels) in every .py of jaxinfer/, pallas_kernels/ and scripts/, at module
top or inside a function, is read with ast and becomes an edge from the importer's room to the imported module's
room. An edge into a room the importer may not import fails; so does a module of jaxinfer/ or pallas_kernels/ that
no room claims (a new file must be placed here), and an entry point that imports an underscore name of ours.
No module is imported: a test of the source, milliseconds, no jax.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("jaxinfer", "pallas_kernels")  # the packages whose imports are checked
TREES = ("jaxinfer", "pallas_kernels", "scripts")  # the directories whose modules are read

# The rooms, bottom of the table first, and what each may import besides itself. "base" is not in DESIGN.md's
# table: plain-Python definitions the device core needs, so they must sit below it, and importing nothing of ours
# they can sit below everything except the kernels (which import no jaxinfer at all).
ROOMS = ("kernels", "base", "device core", "host library", "engine", "server", "front door", "entry points")
MAY_IMPORT = {
    "kernels": set(),
    "base": set(),
    "device core": {"base", "kernels"},
    "host library": {"base", "kernels", "device core", "front door"},
    "engine": {"base", "kernels", "device core", "host library", "front door"},
    # DESIGN.md: the server imports the engine and the tokenizer (which renders chat templates), never the device
    # core; base holds SamplingParams and ParameterError, the request's settings and the API's error.
    "server": {"base", "engine", "jaxinfer.tokenizer", "jaxinfer.chat_template"},
    "front door": set(ROOMS),  # jaxinfer/__init__.py maps public names from anywhere
    "entry points": set(ROOMS),  # public names only: see private_names
}
# Subtrees placed as a whole, by module-name prefix.
TREE_ROOMS = {
    "pallas_kernels": "kernels",
    "jaxinfer.cpu_kernels": "kernels",
    "jaxinfer.checkpoints": "host library",
    "jaxinfer.engine": "engine",
    "jaxinfer.server": "server",
    "scripts": "entry points",
}
# Every other module of jaxinfer/, with its room and the reason it sits there.
MODULE_ROOMS = {
    "jaxinfer": ("front door", "__init__.py: lazy public names (_EXPORTS) from any room"),
    "jaxinfer.__main__": ("entry points", "`python -m jaxinfer` runs cli.main"),
    "jaxinfer.cli": ("entry points", "the `jaxinfer` command: parse, call, print"),
    "jaxinfer.errors": ("base", "ParameterError, plain Python: raised by sampling_params, which the device core uses"),
    "jaxinfer.sampling_params": ("base", "SamplingParams, plain Python: sampling.py (device core) builds its arrays"),
    "jaxinfer.host_memory": ("base", "malloc_trim through ctypes, plain Python: the engine calls it when idle"),
    "jaxinfer.quant_modes": ("base", "the quantize= values, plain Python: the CLI checks them before jax loads"),
    "jaxinfer.config": ("device core", "ModelConfig, static under jit"),
    "jaxinfer.model": ("device core", "the decoder's forward pass"),
    "jaxinfer.kv_cache": ("device core", "the paged cache pytree and its writes"),
    "jaxinfer.attention": ("device core", "picks the XLA path, the reference or a kernel of pallas_kernels"),
    "jaxinfer.xla_attention": ("device core", "attention in plain XLA ops over the visible key blocks"),
    "jaxinfer.runtime": ("device core", "Runtime: attention backend, mesh, scanned layers; static under jit"),
    "jaxinfer.sampling": ("device core", "jitted sampling over per-sequence parameter arrays"),
    "jaxinfer.sharding": ("device core", "mesh, logical-axis rules, shard_map"),
    "jaxinfer.steps": ("device core", "the compiled steps generate.py and engine/runner.py dispatch"),
    "jaxinfer.quant": ("device core", "QuantArray: weights at their stored precision, einsum over them"),
    "jaxinfer.generate": ("host library", "generate, generate_stream and score: host-side batches over steps"),
    "jaxinfer.api": ("host library", "load_model, Model, Checkpoint: checkpoints + tokenizer + device core"),
    "jaxinfer.tokenizer": ("host library", "text <-> ids, host side; the server may import it too"),
    "jaxinfer.chat_template": ("host library", "Jinja chat templates, rendered by the tokenizer"),
    "jaxinfer.roofline": ("host library", "inference math on a ModelConfig, plain Python"),
    "jaxinfer.convert": ("host library", "load_model -> orbax: api and checkpoints"),
    "jaxinfer.page_allocator": ("host library", "host-side page bookkeeping for generate, outside every jit"),
    "jaxinfer.compilation_cache": ("host library", "configures jax's persistent cache for the API and the CLI"),
    "jaxinfer.progress": ("host library", "a stderr progress bar for loads and conversions"),
    "jaxinfer.timing": ("host library", "benchmark medians for the scripts; waits on the device, computes nothing"),
    "jaxinfer.trace_summary": ("host library", "reads a profiler trace back on the host"),
    "jaxinfer.prompt_spec": ("host library", "what the command line asks to generate, checked before any load"),
    "jaxinfer.chat_history": ("host library", "a chat's turns kept within the context, for the CLI's chat"),
    "jaxinfer.interrupts": ("host library", "Ctrl-C between C++ calls, for command lines and convert"),
}


@dataclasses.dataclass(frozen=True)
class Import:
    line: int
    target: str  # the module of ours whose code this import runs (for `from m import name`, m or m.name)
    name: str | None = None  # the name taken from it (from-import or attribute), None for the module itself


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def discover() -> dict[str, Path]:
    """module name -> source file, for every .py under TREES."""
    return {module_name(p): p for tree in TREES for p in sorted((ROOT / tree).rglob("*.py"))}


def front_door_exports() -> dict[str, str]:
    """jaxinfer/__init__.py's `_EXPORTS`: public name -> the module that defines it."""
    tree = ast.parse((ROOT / "jaxinfer" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("jaxinfer/__init__.py has no _EXPORTS dict")


def is_ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports(source: str, module: str, modules, exports: dict[str, str], *, is_package: bool = False) -> list[Import]:
    """Every import of ours in `source` (the code of `module`), wherever it sits: module top, function, branch.

    `from m import name` is an edge to the module m.name when there is one, else to m; through the front door
    (`from jaxinfer import Name`, or `jaxinfer.Name` after `import jaxinfer`) to the module _EXPORTS names for it.
    """
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> the module of ours it is bound to
    bare_front_door: list[int] = []  # lines of `import jaxinfer`: an edge to what it is used for

    def from_package(package: str, name: str) -> str:
        if f"{package}.{name}" in modules:
            return f"{package}.{name}"
        if package == "jaxinfer" and name in exports:
            return exports[name]
        return package

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not is_ours(alias.name):
                    continue
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
                if alias.name == "jaxinfer" and not alias.asname:
                    bare_front_door.append(node.lineno)
                else:
                    found.append(Import(node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            package = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                package = ".".join(parts + ([node.module] if node.module else []))
            if not is_ours(package):
                continue
            for alias in node.names:
                target = from_package(package, alias.name)
                submodule = target == f"{package}.{alias.name}"
                found.append(Import(node.lineno, target, None if submodule else alias.name))
                if submodule:
                    aliases[alias.asname or alias.name] = target
    front_door_uses = 0
    for node in ast.walk(tree):  # attributes of the modules bound above: jaxinfer.generate, gen._prefill
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            bound = aliases[node.value.id]
            if bound == "jaxinfer":
                front_door_uses += 1
                found.append(Import(node.lineno, from_package("jaxinfer", node.attr), node.attr))
            elif is_private(node.attr):
                found.append(Import(node.lineno, bound, node.attr))
    if not front_door_uses:
        found += [Import(line, "jaxinfer") for line in bare_front_door]
    return found


def room_of(module: str) -> str | None:
    if module in MODULE_ROOMS:
        return MODULE_ROOMS[module][0]
    trees = [t for t in TREE_ROOMS if module == t or module.startswith(t + ".")]
    return TREE_ROOMS[max(trees, key=len)] if trees else None


def upward_edges(module: str, found: list[Import], modules) -> list[str]:
    """Imports of `module` that go where its room may not (up the table, or sideways), or to no module at all."""
    room = room_of(module)
    if room is None:
        return [f"{module} is in no room"]
    allowed = MAY_IMPORT[room] | {room}
    bad = []
    for imp in found:
        target_room = room_of(imp.target)
        if imp.target not in modules or target_room is None:
            bad.append(f"{module}:{imp.line} imports {imp.target}, which is no module of ours or in no room")
        elif target_room not in allowed and imp.target not in allowed:
            bad.append(f"{module}:{imp.line} ({room}) imports {imp.target} ({target_room}); "
                       f"{room} may import only {sorted(allowed)}")
    return bad


def private_names(module: str, found: list[Import]) -> list[str]:
    """An entry point's imports of underscore names of ours (`from jaxinfer.generate import _prefill`)."""
    if room_of(module) != "entry points":
        return []
    return [f"{module}:{imp.line} uses the private name {imp.target}.{imp.name or ''}".rstrip(".")
            for imp in found
            if (imp.name and is_private(imp.name)) or any(is_private(p) for p in imp.target.split("."))]


@pytest.fixture(scope="module")
def graph():
    """(module -> source file, module -> its imports of ours), for every module under TREES."""
    modules, exports = discover(), front_door_exports()
    return modules, {m: imports(p.read_text(), m, modules, exports, is_package=p.name == "__init__.py")
                     for m, p in modules.items()}


def test_every_module_has_a_room():
    unplaced = [f"{path.relative_to(ROOT)} ({m})" for m, path in discover().items() if room_of(m) is None]
    assert not unplaced, f"place these in MODULE_ROOMS or TREE_ROOMS of tests/test_layering.py: {unplaced}"


def test_room_table_is_current():
    """Every room named is one of ROOMS; every module named exists, unless it is marked planned."""
    modules = discover()
    assert {room for room, _ in MODULE_ROOMS.values()} | set(TREE_ROOMS.values()) <= set(ROOMS)
    assert set(MAY_IMPORT) == set(ROOMS)
    stale = [m for m, (_, why) in MODULE_ROOMS.items() if m not in modules and not why.startswith("planned")]
    assert not stale, f"MODULE_ROOMS names modules that do not exist: {stale}"
    missing = {name: m for name, m in front_door_exports().items() if m not in modules}
    assert not missing, f"jaxinfer._EXPORTS points at modules that do not exist: {missing}"


def test_imports_go_down_the_table(graph):
    modules, edges = graph
    bad = [line for module, found in sorted(edges.items()) for line in upward_edges(module, found, modules)]
    assert not bad, "imports against DESIGN.md's rooms:\n" + "\n".join(bad)


def test_entry_points_use_public_names_only(graph):
    _, edges = graph
    bad = [line for module, found in sorted(edges.items()) for line in private_names(module, found)]
    assert not bad, "entry points reaching into the library:\n" + "\n".join(bad)


def test_the_checker_reports_what_it_must():
    """A fake kernel that imports jaxinfer, a device-core module reaching up to generate inside a function, a
    script taking a private name two ways, a base module importing the device core: each is reported."""
    modules, exports = discover(), front_door_exports()

    def check(source, module):
        found = imports(source, module, modules, exports)
        return upward_edges(module, found, modules) + private_names(module, found)

    assert check("from jaxinfer.attention import attention\n", "pallas_kernels.fake") != []
    assert check("import jax\n\ndef f():\n    from jaxinfer import generate\n", "jaxinfer.sampling") != []
    assert check("import jaxinfer\n\nx = jaxinfer.generate\n", "jaxinfer.model") != []  # through the front door
    assert check("from jaxinfer.config import ModelConfig\n", "jaxinfer.errors") != []
    assert check("from jaxinfer.kv_cache import init_cache\n", "jaxinfer.server.app") != []
    assert check("from jaxinfer.missing import thing\n", "jaxinfer.generate") != []
    assert check("from . import generate\n", "jaxinfer.model") != []  # relative imports resolve too
    assert check("def main():\n    from jaxinfer.generate import _prefill\n", "scripts.fake") != []
    assert check("from jaxinfer import generate as gen\n\ngen._prefill\n", "scripts.fake") != []
    # ...and what is allowed passes.
    assert check("from pallas_kernels.reference import attention_reference\n", "jaxinfer.attention") == []
    assert check("from jaxinfer import ModelConfig, generate\n", "jaxinfer.api") == []
    assert check("import jaxinfer\n\njaxinfer.generate(jaxinfer.__version__)\n", "scripts.fake") == []
    assert check("from jaxinfer.tokenizer import Tokenizer\n", "jaxinfer.server.app") == []
    assert check("from ..config import ModelConfig\n", "jaxinfer.engine.runner") == []
    # A new module must be placed; a new file under a placed subtree is placed with it.
    assert room_of("jaxinfer.brand_new") is None and room_of("pallas_kernels.brand_new") == "kernels"


DEVICE_CORE = {m for m, (room, _) in MODULE_ROOMS.items() if room == "device core"}


def test_only_the_runner_touches_jax_in_the_engine(graph):
    """DESIGN.md: the engine is plain Python + numpy; only engine/runner.py imports jax and the device core."""
    import ast

    modules, edges = graph
    bad = []
    for module, path in modules.items():
        if not module.startswith("jaxinfer.engine.") or module == "jaxinfer.engine.runner":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{module} imports {n}" for n in names if n == "jax" or n.startswith("jax.")]
        bad += [f"{module} imports {e.target}" for e in edges[module] if e.target in DEVICE_CORE]
    assert not bad, bad


def test_the_scheduler_loads_without_jax():
    """The host side of the engine (what its exact tests import) runs where jax is not even imported."""
    import subprocess
    import sys

    code = ("import sys, jaxinfer.engine.scheduler, jaxinfer.engine.batch; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('jax'))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
