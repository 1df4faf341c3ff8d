"""``labeltriage score --engine dask`` on a cluster whose workers cannot see the driver's disk.

A scheduler and two workers run as separate processes on 127.0.0.1; each worker runs in
its own mount namespace (``unshare -m``) with a private, empty ``/tmp``, so nothing the
driver writes to its temporary folders (or pytest's) is visible to them.  The project, its
YOLO predictions, the label map and the output all live on a local S3 server; the command
uses the default options.  The table must equal the local engine's, and it must still equal
it when a worker is killed in the middle of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("distributed")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample_project"
SAMPLE_PREDICTIONS = REPO / "examples" / "sample_project_predictions" / "yolo"
N_IMAGES = 40
PARTITION = 4  # small partitions: a killed worker always has work left in the queue
LABEL_MAP = "map:\n  stop sign: stop\n  traffic light: trafficlight\n"
COLUMNS = ["item_id", "score", "tier", "rank", "fourier", "true_error"]


def _private_tmp_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /tmp"],
        capture_output=True,
    )
    return probe.returncode == 0


if not _private_tmp_works():
    pytest.skip(
        "needs `unshare -m` and a tmpfs mount (root or CAP_SYS_ADMIN) to give each Dask worker "
        "its own /tmp",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


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
    yield {"fs": s3fs.S3FileSystem(**options, skip_instance_cache=True), "options": options}
    server.stop()


@pytest.fixture(scope="module")
def s3_project(s3: dict[str, Any]) -> dict[str, str]:
    if not SAMPLE.is_dir():
        pytest.skip(f"bundled sample project not found at {SAMPLE}")
    fs = s3["fs"]
    stems = sorted(p.stem for p in (SAMPLE / "images").glob("*.jpg"))[:N_IMAGES]
    for stem in stems:
        fs.put_file(str(SAMPLE / "images" / f"{stem}.jpg"), f"labeltriage/roads/images/{stem}.jpg")
        for src, dst in (
            (SAMPLE / "annotations" / f"{stem}.xml", f"labeltriage/roads/annotations/{stem}.xml"),
            (SAMPLE_PREDICTIONS / f"{stem}.txt", f"labeltriage/preds/{stem}.txt"),
        ):
            if src.exists():
                fs.put_file(str(src), dst)
    fs.put_file(str(SAMPLE_PREDICTIONS / "classes.txt"), "labeltriage/preds/classes.txt")
    fs.pipe_file("labeltriage/label_map.yaml", LABEL_MAP.encode())
    fs.invalidate_cache()
    return {
        "source": "s3://labeltriage/roads",
        "predictions": "s3://labeltriage/preds",
        "label_map": "s3://labeltriage/label_map.yaml",
    }


class Cluster:
    """A scheduler and worker processes on 127.0.0.1; every worker with its own ``/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scheduler = self._start(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", self.address.rsplit(":", 1)[1], "--no-dashboard"],
            "scheduler",
        )  # fmt: skip

    def _start(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (kept open while it runs)
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        return proc

    def add_worker(self, name: str) -> None:
        worker = (
            f"{sys.executable} -m distributed.cli.dask_worker {self.address} --host 127.0.0.1"
            " --nthreads 1 --no-nanny --no-dashboard --local-directory /tmp/dask"
        )
        # A private, empty /tmp: the driver's temporary files do not exist for this worker.
        script = f"mount -t tmpfs none /tmp && exec {worker}"
        self._start(["unshare", "-m", "--propagation", "private", "sh", "-c", script], name)

    def client(self) -> Any:
        from distributed import Client

        return Client(self.address, timeout=30)

    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.add_worker("worker-a")
    c.add_worker("worker-b")
    with c.client() as client:
        _wait(lambda: len(client.scheduler_info()["workers"]) == 2, "two workers", timeout=90)
    yield c
    c.close()


def _score_argv(project: dict[str, str], options: dict[str, Any], out: str) -> list[str]:
    return [
        sys.executable, "-m", "autolabel.cli", "score",
        "--source", project["source"], "--format", "voc",
        "--predictions", project["predictions"], "--predictions-format", "yolo",
        "--label-map", project["label_map"],
        "--storage-options", json.dumps(options),
        "--run-id", "same-run", "--no-progress", "--out", out,
    ]  # fmt: skip


def _table(s3: dict[str, Any], out: str) -> pd.DataFrame:
    s3["fs"].invalidate_cache()
    with s3["fs"].open(f"{out.removeprefix('s3://')}/difficulty.parquet", "rb") as f:
        return pd.read_parquet(f)


def _same(local: pd.DataFrame, dask: pd.DataFrame) -> None:
    assert set(COLUMNS) <= set(local.columns)
    assert local["score"].notna().sum() == N_IMAGES
    pd.testing.assert_frame_equal(local[COLUMNS], dask[COLUMNS])


@pytest.fixture(scope="module")
def local_table(s3: dict[str, Any], s3_project: dict[str, str]) -> pd.DataFrame:
    out = "s3://labeltriage/out/local"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        _score_argv(s3_project, s3["options"], out), cwd=REPO, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()
    return _table(s3, out)


def test_workers_that_cannot_see_the_driver_disk_give_the_local_table(
    s3: dict[str, Any], s3_project: dict[str, str], local_table: pd.DataFrame, cluster: Cluster
) -> None:
    out = "s3://labeltriage/out/dask"
    argv = [*_score_argv(s3_project, s3["options"], out), "--engine", "dask"]
    done = subprocess.run(
        [*argv, "--scheduler", cluster.address], cwd=REPO, env=cluster.env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode() + cluster.log("worker-a")
    _same(local_table, _table(s3, out))
    # the staged partitions were removed after the run
    assert not s3["fs"].exists("labeltriage/out/dask/.labeltriage-staging")


def test_a_worker_killed_mid_run_still_gives_the_local_table(
    s3: dict[str, Any], s3_project: dict[str, str], local_table: pd.DataFrame, cluster: Cluster
) -> None:
    out = "s3://labeltriage/out/killed"
    argv = [*_score_argv(s3_project, s3["options"], out), "--engine", "dask"]
    argv += ["--scheduler", cluster.address, "--partition-size", str(PARTITION)]
    run = subprocess.Popen(
        argv, cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with cluster.client() as client:

        def busy_worker() -> Any:
            processing = client.processing()
            return next((w for w, tasks in processing.items() if tasks), None)

        victim = _wait(busy_worker, "a worker to take a partition", timeout=120)
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: len(client.scheduler_info()["workers"]) == 1, "the scheduler to drop it")
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr.decode()
    _same(local_table, _table(s3, out))
