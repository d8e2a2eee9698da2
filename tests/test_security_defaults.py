"""Security defaults that no single feature test owns: nothing unpickles, servers bind loopback. (That the API
key stays out of the server's log is checked under load, in tests/test_reliability_load.py.)

The scans read the code and the docs as text, so a new offender anywhere fails here with its file:line,
and the scanners themselves are tested on snippets so that a silent scanner cannot pass.
"""

import ast
import re
from pathlib import Path

import click
import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
CODE = ("cli", "flows", "tasks", "models", "benchmarks")
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
UNSAFE_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "joblib.load",
    "pandas.read_pickle",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.full_load",
    "yaml.full_load_all",
    "eval",
    "exec",
}
UNSAFE_MODULES = {"cloudpickle", "dill", "shelve"}
SERVER = re.compile(r"\b(mlflow server|mlflow ui|prefect server start|strata serve)(?![-\w])")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class UnsafeLoads(ast.NodeVisitor):
    """Calls that can run code hidden in data, resolved through the module's imports (``np`` → ``numpy``)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)
            self.names[alias.asname or alias.name.split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self._check_module(node, node.module or "")
        for alias in node.names:
            self.names[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        unpicklers = [b for b in node.bases if self._dotted(b) in ("pickle.Unpickler", "_pickle.Unpickler")]
        if unpicklers and not any(isinstance(s, ast.FunctionDef) and s.name == "find_class" for s in node.body):
            self.found.append((node.lineno, f"{node.name} unpickles without restricting find_class"))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        problem = None
        if name in UNSAFE_CALLS:
            problem = f"{name}()"
        elif name == "torch.load" and not _is_constant(keywords.get("weights_only"), True):
            problem = "torch.load() without weights_only=True"
        elif name == "numpy.load" and not _is_constant(keywords.get("allow_pickle", ast.Constant(False)), False):
            problem = "numpy.load() with allow_pickle"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if not (self._dotted(loader) or "").endswith("SafeLoader"):
                problem = f"{name}() without a SafeLoader"
        if problem:
            self.found.append((node.lineno, problem))
        self.generic_visit(node)

    def _check_module(self, node: ast.stmt, module: str) -> None:
        if module.split(".")[0] in UNSAFE_MODULES:
            self.found.append((node.lineno, f"imports {module}"))

    def _dotted(self, node: ast.expr | None) -> str | None:
        if isinstance(node, ast.Name):
            return self.names.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            owner = self._dotted(node.value)
            return f"{owner}.{node.attr}" if owner else None
        return None


def _is_constant(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, path: str) -> list[str]:
    scanner = UnsafeLoads()
    scanner.visit(ast.parse(source))
    return [f"{path}:{line}: {problem}" for line, problem in scanner.found]


def python_files() -> list[Path]:
    return sorted(p for folder in CODE for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize(
    ("snippet", "line", "problem"),
    [
        ("import pickle\n\npickle.loads(data)", 3, "pickle.loads()"),
        ("from pickle import load as read\nread(handle)", 2, "pickle.load()"),
        ("import pickle\nclass Loader(pickle.Unpickler):\n    pass", 2, "Loader unpickles without restricting"),
        ("import torch\ntorch.load(path)", 2, "torch.load() without weights_only=True"),
        ("from torch import load\nload(path, weights_only=False)", 2, "torch.load() without weights_only=True"),
        ("import numpy as np\nnp.load(path, allow_pickle=True)", 2, "numpy.load() with allow_pickle"),
        ("import yaml\nyaml.load(text)", 2, "yaml.load() without a SafeLoader"),
        ("import yaml\nyaml.load(text, yaml.Loader)", 2, "yaml.load() without a SafeLoader"),
        ("import yaml\nyaml.unsafe_load(text)", 2, "yaml.unsafe_load()"),
        ("import joblib\njoblib.load(path)", 2, "joblib.load()"),
        ("import cloudpickle", 1, "imports cloudpickle"),
        ("from dill import loads", 1, "imports dill"),
        ("eval(text)", 1, "eval()"),
        ("def f(code):\n    exec(code)", 2, "exec()"),
    ],
)
def test_the_scanner_reports_each_unsafe_load_with_its_line(snippet, line, problem):
    found = unsafe_loads(snippet, "x.py")
    assert len(found) == 1 and found[0].startswith(f"x.py:{line}: {problem}"), found


def test_the_scanner_accepts_safe_loading():
    safe = """
