"""The project's tooling: tox.ini's envs, .ci/run (against fake Pythons, pyenv, pip and tox, in
a PATH of their own), and the test suite's handling of Python's fork-with-threads warning."""
from __future__ import annotations

import configparser
import functools
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_RUN = os.path.join(ROOT, ".ci", "run")
pytestmark = pytest.mark.tooling
MINORS = ("3.9", "3.10", "3.11", "3.12", "3.13")  # the CPythons setup.cfg declares
# The CPU wheel on local disk: any other torch request downloads a multi-GB CUDA build.
TORCH_PIN = "torch==2.13.0"
CI_TIMEOUT_S = 60  # .ci/run against fakes takes well under a second; generous for a busy machine
# pyenv's shims exit with this ("command not found") for a version `pyenv global` does not select.
SHIM_NOT_FOUND = 127


# -- tox.ini ---------------------------------------------------------------------------------
def _tox_ini() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    assert cfg.read(os.path.join(ROOT, "tox.ini"))
    return cfg


def _items(value: str) -> list:
    return [v.strip() for v in value.replace("\n", ",").split(",") if v.strip()]


def test_tox_skips_a_missing_python_so_plain_tox_works_with_only_the_default_one():
    assert _tox_ini().getboolean("tox", "skip_missing_interpreters")


def test_envlist_covers_every_declared_python_torch_and_lint():
    setup = configparser.ConfigParser(interpolation=None)
    setup.read(os.path.join(ROOT, "setup.cfg"))
    declared = [c.strip().rpartition(" :: ")[2]
                for c in setup["metadata"]["classifiers"].splitlines()
                if c.strip().startswith("Programming Language :: Python :: 3.")]
    assert declared == list(MINORS)
    envs = _items(_tox_ini()["tox"]["envlist"])
    assert envs == ["py" + m.replace(".", "") for m in MINORS] + ["torch", "lint"]


def test_py310_tests_numpy_1_and_fails_if_it_gets_numpy_2():
    env = _tox_ini()["testenv:py310"]
    assert _items(env["deps"]) == ["numpy<2"]
    commands = env["commands"].strip().splitlines()
    assert "numpy.__version__" in commands[0] and "sys.exit" in commands[0]
    assert commands[-1].startswith("pytest")


def _setenv(section) -> dict:
    return dict(line.split("=", 1) for line in
                (x.replace(" ", "") for x in section.get("setenv", "").splitlines()) if line)


def _pytest_commands(section) -> list:
    return [c.strip() for c in section["commands"].strip().splitlines()
            if c.strip().startswith("pytest")]


def _env(cfg, name: str):
    """An env's section, with [testenv]'s keys where it has none of its own (as tox does)."""
    base = dict(cfg["testenv"])
    base.update(cfg[f"testenv:{name}"] if cfg.has_section(f"testenv:{name}") else {})
    return base


def test_every_start_method_on_the_oldest_python_forkserver_default_on_the_newest():
    cfg = _tox_ini()
    methods = {env: _setenv(_env(cfg, env)).get("SAMPLING_TEST_METHODS")
               for env in _items(cfg["tox"]["envlist"]) if env != "lint"}
    assert methods == {"py39": "all", "py310": "fork", "py311": "fork", "py312": "fork",
                       "py313": "fork", "torch": "fork"}
    defaults = {env: _setenv(_env(cfg, env)).get("SAMPLING_TEST_DEFAULT_METHOD")
                for env in methods}
    assert defaults == {**{env: None for env in methods}, "py313": "forkserver"}
    for env in methods:
        assert _setenv(_env(cfg, env))["PYTHONFAULTHANDLER"] == "1", env


def test_every_pytest_command_prints_skip_reasons_and_tooling_runs_once():
    cfg = _tox_ini()
    once = []
    for env in _items(cfg["tox"]["envlist"]):
        if env == "lint":
            continue
        commands = _pytest_commands(_env(cfg, env))
        assert commands, env
        for c in commands:
            assert " -rs " in c, (env, c)
            assert "-n 4" in c, (env, c)
        if not all('-m "not slow and not tooling"' in c or c.endswith("test_cli.py -k mlp")
                   for c in commands):
            once.append(env)
    assert once == ["py313"]
    assert _pytest_commands(_env(cfg, "py313")) == ["pytest -n 4 -rs {posargs}"]


def test_the_torch_env_runs_only_what_needs_torch():
    commands = _pytest_commands(_tox_ini()["testenv:torch"])
    assert [c.split('" ', 1)[1] for c in commands] == [
        "{posargs:tests/test_torch.py tests/test_distributed.py tests/test_cuda.py "
        "tests/test_docs.py}", "tests/test_cli.py -k mlp"]


