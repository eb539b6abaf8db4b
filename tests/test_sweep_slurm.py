"""``--executor slurm`` against a real one-node Slurm (tests/slurm_cluster.py), not a mock.

The cluster (munged, slurmctld, slurmd from Debian's slurm-wlm and munge: ``make
slurm-deps``) starts once for this module in a temp folder and is stopped by PID at the end.
Without those programs, or without root (slurmd runs jobs as root here), the tests that
need it are skipped and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmlkit.sweep import read_manifest, run_sweep
from dmlkit.sweep.__main__ import main as sweep_main
from dmlkit.sweep.manifest import append_record
from dmlkit.sweep.slurm import SlurmResources, SlurmUnavailableError, resources_from
from tests.slurm_cluster import PARTITION, SlurmCluster, missing_programs
from tests.test_sweep import BASE, NOTEBOOKS, hold, pretend_ran, write_spec

FIGURE = "notebooks/toy_figure.ipynb"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A repository-like folder with the toy notebooks (as in test_sweep.py)."""
    (tmp_path / "notebooks" / "sweeps").mkdir(parents=True)
    for notebook in NOTEBOOKS.glob("*.ipynb"):
        shutil.copy(notebook, tmp_path / "notebooks" / notebook.name)
    return tmp_path


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_programs()
    if missing:
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing): run `make slurm-deps`")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root; these tests need root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "dmlkit.sweep", *args, "--executor", "slurm"]
    return subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.2)


def records(folder: Path) -> list[tuple[str, str]]:
    return [(r["run"], r["status"]) for r in read_manifest(folder)]


def test_resources_come_from_the_spec_then_the_command_line():
    spec = {"partition": "gpu", "gpus_per_run": 1, "sbatch": {"account": "lab"}}
    resources = resources_from(spec, 90.0, partition="debug", cpus_per_run=None, time_min=None)
    assert resources == SlurmResources("debug", 1, 1, None, 2, {"account": "lab"})
    assert resources.submitit_parameters() == {
        "timeout_min": 2, "cpus_per_task": 1, "gpus_per_node": 1, "tasks_per_node": 1,
        "slurm_additional_parameters": {"account": "lab"}, "slurm_partition": "debug",
    }  # fmt: skip


