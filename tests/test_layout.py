"""The repository's layout rules: imports go one way, and nothing refers outside the repository.

Import direction: pallas_kernels <- sharding <- m1jax <- experiments / benchmarks. Every import statement counts,
including those inside functions (a lazy import against the direction is still a dependency).
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("pallas_kernels", "sharding", "m1jax", "experiments", "benchmarks", "tests")
# package -> project packages it must not import
FORBIDDEN = {
    "pallas_kernels": {"sharding", "m1jax", "experiments", "benchmarks", "tests"},
    "sharding": {"m1jax", "experiments", "benchmarks", "tests"},
    "m1jax": {"experiments", "benchmarks", "tests"},
    "experiments": {"benchmarks", "tests"},
    "benchmarks": {"experiments", "tests"},
}
SKIP_DIRS = {".git", "__pycache__", "node_modules"}


def _python_files(package):
    for folder, dirs, names in os.walk(os.path.join(ROOT, package)):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        yield from (os.path.join(folder, n) for n in names if n.endswith(".py"))


def _imported_packages(path):
    """(line, top-level project package) for every absolute import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                yield node.lineno, top


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    bad = [f"{os.path.relpath(path, ROOT)}:{line} imports {top}"
           for path in _python_files(package) for line, top in _imported_packages(path)
           if top in FORBIDDEN[package]]
    assert not bad, "imports against pallas_kernels <- sharding <- m1jax <- experiments/benchmarks:\n" + "\n".join(bad)


def test_import_checker_sees_lazy_imports(tmp_path):
    """The checker is not vacuous: an import inside a function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from m1jax.model import init_model\n    import experiments.train\n")
    assert list(_imported_packages(str(probe))) == [(2, "m1jax"), (3, "experiments")]


# Text that points outside the repository: the developers' background folder, its spec files, or a machine's paths.
# Section citations of that background spec (the word spec followed by a section number); cite docs/ instead.
OUTSIDE = re.compile(r"\.\./shared|(^|[^a-z_])spec/[a-z-]+\.md|DESIGN\.md|/wor" r"k/|/ro" r"ot/"
                     r"|\bspec[ -](section |sections |pitfall )?\d|\b(jax" r"-notes|m1-arch" r"itecture|rl-ci" r"spo)(\.md)?\b"
                     r"|\bperformance\.md")
TEXT_SUFFIXES = (".py", ".md", ".cfg", ".toml", ".txt", ".sh", ".yaml", ".yml", ".json")


def _repository_text_files():
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".venv") and d != ".whl"
                   and not d.endswith(".egg-info")]
        rel = os.path.relpath(folder, ROOT)
        if rel.startswith(os.path.join("tests", "data")):
            continue  # MiniMax's published metadata files, verbatim
        for name in names:
            if name.endswith(TEXT_SUFFIXES) or name in ("run",):
                yield os.path.join(folder, name)


def test_nothing_refers_outside_the_repository():
    bad = []
    for path in _repository_text_files():
        try:
            text = open(path, encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()[:120]}")
    assert not bad, "references outside the repository (write what is needed into docs/):\n" + "\n".join(bad)


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Fresh machine: two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_gives_two_commands_and_ci_runs_the_test_command():
    commands = _readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    main_job, tests = commands
    assert "experiments.rl" in main_job and "pytest" in tests and "'.[test]'" in tests
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert tests in ci, "the CI script must run the README's test command verbatim"


def test_readme_commands_refuse_an_old_python_at_once(tmp_path):
    """The commands' first step stops an interpreter older than 3.12 with one line, before a venv is made."""
    import subprocess
    import sys
    check = _readme_commands()[0].split(" && ")[0]
    code = check.split("-c ", 1)[1].strip("'")
    old = code.replace("sys.version_info >= (3, 12)", "(3, 11) >= (3, 12)")
    proc = subprocess.run([sys.executable, "-c", old], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("m1jax needs Python >= 3.12")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0
    assert not os.listdir(tmp_path)