import pickle, yaml, torch
import numpy as np
class Restricted(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(name)
torch.load(path, map_location="cpu", weights_only=True)
np.load(path)
np.load(path, allow_pickle=False)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
model.eval()
pickle.dumps(value)
"""
    assert unsafe_loads(safe, "x.py") == []


def test_no_production_code_loads_pickles_or_evaluates_strings():
    files = python_files()
    assert len(files) > 50 and ROOT / "tasks" / "data" / "readers.py" in files
    found = [line for path in files for line in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


def server_commands(text: str) -> list[tuple[str, bool]]:
    """Each piece of a text (Markdown, or a string the code prints) naming a server, and whether it is a
    command to run.

    A line in a fenced block always is; elsewhere an inline code span, or the line when it has none, is a
    command only with options (a bare `mlflow server` in a sentence names the program and leaves the host
    to its default, which another test checks).
    """
    pieces, fenced = [], False
    for line in text.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            pieces += [(segment, True) for segment in re.split(r"\s#\s", line)]
        else:
            pieces += [(piece, "--" in piece) for piece in re.findall(r"`+([^`]+)`+", line) or [line]]
    return [(piece, command) for piece, command in pieces if SERVER.search(piece)]


def unsafe_binds(pieces: list[tuple[str, bool]]) -> list[str]:
    problems = []
    for piece, command in pieces:
        host = re.search(r"--host[ =]([\w.:-]+)", piece)
        if SERVER.search(piece)[1] == "strata serve":
            if host and host[1] not in LOOPBACK and "STRATA_SERVE_API_KEY" not in piece:
                problems.append(f"{piece!r} binds {host[1]} without STRATA_SERVE_API_KEY")
        elif (command or host) and not (host and host[1] == "127.0.0.1"):
            problems.append(f"{piece!r} lacks --host 127.0.0.1")
    return problems


def code_strings(source: str) -> list[str]:
    """Every string literal of a module, f-strings with ``{}`` for their fields (what the CLI prints)."""
    tree, parts, strings = ast.parse(source), set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
            strings.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    strings += [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts
    ]
    return strings


@pytest.mark.parametrize(
    ("markdown", "problem"),
    [
        (
            "```bash\nmlflow server --backend-store-uri sqlite:///m.db \\\n    --port 5000\n```",
            "lacks --host 127.0.0.1",
        ),
        ("```\nprefect server start &   # the UI\n```", "lacks --host 127.0.0.1"),
        ("Run `mlflow ui --host 0.0.0.0` to share it.", "lacks --host 127.0.0.1"),
        ("```\nstrata serve --model-dir x --host 0.0.0.0\n```", "binds 0.0.0.0 without STRATA_SERVE_API_KEY"),
    ],
)
def test_the_docs_scanner_reports_a_public_or_unpinned_bind(markdown, problem):
    found = unsafe_binds(server_commands(markdown))
    assert len(found) == 1 and problem in found[0], found


def test_the_docs_scanner_accepts_loopback_and_keyed_binds():
    markdown = (
        "```\nprefect server start --host 127.0.0.1   # then open http://127.0.0.1:4200\n"
        "STRATA_SERVE_API_KEY=k strata serve --learner pets --host 0.0.0.0\nstrata serve-flows\n```\n"
        "`mlflow server` on PostgreSQL; `strata serve --learner pets` follows the alias."
    )
    assert len(server_commands(markdown)) == 4
    assert unsafe_binds(server_commands(markdown)) == []


def test_every_documented_or_printed_server_command_binds_loopback():
    pieces = [p for doc in DOCS for p in server_commands((ROOT / doc).read_text())]
    pieces += [p for path in python_files() for text in code_strings(path.read_text()) for p in server_commands(text)]
    assert sum(command for _, command in pieces) >= 5  # README's and scaling.md's commands, the demo's hints
    assert any("mlflow ui" in piece for piece, _ in pieces)  # the demo's printed hint was read
    assert unsafe_binds(pieces) == []


def test_servers_left_to_their_defaults_bind_loopback():
    from mlflow.cli import cli as mlflow_cli
    from prefect.settings.models.server.api import ServerAPISettings

    from strata.cli.app import app

    strata = typer.main.get_command(app)
    context = click.Context(mlflow_cli)
    commands = [
        strata.commands["serve"],
        mlflow_cli.get_command(context, "server"),
        mlflow_cli.get_command(context, "ui"),
    ]
    assert [next(p.default for p in c.params if p.name == "host") for c in commands] == ["127.0.0.1"] * 3
    assert ServerAPISettings.model_fields["host"].default == "127.0.0.1"
