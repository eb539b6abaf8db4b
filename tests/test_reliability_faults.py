"""Reliability, injected faults: SIGKILL, a kill before the rename, a full disk, untrusted files,
memory at SOP scale.

Every case is listed in docs/reliability.md; the tiny real-JPEG runs and helpers are in
``tests/reliability_fixtures.py``.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dmlkit.io import atomic_write_bytes, remove_stale_temporaries
from dmlkit.train import fit, load_checkpoint
from tests.reliability_fixtures import (
    ROOT,
    assert_same_run,
    child_env,
    cli_args,
    fill_disk_for,
    never,
    snapshot,
    tiny,
)

# ---------------------------------------------------------------- hard kills


LONGER = {"epochs": 4, "num_batches": 3}  # the SIGKILL runs: time to land a kill anywhere


@pytest.fixture(scope="module")
def longer(tmp_path_factory, tree) -> dict:
    """metrics.json of an uninterrupted ``LONGER`` run (this process, 1 torch thread)."""
    out = tmp_path_factory.mktemp("longer") / "run"
    fit(tiny(tree, out, **LONGER))
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_sigkill_at_a_random_moment_then_resume_gives_identical_metrics(
    tmp_path, tree, longer, seed
):
    cfg = tiny(tree, tmp_path / "killed", **LONGER)
    reference = longer
    chooser = random.Random(seed)
    epoch, delay = chooser.randint(1, cfg.epochs - 1), chooser.uniform(0.0, 1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmlkit.train", *cli_args(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    # The epoch line is logged just before that epoch's checkpoint is written: the kill
    # lands `delay` s later, in the checkpoint write or in one of the next epoch's steps.
    for line in proc.stderr:
        if line.startswith(f"epoch {epoch}/{cfg.epochs}:"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    kept = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"]
    assert epoch - 1 <= kept <= epoch + 1 and kept < cfg.epochs
    resumed = subprocess.run(
        [sys.executable, "-m", "dmlkit.train", *cli_args(cfg), "--resume"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {kept}" in resumed.stderr
    assert json.loads(resumed.stdout) == reference["metrics"]
    assert_same_run(tmp_path / "killed", reference)
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # a torn write's file, cleaned


KILL_AT_RENAME = """
import json, os, signal, sys
from pathlib import Path
from dmlkit.train import TrainConfig, fit

target, nth, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
real_replace, seen = os.replace, []

def replace(src, dst):
    # Killed with the new content complete in the temporary file, before the rename.
    if Path(dst).name == target:
        seen.append(dst)
        if len(seen) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace
