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


def _group_threads(pgid: int) -> list[tuple[int, str]]:
    """(thread id, process name) for every thread of every process in process group `pgid`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            # the fields after ")" are: state ppid pgrp ...
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            name = (d / "comm").read_text().strip()
            out += [(int(t.name), name) for t in (d / "task").iterdir()]
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return out


def pin_engine(server: VLLMServer, engine_cpus: set[int]) -> set[int]:
    """Pin vLLM's engine processes (EngineCore, Worker) to `engine_cpus`, the rest elsewhere.

    Why: on a small CPU box the engine's two processes hand work to each other through
    shared memory with spin-and-yield loops. Left to the OS scheduler they land on
    either core, share it with the HTTP frontend by chance, and capacity swings 3x
    from one minute to the next (measured 4.8-15 req/s at 32 concurrent). With the
    engine on its own core and the frontend (and a load generator) on the others it
    is steady within about 5% (34-37 req/s): the layout of a GPU server, where the
    engine runs on the device and the frontend on the host. Returns the CPUs left
    for the frontend, so a load generator can pin itself there too.
    """
    if server.process is None:
        raise ValueError("only a server this process started can be pinned")
    allowed = os.sched_getaffinity(0)
    frontend = allowed - engine_cpus
    if not engine_cpus <= allowed or not frontend:
        raise ValueError(
            f"engine CPUs {sorted(engine_cpus)} must be a strict subset of the "
            f"allowed CPUs {sorted(allowed)}"
        )
    for tid, name in _group_threads(server.process.pid):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, engine_cpus if name.startswith("VLLM::") else frontend)
    return frontend


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
    engine_cpus: set[int] | None = None,
) -> VLLMServer:
    """Start a server serving the tiny model under each of `names` (tiers).

    `engine_cpus` pins the engine there and the HTTP frontend elsewhere (see
    `pin_engine`); benchmarks that compare load levels want it.
    """
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
        # keep Responses API answers (`store`) so follow-ups and retrievals work, as a
        # deployment using them must (vLLM keeps them in memory, unbounded: fine for a
        # test or demo server)
        "VLLM_ENABLE_RESPONSES_API_STORE": os.environ.get("VLLM_ENABLE_RESPONSES_API_STORE", "1"),
    }
    if engine_cpus:
        # the worker's OpenMP threads on the engine's cores from their first instruction
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(engine_cpus)))
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
        if engine_cpus:
            pin_engine(server, engine_cpus)
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
