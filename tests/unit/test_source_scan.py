"""A scan of the package source (ast, not grep): nothing that turns bytes from a socket or a file
into code or objects — no pickle / marshal / dill / shelve, no eval / exec / compile of strings, no
torch.load without weights_only=True, no yaml.load without a safe loader, no shell=True or
os.system / os.popen — and trust_remote_code off by default."""
import ast
import pathlib

import meshserve
from meshserve.config import LlmArgs

PACKAGE = pathlib.Path(meshserve.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "shelve", "cloudpickle", "jsonpickle"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else None)
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            yield node, name, owner


def _kw(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def scan(package: pathlib.Path) -> list[str]:
    """One line per forbidden import or call in the package's source."""
    problems = []
    files = sorted(package.rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(package.parent)
        safe_loaders = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                        and any("SafeLoader" in ast.unparse(b) for b in n.bases)}  # subclasses of yaml.SafeLoader
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{rel}:{node.lineno} import {a.name}" for a in node.names
                             if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{rel}:{node.lineno} from {node.module} import ...")
        for node, name, owner in _calls(tree):
            where = f"{rel}:{node.lineno}"
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{where} {name}(...)")
            if name == "load" and owner == "torch":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where} torch.load without weights_only=True")
            if name == "load" and owner == "yaml":
                loader = _kw(node, "Loader")
                if loader is None or not ("SafeLoader" in ast.unparse(loader) or ast.unparse(loader) in safe_loaders):
                    problems.append(f"{where} yaml.load without a safe Loader")
            shell = _kw(node, "shell")
            if isinstance(shell, ast.Constant) and shell.value is True:
                problems.append(f"{where} {name}(..., shell=True)")
            if owner == "os" and name in ("system", "popen"):
                problems.append(f"{where} os.{name}(...)")
    return problems


def test_no_unsafe_deserialisation_or_code_execution_in_the_package():
    assert len(list(PACKAGE.rglob("*.py"))) > 100
    problems = scan(PACKAGE)
    assert not problems, "\n".join(problems)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan itself: a file with each forbidden pattern is reported, line by line."""
    bad = tmp_path / "meshserve"
    bad.mkdir()
    (bad / "bad.py").write_text("import pickle\nimport yaml, torch, os, subprocess\neval('1')\ntorch.load('x')\n"
                                "yaml.load(s)\nsubprocess.run('ls', shell=True)\nos.system('ls')\n"
                                "torch.load('y', weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\n")
    lines = scan(bad)
    assert [line.split(" ", 1)[0] for line in lines] == [f"meshserve/bad.py:{i}" for i in (1, 3, 4, 5, 6, 7)], lines


def test_trust_remote_code_is_off_by_default():
    assert LlmArgs().trust_remote_code is False
