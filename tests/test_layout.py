"""The house rules of the package, checked on its source (AST) and in a fresh interpreter.

- Each heavy import lives in its room: Ray in capture/ and the Ray Train adapter; transformers in capture/teacher,
  capture/generate (Hugging Face generate), the Hugging Face adapter and demo/; vLLM in capture/generate; zarr in
  formats/zarr; fsspec (and its s3/gcs filesystems) in store; Lightning in its adapter; matplotlib in tools/report
  and demo/.
- The folders are stages of one data flow; nothing imports a later stage (`STAGES`).
- Nothing outside demo/ (and cli.py, which runs it) imports kdcache.demo.
- `import kdcache.losses` loads neither pyarrow nor Ray (a trainer process pays for torch alone).
- Every module opens with a docstring; no module re-exports another's name under `__all__` (one address per name).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdcache"

# Heavy third-party packages -> module name prefixes (dotted, relative to kdcache) allowed to import them.
ROOMS: dict[str, tuple[str, ...]] = {
    "ray": ("capture.", "integrations.ray_train"),
    "transformers": ("capture.teacher", "capture.generate", "integrations.hf_trainer", "demo."),
    "vllm": ("capture.generate",),
    "tokenizers": ("capture.teacher", "demo."),
    "accelerate": ("capture.teacher",),
    "zarr": ("formats.zarr",),
    "fsspec": ("store",),
    "s3fs": ("store",),
    "gcsfs": ("store",),
    "lightning": ("integrations.lightning",),
    "matplotlib": ("tools.report", "demo."),
}

# The stages in data-flow order; a module may import its own stage and earlier ones only. "base" is the shared
# foundation (errors, config, store, codec, telemetry, manifest, identity); cli sits on top of everything.
STAGES = ("base", "formats", "capture", "read", "losses", "integrations", "tools", "demo", "cli")


def stage_of(module: str) -> str:
    """The stage of a dotted module name relative to kdcache ("" is the package itself)."""
    head = module.split(".", 1)[0]
    if head in STAGES:
        return head
    return "cli" if head in ("", "__init__") else "base"


def package_modules() -> dict[str, Path]:
    """Dotted names relative to kdcache ("read.dataset", "formats", "" for kdcache/__init__.py) -> path."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, inside functions and TYPE_CHECKING blocks too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import (kdcache uses absolute imports)")
            found.append((node.lineno, node.module))
            if node.module == "kdcache":  # from kdcache import losses -> kdcache.losses
                found += [(node.lineno, f"kdcache.{alias.name}") for alias in node.names]
    return found


def violations(modules: dict[str, Path]) -> list[str]:
    """Every broken rule of the house, one line each (empty: the layout holds)."""
    problems = []
    for name, path in modules.items():
        where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
        for line, imported in imports_of(path):
            top = imported.split(".", 1)[0]
            if top in ROOMS and not any(name == p.rstrip(".") or name.startswith(p) for p in ROOMS[top]):
                problems.append(f"{where}:{line}: imports {imported}, which belongs in {', '.join(ROOMS[top])}")
            if top != "kdcache" or imported == "kdcache":
                continue
            target = imported.split(".", 1)[1]
            if stage_of(target) == "demo" and stage_of(name) not in ("demo", "cli"):
                problems.append(f"{where}:{line}: imports {imported}; only demo/ and cli.py may use the demo")
            if STAGES.index(stage_of(target)) > STAGES.index(stage_of(name)):
                problems.append(
                    f"{where}:{line}: {stage_of(name)} imports {imported} of the later stage {stage_of(target)}"
                )
    return problems


def test_heavy_imports_stay_in_their_rooms_and_stages_only_look_back():
    problems = violations(package_modules())
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_broken_rule(tmp_path):
    """A scratch module that breaks each rule once is reported once per rule (the checker is not vacuous)."""
    scratch = tmp_path / "scratch.py"
    scratch.write_text('"""Scratch."""\nimport ray\nfrom kdcache.read.dataset import KDCacheDataset\nimport zarr\n')
    demo_user = tmp_path / "demo_user.py"
    demo_user.write_text('"""Scratch."""\nfrom kdcache.demo.assets import prepare_demo\n')
    found = violations({"formats.scratch": scratch, "read.demo_user": demo_user})
    assert len(found) == 5, found  # ray, zarr, later stage (read), demo outside demo/, demo is a later stage
    assert any("ray" in p for p in found) and any("zarr" in p for p in found)
    assert any("later stage read" in p for p in found) and any("only demo/" in p for p in found)


def test_losses_import_neither_pyarrow_nor_ray():
    code = (
        "import sys, kdcache, kdcache.losses\n"
        "heavy = sorted(m for m in ('pyarrow', 'ray', 'transformers', 'fsspec') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert kdcache.losses.distillation_loss is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_losses_and_integrations_are_attributes_of_the_package():
    code = "import kdcache\nprint(kdcache.losses.__name__, kdcache.integrations.__name__)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["kdcache.losses", "kdcache.integrations"]


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_every_module_opens_with_a_docstring_and_defines_what_it_exports(name):
    path = package_modules()[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert ast.get_docstring(tree), f"{path}: no module docstring"
    exported = next(
        (
            ast.literal_eval(node.value)
            for node in tree.body
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
        ),
        [],
    )
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdcache")
        for alias in node.names
    }
    shims = sorted(set(exported) & imported)
    assert not shims, f"{path}: re-exports {shims} (one address per name: import them from where they are defined)"
