"""Other builds of proxygate as compare targets: `--compare ref:REF` (a git ref of this repository).

A ref is resolved to its full commit, its sources exported (`git archive`, committed content
only) and installed, non-editable, into a virtualenv of its own under a cache directory
(`$PROXYGATE_LOADTEST_BUILDS`, else `$XDG_CACHE_HOME/proxygate-loadtest/builds`, else
`~/.cache/proxygate-loadtest/builds`), one directory per commit and compile mode. The install is
`pip install` of the export by the interpreter the harness runs on, with `PROXYGATE_COMPILE` as
in the environment (setup.py compiles the request path with mypyc unless it is 0), and with the
harness's own dependency versions as constraints: the comparison is then of proxygate's code,
not of aiohttp's or uvloop's releases. A marker file, written only after an install that
imports, lets later runs of the same commit and mode reuse the build.

The build's gateway runs as `VENV/bin/python -P -m gateway run --config FILE`: `-P` keeps the
working directory off `sys.path` and the environment has no PYTHONPATH, so `gateway` is the
installed package, never this tree's sources (the install is checked for exactly that).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from loadtest.peers import isolated_env

__all__ = [
    "LABEL_PREFIX",
    "REF_PREFIX",
    "Build",
    "BuildError",
    "cache_key",
    "cache_root",
    "compile_wanted",
    "is_proxygate",
    "is_ref",
    "marker_matches",
    "prepare",
    "prepare_all",
    "resolve",
    "split_compare",
    "write_marker",
]

REF_PREFIX = "ref:"
LABEL_PREFIX = "proxygate@"
REPO = Path(__file__).resolve().parents[1]
MARKER = "installed.json"
#: Written into the marker: a marker of another layout is not trusted.
MARKER_VERSION = 1
#: A compiled install takes about a minute on two cores; a cold dependency download more.
INSTALL_TIMEOUT = 1200.0
#: Another harness building the same commit holds the lock at most this long before we give up.
LOCK_WAIT = INSTALL_TIMEOUT + 60.0


class BuildError(Exception):
    """A ref that cannot be built; the message is one line naming the ref and why."""


@dataclass(frozen=True, slots=True)
class Build:
    ref: str  # as the user wrote it, without "ref:"
    sha: str  # the full commit
    directory: Path  # the cache directory: venv/ and the marker
    compiled: bool  # the request path is compiled (what the install did, not what was asked)
    reused: bool  # found built by an earlier run

    @property
    def label(self) -> str:
        """The target's name in reports."""
        return label_for(self.sha)

    @property
    def python(self) -> Path:
        return self.directory / "venv" / "bin" / "python"

    def describe(self) -> str:
        how = "compiled" if self.compiled else "pure Python"
        where = "reused from" if self.reused else "built in"
        return f"{self.label} = ref {self.ref} ({self.sha}), {how}, {where} {self.directory}"

    def to_json(self) -> dict[str, str | bool]:
        return {
            "ref": self.ref,
            "sha": self.sha,
            "directory": str(self.directory),
            "compiled": self.compiled,
            "reused": self.reused,
        }


def label_for(sha: str) -> str:
    return f"{LABEL_PREFIX}{sha[:7]}"


def is_ref(entry: str) -> bool:
    return entry.startswith(REF_PREFIX)


def is_proxygate(target: str) -> bool:
    """This tree's gateway or another build of it: the targets with leases to check."""
    return target == "proxygate" or target.startswith(LABEL_PREFIX)


def split_compare(entries: list[str]) -> tuple[list[str], list[str]]:
    """`--compare` entries as (peers, refs), refs without their prefix, each in given order."""
    peers: list[str] = []
    refs: list[str] = []
    for entry in entries:
        if not is_ref(entry):
            peers.append(entry)
            continue
        ref = entry[len(REF_PREFIX) :].strip()
        # A leading "-" would reach git as an option; no ref is spelt that way.
        if not ref or ref.startswith("-") or any(c.isspace() for c in ref):
            raise BuildError(f"--compare {entry!r}: ref:REF needs a git ref, e.g. ref:HEAD~1")
        if ref in refs:
            raise BuildError(f"--compare names ref:{ref} twice")
        refs.append(ref)
    return peers, refs


