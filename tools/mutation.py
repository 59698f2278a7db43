"""Mutation testing of one heatlens module against the test files that exercise it.

Usage (from the repository root, in the dev virtualenv)::

    nice -n 15 python tools/mutation.py heatlens/engine/maps.py \\
        tests/test_engine.py tests/test_agreement.py

The working tree is never touched: the repository (git-tracked files plus untracked files that
are not ignored) is copied into a scratch folder (``/tmp/heatlens-mutation/<module stem>`` by
default), the copy's ``pyproject.toml`` gets a ``[tool.mutmut]`` table that mutates only the
given module and selects only the given tests, and ``mutmut run`` runs there. The script then
prints the number of killed, surviving, timed-out and untested mutants, the score and the diff
of every surviving mutant.

The score is ``(killed + timed out) / (all mutants - equivalent)``: a mutant that makes the tests
hang is caught (it cannot pass), as mutmut counts it; ``--timeout-multiplier`` sets how long
mutmut waits, a multiple of the covering tests' time. Equivalent mutants are the mutant names
listed in the "Equivalent mutants" section of ``docs/testing.md`` (see ``--equivalent``); a
survivor listed there is reported as equivalent, not as a survivor.

Options: ``--workdir`` (scratch folder), ``--max-children`` (mutmut workers, default 2),
``--mutant NAME`` (re-run only these mutants, e.g. after adding a test; repeatable; ``*``
matches any text, as in ``heatlens.metrics.imputation.x__pcg__mutmut_*``),
``--deselect NODE`` (leave out a test that fails on the unmutated code, as mutmut needs a
green run first; repeatable), ``--equivalent PATH`` and ``--min-score`` (exit with status 1
below this percentage).

mutmut is a ``test`` extra (``pip install mutmut``). Run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRATCH = Path("/tmp/heatlens-mutation")
EQUIVALENT_HEADING = "equivalent mutants"
MUTANT_NAME = re.compile(r"heatlens(?:\.\w+)+__mutmut_\d+")
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
CAUGHT = ("killed", "timeout")


@dataclass
class Summary:
    """The outcome of one module's mutation run."""

    status: dict[str, str]
    equivalent: set[str] = field(default_factory=set)

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.status.values())

    @property
    def survivors(self) -> list[str]:
        """Surviving mutants not listed as equivalent."""
        return [n for n, s in self.status.items() if s == "survived" and n not in self.equivalent]

    @property
    def score(self) -> float:
        """Percentage caught (killed, or timed out: the tests hang) among the mutants that are
        not equivalent."""
        relevant = [n for n in self.status if n not in self.equivalent]
        caught = sum(self.status[n] in CAUGHT for n in relevant)
        return 100.0 * caught / len(relevant) if relevant else 100.0


def module_name(path: Path) -> str:
    """``heatlens/engine/maps.py`` -> ``heatlens.engine.maps``."""
    return ".".join(path.with_suffix("").parts)


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def equivalent_mutants(doc: Path, module: str) -> set[str]:
    """Mutant names of ``module`` in the section of ``doc`` whose heading names equivalent
    mutants (up to the next heading of the same or a higher level)."""
    if not doc.is_file():
        return set()
    names: set[str] = set()
    level = 0
    for line in doc.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"(#+)\s+(.*)", line)
        if heading:
            depth = len(heading.group(1))
            if EQUIVALENT_HEADING in heading.group(2).lower():
                level = depth
            elif level and depth <= level:
                level = 0
        elif level:
            names.update(n for n in MUTANT_NAME.findall(line) if n.startswith(module + "."))
    return names


def copy_repository(workdir: Path) -> None:
    """A fresh copy of the git-tracked and untracked, not ignored files of the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")
    if workdir.exists():
        shutil.rmtree(workdir)
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def configure(workdir: Path, module: Path, tests: list[str], deselect: list[str],
              timeout_multiplier: float) -> None:
    """Append the ``[tool.mutmut]`` table to the copy's ``pyproject.toml``."""
    pytest_args = PYTEST_ARGS + [arg for node in deselect for arg in ("--deselect", node)]
    pyproject = workdir / "pyproject.toml"
    text = pyproject.read_text(encoding="utf-8")
    if "[tool.mutmut]" in text:
        raise SystemExit("the repository's pyproject.toml already has a [tool.mutmut] table")
    table = (
        "\n[tool.mutmut]\n"
        'source_paths = ["heatlens"]\n'
        f"only_mutate = {toml_list([module.as_posix()])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(pytest_args)}\n"
        f"timeout_multiplier = {timeout_multiplier}\n"
    )
    pyproject.write_text(text + table, encoding="utf-8")
    # mutmut's workers import heatlens from mutants/; the folder must exist before Python starts
    # so that the PYTHONPATH entry is not cached as missing.
    (workdir / "mutants").mkdir(exist_ok=True)