def test_the_cli_reads_slurm_options_and_a_dry_run_shows_what_it_would_collect(project, capsys):
    executor = {"partition": "gpu", "mem_gb": 8, "sbatch": {"qos": "low", "account": "x"}}
    spec = write_spec(project, {**BASE, "executor": executor})
    folder = project / "papermill_runs" / "toy"
    append_record(folder / "manifest.jsonl", {"run": "x=1", "kind": "run", "status": "submitted"})
    argv = [str(spec), "--dry-run", "--executor", "slurm", "--cpus-per-run", "4"]
    assert sweep_main([*argv, "--sbatch", "account=lab", "qos=high"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        "2 selected; one Slurm job each: SlurmResources(partition='gpu', gpus_per_run=0, "
        "cpus_per_run=4, mem_gb=8, time_min=1440, sbatch={'qos': 'high', 'account': 'lab'})"
    )
    assert [line.split() for line in lines[2:]] == [["collect", "x=1"], ["run", "x=2"]]


def test_without_sbatch_nothing_is_submitted_or_written(project, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # python, but no sbatch
    spec = write_spec(project, BASE)
    with pytest.raises(SlurmUnavailableError, match="no `sbatch` on PATH"):
        run_sweep(spec, executor="slurm", progress=False)
    assert not (project / "papermill_runs").exists()


def test_an_unknown_partition_or_a_dead_controller_stops_before_anything_is_written(
    slurm, project, tmp_path
):
    spec = write_spec(project, BASE)
    done = cli(str(spec), "--partition", "gpu-a100", cwd=project)
    out, err = done.communicate(timeout=120)
    assert done.returncode == 2
    assert f"no partition 'gpu-a100'; `sinfo --noheader --format=%P` lists: {PARTITION}" in err
    dead = tmp_path / "dead.conf"  # the same cluster, its controller's port moved
    text = (
        slurm.conf.read_text()
        .replace("SlurmctldPort=", "SlurmctldPort=1")
        .replace("ClusterName=", "MessageTimeout=2\nClusterName=")
    )
    dead.write_text(text)
    with pytest.raises(SlurmUnavailableError, match=r"`sinfo --noheader --format=%P` exited"):
        os.environ["SLURM_CONF"] = str(dead)
        try:
            run_sweep(spec, executor="slurm", progress=False)
        finally:
            os.environ["SLURM_CONF"] = str(slurm.conf)
    assert not (project / "papermill_runs").exists()


def test_a_sweep_with_a_failure_a_cancel_and_a_resume(slurm, project):
    spec = write_spec(
        project, {**BASE, "grid": {"x": [1, -1, 2]}, "then": [{"notebook": FIGURE, "per": "sweep"}]}
    )
    folder = project / "papermill_runs" / "toy"
    held = hold(project, "x=2")
    runner = cli(str(spec), "--time-min", "10", cwd=project)
    wait_for(lambda: (folder / "x=2" / "kernel.pid").exists(), "x=2 to start on Slurm")
    wait_for(lambda: {("x=1", "ok"), ("x=-1", "failed")} <= set(records(folder)), "x=1, x=-1")
    runner.send_signal(signal.SIGINT)  # Ctrl-C: cancel what this invocation submitted
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 130, err
    lines = read_manifest(folder)
    x2 = [r for r in lines if r["run"] == "x=2"]
    assert [r["status"] for r in x2] == ["submitting", "submitted", "interrupted"]
    assert x2[1]["slurm_job"] == x2[2]["slurm_job"] and x2[2]["slurm_state"] in (
        "RUNNING",
        "CANCELLED",
        "COMPLETING",
    )
    job = x2[1]["slurm_job"]
    squeue = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"{job} CANCELLED" in squeue.stdout or f"{job} COMPLETING" in squeue.stdout
    assert "toy_figure" not in [r["run"] for r in lines]

    held.unlink()
    again = cli(str(spec), cwd=project)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 1, err  # x=-1 fails again
    new = records(folder)[len(lines) :]
    assert sorted(new) == sorted(
        [("x=-1", "submitting"), ("x=-1", "submitted"), ("x=-1", "failed"),
         ("x=2", "submitting"), ("x=2", "submitted"), ("x=2", "ok"),
         ("toy_figure", "submitting"), ("toy_figure", "submitted"), ("toy_figure", "ok")]
    )  # fmt: skip
    assert json.loads((folder / "x=2" / "metrics.json").read_text())["config"]["x"] == 2


def test_detach_submits_and_a_later_invocation_collects_without_a_second_copy(slurm, project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1]}})
    folder = project / "papermill_runs" / "toy"
    held = hold(project, "x=1")
    detached = cli(str(spec), "--detach", cwd=project)
    out, err = detached.communicate(timeout=120)
    assert detached.returncode == 0, err
    assert "x=1  submitted" in out
    wait_for(lambda: (folder / "x=1" / "kernel.pid").exists(), "x=1 to start on Slurm")
    collector = cli(str(spec), cwd=project)
    time.sleep(3)  # it finds x=1 running: it waits for it rather than submitting it again
    held.unlink()
    out, err = collector.communicate(timeout=120)
    assert collector.returncode == 0, err
    lines = read_manifest(folder)
    assert [r["status"] for r in lines] == ["submitting", "submitted", "ok"]
    assert lines[1]["slurm_job"] == lines[2]["slurm_job"]


