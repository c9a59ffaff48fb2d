"""`tunesmith search` on a real database server: a throwaway PostgreSQL cluster (Debian's `postgresql`
package, which .ci/run installs), two workers in their own processes sharing its study, one of them
killed mid-trial. Skipped where the server's binaries are absent."""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_search import _cli, _env, search_config

USER = "tunesmith"  # the cluster's superuser; trust authentication, on 127.0.0.1 only
DATABASE = "search"


def _server_bin() -> Path | None:
    """The newest installed server's bin directory (Debian keeps it out of PATH)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda p: [int(n) for n in re.findall(r"\d+", Path(p).parent.parent.name)])
        return Path(newest).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server on 127.0.0.1 in a temporary directory, with an empty database; stopped and
    removed at the end. The server refuses to run as root, so as root it runs as `postgres` (the
    package's user) or `nobody`."""
    bin_dir = _server_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server is not installed (Debian: apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install -e '.[test]'")
    root = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))  # under /tmp, which the server's user can reach
    as_user: list[str] = []
    if os.geteuid() == 0:
        name = next((n for n in ("postgres", "nobody") if _has_user(n)), None)
        if name is None or not shutil.which("runuser"):
            pytest.skip("running as root, with no unprivileged user (postgres, nobody) or runuser to run the server")
        entry = pwd.getpwnam(name)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", name, "--"]
    data, log, port = root / "data", root / "server.log", _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, cwd=root)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--encoding=UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
            yield f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"{err.cmd}: {err.stderr.decode()}\n{log.read_text() if log.exists() else ''}") from err
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _trials(url: str, name: str) -> dict[int, dict]:
    """The study's trials by number, read from the server through optuna, as a user would."""
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    return {t.number: {"state": t.state.name, "run_dir": t.user_attrs.get("run_dir"), "params": t.params,
                       "pid": t.user_attrs.get("pid"), "retried": t.system_attrs.get("failed_trial"),
                       "value": t.value} for t in study.trials}


def test_two_workers_on_postgresql_survive_a_killed_worker(tmp_path, tiny_model_dir, review_data, postgres_url):
    import optuna

    from tunesmith.config import load_config

    config = search_config(tmp_path, tiny_model_dir, review_data, train={"max_steps": 12, "eval_every": 6},
                           heartbeat=1)
    out = tmp_path / "search"
    command = _cli(str(config), "--trials", "3", "--workers", "2", "--storage", postgres_url)
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill the worker of the first trial to save a checkpoint, once both workers hold a trial.
    deadline = time.monotonic() + 300  # a bound on waiting for a hung child, not a figure under test
    victim = None
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        saved = sorted(out.glob("trial_*/checkpoints/last/state.json"))
        if not saved:
            continue
        running = {t["run_dir"]: t for t in _trials(postgres_url, "search").values() if t["state"] == "RUNNING"}
        victim = next((running[str(s.parents[2])] for s in saved if str(s.parents[2]) in running), None)
    assert victim is not None, f"no trial saved a checkpoint while running: {proc.stderr.read() if proc.poll() is not None else ''}"
    os.kill(victim["pid"], signal.SIGKILL)
    killed_number = next(n for n, t in _trials(postgres_url, "search").items() if t["run_dir"] == victim["run_dir"])
    killed_at = json.loads((Path(victim["run_dir"]) / "checkpoints" / "last" / "state.json").read_text())["step"]
    # The other worker goes on, retrying the killed trial once its heartbeat is stale; the command
    # then says that one of its workers failed.
    first = proc.wait(300)
    assert first == 2 and "1 of 2 workers failed" in proc.stderr.read()

    done = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    trials = _trials(postgres_url, "search")
    complete = {n: t for n, t in trials.items() if t["state"] == "COMPLETE"}
    assert trials[killed_number]["state"] == "FAIL" and len(complete) >= 3
    # No trial ran twice: each complete trial has its own run and its own values; the killed trial
    # was retried once, in its own run, resumed from its checkpoint.
    run_dirs = [t["run_dir"] for t in complete.values()]
    assert len(set(run_dirs)) == len(run_dirs)
    assert len({json.dumps(t["params"], sort_keys=True) for t in complete.values()}) == len(complete)
    (retry,) = [t for t in complete.values() if t["retried"] == killed_number]
    assert retry["run_dir"] == victim["run_dir"] and retry["params"] == victim["params"]
    for run_dir in run_dirs:
        steps = [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        if run_dir == victim["run_dir"]:
            assert killed_at > 0 and steps.count(1) == 1 and max(steps) == 12
        else:
            assert steps == list(range(1, 13))
    # The best trial in best.yaml and search.md is the one the database holds.
    best = optuna.load_study(study_name="search", storage=postgres_url).best_trial
    assert best.value == min(t["value"] for t in complete.values())
    assert load_config(out / "best.yaml").train.lr == best.params["train.lr"]
    assert f"trial {best.number}, objective" in (out / "best.yaml").read_text()
    assert f"Best: trial {best.number}," in (out / "search.md").read_text()
    assert not (out / "study.sqlite").exists()
    assert yaml.safe_load((Path(best.user_attrs["run_dir"]) / "config.yaml").read_text())["method"]["r"] == \
        best.params["method.r"]

    # Another machine: its own output.dir (same study name), none of the trials' run directories.
    # The study has ended, so it trains nothing; its best.yaml is made from the best trial's values.
    elsewhere = tmp_path / "machine2" / "search"
    other = subprocess.run([*command, "--set", f"output.dir={elsewhere}"], check=False, env=_env(),
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert not list(elsewhere.glob("trial_*")) and _trials(postgres_url, "search") == trials
    theirs = load_config(elsewhere / "best.yaml")
    assert theirs.train.lr == best.params["train.lr"] and theirs.method.r == best.params["method.r"]
    assert theirs.output.dir == str(elsewhere / "best")
    assert theirs.model_dump(exclude={"output"}) == load_config(out / "best.yaml").model_dump(exclude={"output"})
