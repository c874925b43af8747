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
