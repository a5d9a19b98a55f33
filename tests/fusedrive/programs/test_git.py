"""git on fusedrive: clone, fsck, checkouts, new commits and gc, against the referee.

The test builds a small repository with history on the machine's own filesystem
(text edits, a growing binary, renames, deletions, an executable bit, a symlink, a
tag and a branch; fixed dates, so every hash is known). Each site clones it over
``file://`` (the pack protocol: index-pack writes the pack), runs ``git fsck
--full --strict``, checks out an old commit and comes back, commits on top (loose
objects), runs ``git gc --prune=now`` (repack, loose objects removed, refs packed),
is remounted and runs ``git fsck`` again. The working trees at each step, the
history and the object counts must equal the referee's.

The crash test commits in a loop with ``core.fsync=all`` and SIGKILLs the daemon:
the repository must stay sound (git fsyncs objects and refs before renaming them
into place, but not directories, so the last commit may be gone: in trials 30
commits reported, 29 kept).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
from referee import Entry, Site, assert_same_tree, manifest, run

pytestmark = pytest.mark.needs_fuse

COMMITS = 30
ENV = {
    "GIT_AUTHOR_NAME": "Ada",
    "GIT_AUTHOR_EMAIL": "ada@example.invalid",
    "GIT_COMMITTER_NAME": "Ada",
    "GIT_COMMITTER_EMAIL": "ada@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
    "TZ": "UTC",
}


def git(repo: Path, *args: str, when: int = 0) -> str:
    env = {**ENV, "GIT_AUTHOR_DATE": f"@{1_600_000_000 + when * 3600} +0000"}
    env["GIT_COMMITTER_DATE"] = env["GIT_AUTHOR_DATE"]
    return run(["git", "-C", repo, *args], env=env).stdout


def change(repo: Path, rng: random.Random, i: int) -> None:
    """One commit's worth of edits."""
    (repo / "src").mkdir(exist_ok=True)
    lines = [f"line {j} of commit {i}: {rng.random()}" for j in range(rng.randrange(5, 300))]
    edited = repo / "src" / f"mod{i % 7}.txt"
    # A new file each time: overwriting in place (O_TRUNC) is test_shell_overwrites' topic.
    edited.unlink(missing_ok=True)
    edited.write_text("\n".join(lines) + "\n")
    with open(repo / "data.bin", "ab") as f:
        f.write(rng.randbytes(20_000))
    if i % 5 == 4 and (repo / "src" / f"mod{(i + 1) % 7}.txt").exists():
        git(repo, "mv", f"src/mod{(i + 1) % 7}.txt", f"src/renamed{i}.txt")
    if i % 9 == 8:
        for p in sorted((repo / "src").glob("renamed*.txt"))[:1]:
            p.unlink()
    if i == 10:
        (repo / "run.sh").write_text("#!/bin/sh\necho hi\n")
        os.chmod(repo / "run.sh", 0o755)
        os.symlink("src/mod0.txt", repo / "link")


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("git") / "origin"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    rng = random.Random(3)
    for i in range(COMMITS):
        change(repo, rng, i)
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "-m", f"commit {i}", when=i)
        if i == 12:
            git(repo, "tag", "-a", "v1", "-m", "version 1", when=i)
        if i == 20:
            git(repo, "branch", "side")
    return repo


def worktree(clone: Path) -> dict[str, Entry]:
    return manifest(clone, times=False, skip=lambda rel: rel == ".git")


def play(site: Site, origin: Path) -> dict[str, Any]:
    """The git session on one site; what it saw at each step."""
    clone = site.root / "clone"
    seen: dict[str, Any] = {}
    run(["git", "clone", "-q", "--no-hardlinks", f"file://{origin}", clone], env=ENV)
    git(clone, "fsck", "--full", "--strict", "--no-progress")
    seen["cloned"] = worktree(clone)
    git(clone, "checkout", "-q", "main~20")
    assert git(clone, "status", "--porcelain", "--ignored") == ""
    seen["old"] = worktree(clone)
    git(clone, "checkout", "-q", "v1")
    git(clone, "checkout", "-q", "main")
    assert git(clone, "status", "--porcelain", "--ignored") == ""
    rng = random.Random(11)
    for i in range(COMMITS, COMMITS + 6):
        change(clone, rng, i)
        git(clone, "add", "-A")
        git(clone, "commit", "-q", "-m", f"local {i}", when=i)
    seen["loose"] = int(git(clone, "count-objects").split()[0])
    git(clone, "gc", "-q", "--prune=now")
    git(clone, "fsck", "--full", "--strict", "--no-progress")
    site.cycle()
    git(clone, "fsck", "--full", "--strict", "--no-progress")
    assert git(clone, "status", "--porcelain", "--ignored") == ""
    counts = dict(line.split(": ") for line in git(clone, "count-objects", "-v").splitlines())
    seen["after gc"] = {k: counts[k] for k in ("count", "in-pack", "packs")}
    seen["log"] = git(clone, "log", "--all", "--format=%H %T %s")
    seen["final"] = worktree(clone)
    return seen


def test_git_session_matches_the_referee(origin: Path, sites: tuple[Site, Site]) -> None:
    want, got = (play(site, origin) for site in sites)
    assert isinstance(want["loose"], int) and want["loose"] > 20  # the commits made loose objects
    assert want["after gc"]["count"] == "0"
    for step in ("cloned", "old", "final"):
        assert_same_tree(want[step], got[step], f"working tree, {step}")
    for step in ("loose", "after gc", "log"):
        assert want[step] == got[step], step


COMMITTER = """
set -eu
cd "$1"
git init -q -b main .
for i in $(seq 1 100000); do
    seq 1 $((i * 37 % 5000)) > "f$((i % 13))"
    head -c $((i * 101 % 70000)) /dev/urandom > "blob$((i % 5))"
    git add -A
    git commit -q -m "commit $i"
    echo "$i"
done
"""


def test_git_repository_is_sound_after_a_crash(site: Site) -> None:
    """Commits with ``core.fsync=all`` while the daemon is SIGKILLed (on the referee the
    committer is): afterwards every ref resolves and fsck finds every object sound.
    (git does not fsync directories, so the last commits may be gone; not their parts.)"""
    repo = site.root / "repo"
    repo.mkdir()
    env = {**os.environ, **ENV, "GIT_CONFIG_COUNT": "1"}
    env |= {"GIT_CONFIG_KEY_0": "core.fsync", "GIT_CONFIG_VALUE_0": "all"}
    committer = subprocess.Popen(
        ["bash", "-c", COMMITTER, "committer", repo],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    acknowledged = 0
    try:
        assert committer.stdout is not None
        while acknowledged < 30:
            line = committer.stdout.readline()
            assert line, "the committer stopped"
            acknowledged = int(line)
        if site.kill_daemon is not None:
            site.kill_daemon()
    finally:
        committer.kill()
        committer.communicate()
    if site.mount is not None:
        site.mount()
    fsck = run(["git", "-C", repo, "fsck", "--full", "--strict", "--no-progress"], env=ENV)
    assert "missing" not in fsck.stdout + fsck.stderr
    kept = int(git(repo, "rev-list", "--count", "HEAD"))
    assert kept >= 1, "no commit survived"
    git(repo, "log", "-p", "--format=%H")  # every commit's tree and blobs read back