def test_only_the_torch_env_installs_torch_and_only_the_pinned_cpu_build():
    cfg = _tox_ini()
    assert cfg["testenv:torch"]["basepython"] == "python3.11"
    for name, section in cfg.items():
        deps = [d for d in _items(section.get("deps", "")) if d.lower().startswith("torch")]
        assert deps == ([TORCH_PIN] if name == "testenv:torch" else []), name
        # setup.cfg's [torch] extra asks for any torch: no env may install it
        assert "torch" not in _items(section.get("extras", "")), name


# -- .ci/run ---------------------------------------------------------------------------------
def _script(path, body: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return str(path)


def _fake_python(path, name: str) -> str:
    """Answers anything with success and logs ``name args`` to $LOG (pip and tox included)."""
    return _script(path, f'echo "{name} $*" >> "$LOG"')


class FakeMachine:
    """A PATH of its own: pyenv (root ``pyenv``, with the given versions), its shims
    (``python`` and ``python3.11`` selected by `pyenv global`, the other python3.X failing as
    the real shims do), optionally an active virtualenv, and the few tools .ci/run uses."""

    def __init__(self, tmp_path, versions, venv: bool):
        self.tmp = tmp_path
        self.log = tmp_path / "log"
        self.log.write_text("")
        root = tmp_path / "pyenv"
        listing = "\\n".join(versions)
        _script(tmp_path / "pyenv-bin" / "pyenv",
                f'case "$1" in root) echo "{root}";; versions) printf "{listing}\\n";; esac')
        for v in versions:
            minor = ".".join(v.split(".")[:2])
            _fake_python(root / "versions" / v / "bin" / f"python{minor}", f"pyenv-{v}")
            _fake_python(root / "versions" / v / "bin" / "python", f"pyenv-{v}")
        shims = tmp_path / "shims"
        _fake_python(shims / "python", "shim-python")
        _fake_python(shims / "python3.11", "shim-python3.11")
        for minor in MINORS:
            if minor != "3.11":
                _script(shims / f"python{minor}",
                        f'echo "pyenv: python{minor}: command not found" >&2; '
                        f"exit {SHIM_NOT_FOUND}")
        tools = tmp_path / "tools"
        tools.mkdir()
        for tool in ("grep", "sort", "tail", "dirname"):
            real = shutil.which(tool)
            if real is None:
                pytest.skip(f"no {tool} here")
            os.symlink(real, tools / tool)
        path = [shims, tmp_path / "pyenv-bin", tools]
        self.env = {"PATH": "", "LOG": str(self.log)}
        if venv:
            _fake_python(tmp_path / "venv" / "bin" / "python", "venv-python")
            path.insert(0, tmp_path / "venv" / "bin")
            self.env["VIRTUAL_ENV"] = str(tmp_path / "venv")
        self.env["PATH"] = os.pathsep.join(map(str, path))

    def run(self) -> subprocess.CompletedProcess:
        bash = shutil.which("bash")
        if bash is None:
            pytest.skip("no bash here")
        return subprocess.run([bash, CI_RUN], env=self.env, capture_output=True, text=True,
                              timeout=CI_TIMEOUT_S)

    def module_calls(self) -> list:
        """The ``python -m ...`` calls, as ``who -m module args``."""
        return [line for line in self.log.read_text().splitlines() if " -m " in line]


# What `pyenv versions --bare` lists: every minor, an older patch release of 3.12 (.ci/run takes
# the newest) and a Python 2 (not one of ours).
ALL_VERSIONS = ["3.9.18", "3.10.13", "3.11.7", "3.12.0", "3.12.1", "3.13.0", "2.7.18"]


@pytest.mark.skipif(sys.platform == "win32", reason=".ci/run is a bash script")
def test_ci_installs_and_runs_tox_with_the_active_virtualenv(tmp_path):
    m = FakeMachine(tmp_path, ALL_VERSIONS, venv=True)
    p = m.run()
    assert p.returncode == 0, p.stdout + p.stderr
    assert m.module_calls() == ["venv-python -m pip install --quiet tox",
                                "venv-python -m tox --skip-missing-interpreters=false"]
    # every python3.X found past the failing shims, the newest patch release of each
    versions = tmp_path / "pyenv" / "versions"
    for minor, v in [("3.9", "3.9.18"), ("3.10", "3.10.13"), ("3.12", "3.12.1"),
                     ("3.13", "3.13.0")]:
        assert f"CI: python{minor} -> {versions / v / 'bin' / ('python' + minor)}\n" in p.stdout
    assert f"CI: python3.11 -> {tmp_path / 'shims' / 'python3.11'}\n" in p.stdout


@pytest.mark.skipif(sys.platform == "win32", reason=".ci/run is a bash script")
def test_ci_without_a_virtualenv_uses_the_first_python_on_path(tmp_path):
    m = FakeMachine(tmp_path, ALL_VERSIONS, venv=False)
    p = m.run()
    assert p.returncode == 0, p.stdout + p.stderr
    assert m.module_calls() == ["shim-python -m pip install --quiet tox",
                                "shim-python -m tox --skip-missing-interpreters=false"]


@pytest.mark.skipif(sys.platform == "win32", reason=".ci/run is a bash script")
@pytest.mark.parametrize("absent", ["3.9.18", "3.13.0"])
def test_ci_fails_loudly_before_tox_when_a_python_is_missing(tmp_path, absent):
    m = FakeMachine(tmp_path, [v for v in ALL_VERSIONS if v != absent], venv=True)
    p = m.run()
    minor = ".".join(absent.split(".")[:2])
    assert p.returncode != 0
    assert f"CI: python{minor} -> missing" in p.stdout
    assert f"python{minor} not found" in p.stderr
    assert m.module_calls() == []  # neither pip nor tox ran


# -- Python >= 3.12's warning about fork() in a process with threads --------------------------
FORK_WARNING = ("This process (pid={}) is multi-threaded, use of fork() may lead to deadlocks in "
                "the child.")


def _child():
    pass


def _action_for(text: str, category: type, module: str) -> str:
    """What the active warning filters do with this warning (the warnings module's own rule)."""
    for action, message, cat, mod, _lineno in warnings.filters:
        if ((message is None or message.match(text)) and issubclass(category, cat)
                and (mod is None or mod.match(module))):
            return action
    return warnings.defaultaction


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Python warns about this from 3.12 on")
@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="no fork here")
def test_fork_with_threads_warning_is_ignored_in_xdist_workers_only(request):
    """Under pytest-xdist (tox runs -n 4) execnet's thread makes every fork warn: conftest
    ignores that there. Without xdist the warning still shows a fork from a threaded parent."""
    action = _action_for(FORK_WARNING.format(os.getpid()), DeprecationWarning,
                         "multiprocessing.popen_fork")
    if action == "error":  # the fork has happened by then: CPython drops the error
        pytest.skip("-W error hides this warning; run without it")
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()  # this process now has a second thread, under xdist or not
    proc = mp.get_context("fork").Process(target=_child)
    try:
        with warnings.catch_warnings(record=True) as caught:  # this test's filters, recorded
            proc.start()
    finally:
        stop.set()
        thread.join()
        if proc.pid is not None:
            proc.join()
    forks = [w for w in caught if "is multi-threaded, use of fork()" in str(w.message)]
    if hasattr(request.config, "workerinput"):  # an xdist worker
        assert action == "ignore" and forks == []
    else:
        assert action != "ignore" and len(forks) == 1
        assert issubclass(forks[0].category, DeprecationWarning)