def compile_wanted(env: Mapping[str, str]) -> bool:
    """What setup.py will be asked for: compiled unless PROXYGATE_COMPILE=0."""
    return env.get("PROXYGATE_COMPILE", "1") != "0"


def cache_root(env: Mapping[str, str]) -> Path:
    """Outside the work tree (which must not grow untracked files), per user."""
    explicit = env.get("PROXYGATE_LOADTEST_BUILDS")
    if explicit:
        return Path(explicit)
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "proxygate-loadtest" / "builds"


def cache_key(sha: str, compiled: bool) -> str:
    # A pure-Python build must never stand in for a compiled one, nor the other way round.
    return sha if compiled else f"{sha}-pure"


def _interpreter() -> str:
    """The interpreter a build's venv is made from; a build made by another is not reused."""
    return f"{getattr(sys, '_base_executable', sys.executable)} {sys.version.split()[0]}"


def marker_matches(directory: Path, sha: str, compile_asked: bool) -> dict[str, object] | None:
    """The marker's contents when `directory` holds a finished build of `sha` in this mode made
    by this interpreter, its venv still there; else None."""
    try:
        found = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict):
        return None
    expected = {
        "version": MARKER_VERSION,
        "sha": sha,
        "compile": compile_asked,
        "interpreter": _interpreter(),
    }
    if any(found.get(key) != value for key, value in expected.items()):
        return None
    if not (directory / "venv" / "bin" / "python").exists():
        return None
    return found


def write_marker(directory: Path, sha: str, ref: str, compile_asked: bool, compiled: bool) -> None:
    """Last step of a build: written whole (rename) so a reader never trusts half a marker."""
    record = {
        "version": MARKER_VERSION,
        "sha": sha,
        "ref": ref,
        "compile": compile_asked,
        "compiled": compiled,
        "interpreter": _interpreter(),
        "installed_at": time.time(),
    }
    spare = directory / (MARKER + ".new")
    spare.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(spare, directory / MARKER)


def _run(
    command: list[str],
    what: str,
    ref: str,
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a build step; a failure is a BuildError naming the ref, the step and pip's or git's
    last word."""
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
            env=None if env is None else dict(env),
        )
    except subprocess.TimeoutExpired:
        raise BuildError(f"ref:{ref}: {what} took over {timeout:g} s") from None
    except OSError as exc:
        raise BuildError(f"ref:{ref}: {what} failed: {exc}") from None
    if done.returncode != 0:
        raise BuildError(f"ref:{ref}: {what} failed: {_last_word(done.stderr or done.stdout)}")
    return done


def _last_word(text: str) -> str:
    """pip's "ERROR:" line when there is one: its warnings about the index come after it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR:", "error:", "fatal:"))]
    return (errors or lines or ["(no output)"])[-1][:300]


def resolve(ref: str, repo: Path = REPO) -> str:
    """The full commit `ref` names in `repo`."""
    done = _run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", "--end-of-options",
         f"{ref}^{{commit}}"],
        "resolving", ref, timeout=30.0,
    )  # fmt: skip
    sha = done.stdout.strip()
    if len(sha) != 40:
        raise BuildError(f"ref:{ref}: git rev-parse gave {sha!r}, not a commit")
    return sha


def _resolve_or_explain(ref: str, repo: Path) -> str:
    try:
        return resolve(ref, repo)
    except BuildError as exc:
        if "(no output)" in str(exc):  # --quiet: git says nothing for an unknown name
            raise BuildError(f"ref:{ref}: not a commit of {repo}") from None
        raise


