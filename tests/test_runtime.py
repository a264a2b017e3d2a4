"""Process-level settings of the command-line tools."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mgdn_jax import runtime

SHOW = (
    "import os, sys; from mgdn_jax import runtime; print('start', flush=True); "
    "runtime.use_huge_pages(single_arena={}); "
    "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
)


def run_program(tunables: str | None, single_arena: bool = False) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    done = subprocess.run(
        [sys.executable, "-c", SHOW.format(single_arena), "--flag", "x"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.split("\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tunable is Linux's")
def test_use_huge_pages_reexecutes_once_with_the_tunable():
    lines = run_program(None)
    assert lines[:2] == ["start", "start"]  # the program ran again, from the start
    tunables, argv = lines[2].split(" ", 1)
    assert tunables == "glibc.malloc.hugetlb=1" and argv == "['--flag', 'x']"
    lines = run_program("glibc.malloc.trim_threshold=1000")
    assert lines[2].split(" ", 1)[0] == "glibc.malloc.trim_threshold=1000:glibc.malloc.hugetlb=1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tunables are Linux's")
def test_single_arena_adds_what_is_missing_and_keeps_given_settings():
    lines = run_program(None, single_arena=True)
    assert lines[:2] == ["start", "start"]
    assert lines[2].split(" ", 1)[0] == "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"
    lines = run_program("glibc.malloc.hugetlb=0", single_arena=True)
    assert lines[:2] == ["start", "start"]
    assert lines[2].split(" ", 1)[0] == "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=1"
    given = "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    lines = run_program(given, single_arena=True)
    assert lines[0] == "start" and lines[1].split(" ", 1)[0] == given


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1"])
def test_use_huge_pages_keeps_a_given_setting(tunables):
    lines = run_program(tunables)
    assert lines[0] == "start" and lines[1].split(" ", 1)[0] == tunables


def test_library_calls_do_not_reexecute(monkeypatch):
    """The tools' mains with an argument list (library calls) must not replace the caller's
    process."""
    from mgdn_jax import evaluate, fuse

    monkeypatch.setattr(runtime, "use_huge_pages", lambda **_: pytest.fail("re-executed"))
    with pytest.raises(SystemExit):
        fuse.main(["--help"])
    assert evaluate.main(["--help"]) == 0
