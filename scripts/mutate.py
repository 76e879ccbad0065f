#!/usr/bin/env python3
"""Mutation testing for one module at a time: plant one small bug, run that module's tests, restore, repeat.

    python scripts/mutate.py m1jax/losses.py                      # the module's default tests (DEFAULT_TESTS)
    python scripts/mutate.py m1jax/rl/losses.py tests/rl/test_rl_losses.py --timeout 300
    python scripts/mutate.py m1jax/losses.py --list               # only print the mutants
    python scripts/mutate.py m1jax/losses.py --lines 90-130 --only 3,7 --json out.json

A surviving mutant is a plausible bug the tests do not notice: either a missing test, or an equivalent mutant (same
behaviour, e.g. ``<`` vs ``<=`` where the two never differ) that a reader should recognise and leave. Run on demand,
from the repository root, never in CI (one full test run per mutant: minutes to an hour per module).

Mutants come from the module's AST, one node at a time, each spliced back into the unchanged source (comments and
layout elsewhere stay as they are): arithmetic operator swaps (+ -, * /, // /, ** *), dropped terms and factors
(``a + b`` -> ``a``, ``b``; ``a * b`` -> ``a``), removed unary minus / not, flipped comparisons (< <=, > >=, == !=,
is / is not, in / not in), and/or swaps, numeric constants changed (n -> n + 1, n - 1; x -> 2x; 0 -> 1), True/False
swaps, slice bounds off by one, swapped if-else branches and ``where`` branches, dropped ``stop_gradient``, and
numeric function swaps (max/min, maximum/minimum, sum/mean, any/all, exp/log). Never mutated: docstrings, strings,
f-strings, annotations, ``raise`` and ``assert`` statements (error messages).

Self-contained (standard library only) rather than mutmut: mutmut 3 copies the project into a ``mutants/`` tree and
instruments every function with trampolines, which does not fit JAX code traced under ``jit``/``custom_vjp`` (the
trampoline runs at trace time only) and would add a dependency for a tool run by hand; splicing one mutant into the
real file and running the real tests needs neither. Safety: the original bytes are restored after every mutant and on
exit, Ctrl-C or SIGTERM, and the module's cached bytecode is removed so a stale ``.pyc`` never masks a mutant (the
test subprocess runs with PYTHONDONTWRITEBYTECODE=1).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# module -> the tests that specify it (used when no tests are given on the command line)
DEFAULT_TESTS = {
    "m1jax/losses.py": ["tests/train/test_losses.py", "tests/model/test_lm_head.py"],
    "m1jax/rl/losses.py": ["tests/rl/test_rl_losses.py", "tests/rl/test_rl_losses_edges.py"],
    "m1jax/layers/embed.py": ["tests/model/test_lm_head.py", "tests/train/test_losses.py"],
}

BINOP_SWAPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult, ast.FloorDiv],
               ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv], ast.Pow: [ast.Mult],
               ast.BitAnd: [ast.BitOr], ast.BitOr: [ast.BitAnd]}
COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}
FUNCTION_SWAPS = {"max": "min", "min": "max", "maximum": "minimum", "minimum": "maximum", "sum": "mean",
                  "mean": "sum", "any": "all", "all": "any", "exp": "log", "log": "exp", "argmax": "argmin"}
# fields that hold annotations, never mutated
ANNOTATION_FIELDS = {("arg", "annotation"), ("FunctionDef", "returns"), ("AsyncFunctionDef", "returns"),
                     ("AnnAssign", "annotation")}


@dataclasses.dataclass(frozen=True)
class Mutant:
    index: int
    line: int
    start: tuple[int, int]  # (line, utf-8 byte column) of the replaced node, 1-based line
    end: tuple[int, int]
    replacement: str
    description: str


def _text(node: ast.AST) -> str:
    return "(" + ast.unparse(node) + ")"


def _replaced(node, **changes):
    new = copy.deepcopy(node)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def _call_name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def node_mutations(node: ast.AST, source: bytes):
    """(target node, replacement source, description) for every mutant of ``node`` itself (not its children)."""
    seg = _segment(source, node)
    out = []
    if isinstance(node, ast.BinOp):
        for op in BINOP_SWAPS.get(type(node.op), []):
            out.append((node, _text(_replaced(node, op=op())), f"operator -> {type(op()).__name__}"))
        if isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)):
            out.append((node, _text(node.left), "drop right operand"))
        if isinstance(node.op, (ast.Add, ast.Mult)):
            out.append((node, _text(node.right), "drop left operand"))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        out.append((node, _text(node.operand), f"drop unary {type(node.op).__name__}"))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            swapped = list(node.ops)
            swapped[i] = COMPARE_SWAPS[type(op)]()
            out.append((node, _text(_replaced(node, ops=swapped)), f"{type(op).__name__} -> "
                        f"{type(swapped[i]).__name__}"))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append((node, _text(_replaced(node, op=other)), "and <-> or"))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append((node, repr(not node.value), "flip bool"))
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        v = node.value
        if isinstance(v, int):
            for new in ({v + 1, v - 1} if v != 0 else {1}):
                out.append((node, repr(new), f"constant {v} -> {new}"))
        else:
            new = 2 * v if v != 0 else 1.0
            out.append((node, repr(new), f"constant {v} -> {new}"))
    elif isinstance(node, ast.IfExp):
        out.append((node, _text(_replaced(node, body=node.orelse, orelse=node.body)), "swap if-else branches"))
    elif isinstance(node, ast.Call):
        name = _call_name(node.func)
        if name == "stop_gradient" and len(node.args) == 1:
            out.append((node, _text(node.args[0]), "drop stop_gradient"))
        if name == "where" and len(node.args) == 3:
            c, a, b = node.args
            out.append((node, _text(_replaced(node, args=[c, b, a])), "swap where branches"))
        if name in FUNCTION_SWAPS and isinstance(node.func, ast.Attribute):
            func = _replaced(node.func, attr=FUNCTION_SWAPS[name])
            out.append((node, _text(_replaced(node, func=func)), f"{name} -> {FUNCTION_SWAPS[name]}"))
    elif isinstance(node, ast.Slice):
        for field in ("lower", "upper"):
            bound = getattr(node, field)
            if bound is not None and not isinstance(bound, ast.Constant):  # constants already mutate as constants
                for sign in ("+", "-"):
                    out.append((bound, f"({_segment(source, bound)}) {sign} 1", f"slice {field} bound {sign} 1"))
    return [(target, rep, f"{desc}: {seg if len(seg) < 70 else seg[:67] + '...'}") for target, rep, desc in out]


def _is_docstring(node: ast.AST) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def generate(source: bytes) -> list[Mutant]:
    tree = ast.parse(source)
    found = []

    def walk(node):
        if isinstance(node, (ast.JoinedStr, ast.Raise, ast.Assert)) or _is_docstring(node):
            return
        if hasattr(node, "lineno"):
            for target, rep, desc in node_mutations(node, source):
                found.append(((target.lineno, target.col_offset), (target.end_lineno, target.end_col_offset), rep,
                              desc))
        for field, value in ast.iter_fields(node):
            if (type(node).__name__, field) in ANNOTATION_FIELDS:
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    walk(child)

    walk(tree)
    return [Mutant(i, start[0], start, end, rep, desc) for i, (start, end, rep, desc) in enumerate(found)]


def _offsets(source: bytes) -> list[int]:
    starts, pos = [0], 0
    for line in source.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def _segment(source: bytes, node: ast.AST) -> str:
    starts = _offsets(source)
    a = starts[node.lineno - 1] + node.col_offset
    b = starts[node.end_lineno - 1] + node.end_col_offset
    return " ".join(source[a:b].decode().split())


def apply(source: bytes, m: Mutant) -> bytes:
    starts = _offsets(source)
    a = starts[m.start[0] - 1] + m.start[1]
    b = starts[m.end[0] - 1] + m.end[1]
    return source[:a] + m.replacement.encode() + source[b:]


class Restorer:
    """Writes the original bytes back after each mutant, at exit and on SIGINT/SIGTERM."""

    def __init__(self, path: Path, original: bytes):
        self.path, self.original = path, original
        signal.signal(signal.SIGTERM, self._signal)

    def _signal(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def restore(self):
        if self.path.read_bytes() != self.original:
            self.path.write_bytes(self.original)
        _drop_bytecode(self.path)


def _drop_bytecode(path: Path):
    cache = path.parent / "__pycache__"
    for pyc in cache.glob(f"{path.stem}.*.pyc") if cache.is_dir() else []:
        pyc.unlink(missing_ok=True)


def run_tests(tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'error', seconds, output tail)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    status = {0: "pass", 1: "fail"}.get(proc.returncode, "error")  # 2-5: interrupted / usage / no tests collected
    return status, time.time() - t0, tail


def _parse_lines(spec: str | None):
    if not spec:
        return None
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module", help="path of the module to mutate, relative to the repository root")
    ap.add_argument("tests", nargs="*", help="test files/ids to run (default: DEFAULT_TESTS[module])")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per mutant (default 3x the baseline run, "
                    "at least 60); a mutant that times out counts as killed")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--only", default=None, help="comma-separated mutant indices to run")
    ap.add_argument("--lines", default=None, help="only mutants starting in this line range, e.g. 90-130")
    ap.add_argument("--json", default=None, help="write every result to this file")
    args = ap.parse_args(argv)

    path = Path(args.module)
    tests = args.tests or DEFAULT_TESTS.get(args.module.replace(os.sep, "/"))
    if not path.is_file():
        ap.error(f"{path} is not a file (run from the repository root)")
    if not tests and not args.list:
        ap.error(f"no tests given and none known for {args.module}; name the test files")
    original = path.read_bytes()
    mutants = generate(original)
    lines = _parse_lines(args.lines)
    if lines:
        mutants = [m for m in mutants if lines[0] <= m.line <= lines[1]]
    if args.only:
        wanted = {int(i) for i in args.only.split(",")}
        mutants = [m for m in mutants if m.index in wanted]
    if args.list:
        for m in mutants:
            print(f"#{m.index:<4} L{m.line:<5} {m.description}  =>  {m.replacement}")
        print(f"{len(mutants)} mutants")
        return 0

    restorer = Restorer(path, original)
    results = []
    try:
        _drop_bytecode(path)
        status, seconds, tail = run_tests(tests, timeout=1800)
        if status != "pass":
            print(f"baseline: tests do not pass on the unmutated module ({status}):\n{tail}")
            return 2
        timeout = args.timeout or max(60.0, 3 * seconds)
        print(f"baseline passed in {seconds:.0f}s; {len(mutants)} mutants, {timeout:.0f}s timeout each", flush=True)
        for m in mutants:
            mutated = apply(original, m)
            try:
                compile(mutated, str(path), "exec")
            except SyntaxError as e:
                results.append((m, "invalid", 0.0, str(e)))
                continue
            path.write_bytes(mutated)
            _drop_bytecode(path)
            try:
                status, seconds, tail = run_tests(tests, timeout)
            finally:
                restorer.restore()
            verdict = {"pass": "SURVIVED", "fail": "killed", "timeout": "killed (timeout)"}.get(status, "error")
            results.append((m, verdict, seconds, tail))
            print(f"#{m.index:<4} L{m.line:<5} {verdict:<16} {seconds:5.0f}s  {m.description}", flush=True)
    finally:
        restorer.restore()

    survived = [r for r in results if r[1] == "SURVIVED"]
    counts = {}
    for r in results:
        counts[r[1]] = counts.get(r[1], 0) + 1
    print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if survived:
        print("survivors:")
        for m, *_ in survived:
            print(f"  #{m.index:<4} {path}:{m.line}  {m.description}  =>  {m.replacement}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [dict(index=m.index, line=m.line, description=m.description, replacement=m.replacement, verdict=v,
                  seconds=round(s, 1), tail=t) for m, v, s, t in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
