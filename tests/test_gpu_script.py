"""The one GPU call (benchmarks/gpu_check.sh) and its runner, checked on the CPU: the dry run end to end,
the stage budgets, the benchmark runner's topic list and its partial results at a budget."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# What the `run` call carries besides the working tree (docs/speed_checks.md, "The one GPU call").
CARRY = ("vefast/_C.abi3.so", "vefast/_build_info.json", ".whl")
CARRY_LIMIT = 64 * 2**20


def _gpu_check(out: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    t0 = time.monotonic()
    run = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return run, time.monotonic() - t0


def _summary(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in lines if line.strip()}


@pytest.mark.slow
def test_dry_run_passes_every_stage_and_bundles_their_logs(tmp_path):
    """~50 s on an idle 2-core machine: imports, extension load, lane collection, benchmark dry runs, sanitizer driver."""
    out = tmp_path / "out"
    run, wall = _gpu_check(out, "--dry-run")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    summary = _summary(out)
    built = (ROOT / "vefast" / "_build_info.json").is_file()
    assert summary.pop("1-ext") == ("ok" if built else "skipped"), summary
    assert {k: summary.get(k) for k in ("0-env", "2-lane", "3-bench", "4-memcheck")} == dict.fromkeys(
        ("0-env", "2-lane", "3-bench", "4-memcheck"), "ok"), summary
    assert run.stdout.rstrip().splitlines()[-1].startswith("4-racecheck"), "the summary table must be printed last"
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = set(tar.getnames())
        lane = tar.extractfile("./logs/lane.log").read().decode()
    for log in ("env", "ext", "lane", "bench", "sanitize-dry"):
        assert f"./logs/{log}.log" in names
    collected = [line for line in lane.splitlines() if "collected" in line or "selected" in line]
    assert collected and not collected[-1].startswith(("0 ", "no tests")), lane[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "summary.txt"]  # 8 files at most come back
    print(f"gpu_check.sh --dry-run: {wall:.0f} s")


def test_stages_past_the_budget_are_skipped_and_still_reported(tmp_path):
    out = tmp_path / "out"
    run, _ = _gpu_check(out, "--dry-run", "--budget", "3", "--stages", "2 3", timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _summary(out) == {"2-lane": "skipped", "3-bench": "skipped"}
    assert run.stdout.count("skipped, -") == 2  # budget left after the 15 s reserve


def test_bad_argument_is_refused(tmp_path):
    run, _ = _gpu_check(tmp_path / "out", "--fast", timeout=30)
    assert run.returncode == 2 and "unknown argument --fast" in run.stderr


def test_carried_files_fit_the_device_call():
    """The working tree that travels plus the carried build outputs stay under the call's 64 MiB."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tree = sum((ROOT / p).stat().st_size for p in listed.stdout.decode().split("\0") if p and (ROOT / p).is_file())
    carried = 0
    for c in CARRY:
        path = ROOT / c
        files = [path] if path.is_file() else list(path.rglob("*")) if path.is_dir() else []
        carried += sum(f.stat().st_size for f in files if f.is_file())
    if not (ROOT / "vefast" / "_C.abi3.so").is_file():
        pytest.skip("the extension was not built")
    assert tree + carried < CARRY_LIMIT, f"tree {tree / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------- benchmarks.run_gpu
def test_every_benchmark_file_has_a_priority():
    from benchmarks import run_gpu

    assert sorted(run_gpu.topic_names()) == run_gpu.found_topics(), \
        "each benchmarks/gpu_<topic>.py needs one entry in benchmarks.run_gpu.TOPICS (its priority and budget)"
    assert all(budget >= run_gpu.MIN_TOPIC_S for _, budget in run_gpu.TOPICS)


def test_dry_run_reports_unlisted_and_missing_topics(tmp_path, monkeypatch, capsys):
    from benchmarks import run_gpu

    monkeypatch.setattr(run_gpu, "TOPICS", [("not_a_topic", 30)])
    monkeypatch.setattr(run_gpu, "found_topics", lambda: ["reparam"])
    assert run_gpu.dry_run(tmp_path) == 1
    err = capsys.readouterr().err
    assert "gpu_reparam.py is not in run_gpu.TOPICS" in err and "lists 'not_a_topic'" in err