def mutmut(workdir: Path, *args: str, capture: bool = False) -> str:
    """Run ``mutmut ARGS`` in ``workdir`` with the mutated copy first on the import path."""
    env = dict(os.environ, PYTHONPATH=str(workdir / "mutants"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=workdir, env=env,
                          capture_output=capture, text=True)
    if done.returncode != 0:
        if capture:
            sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"mutmut {' '.join(args[:1])} failed with status {done.returncode}")
    return done.stdout if capture else ""


def results(workdir: Path, module: str, only: list[str]) -> dict[str, str]:
    """``{mutant name: status}`` for the module's mutants, from ``mutmut results --all``."""
    status: dict[str, str] = {}
    for line in mutmut(workdir, "results", "--all", "true", capture=True).splitlines():
        name, _, state = line.strip().partition(": ")
        if name.startswith(module + ".") and (not only or any(fnmatch.fnmatchcase(name, pattern)
                                                               for pattern in only)):
            status[name] = state.strip()
    return status


def report(summary: Summary, workdir: Path, command: str) -> None:
    counts = summary.counts
    equivalent = sorted(n for n in summary.equivalent if n in summary.status)
    print(f"\ncommand: {command}")
    print(f"mutants: {len(summary.status)}")
    for state in ("killed", "survived", "timeout", "no tests", "suspicious", "skipped"):
        print(f"{state}: {counts.get(state, 0)}")
    other = {k: v for k, v in counts.items()
             if k not in {"killed", "survived", "timeout", "no tests", "suspicious", "skipped"}}
    if other:
        print(f"other: {dict(other)}")
    print(f"equivalent (listed in docs): {len(equivalent)}")
    print(f"score: {summary.score:.1f}% ((killed + timeout) / (mutants - equivalent))")
    for name in summary.survivors:
        print(f"\n--- surviving: {name}")
        print(mutmut(workdir, "show", name, capture=True).rstrip())
    untested = [n for n, s in summary.status.items() if s not in (*CAUGHT, "survived")
                and n not in summary.equivalent]
    for name in untested:
        print(f"\n--- {summary.status[name]}: {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", type=Path, help="e.g. heatlens/engine/maps.py")
    parser.add_argument("tests", nargs="+", help="test files (or node ids) that exercise it")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: %(default)s)")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--mutant", action="append", default=[],
                        help="run only this mutant (repeatable)")
    parser.add_argument("--deselect", action="append", default=[],
                        help="leave out this test node id (repeatable), e.g. one that fails "
                             "on the unmutated code, which mutmut refuses")
    parser.add_argument("--equivalent", type=Path, default=REPO / "docs" / "testing.md",
                        help="document listing the equivalent mutants (default: %(default)s)")
    parser.add_argument("--timeout-multiplier", type=float, default=15.0,
                        help="a mutant times out after this many times its covering tests' "
                             "time (mutmut's default: %(default)s); lower it for modules with "
                             "loops that mutants make endless")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="exit with status 1 when the score is below this percentage")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("mutmut") is None:
        raise SystemExit("mutmut is not installed: pip install mutmut (or the 'test' extra)")
    module = Path(os.path.relpath(args.module.resolve(), REPO))
    if module.suffix != ".py" or module.parts[0] != "heatlens" or not (REPO / module).is_file():
        raise SystemExit(f"{args.module} is not a module of the heatlens package")
    missing = [t for t in args.tests if not (REPO / t.split("::")[0]).is_file()]
    if missing:
        raise SystemExit(f"no such test file: {', '.join(missing)}")
    workdir = args.workdir or SCRATCH / module.stem

    copy_repository(workdir)
    configure(workdir, module, args.tests, args.deselect, args.timeout_multiplier)
    mutmut(workdir, "run", "--max-children", str(args.max_children), *args.mutant)

    name = module_name(module)
    equivalent = equivalent_mutants(args.equivalent, name)
    summary = Summary(results(workdir, name, args.mutant), equivalent)
    command = " ".join(["python", "tools/mutation.py", module.as_posix(), *args.tests,
                        *(f"--deselect {node}" for node in args.deselect),
                        *(f"--mutant {name}" for name in args.mutant)])
    report(summary, workdir, command)
    return 0 if summary.score >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