def _export(sha: str, ref: str, repo: Path, into: Path) -> None:
    archive = into.parent / "source.tar"
    _run(
        ["git", "-C", str(repo), "archive", "--format=tar", "-o", str(archive), sha],
        "git archive", ref, timeout=120.0,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")  # git's own archive: plain files, no links out
    archive.unlink()
    if not (into / "pyproject.toml").exists():
        raise BuildError(f"ref:{ref}: {sha[:7]} has no pyproject.toml: not an installable tree")


def _constraints(path: Path) -> Path:
    """This environment's distributions as pins (proxygate itself left out)."""
    pins = sorted(
        {
            f"{dist.metadata['Name']}=={dist.version}"
            for dist in metadata.distributions()
            if dist.metadata["Name"] and dist.metadata["Name"].lower() != "proxygate"
        }
    )
    path.write_text("\n".join(pins) + "\n")
    return path


def _installed_gateway(python: Path, ref: str) -> Path:
    """Where the venv's `python -P` finds `gateway`, asked from this repository's root: it must
    be the venv's copy, not the sources of the working directory."""
    done = _run(
        [str(python), "-P", "-c", "import gateway.cli, pathlib; "
         "print(pathlib.Path(gateway.__file__).resolve().parent)"],
        "importing the installed gateway", ref, timeout=60.0, cwd=REPO, env=isolated_env(),
    )  # fmt: skip
    return Path(done.stdout.strip())


def _is_compiled(package: Path) -> bool:
    """mypyc's extensions lie beside the modules they replace."""
    return any(package.glob("*.so")) or any(package.parent.glob("core/**/*.so"))


def _install(sha: str, ref: str, directory: Path, repo: Path) -> bool:
    """Export, venv, pip install, check; whether the request path came out compiled."""
    source = directory / "src"
    source.mkdir(parents=True)
    _export(sha, ref, repo, source)
    venv = directory / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], "creating its venv", ref, timeout=300.0)
    python = venv / "bin" / "python"
    pins = _constraints(directory / "constraints.txt")
    _run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "-c", str(pins), str(source)],
        "pip install", ref, timeout=INSTALL_TIMEOUT, env=isolated_env(), cwd=directory,
    )  # fmt: skip
    package = _installed_gateway(python, ref)
    if venv.resolve() not in package.parents:
        raise BuildError(f"ref:{ref}: its venv imports gateway from {package}, not its install")
    # The export was only the build's input: nothing may import from it.
    shutil.rmtree(source, ignore_errors=True)
    return _is_compiled(package)


@contextlib.contextmanager
def _locked(path: Path, ref: str) -> Iterator[None]:
    """One harness at a time builds a given commit; the others wait for it, boundedly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BuildError(f"ref:{ref}: another build of it holds {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare(
    ref: str,
    *,
    env: Mapping[str, str] | None = None,
    repo: Path = REPO,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> Build:
    """The build of `ref`: found in the cache, or made now."""
    env = os.environ if env is None else env
    sha = _resolve_or_explain(ref, repo)
    asked = compile_wanted(env)
    root = cache_root(env)
    directory = root / cache_key(sha, asked)
    with _locked(root / f"{cache_key(sha, asked)}.lock", ref):
        found = marker_matches(directory, sha, asked)
        if found is not None:
            return Build(ref, sha, directory, bool(found.get("compiled")), reused=True)
        how = "compiling its request path (about a minute)" if asked else "pure Python"
        say(f"[build] {label_for(sha)}: installing ref:{ref} into {directory}, {how}")
        shutil.rmtree(directory, ignore_errors=True)  # a build that never finished
        try:
            compiled = _install(sha, ref, directory, repo)
        except BuildError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        except (OSError, tarfile.TarError) as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise BuildError(f"ref:{ref}: {type(exc).__name__}: {exc}") from None
        write_marker(directory, sha, ref, asked, compiled)
    if asked and not compiled:
        say(f"[build] ref:{ref}: installed as pure Python (setup.py found no mypyc or compiler)")
    return Build(ref, sha, directory, compiled, reused=False)


def prepare_all(compare: list[str], *, install: bool) -> tuple[list[str], dict[str, Build]]:
    """`--compare` with each ref:REF built (or found built) and named by its label, in place."""
    named: list[str] = []
    made: dict[str, Build] = {}
    for entry in compare:
        if not is_ref(entry):
            named.append(entry)
            continue
        ref = entry[len(REF_PREFIX) :]
        if not install and not _built(ref):
            # The venv is made with pip like the peers': --no-install forbids both.
            raise BuildError(f"ref:{ref}: not built yet, and installing is off (--no-install)")
        build = prepare(ref)
        if build.label in made:
            raise BuildError(f"ref:{made[build.label].ref} and ref:{ref} are the same commit")
        made[build.label] = build
        named.append(build.label)
    return named, made


def _built(ref: str) -> bool:
    sha = _resolve_or_explain(ref, REPO)
    asked = compile_wanted(os.environ)
    directory = cache_root(os.environ) / cache_key(sha, asked)
    return marker_matches(directory, sha, asked) is not None
