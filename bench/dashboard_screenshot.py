"""optuna-dashboard on a finished study, as a subprocess, and a screenshot of its study page.

    python -m bench.dashboard_screenshot --db tutorials/out/fms.db      # after tutorial 1
    # -> bench/results/dashboard/study.png (and trials.png: the Trials (List) tab)

``dashboard_server`` is also what tests/test_dashboard_server.py starts. The screenshot needs a
Chromium (Debian: ``apt-get install -y chromium``); the dashboard is a JavaScript app, so Chromium
is given virtual time to render it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import contextlib
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

RESULTS = Path(__file__).resolve().parent / "results" / "dashboard"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dashboard_command(storage: str, artifact_dir: Path | None, host: str, port: int) -> list[str]:
    """This interpreter's optuna-dashboard (the console script next to it, else the module's CLI)."""
    exe = Path(sys.executable).parent / "optuna-dashboard"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]
    cmd += [storage, "--host", host, "--port", str(port), "--quiet"]
    if artifact_dir is not None:
        cmd += ["--artifact-dir", str(artifact_dir)]
    return cmd


@contextlib.contextmanager
def dashboard_server(storage: str, artifact_dir: Path | None = None, *, host: str = "127.0.0.1",
                     timeout: float = 60.0) -> Iterator[str]:
    """Start optuna-dashboard on a free port, wait until its API answers, yield its base URL; stop it after."""
    port = free_port(host)
    proc = subprocess.Popen(dashboard_command(storage, artifact_dir, host, port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"optuna-dashboard exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{base}/api/meta", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"optuna-dashboard did not answer at {base} within {timeout:.0f} s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(url: str, png: Path, *, width: int = 1400, height: int = 900, budget_ms: int = 15000) -> None:
    """One headless Chromium screenshot of ``url`` after ``budget_ms`` of virtual time (JS renders)."""
    exe = chromium()
    if exe is None:
        raise SystemExit("No Chromium found: apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
         f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600,
    )
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot of {url}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=Path("tutorials/out/fms.db"))
    parser.add_argument("--artifact-dir", type=Path, default=None, help="default: fms-artifacts/ next to --db")
    parser.add_argument("--study-id", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--height", type=int, default=2000, help="tall enough for the lineage figure below the built-in plots")
    args = parser.parse_args(argv)
    db = args.db.resolve()
    artifacts = (args.artifact_dir or db.parent / "fms-artifacts").resolve()
    with dashboard_server(f"sqlite:///{db}", artifacts) as base:
        study = f"{base}/dashboard/studies/{args.study_id}"
        for name, url in (("study", study), ("trials", f"{study}/trials")):
            screenshot(url, args.out / f"{name}.png", height=args.height)
            print(f"{url} -> {args.out / f'{name}.png'}")


if __name__ == "__main__":
    main()