fit(TrainConfig(**config))
"""


@pytest.mark.parametrize(
    ("target", "nth", "first_epochs"),
    [
        ("checkpoint.pt", 2, None),  # epoch 2 of 3: epoch 1's checkpoint must survive
        ("metrics.json", 1, 2),  # extending a finished 2-epoch run to 3 epochs
        pytest.param("embeddings.npz", 1, 2, marks=pytest.mark.slow),
    ],
)
def test_kill_between_temporary_write_and_rename_keeps_the_previous_file(
    tmp_path, tree, finished, target, nth, first_epochs
):
    run = tmp_path / "run"
    reference = json.loads((finished / "metrics.json").read_text())
    if first_epochs:
        fit(tiny(tree, run, epochs=first_epochs))
    before = snapshot(run)
    config = tiny(tree, run, resume=True).to_dict()
    child = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, target, str(nth), json.dumps(config)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    (stale,) = run.glob(f".{target}.*.tmp")  # the complete, never renamed, new version
    assert stale.stat().st_size > 0
    if first_epochs:  # the finished run's files are as they were (or newer and complete)
        assert before[target] == snapshot(run)[target]
        assert json.loads((run / "metrics.json").read_text())["history"][-1]["epoch"] == 2
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == (nth - 1 if not first_epochs else 3)
    fit(tiny(tree, run, resume=True))
    assert_same_run(run, reference)
    assert not stale.exists() and not list(run.glob(".*.tmp"))


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    import dmlkit.io as io

    dead_pid = 4_194_305  # above the largest pid_max Linux allows (2**22): never running
    names = {
        f".metrics.json.{dead_pid}@{io._HOST}.abc123_x.tmp": False,  # killed writer: removed
        f".metrics.json.{os.getpid()}@{io._HOST}.abc123_x.tmp": True,  # a live writer
        f".metrics.json.{dead_pid}@another-host.abc123_x.tmp": True,  # other host, shared folder
        f".metrics.json.5.{dead_pid}@{io._HOST}.abc123_x.tmp": True,  # metrics.json.5's
        ".metrics.json.abc123_x.tmp": True,  # old naming: not ours to judge
        "metrics.json.bak": True,
    }
    for name in names:
        (tmp_path / name).write_text("x")
    atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    assert {name: (tmp_path / name).exists() for name in names} == names
    assert remove_stale_temporaries(tmp_path / "metrics.json") == []


# ---------------------------------------------------------------- full disk


@pytest.mark.parametrize("target", ["embeddings.npz", "metrics.json"])
def test_full_disk_on_final_outputs_names_the_file_and_keeps_the_previous_one(
    tmp_path, tree, finished, monkeypatch, target
):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    fill_disk_for(monkeypatch, target)
    with pytest.raises(OSError, match=f"cannot write {run / target}: No space left") as info:
        fit(tiny(tree, run, epochs=4, resume=True))
    assert info.value.errno == errno.ENOSPC
    assert "checkpoint.pt holds the trained model: rerun with resume=True" in str(info.value)
    after = snapshot(run)
    assert after[target] == before[target] and json.loads((run / "metrics.json").read_text())
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 4  # the training is kept
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()  # space freed: the rerun only evaluates and writes the outputs
    result = fit(tiny(tree, run, epochs=4, resume=True), on_step=never)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert json.loads((run / "metrics.json").read_text())["metrics"] == result.metrics


FULL_TMPFS = """
import json, os, sys
from pathlib import Path
from dmlkit.train import TrainConfig, fit, load_checkpoint

disk, config = Path(sys.argv[1]), json.loads(sys.argv[2])
run, out = disk / "run", {}
def files():
    return {p.name: p.read_bytes() for p in run.iterdir()}
fit(TrainConfig(**{**config, "epochs": 1}))
with open(disk / "filler", "wb") as filler:  # fill the tmpfs up
    try:
        while True:
            filler.write(b"\\0" * 65536)
            filler.flush()
    except OSError as error:
        out["filler_errno"] = error.errno
before = files()
for name, epochs in (("checkpoint", 2), ("outputs", 1)):
    try:
        fit(TrainConfig(**{**config, "epochs": epochs, "resume": True}))
    except OSError as error:
        out[name] = [error.errno, str(error)]
    out[name + "_unchanged"] = files() == before
out["epoch_kept"] = load_checkpoint(run / "checkpoint.pt")["epoch"]
(disk / "filler").unlink()
out["rerun"] = len(fit(TrainConfig(**{**config, "epochs": 2, "resume": True})).history)
out["left"] = sorted(p.name for p in run.iterdir())
print(json.dumps(out))
"""


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || mount -t tmpfs tmpfs /tmp"
    return (
        subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and a tmpfs mount")
def test_a_real_full_tmpfs_stops_with_enospc_and_keeps_the_run_folder(tmp_path, tree):
    disk = tmp_path / "disk"
    disk.mkdir()
    config = tiny(tree, disk / "run").to_dict()
    # A private mount namespace: the 24 MiB tmpfs exists for the child only.
    mount = 'mount -t tmpfs -o size=24m tmpfs "$1" && shift && exec "$@"'
    child = subprocess.run(
        ["unshare", "-rm", "sh", "-c", mount, "sh", str(disk)]
        + [sys.executable, "-c", FULL_TMPFS, str(disk), json.dumps(config)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=180,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    assert out["filler_errno"] == errno.ENOSPC
    assert out["checkpoint"][0] == errno.ENOSPC
    assert f"cannot write checkpoint {disk / 'run' / 'checkpoint.pt'}" in out["checkpoint"][1]
    assert out["outputs"][0] == errno.ENOSPC and "cannot write" in out["outputs"][1]
    assert out["checkpoint_unchanged"] and out["outputs_unchanged"] and out["epoch_kept"] == 1
    assert out["rerun"] == 2
    assert out["left"] == ["checkpoint.pt", "embeddings.npz", "metrics.json"]
    assert not (disk / "run").exists()  # it was all on the private tmpfs


# ---------------------------------------------------------------- untrusted files: no code runs


UNSAFE = {
    ("torch", "load"): "torch.load without weights_only=True",
    ("yaml", "load"): "yaml.load (use yaml.safe_load)",
    ("yaml", "unsafe_load"): "yaml.unsafe_load",
    ("yaml", "full_load"): "yaml.full_load",
    ("yaml", "Loader"): "yaml.Loader",
    ("yaml", "UnsafeLoader"): "yaml.UnsafeLoader",
    ("pickle", "load"): "pickle.load",
    ("pickle", "loads"): "pickle.loads",
    ("pickle", "Unpickler"): "pickle.Unpickler",
    ("marshal", "loads"): "marshal.loads",
    ("shelve", "open"): "shelve.open",
}


def unsafe_calls(source: str, where: str) -> list[str]:
    """Places in ``source`` that could run code from a file: the security audit's rule."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            rule = UNSAFE.get((node.value.id, node.attr))
            if rule and (node.value.id, node.attr) != ("torch", "load"):
                problems.append(f"{where}:{node.lineno}: {rule}")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        flag = keywords.get("weights_only")
        if name == "torch.load" and not (isinstance(flag, ast.Constant) and flag.value is True):
            problems.append(f"{where}:{node.lineno}: {UNSAFE['torch', 'load']}")
        pickle_flag = keywords.get("allow_pickle")
        if name in ("np.load", "numpy.load") and not (
            pickle_flag is None or (isinstance(pickle_flag, ast.Constant) and not pickle_flag.value)
        ):
            problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
        if name in ("eval", "exec"):
            problems.append(f"{where}:{node.lineno}: {name}()")
    return problems


