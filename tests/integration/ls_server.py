"""Install Label Studio into its own virtual environment and run it on 127.0.0.1.

Label Studio is a large Django application with pinned dependencies of its own, so it
lives in a separate venv (``.ls-venv`` at the repository root, git-ignored) and never
in the project's ``.venv``.  :func:`ensure_venv` creates it on first use
(``pip install label-studio``, about 90 s and 1 GB); :class:`LabelStudioServer` starts
``label-studio start`` with a fresh data directory, a known user and a legacy API
token, waits until ``/health`` answers, and stops the process on exit.

Run by hand::

    python tests/integration/ls_server.py --port 8080   # prints URL and token, Ctrl-C stops
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LABELTRIAGE_LS_VENV", REPO / ".ls-venv"))
LS_REQUIREMENT = os.environ.get("LABELTRIAGE_LS_REQUIREMENT", "label-studio>=1.20")
START_TIMEOUT_S = 600.0  # a fresh database migrates first; slow on a busy 2-core machine


def ls_executable(venv: Path = LS_VENV) -> Path:
    return venv / "bin" / "label-studio"


def ensure_venv(venv: Path = LS_VENV, requirement: str = LS_REQUIREMENT) -> Path:
    """Create ``venv`` with Label Studio installed, unless it is already there."""
    exe = ls_executable(venv)
    if exe.exists():
        return exe
    log.warning("installing %s into %s (first run only, about 90 s)", requirement, venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True)
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing after installing {requirement}")
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabelStudioServer:
    """A Label Studio process on ``127.0.0.1:port`` with its own data directory.

    ``files_root`` (optional) is served through Label Studio's local-files storage, so
    tasks may reference images as ``/data/local-files/?d=<path relative to files_root>``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        files_root: Path | None = None,
        username: str = "triage@example.com",
        password: str | None = None,
        token: str | None = None,
        venv: Path = LS_VENV,
    ) -> None:
        self.port = port or free_port()
        self._own_data_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ls-data-"))
        self.files_root = files_root
        self.username = username
        self.password = password or secrets.token_urlsafe(12)
        self.token = token or secrets.token_hex(20)
        self.venv = venv
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.data_dir / "label-studio.log"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def start(self, timeout_s: float = START_TIMEOUT_S) -> LabelStudioServer:
        exe = ensure_venv(self.venv)
        env = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "COLLECT_ANALYTICS": "false",
            "DJANGO_DB": "sqlite",
            "PYTHONUNBUFFERED": "1",
        }
        if self.files_root is not None:
            env["LOCAL_FILES_SERVING_ENABLED"] = "true"
            env["LOCAL_FILES_DOCUMENT_ROOT"] = str(self.files_root)
        cmd = [
            str(exe), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--host", self.url, "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            # NAME=VALUE: a generated value may start with "-", which a separate argument
            # would turn into an option
            f"--username={self.username}", f"--password={self.password}",
            f"--user-token={self.token}", "--enable-legacy-api-token",
        ]  # fmt: skip
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self._log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
        self._proc = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"label-studio exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{self.url}/api/projects", headers=self.headers, timeout=5)
                if r.status_code == 200:
                    return self
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(
            f"label-studio did not answer within {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--files-root", type=Path, default=None)
    parser.add_argument("--token", default=None)
    parser.add_argument(
        "--install-only", action="store_true", help="only create the Label Studio venv"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.install_only:
        print(ensure_venv())
        return
    server = LabelStudioServer(
        port=args.port, data_dir=args.data_dir, files_root=args.files_root, token=args.token
    )
    with server:
        print(
            f"url={server.url} token={server.token} user={server.username} password={server.password}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