def squeue_jobs(**fields: str) -> list[dict[str, str]]:
    """This machine's Slurm jobs (array tasks one by one): id, state and comment."""
    command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%k"]
    lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = (line.split("|", 2) for line in lines.splitlines())
    jobs = [{"id": job, "state": state, "comment": comment} for job, state, comment in rows]
    return [job for job in jobs if all(job[key] == value for key, value in fields.items())]


def test_a_then_step_left_queued_by_detach_is_collected_not_submitted_again(slurm, project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1]}, "then": [FIGURE]})
    folder = project / "papermill_runs" / "toy"
    pretend_ran(folder, "x=1")  # finished earlier: only its per-run step is left to run
    held = {"sbatch": {"hold": True}}  # Slurm keeps the step's job queued until released
    result = run_sweep(spec, executor="slurm", slurm=held, detach=True, progress=False)
    assert [(o.key, o.status) for o in result.outcomes] == [
        ("x=1", "skipped"), ("x=1/toy_figure", "submitted")
    ]  # fmt: skip
    job = read_manifest(folder)[-1]["slurm_job"]
    collector = cli(str(spec), cwd=project)
    time.sleep(5)  # it finds the step's job queued: it waits for it rather than submit a copy
    assert [j["state"] for j in squeue_jobs(id=job)] == ["PENDING"]
    subprocess.run(["scontrol", "release", job], check=True)
    out, err = collector.communicate(timeout=120)
    assert collector.returncode == 0, err
    steps = [r for r in read_manifest(folder) if r["run"] == "x=1/toy_figure"]
    assert [r["status"] for r in steps] == ["submitting", "submitted", "ok"]
    assert steps[-1]["slurm_job"] == job and (folder / "x=1" / "figure.txt").exists()
    assert len(list((folder / "slurm").glob("*/*_submitted.pkl"))) == 1  # one job submitted


# A runner SIGKILLed inside SlurmExecutor.start_many: before sbatch, or after it and before
# the runner's `submitted` lines (the window where a second copy could be submitted).
DIE_IN_SUBMISSION = """
import os, signal, sys
from dmlkit.sweep import slurm
from dmlkit.sweep.__main__ import main
submit = slurm.SlurmExecutor.start_many
def start_many(self, descriptions, token):
    if sys.argv[1] == "after":
        submit(self, descriptions, token)
    os.kill(os.getpid(), signal.SIGKILL)
slurm.SlurmExecutor.start_many = start_many
sys.exit(main(sys.argv[2:]))
"""


def test_a_runner_killed_while_submitting_leaves_no_second_copy(slurm, project):
    spec = write_spec(project, {**BASE, "grid": {"x": [1, 2]}})
    folder = project / "papermill_runs" / "toy"
    gate = hold(project, "x=1")
    for when, run in (("before", "x=2"), ("after", "x=1")):
        argv = [when, str(spec), "--executor", "slurm", "--only", run]
        died = subprocess.run(
            [sys.executable, "-c", DIE_IN_SUBMISSION, *argv], cwd=project, capture_output=True
        )
        assert died.returncode == -signal.SIGKILL, died.stderr
    assert records(folder) == [("x=2", "submitting"), ("x=1", "submitting")]
    token = read_manifest(folder)[1]["slurm_token"]
    (job,) = squeue_jobs(comment=token)  # x=1's job was submitted; x=2's never was
    wait_for(lambda: (folder / "x=1" / "kernel.pid").exists(), "x=1 to start on Slurm")
    collector = cli(str(spec), cwd=project)
    wait_for(lambda: ("x=2", "submitted") in records(folder), "x=2 to be submitted")
    gate.unlink()
    out, err = collector.communicate(timeout=180)
    assert collector.returncode == 0, err
    lines = read_manifest(folder)
    x1 = [(r["status"], r.get("slurm_job")) for r in lines if r["run"] == "x=1"]
    assert x1 == [("submitting", None), ("submitted", job["id"]), ("ok", job["id"])]
    x2 = [r["status"] for r in lines if r["run"] == "x=2"]
    assert x2 == ["submitting", "submitting", "submitted", "ok"]
    assert len(squeue_jobs(comment=token)) == 1  # no second copy of x=1


