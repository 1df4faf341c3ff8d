"""The Dask engine on a cluster whose workers cannot see the driver's disk.

A ``dask scheduler`` and two ``dask worker`` processes (each with its nanny) run as
separate processes on 127.0.0.1.  Every worker runs in its own mount namespace
(``unshare``) with private, empty tmpfs mounts over the driver's temporary folder (a folder
of this module's own) and over pytest's temporary root, so nothing the driver writes
there — its temporary staging folder, pytest's ``tmp_path`` — exists for the workers, as on
a cluster that spans machines, while the repository and the interpreter stay visible
wherever they are (a CI clone may itself lie in the system's temporary folder).  Where ``unshare`` is not allowed,
each worker gets its own ``TMPDIR`` instead, and the checks that need the isolation skip.

The project (the bundled sample's real road-sign photos, Pascal VOC, three copies of it),
its YOLOv5n predictions and every output live on a local S3 server (moto, 127.0.0.1).
The commands run with default settings; the tables must equal the local engine's, also
when a worker is killed in the middle of a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("distributed")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from click.testing import CliRunner  # noqa: E402

from autolabel.cli import cli  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "examples" / "sample_project"
SAMPLE_PREDICTIONS = REPO / "examples" / "sample_project_predictions" / "yolo"
COPIES = 3
DASK = str(Path(sys.executable).parent / "dask")
LABEL_MAP = {"map": {"stop sign": "stop", "traffic light": "trafficlight"}}


def _hide(folders: tuple[str, ...]) -> str:
    """Shell commands that put an empty tmpfs over each of ``folders``."""
    return " && ".join(f'mount -t tmpfs tmpfs "{folder}"' for folder in folders)


def _private_tmp_works(folders: tuple[str, ...]) -> bool:
    empty = " && ".join(f'test -z "$(ls -A "{folder}")"' for folder in folders)
    probe = ["unshare", "-rm", "sh", "-c", f"{_hide(folders)} && {empty}"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Cluster:
    """A scheduler and named workers, each a process group of its own, on 127.0.0.1."""

    def __init__(self, home: Path, hidden: tuple[str, ...]) -> None:
        self.home = home
        self.hidden = hidden  # the driver's folders, each an empty tmpfs for a worker
        self.isolated = _private_tmp_works(hidden)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        self.logs: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        scheduler_file = home / "scheduler.json"
        self._start(
            "scheduler",
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
            isolate=False,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            self._alive("scheduler")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start: {self.log('scheduler')}")
            time.sleep(0.2)
        time.sleep(0.2)
        self.address = json.loads(scheduler_file.read_text())["address"]
        from distributed import Client

        self.client = Client(self.address, timeout="60s")

    def _start(self, name: str, cmd: list[str], *, isolate: bool) -> None:
        env = dict(self.env)
        if isolate and self.isolated:
            script = f'{_hide(self.hidden)} && exec "$@"'
            cmd = ["unshare", "-rm", "sh", "-c", script, "sh", *cmd]
        elif isolate:
            own = self.home / f"tmp-{name}"
            own.mkdir(exist_ok=True)
            env["TMPDIR"] = str(own)
        self.logs[name] = self.home / f"{name}.log"
        with self.logs[name].open("ab") as log:
            self.procs[name] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _alive(self, name: str) -> None:
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited: {self.log(name)}")

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")[-3000:]

    def add_worker(self, name: str, *, isolate: bool = True) -> None:
        self._start(
            name,
            [DASK, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
             "--nworkers", "1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
             "--name", name, "--local-directory", f"{self.hidden[0]}/dask-{name}"],
            isolate=isolate,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while not self._named(name):
            self._alive(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not join: {self.log(name)}")
            time.sleep(0.2)

    def _named(self, name: str) -> list[str]:
        workers = self.client.scheduler_info()["workers"]
        return [str(a) for a, info in workers.items() if info.get("name") == name]

    def worker_address(self, name: str) -> str:
        (address,) = self._named(name)
        return address

    def kill_scheduler(self) -> None:
        proc = self.procs.pop("scheduler")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def kill(self, name: str) -> None:
        """SIGKILL the worker's whole process group (nanny and worker): a lost machine."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def driver_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The driver's temporary folder for this module: a folder of its own, which the
    workers see as empty, rather than the whole system temporary folder (which may hold
    the repository and its virtual environment)."""
    tmp_path_factory.getbasetemp()  # pytest's root first, outside the folder removed below
    folder = tempfile.mkdtemp(prefix="labeltriage-driver-")
    saved = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield folder
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)


def _driver_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    """The driver's temporary folder (:func:`driver_tmp`) and pytest's root."""
    return (tempfile.gettempdir(), str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, Any]]:
    import boto3
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="labeltriage")
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    yield {"fs": fs, "options": options}
    server.stop()


@pytest.fixture(scope="module")
def project(s3: dict[str, Any]) -> dict[str, str]:
    """The sample project three times over (360 items) with its predictions, on S3."""
    if not SAMPLE.is_dir():
        pytest.skip(f"bundled sample project not found at {SAMPLE}")
    fs = s3["fs"]
    files: dict[str, bytes] = {
        "preds/classes.txt": (SAMPLE_PREDICTIONS / "classes.txt").read_bytes()
    }
    for copy in range(COPIES):
        for image in sorted((SAMPLE / "images").glob("*.jpg")):
            stem = f"c{copy}_{image.stem}"
            files[f"roads/images/{stem}.jpg"] = image.read_bytes()
            xml = SAMPLE / "annotations" / f"{image.stem}.xml"
            if xml.exists():
                text = xml.read_text().replace(image.name, f"{stem}.jpg")
                files[f"roads/annotations/{stem}.xml"] = text.encode()
            pred = SAMPLE_PREDICTIONS / f"{image.stem}.txt"
            if pred.exists():
                files[f"preds/{stem}.txt"] = pred.read_bytes()
    fs.pipe({f"labeltriage/{k}": v for k, v in files.items()})
    fs.invalidate_cache()
    return {"source": "s3://labeltriage/roads", "predictions": "s3://labeltriage/preds"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), _driver_folders(tmp_path_factory))
    try:
        c.add_worker("wA")
        c.add_worker("wB")
        yield c
    finally:
        c.close()


def _score_args(s3: dict[str, Any], project: dict[str, str], out: str) -> list[str]:
    return [
        "score", "-s", project["source"], "-f", "voc",
        "--predictions", project["predictions"], "--predictions-format", "yolo",
        "--storage-options", json.dumps(s3["options"]), "--run-id", "same-run", "--out", out,
    ]  # fmt: skip


def _label_map(tmp_path: Path) -> list[str]:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(LABEL_MAP))
    return ["--label-map", str(path)]


def _table(s3: dict[str, Any], out: str) -> pd.DataFrame:
    s3["fs"].invalidate_cache()
    with s3["fs"].open(f"{out}/difficulty.parquet", "rb") as f:
        return pd.read_parquet(f)


def _staged(s3: dict[str, Any], out: str) -> list[str]:
    s3["fs"].invalidate_cache()
    return [p for p in s3["fs"].find(out) if ".labeltriage-staging" in p]


@pytest.fixture(scope="module")
def local_table(
    s3: dict[str, Any], project: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> pd.DataFrame:
    out = "s3://labeltriage/runs/local"
    extra = _label_map(tmp_path_factory.mktemp("local"))
    # --num-workers 0: forked DataLoader workers cannot share the driver's S3 client
    result = CliRunner().invoke(cli, [*_score_args(s3, project, out), *extra, "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    table = _table(s3, out)
    assert len(table) == COPIES * 120
    assert table["score"].notna().sum() > 300
    return table


def test_the_workers_cannot_see_the_driver_temp_files(cluster: Cluster, tmp_path: Path) -> None:
    if not cluster.isolated:
        pytest.skip(
            "unshare -m is not allowed here: the workers share the driver's temporary folder"
        )
    marker = Path(tempfile.mkdtemp()) / "driver-only"
    marker.write_text("x")
    seen = cluster.client.run(os.path.exists, str(marker))
    assert len(seen) == 2
    assert not any(seen.values())


def test_default_settings_on_s3_give_the_local_table(
    cluster: Cluster,
    s3: dict[str, Any],
    project: dict[str, str],
    local_table: pd.DataFrame,
    tmp_path: Path,
) -> None:
    out = "s3://labeltriage/runs/dask"
    args = [
        *_score_args(s3, project, out),
        *_label_map(tmp_path),
        "--engine",
        "dask",
        "--scheduler",
        cluster.address,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/difficulty.parquet and {out}/summary.json" in result.output
    pd.testing.assert_frame_equal(_table(s3, out), local_table)
    assert _staged(s3, out) == []  # the staged partitions are gone
    # both workers took part, and labeltriage's own log lines are in their logs
    logs = cluster.client.get_worker_logs()
    assert len(logs) == 2
    for lines in logs.values():
        assert any(
            "autolabel.engine_dask" in text and "opened predictions" in text for _, text in lines
        )


def test_staging_on_the_driver_disk_is_a_failed_run_with_one_error_line(
    cluster: Cluster, s3: dict[str, Any], project: dict[str, str], tmp_path: Path
) -> None:
    if not cluster.isolated:
        pytest.skip("unshare -m is not allowed here: the workers would read the driver's folder")
    staging = tempfile.mkdtemp()
    args = [
        *_score_args(s3, project, "s3://labeltriage/runs/bad"),
        "--engine",
        "dask",
        "--scheduler",
        cluster.address,
        "--staging",
        staging,
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "cannot read the staged partition" in result.output
    assert "--staging" in result.output
    assert "Traceback" not in result.output
    assert os.listdir(staging) == []  # cleaned up after the failure too


def test_workers_lost_mid_run_give_the_same_table(
    cluster: Cluster,
    s3: dict[str, Any],
    project: dict[str, str],
    local_table: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """A rolling restart while a run is going: wA is killed, wA2 joins, wB is killed; the
    run finishes on wA2 alone — a worker that joined after the run started and every
    worker present at its start gone."""
    out = "s3://labeltriage/runs/killed"
    args = [*_score_args(s3, project, out), *_label_map(tmp_path)]
    args += ["--engine", "dask", "--scheduler", cluster.address, "--partition-size", "8"]
    log = tmp_path / "run.log"
    before = _score_tasks_done(cluster.client)
    with log.open("wb") as f:
        run = subprocess.Popen(
            [sys.executable, "-m", "autolabel.cli", *args],
            env=cluster.env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    _kill_while_scoring(cluster, "wA", run, log, before)
    cluster.add_worker("wA2")
    _kill_while_scoring(cluster, "wB", run, log, before)
    assert run.wait(timeout=900) == 0, log.read_text()
    assert list(cluster.client.scheduler_info()["workers"]) == [cluster.worker_address("wA2")]
    pd.testing.assert_frame_equal(_table(s3, out), local_table)
    assert _staged(s3, out) == []


def _kill_while_scoring(
    cluster: Cluster, name: str, run: subprocess.Popen[bytes], log: Path, before: int
) -> None:
    """Kill worker ``name`` while it scores a partition of ``run`` (after two partitions
    of the run have finished)."""
    victim = cluster.worker_address(name)
    deadline = time.monotonic() + 300
    while True:
        assert run.poll() is None, f"the run ended before {name} was killed: {log.read_text()}"
        assert time.monotonic() < deadline, f"no partition ran on {name}"
        done = _score_tasks_done(cluster.client) - before
        processing = cluster.client.processing(workers=[victim]).get(victim, ())
        if done >= 2 and any(str(k).startswith("labeltriage-score") for k in processing):
            break
        time.sleep(0.02)
    cluster.kill(name)


def _score_tasks_done(client: Any) -> int:
    """How many times a score task finished on the scheduler so far."""

    def count(dask_scheduler: Any) -> int:  # defined here: sent by value to the scheduler
        return sum(
            prefix.state_counts["memory"]
            for name, prefix in dask_scheduler.task_prefixes.items()
            if name.startswith("labeltriage-score")
        )

    return int(client.run_on_scheduler(count))


def test_a_scheduler_lost_mid_run_is_a_failed_run_with_one_error_line(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Its own scheduler and worker (the worker reads the driver's disk here)."""
    if not SAMPLE.is_dir():
        pytest.skip(f"bundled sample project not found at {SAMPLE}")
    home = tmp_path_factory.mktemp("lost")
    small = Cluster(home, _driver_folders(tmp_path_factory))
    try:
        small.add_worker("w", isolate=False)
        args = [
            "-m",
            "autolabel.cli",
            "score",
            "-s",
            str(SAMPLE),
            "-f",
            "voc",
            "--scorers",
            "fourier",
        ]
        args += ["--engine", "dask", "--scheduler", small.address, "--partition-size", "4"]
        log = home / "run.log"
        with log.open("wb") as f:
            run = subprocess.Popen(
                [sys.executable, *args, "--out", str(home / "out")],
                env=small.env, stdout=f, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 300
        while _score_tasks_done(small.client) < 2:
            assert run.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no partition finished"
            time.sleep(0.05)
        small.kill_scheduler()
        assert run.wait(timeout=300) == 1, log.read_text()
        output = log.read_text()
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert "scheduler" in errors[0]
        assert "Traceback" not in output
        assert not (home / "out" / "difficulty.parquet").exists()
        assert not (home / "out" / ".labeltriage-staging").exists()
    finally:
        small.close()