def test_the_audit_rule_catches_unsafe_loading():
    bad = "torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(t)\npickle.loads(b)\n"
    bad += "np.load(f, allow_pickle=True)\neval(s)\n"
    assert len(unsafe_calls(bad, "x")) == 6
    good = "torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\n"
    assert unsafe_calls(good + "np.load(f)\nnp.load(f, allow_pickle=False)\n", "x") == []


def test_no_library_code_or_notebook_loads_files_unsafely():
    import nbformat

    problems = []
    for path in sorted([*ROOT.glob("dmlkit/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        problems += unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        cells = nbformat.read(path, as_version=4).cells
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        code = "\n".join(line for line in code.splitlines() if not line.startswith("%"))
        problems += unsafe_calls(code, str(path.relative_to(ROOT)))
    assert problems == []


def test_a_yaml_spec_with_a_python_tag_runs_nothing(tmp_path):
    from dmlkit.sweep import SpecError, load_spec

    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: x\ngrid:\n  seed: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(spec)
    assert not marker.exists()


# ---------------------------------------------------------------- load (slow)


# The peak is this process's VmHWM (bench_eval.peak_rss_gb). Not getrusage's ru_maxrss:
# Linux carries the peak of the memory image an exec replaces into it, so a child that
# pytest starts reports the test worker's own peak (1.52-1.57 GB measured under
# `make test-all`, against ~1.2 GB for this search).
SOP_SCALE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench_eval import peak_rss_gb, sop_like
from dmlkit.evaluate import retrieval_metrics

embeddings, labels = sop_like(60_502)  # (60502, 512) unit vectors, SOP-like classes
metrics = retrieval_metrics(embeddings, labels, ks=(1, 10, 100), nmi=False)
print(json.dumps({"peak_bytes": peak_rss_gb() * 1e9, **metrics}))
"""


@pytest.mark.slow  # ~25 s on 2 cores
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_sop_scale_evaluation_stays_within_the_memory_bound():
    child = subprocess.run(
        [sys.executable, "-c", SOP_SCALE, str(ROOT / "benchmarks")],
        capture_output=True,
        text=True,
        env=child_env() | {"OMP_NUM_THREADS": str(os.cpu_count() or 1)},
        timeout=600,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.splitlines()[-1])
    assert out["num_queries"] == 60_502 and 0.5 < out["recall@1"] <= out["recall@100"] <= 1
    # The bound, in decimal units as bench_eval.py prints them: 1.5 GB = 1.5e9 bytes.
    assert out["peak_bytes"] <= 1.5e9, f"peak RSS {out['peak_bytes'] / 1e9:.3f} GB"