_SET_AFTER_IMPORT: list = []  # a forked worker inherits what the test puts here


def _how_started(folder):
    """Writes how its process came to be: whether it inherited this process's memory
    (fork), and whether its parent is this process (not under forkserver); a CartPole.
    (A module-level function: workers import it, they do not get a pickled copy.)"""
    import sampling

    with open(os.path.join(folder, f"{os.getpid()}"), "w") as f:
        f.write(f"{bool(_SET_AFTER_IMPORT)} {os.getppid()}")
    return sampling.CartPole()


def test_the_default_start_method_is_the_one_tox_asks_for(tmp_path):
    """SAMPLING_TEST_DEFAULT_METHOD (py313: forkserver) reaches the samplers that name no
    start method: conftest sets it for the session."""
    import sampling

    want = (os.environ.get("SAMPLING_TEST_DEFAULT_METHOD")
            or mp.get_start_method(allow_none=True) or mp.get_context().get_start_method())
    _SET_AFTER_IMPORT.append(True)
    try:
        with sampling.make_sampler("cpu", functools.partial(_how_started, str(tmp_path)),
                                   lambda o: np.zeros(len(o), np.int64), batch_T=2, batch_B=1,
                                   n_workers=1) as s:
            s.obtain_samples()
    finally:
        _SET_AFTER_IMPORT.clear()
    (worker,) = [p for p in tmp_path.iterdir() if int(p.name) != os.getpid()]
    inherited, ppid = worker.read_text().split()
    assert (inherited == "True", int(ppid) == os.getpid()) == {
        "fork": (True, True), "spawn": (False, True), "forkserver": (False, False)}[want]