@pytest.fixture
def fake_topic(monkeypatch):
    """benchmarks.gpu_fake: measures rows on the CPU, then runs past any budget."""
    from benchmarks import harness

    def run(ceilings):
        rows = [harness.measure(lambda: None, name="fake", variant=f"v{i}", rep=20) for i in range(3)]
        time.sleep(30)
        return rows

    module = types.ModuleType("benchmarks.gpu_fake")
    module.run = run
    monkeypatch.setitem(sys.modules, "benchmarks.gpu_fake", module)
    yield module
    harness.set_sink(None)


def test_a_topic_stopped_at_its_budget_keeps_its_rows(tmp_path, fake_topic):
    from benchmarks import run_gpu

    t0 = time.monotonic()
    assert run_gpu.run_topic("fake", 1, {"hbm_copy_gbps": 1.0}, tmp_path) == 3
    assert time.monotonic() - t0 < 10
    body = json.loads((tmp_path / "fake.json").read_text())
    assert body["complete"] is False and "budget of 1 s reached" in body["stopped"]
    assert [r["variant"] for r in body["results"]] == ["v0", "v1", "v2"]
    assert body["ceilings"] == {"hbm_copy_gbps": 1.0} and "commit" in body["environment"]


def test_a_finished_topic_is_complete(tmp_path, fake_topic, monkeypatch):
    from benchmarks import harness, run_gpu

    fake_topic.run = lambda ceilings: [harness.measure(lambda: None, name="fake", variant="only", rep=20)]
    assert run_gpu.run_topic("fake", 30, {}, tmp_path) == 0
    body = json.loads((tmp_path / "fake.json").read_text())
    assert body["complete"] is True and [r["variant"] for r in body["results"]] == ["only"]


def test_commit_comes_from_the_environment(monkeypatch):
    """The GPU machine's copy of the tree has no .git: gpu_check.sh passes VEFAST_COMMIT."""
    from benchmarks import harness

    monkeypatch.setenv("VEFAST_COMMIT", "abc123-dirty")
    assert harness.environment()["commit"] == "abc123-dirty"


FAKE_TOPICS = '''
import signal, time
from benchmarks import harness

def run(ceilings):
    if ceilings.get("hang"):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # deaf to its budget: the runner must kill it
        harness.measure(lambda: None, name="hang", variant="first", rep=20)
        time.sleep(120)
    return [harness.measure(lambda: None, name="fine", variant="only", rep=20)]
'''


@pytest.mark.slow
def test_runner_runs_each_topic_in_its_own_process_and_kills_a_hang(tmp_path, monkeypatch):
    """The stage loop (benchmarks.run_gpu.run_all) on CPU: a finished topic, a topic deaf to its budget, and one
    left without time; the summary gets a line per topic. ~10 s (two child processes)."""
    from benchmarks import run_gpu

    (tmp_path / "fakebench").mkdir()
    (tmp_path / "fakebench" / "__init__.py").write_text("")
    (tmp_path / "fakebench" / "topic.py").write_text(FAKE_TOPICS)
    topic = "fakebench.topic"  # a dotted name: the module itself, results in topic.json
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(run_gpu, "KILL_GRACE_S", 1)
    monkeypatch.setattr(run_gpu, "TOPICS", [(topic, 20)])
    results = tmp_path / "results"
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"ceilings": {"hang": 0}}))
    assert run_gpu.run_all([topic], 60, ceilings, results) == 0
    assert json.loads((results / "topic.json").read_text())["complete"] is True

    ceilings.write_text(json.dumps({"ceilings": {"hang": 1}}))
    monkeypatch.setattr(run_gpu, "TOPICS", [(topic, 8)])
    t0 = time.monotonic()
    assert run_gpu.run_all([topic, topic], 14, ceilings, results) == 1  # killed: a failure, not a budget cut
    assert time.monotonic() - t0 < 30
    summary = json.loads((results / "run_gpu_summary.json").read_text())
    assert [(s["status"], s.get("rows")) for s in summary] == [("killed", 1), ("skipped", None)], summary
    body = json.loads((results / "topic.json").read_text())
    assert body["complete"] is False and [r["name"] for r in body["results"]] == ["hang"]