def slurm_state(job: str) -> str:
    command = ["squeue", "--noheader", "--jobs", job, "--format=%T"]
    return subprocess.run(command, capture_output=True, text=True).stdout.strip()


def finish_requeued(runner, folder: Path, starts: Path, held: Path, job: str) -> None:
    """Wait for x=1's second attempt, release it, and check that the run finished ok under
    the same job id, started twice."""
    wait_for(lambda: len(starts.read_text().split()) == 2, "the requeued attempt to start")
    held.unlink()
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 0, err
    lines = read_manifest(folder)
    assert [(r["status"], r.get("slurm_job")) for r in lines] == [
        ("submitting", None), ("submitted", job), ("ok", job)
    ]  # fmt: skip
    assert json.loads((folder / "x=1" / "metrics.json").read_text())["starts"] == 2


def test_a_job_at_its_time_limit_is_requeued_and_its_run_resumes(slurm, project):
    # Slurm sends a job's --signal (submitit's USR2@90) at the first of slurmctld's time-limit
    # checks, every 30 s, that finds the end closer than the signal's lead + 30 s: with the
    # 90 s lead, the first check, maybe before the notebook started. A 5 s lead and the 1 min
    # limit send it 25-55 s after the start. submitit requeues the job as timed out, and the
    # notebook starts again in its run folder, by the first attempt's starts.txt (a stand-in
    # for a checkpoint).
    spec = write_spec(project, {**BASE, "grid": {"x": [1]}})
    folder = project / "papermill_runs" / "toy"
    held = hold(project, "x=1")
    runner = cli(str(spec), "--time-min", "1", "--sbatch", "signal=USR2@5", cwd=project)
    starts = folder / "x=1" / "starts.txt"
    wait_for(starts.exists, "x=1 to start on Slurm")
    job = read_manifest(folder)[1]["slurm_job"]
    wait_for(lambda: slurm_state(job) == "PENDING", "the job to be requeued")
    # The requeued attempt, which Slurm starts ~11 s later (tests/slurm_cluster.py), gets a
    # longer limit so that it cannot time out too.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
    finish_requeued(runner, folder, starts, held, job)
    logs = "".join(path.read_text() for path in (folder / "slurm").glob(f"{job}/*_log.*"))
    assert "this job is timed-out" in logs and "Requeued job" in logs


def test_a_preempted_job_is_requeued_by_submitit_and_its_run_resumes(slurm, project):
    # Preemption as submitit's own test helper sends it: SIGTERM, then USR2, here 3 s later, as
    # on a loaded machine. Slurm signals every process of the job: the kernel must outlive the
    # SIGTERM (a dead kernel is a failed run, which was then not requeued: this test's flakes
    # in the parallel suite). submitit requeues the job on the USR2, and the notebook starts
    # again in its run folder (a training notebook with `resume: true` would continue from
    # its checkpoint.pt), by the first attempt's starts.txt.
    spec = write_spec(project, {**BASE, "grid": {"x": [1]}})
    folder = project / "papermill_runs" / "toy"
    held = hold(project, "x=1")
    runner = cli(str(spec), cwd=project)
    starts = folder / "x=1" / "starts.txt"
    wait_for(starts.exists, "x=1 to start on Slurm")
    job = read_manifest(folder)[1]["slurm_job"]
    subprocess.run(["scancel", job, "--signal", "SIGTERM"], check=True)
    time.sleep(3)
    subprocess.run(["scancel", job, "--signal", "USR2"], check=True)
    # Slurm starts the requeued job again ~11 s later (tests/slurm_cluster.py). Forcing it with
    # `scontrol update StartTime=now` raced with the first attempt's end: within the second of
    # the requeue the node refused the job ("Job credential revoked"), and it ended FAILED.
    finish_requeued(runner, folder, starts, held, job)
