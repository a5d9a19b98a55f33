"""How shells and coreutils overwrite files, on fusedrive and on the referee.

Each pattern is a shell set-up and an action (``>``, ``>>``, ``cp`` over a longer
file, ``mv`` over a file, ``sed -i``, ``truncate -s``, ``dd conv=notrunc``, ...),
played by bash in two directories of each site. Files are longer than a chunk
(64 KiB), so overwrites cross chunk boundaries. In "fresh" the action runs right
after the set-up (the old file is still in the daemon's buffers), in "settled"
after a remount (it is in the store). Each directory must then hold the same
names, types, bytes, modes and link targets as on the referee, both before and
after another remount (times are the runs' own, so they are left out).
"""

from __future__ import annotations

import pytest
from referee import Entry, Site, assert_same_tree, manifest, run

pytestmark = pytest.mark.needs_fuse

WHERE = ("fresh", "settled")
Trees = dict[str, dict[str, Entry]]

LONG = "seq 1 60000 > f"  # 339 KiB of text: six chunks
PATTERNS: dict[str, tuple[str, str]] = {
    "redirect-over-longer": (f"{LONG}; chmod 640 f", "echo short > f"),
    "redirect-noclobber-off-loop": (LONG, "for i in 1 2 3; do seq 1 $((4000 / i)) >| f; done"),
    "append": (f"{LONG}; chmod 600 f", "echo tail >> f; printf 'no newline' >> f"),
    "append-to-empty": (": > f", "for i in $(seq 1 500); do echo line $i >> f; done"),
    "cp-over-longer": (f"{LONG}; echo short > g; chmod 700 g", "cp g f"),
    "cp-over-shorter": (f"echo short > f; {LONG.replace('> f', '> g')}", "cp g f"),
    "tee-over-longer": (LONG, "echo via tee | tee f > /dev/null"),
    "mv-over": (f"{LONG}; chmod 604 f; echo other > g; chmod 750 g", "mv g f"),
    "sed-i": (f"{LONG}; chmod 754 f", "sed -i 's/^1/one/; 5000,9000d' f"),
    "sed-i-grow": (f"{LONG}; chmod 640 f", "sed -i 's/$/ and more/' f"),
    "truncate-shrink": (LONG, "truncate -s 70000 f"),
    "truncate-grow": (LONG, "truncate -s 1M f"),
    "truncate-zero-then-write": (LONG, "truncate -s 0 f; echo new >> f"),
    "dd-notrunc": (
        f"{LONG}; head -c 100000 /dev/zero | tr '\\0' x > p",
        "dd if=p of=f bs=1000 seek=100 conv=notrunc status=none;"
        " dd if=p of=f bs=1 seek=7 count=3 conv=notrunc status=none",
    ),
    "dd-seek-truncates": (
        f"{LONG}; head -c 5000 /dev/zero | tr '\\0' y > p",
        "dd if=p of=f bs=1000 seek=3 status=none",
    ),
    "exec-script": ("printf '#!/bin/sh\\necho ran \"$@\" > out\\n' > s; chmod 755 s", "./s a b"),
    "mv-dir": ("mkdir -p a/b c; echo x > a/b/f; echo y > a/g", "mv a c/; mv c/a/b c/b2"),
    "ln-sf-and-hard-link-append": (
        "echo 1 > t1; echo 2 > t2; ln -s t1 l",
        "ln -sf t2 l; ln -f t1 h; echo more >> h",
    ),
    "install-over": (f"{LONG}; echo new > n", "install -m 750 n f"),
    "rm-rf-and-recreate": (
        "mkdir -p d/e/f; seq 1 9999 > d/e/f/g",
        "rm -rf d; mkdir d; echo z > d/f",
    ),
    "rm-rf-big-dir": (
        "mkdir d e; (cd d && seq 1 500 | xargs touch); cp -r d e/",
        "rm -rf d; find e -delete",
    ),
    "chown-clears-setuid": ("echo x > f; chmod 6755 f", "chown 1234:1234 f"),
    "write-by-other-user-clears-setuid": (
        "echo x > f; chmod 6777 f",
        "runuser -u nobody -- sh -c 'echo y >> f'",
    ),
    "rewrite-and-ftruncate": (
        LONG,
        "python3 -c \"f = open('f', 'r+'); f.seek(100000); f.write('abc'); f.truncate()\"",
    ),
    "posix-fallocate": (
        LONG,
        "python3 -c \"import os; os.posix_fallocate(os.open('f', os.O_RDWR), 0, 1 << 20)\"",
    ),
    "dd-notrunc-past-end": (
        "echo short > f; head -c 70000 /dev/zero | tr '\\0' z > p",
        "dd if=p of=f bs=1000 seek=200 conv=notrunc status=none",
    ),
}


def play(site: Site, setup: str, action: str) -> tuple[Trees, Trees]:
    """The pattern in two directories of the site, "fresh" and "settled"; what they
    hold after the action, and after a remount."""

    def sh(script: str, where: str) -> None:
        run(["bash", "-euo", "pipefail", "-c", f"umask 022; {script}"], cwd=site.root / where)

    for d in WHERE:
        (site.root / d).mkdir()
    sh(setup, "settled")
    site.cycle()
    sh(setup, "fresh")
    for d in WHERE:
        sh(action, d)
    now = {d: manifest(site.root / d, times=False) for d in WHERE}
    site.cycle()
    return now, {d: manifest(site.root / d, times=False) for d in WHERE}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_shell_overwrite_matches_the_referee(pattern: str, sites: tuple[Site, Site]) -> None:
    referee, fusedrive = sites
    setup, action = PATTERNS[pattern]
    want, _ = play(referee, setup, action)
    got_now, got_after_remount = play(fusedrive, setup, action)
    for d in WHERE:
        assert_same_tree(want[d], got_now[d], f"{d}: after `{action}`")
        assert_same_tree(want[d], got_after_remount[d], f"{d}: after `{action}` and a remount")
