"""Start a real vLLM OpenAI server (CPU build) on loopback, with a tiny model.

Used by the test suite (session fixture), the benchmarks and `make demo-live`.
vLLM lives in its own virtual environment (`.venv-vllm`, ~3 GB, made by
`make vllm-env`) so it never constrains the project's own dependencies.
See shared/notes/vllm-on-cpu.md for how and why it is run this way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from finops.loopback import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VLLM_ENV = Path(os.environ.get("FINOPS_VLLM_ENV", PROJECT_ROOT / ".venv-vllm"))
MODEL_DIR = PROJECT_ROOT / "data" / "cache" / "tiny-llama"
DEFAULT_NAMES = ("small", "mid", "large")


class VLLMUnavailable(RuntimeError):
    """vLLM cannot be installed or started here; the message says why."""


def vllm_python() -> Path:
    return VLLM_ENV / "bin" / "python"


def ensure_env() -> Path:
    """Install `.venv-vllm` via `make vllm-env` on first use; return its python."""
    py = vllm_python()
    marker = VLLM_ENV / ".installed"
    if py.exists() and marker.exists():
        return py
    proc = subprocess.run(
        ["make", "-C", str(PROJECT_ROOT), "vllm-env"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not py.exists():
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise VLLMUnavailable(f"could not install vLLM CPU build (make vllm-env): {tail}")
    return py


def ensure_model(out: Path = MODEL_DIR) -> Path:
    """Build the tiny random-weight model once; later calls reuse it."""
    if (out / "finops_tiny_model.json").exists():
        return out
    py = ensure_env()
    proc = subprocess.run(
        [str(py), str(Path(__file__).parent / "_tiny_model.py"), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VLLMUnavailable(f"building the tiny model failed: {proc.stderr[-2000:]}")
    return out


@dataclass
class VLLMServer:
    """A running server: `base_url` ends in /v1; `metrics_url` is /metrics."""

    port: int
    names: tuple[str, ...]
    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self.root_url}/metrics"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole server (for failover tests)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def wait_ready(
    root_url: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise VLLMUnavailable(
                f"vLLM server exited with code {process.returncode} before it was ready"
            )
        try:
            if httpx.get(f"{root_url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise VLLMUnavailable(f"vLLM server at {root_url} not ready after {timeout:.0f}s")


def start(
    names: Sequence[str] = DEFAULT_NAMES,
    *,
    port: int | None = None,
    log_dir: Path | None = None,
    timeout: float = 600,
    max_model_len: int = 1024,
    extra_args: Sequence[str] = (),
) -> VLLMServer:
    """Start a server serving the tiny model under each of `names` (tiers)."""
    py = ensure_env()
    model = ensure_model()
    port = port or free_port()
    log_path = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"vllm-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_LOGGING_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    cmd = [
        str(py), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--dtype", "float32",
        "--max-model-len", str(max_model_len),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--enable-prompt-tokens-details",
        "--served-model-name", *names,
        *extra_args,
    ]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - the child process owns it
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    server = VLLMServer(port=port, names=tuple(names), process=proc, log_path=log_path)
    try:
        wait_ready(server.root_url, timeout, proc)
    except BaseException:
        server.stop()
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise VLLMUnavailable(f"vLLM did not start (log {log_path}):\n{tail}") from None
    return server


def attach(url: str, names: Sequence[str] = DEFAULT_NAMES) -> VLLMServer:
    """Use an already running server (e.g. FINOPS_VLLM_URL=http://127.0.0.1:18000)."""
    root = url.rstrip("/").removesuffix("/v1")
    port = int(root.rsplit(":", 1)[1])
    wait_ready(root, 30)
    return VLLMServer(port=port, names=tuple(names), process=None, log_path=None)


@contextlib.contextmanager
def running(names: Sequence[str] = DEFAULT_NAMES, **kwargs: object) -> Iterator[VLLMServer]:
    server = start(names, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # python -m finops.vllm_local [PORT] : serve until Ctrl-C
    srv = start(port=int(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(srv.base_url, flush=True)
    try:
        srv.process.wait()  # type: ignore[union-attr]
    except KeyboardInterrupt:
        srv.stop()
