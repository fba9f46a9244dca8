"""`--compare ref:REF`: another build of proxygate as a target (`loadtest/builds.py`).

The fast tests parse entries and check the cache's key and marker without installing anything;
the slow one builds `ref:HEAD` pure Python into a temporary cache and runs it beside this tree.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from loadtest import builds, cli
from loadtest.builds import Build, BuildError
from loadtest.runner import TargetRun
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"


def _head() -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if done.returncode != 0:
        skip_or_fail("not a git checkout: ref: needs this repository's history")
    return done.stdout.strip()


def test_compare_entries_split_into_peers_and_refs_in_order() -> None:
    peers, refs = builds.split_compare(["ref:1fea677", "pproxy", "ref:HEAD~3", "direct"])
    assert peers == ["pproxy", "direct"]
    assert refs == ["1fea677", "HEAD~3"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["ref:"], "needs a git ref"),
        (["ref:--output=x"], "needs a git ref"),
        (["ref:a b"], "needs a git ref"),
        (["ref:HEAD", "ref:HEAD"], "twice"),
    ],
)
def test_bad_ref_entries_are_refused(entries: list[str], message: str) -> None:
    with pytest.raises(BuildError, match=message):
        builds.split_compare(entries)


def test_labels_and_proxygate_targets() -> None:
    assert builds.label_for(SHA) == "proxygate@0123456"
    assert builds.is_proxygate("proxygate")
    assert builds.is_proxygate("proxygate@0123456")
    assert not builds.is_proxygate("pproxy")


def test_cache_key_and_root_follow_the_compile_mode_and_environment(tmp_path: Path) -> None:
    assert builds.compile_wanted({})
    assert not builds.compile_wanted({"PROXYGATE_COMPILE": "0"})
    assert builds.cache_key(SHA, True) == SHA
    assert builds.cache_key(SHA, False) == f"{SHA}-pure"
    assert builds.cache_root({"PROXYGATE_LOADTEST_BUILDS": str(tmp_path)}) == tmp_path
    assert builds.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "proxygate-loadtest" / "builds"
    )


def _fake_venv(directory: Path) -> None:
    python = directory / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")


def test_a_marker_is_trusted_only_for_its_commit_mode_and_venv(tmp_path: Path) -> None:
    assert builds.marker_matches(tmp_path, SHA, True) is None  # none written
    builds.write_marker(tmp_path, SHA, "HEAD", True, compiled=True)
    assert builds.marker_matches(tmp_path, SHA, True) is None  # no venv
    _fake_venv(tmp_path)
    found = builds.marker_matches(tmp_path, SHA, True)
    assert found is not None
    assert found["compiled"] is True
    assert builds.marker_matches(tmp_path, SHA, False) is None
    assert builds.marker_matches(tmp_path, "f" * 40, True) is None
    (tmp_path / "installed.json").write_text("{half")
    assert builds.marker_matches(tmp_path, SHA, True) is None
    assert not (tmp_path / "installed.json.new").exists()


def test_a_marked_build_is_reused_without_installing(tmp_path: Path) -> None:
    head = _head()
    env = {"PROXYGATE_LOADTEST_BUILDS": str(tmp_path), "PROXYGATE_COMPILE": "0"}
    directory = tmp_path / builds.cache_key(head, False)
    _fake_venv(directory)
    builds.write_marker(directory, head, "HEAD", False, compiled=False)
    said: list[str] = []
    build = builds.prepare("HEAD", env=env, say=said.append)
    assert build == Build("HEAD", head, directory, compiled=False, reused=True)
    assert build.label == f"proxygate@{head[:7]}"
    assert said == []  # nothing was built


def test_a_failed_build_is_one_line_and_leaves_no_marker(tmp_path: Path) -> None:
    """An install that fails (here: a commit with nothing to install) names the ref and why,
    and leaves nothing a later run would reuse."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    (repo / "README").write_text("not a package\n")
    for step in (["init", "-q"], ["add", "README"], ["commit", "-q", "-m", "x"]):
        subprocess.run([*git, *step], check=True, capture_output=True, timeout=30)
    env = {"PROXYGATE_LOADTEST_BUILDS": str(tmp_path / "builds")}
    with pytest.raises(BuildError, match=r"^ref:HEAD: [0-9a-f]{7} has no pyproject.toml"):
        builds.prepare("HEAD", env=env, repo=repo, say=lambda _: None)
    assert [p.name for p in (tmp_path / "builds").iterdir()] == [
        p.name for p in (tmp_path / "builds").glob("*.lock")
    ]


def test_a_ref_that_does_not_resolve_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _head()
    code = cli.main(["http-keepalive", "--compare", "ref:no-such-ref-here", "--quiet"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert err.strip() == f"loadtest: ref:no-such-ref-here: not a commit of {REPO}"


def test_refs_are_refused_where_runs_vary_a_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["scale", "--compare", "ref:HEAD"]) == cli.EXIT_USAGE
    assert "scale takes no ref:" in capsys.readouterr().err


def test_a_build_refusing_the_configuration_is_exit_3_and_says_why() -> None:
    run = TargetRun("proxygate@0123456", "", 1, "us/req")
    run.refused = "proxygate@0123456 exited with status 2 at start-up: gateway.x: unknown key"
    problems: list[str] = []
    assert cli._exit_code([run], problems) == cli.EXIT_REFUSED
    assert problems == [
        "proxygate@0123456 refused its configuration: " + run.refused + " (the configuration "
        "is written for this tree's gateway; that build does not know a key of it)"
    ]


@pytest.mark.slow
def test_compare_with_a_build_of_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    head = _head()
    # Pure Python: seconds to install instead of a minute of mypyc; a cache of the test's own.
    monkeypatch.setenv("PROXYGATE_COMPILE", "0")
    monkeypatch.setenv("PROXYGATE_LOADTEST_BUILDS", str(tmp_path / "builds"))
    results = tmp_path / "results.json"
    argv = ["http-keepalive", "--duration", "2", "--warmup", "1", "--compare", "ref:HEAD"]
    code = cli.main([*argv, "--quiet", "--no-pin", "--json", str(results)])
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    label = f"proxygate@{head[:7]}"
    document = json.loads(results.read_text())
    assert document["builds"][label]["sha"] == head
    assert document["builds"][label]["compiled"] is False
    runs = document["runs"]
    assert {run["target"] for run in runs} == {"proxygate", label}
    for run in runs:
        assert run["requests"] > 0, run["target"]
        assert run["leases"]["leaked"] == 0, run["target"]
        assert run["leases"]["acquired"] > 0, run["target"]
    assert f"{label} = ref HEAD ({head}), pure Python, built in" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("http-keepalive: proxygate ")
    assert f", {label} " in last
    assert (tmp_path / "builds" / f"{head}-pure" / "installed.json").exists()
