"""The README's PyTorch example against the package (torch is not installed in CI): it parses,
every ``mole.<name>`` it calls exists, and every name it imports from ``mole.torch`` is defined
there with the methods the example calls on it."""

import ast
import pathlib
import re

import mole

ROOT = pathlib.Path(__file__).resolve().parents[2]


def example():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python example in the README's Python section"
    return ast.parse(blocks[0])


def test_the_example_calls_what_the_package_has():
    tree = example()
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "mole"}
    assert used, "the example calls nothing of mole"
    missing = sorted(name for name in used if not hasattr(mole, name))
    assert not missing, f"the README's example calls mole.{missing}, which the package lacks"

    torch_module = ast.parse((ROOT / "python" / "mole" / "torch.py").read_text())
    classes = {n.name: {f.name for f in n.body if isinstance(f, ast.FunctionDef)}
               for n in torch_module.body if isinstance(n, ast.ClassDef)}
    imported = {a.asname or a.name: a.name for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module == "mole.torch" for a in n.names}
    assert imported, "the example imports nothing from mole.torch"
    for local, name in imported.items():
        assert name in classes, f"mole.torch has no {name}"
        calls = {n.attr for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == local}
        assert calls <= classes[name], f"mole.torch.{name} lacks {sorted(calls - classes[name])}"
