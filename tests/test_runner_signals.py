"""Ctrl-C and SIGTERM during a chapter run: one line, the conventional exit status, nothing left
behind, the published page kept (issue 11 case 5)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from toychapter import chapter

CHAPTER = chapter("Slow", '''\
    ```{code-cell} ipython3
    :tags: [parameters]
    profile = "quick"
    device = "auto"
    seed = 0
    nap = 0.0
    ```

    ```{code-cell} ipython3
    import os, pathlib, time
    pathlib.Path("started").write_text(str(os.getpid()))  # the kernel runs in book/chapters/
    time.sleep(nap)
    ```
    ''')


@pytest.fixture
def project(tmp_path):
    (tmp_path / "chapters").mkdir()
    (tmp_path / "src" / "bnbook").mkdir(parents=True)
    (tmp_path / "_config.yml").write_text("title: toy\n")
    (tmp_path / "chapters" / "01-slow.md").write_text(CHAPTER)
    (tmp_path / "tmp").mkdir()
    return tmp_path


def bnbook(project, *args, **kwargs):
    env = {**os.environ, "TMPDIR": str(project / "tmp")}
    return subprocess.Popen(
        [sys.executable, "-m", "bnbook.run", *args], cwd=project, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_a_signal_stops_the_run_cleanly(project, signum, status, word):
    first = bnbook(project, "run", "01", "--profile", "smoke")
    assert first.wait(timeout=120) == 0, first.stderr.read()
    page = (project / "book" / "chapters" / "01-slow.ipynb").read_bytes()
    record = (project / "book" / "_records" / "01-slow.json").read_bytes()
    started = project / "book" / "chapters" / "started"
    started.unlink()

    # A terminal's Ctrl-C reaches the whole foreground process group: run bnbook in a group of
    # its own and signal the group (SIGINT restored to its default, which a background shell ignores).
    proc = bnbook(project, "run", "01", "--profile", "smoke", "-p", "nap=60", start_new_session=True,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists(), proc.communicate()[1]
    assert [p.name for p in (project / "tmp").iterdir() if p.name.startswith("bnbook-")]
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert err.strip().splitlines() == [f"bnbook: {word}"], err
    assert list((project / "tmp").iterdir()) == []  # no /tmp/bnbook-* folder, no kernel files
    assert (project / "book" / "chapters" / "01-slow.ipynb").read_bytes() == page
    assert (project / "book" / "_records" / "01-slow.json").read_bytes() == record
    assert sorted(p.name for p in (project / "book" / "chapters").iterdir()) == ["01-slow.ipynb", "started"]
    kernel = int(started.read_text())
    for _ in range(100):  # the kernel was shut down, not left running
        if not os.path.exists(f"/proc/{kernel}") or "zombie" in open(f"/proc/{kernel}/status").read():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the kernel (pid {kernel}) is still running")
