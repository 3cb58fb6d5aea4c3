"""Shared fixtures. Every test session gets its own SUPERCLUSTER_HOME (caches, fleet DB).

Tests marked `slurm` or `postgres` may skip on a developer's machine that lacks Slurm or a
PostgreSQL server (with the reason), but in CI (`CI=true`) such a skip fails the test: CI must
run them, and a setup step that silently did nothing must not pass as green.
"""

import contextlib
import functools
import os
import sysconfig
from pathlib import Path

import pytest

MUST_RUN_IN_CI = ("slurm", "postgres")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    needs = [name for name in MUST_RUN_IN_CI if item.get_closest_marker(name)]
    if report.skipped and needs and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"a {'/'.join(needs)} test skipped in CI ({reason}); CI must provide what it needs"


@pytest.fixture(scope="session", autouse=True)
def supercluster_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("supercluster-home")
    old = os.environ.get("SUPERCLUSTER_HOME")
    os.environ["SUPERCLUSTER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SUPERCLUSTER_HOME", None)
    else:
        os.environ["SUPERCLUSTER_HOME"] = old


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A folder of real Python source (a few stdlib packages, ~200 KB): tiny models learn it fast."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for i, src in enumerate(sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:8]):
        (root / f"{i:02d}_{src.name}").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def library_corpus(small_corpus, supercluster_home) -> Path:
    """small_corpus in the shared data library, where the service lets every project's jobs read it."""
    import shutil

    from supercluster.paths import data_library

    return Path(shutil.copytree(small_corpus, data_library() / "small-corpus"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_corpus) -> Path:
    """A tiny model trained 30 steps on small_corpus: the run directory the serving tests serve."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("serve") / "tiny-run"
    out = subprocess.run([str(Path(sys.executable).with_name("supercluster")), "train", "configs/tiny.toml", "--set",
                          f"run.dir={run}", "--set", f"data.path={small_corpus}", "--set", "train.steps=30", "--set",
                          "train.eval_every=0", "--no-sample"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture
def tiny_job(small_corpus):
    """`tiny_job(steps, checkpoint_every)`: the overrides of a tiny fp32 training job on small_corpus."""
    def overrides(steps: int, checkpoint_every: int = 3) -> list[str]:
        return [f"data.path={small_corpus}", "model.preset=tiny", f"train.steps={steps}",
                f"train.checkpoint_every={checkpoint_every}", "train.eval_every=1000", "train.precision=fp32",
                "train.seq_len=32", "train.micro_batch=2", "train.global_batch=4"]
    return overrides


SERVICE_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def service_url(request, tmp_path):
    """A fresh service database: a SQLite file, and a private schema on the PostgreSQL server
    (skipped with the reason when it is down, except under CI=true where that fails)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    import uuid

    try:
        import psycopg2

        conn = psycopg2.connect(SERVICE_PG_URL, connect_timeout=3)
    except Exception as err:  # any failure means: no server to test against
        reason = f"PostgreSQL at {SERVICE_PG_URL} is not reachable ({type(err).__name__})"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"sc_svc_{uuid.uuid4().hex[:10]}"
    conn.autocommit = True
    conn.cursor().execute(f"CREATE SCHEMA {schema}")
    yield f"{SERVICE_PG_URL}?options=-csearch_path%3D{schema}"
    conn.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
    conn.close()


@pytest.fixture
def live_service(tmp_path):
    """The service on a local 2-GPU fleet, served by uvicorn on a loopback port (for clients that
    speak real HTTP: a browser, the openai SDK). Yields (base URL, tokens): tokens["op"] is the
    operator's; `grant(project, role)` gives tokens[project, role] (orgs and users made as needed)."""
    with _service_on_loopback(tmp_path) as service:
        yield service


@pytest.fixture
def start_service(tmp_path):
    """live_service, started by the test: `with start_service(backend, **create_app options) as
    (base, tokens, grant)`, on a fresh fleet of that backend (local: 2 GPUs)."""
    return functools.partial(_service_on_loopback, tmp_path)


@contextlib.contextmanager
def _service_on_loopback(tmp_path, backend: str = "local", **app_options):
    import threading
    import time

    import httpx
    import uvicorn

    from supercluster.cluster.fleet import init_fleet
    from supercluster.service import tenancy
    from supercluster.service.app import create_app
    from supercluster.service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    with store.session() as s:
        tokens = {"op": tenancy.init_operator(s)}
    init_fleet(store.fleet, backend, **({"gpus": 2} if backend == "local" else {}))
    app = create_app(store=store, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    def grant(org: str, project: str, role: str) -> str:
        op = {"Authorization": f"Bearer {tokens['op']}"}
        with httpx.Client(base_url=base, timeout=60) as c:
            c.post("/v1/orgs", headers=op, json={"name": org})  # 409 when it exists: fine
            c.post(f"/v1/orgs/{org}/projects", headers=op, json={"name": project})
            c.post("/v1/users", headers=op, json={"name": f"{project}-{role}", "org": org}).raise_for_status()
            tokens[project, role] = c.post("/v1/tokens", headers=op, json={
                "user": f"{project}-{role}", "project": project, "role": role}).json()["token"]
        return tokens[project, role]

    try:
        yield base, tokens, grant
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.dispose()
