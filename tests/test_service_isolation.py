"""A job reads only its project's area, its own jobs' folders and the shared libraries, and writes
only its own run directory: every path key of a submitted config, in the TOML or in an override,
is checked at submit (403), on SQLite and PostgreSQL. The regression: a job of another project
once trained into a run directory it named with `run.dir`, overwriting that team's checkpoint."""

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from supercluster.cluster import jobs as fleet_jobs
from supercluster.cluster.backends.base import JobSpec, train_command
from supercluster.cluster.fleet import init_fleet
from supercluster.cluster.isolation import JobArea, PathRefused, pin_paths
from supercluster.paths import project_area
from supercluster.service import tenancy
from supercluster.service.app import create_app
from supercluster.service.models import Project
from supercluster.service.store import Store
from supercluster.train.config import load_config, path_keys
from test_service_jobs import tiny_config


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _wait(client, url, headers, timeout=240):
    deadline = time.monotonic() + timeout
    while (job := client.get(url, headers=headers).json())["state"] in ("pending", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    return job


@pytest.fixture
def tenants(service_url):
    store = Store(service_url)
    with store.session() as s:
        op = {"Authorization": f"Bearer {tenancy.init_operator(s)}"}
    init_fleet(store.fleet, "local", gpus=2)
    client = TestClient(create_app(store=store))
    tokens, ids = {}, {}
    for org, project in (("acme", "llm"), ("globex", "web")):
        client.post("/v1/orgs", headers=op, json={"name": org})
        client.post(f"/v1/orgs/{org}/projects", headers=op, json={"name": project}).raise_for_status()
        with store.reading() as s:
            ids[project] = s.scalar(sa.select(Project.id).where(Project.name == project))
        client.post("/v1/users", headers=op, json={"name": f"{project}-member", "org": org})
        token = client.post("/v1/tokens", headers=op, json={"user": f"{project}-member", "project": project, "role": "member"}).json()["token"]
        tokens[project] = {"Authorization": f"Bearer {token}"}
        r = client.post(f"/v1/projects/{project}/clusters", headers=tokens[project], json={"name": "c", "gpus": 1})
        assert r.json()["state"] == "ready", r.text
    yield client, tokens, ids, store
    client.close()
    store.dispose()


@pytest.mark.slow
def test_no_path_key_reaches_another_projects_run(tenants, library_corpus, tmp_path):
    client, tokens, ids, store = tenants
    web, llm = tokens["web"], tokens["llm"]
    # web's job trains to a checkpoint
    r = client.post("/v1/projects/web/jobs", headers=web, json={"cluster": "c", "config": tiny_config(library_corpus, 3), "max_restarts": 0})
    assert r.status_code == 202, r.text
    wid = r.json()["id"]
    assert _wait(client, f"/v1/projects/web/jobs/{wid}", web)["state"] == "completed"
    their_run = Path(fleet_jobs.job_status(store.fleet, wid)["run_dir"])
    assert (their_run / "checkpoints").is_dir()
    before = _digests(their_run)

    # llm's own area, with a link planted into web's run
    mine = project_area(ids["llm"])
    mine.mkdir(parents=True, exist_ok=True)
    link = mine / "theirs"
    link.unlink(missing_ok=True)
    link.symlink_to(their_run)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the project's\n" * 100)
    attacks = {
        "absolute": str(their_run),
        "dotdot": f"../p{ids['web']}/../../jobs/{their_run.parent.name}/run",
        "symlink": str(link),
        "another project's job": str(their_run.parent),
        "outside file": str(outside),
    }
    assert set(path_keys()) == {"data.path", "data.mix", "run.dir"}  # a new path key must join this table
    refused = 0
    for key in path_keys():
        section, name = key.split(".")
        for kind, value in attacks.items():
            for how in ("config", "override"):
                config = tiny_config(library_corpus, 2)
                overrides = []
                if key == "data.mix":  # a list of tables, each naming a prepared folder
                    config["data"].pop("path", None)
                    if how == "config":
                        config["data"]["mix"] = [{"path": str(library_corpus), "weight": 1.0}, {"path": value, "weight": 1.0}]
                    else:
                        overrides = [f'data.mix=[{{path={json.dumps(value)}, weight=1.0}}]']
                elif how == "config":
                    config.setdefault(section, {})[name] = value
                else:
                    overrides = [f"{key}={value}"]
                r = client.post("/v1/projects/llm/jobs", headers=llm,
                                json={"cluster": "c", "config": config, "overrides": overrides, "max_restarts": 0})
                if key == "data.path" and kind == "symlink":  # the link itself sits in llm's area: where it leads counts
                    assert r.status_code == 403 and str(their_run) in r.json()["detail"], (key, kind, how, r.text)
                assert r.status_code == 403, (key, kind, how, r.text)
                assert key in r.json()["detail"]
                refused += 1
    assert refused == len(path_keys()) * len(attacks) * 2
    assert client.get("/v1/projects/llm/jobs", headers=llm).json() == []  # nothing was started
    assert _digests(their_run) == before  # web's checkpoint untouched

    # What a project may read: the shared data library, its own area (relative paths start there)
    link.unlink()
    (mine / "corpus").mkdir(exist_ok=True)
    (mine / "corpus" / "a.py").write_text((library_corpus / sorted(os.listdir(library_corpus))[0]).read_text())
    for path in (str(library_corpus), "corpus"):
        config = tiny_config(library_corpus, 2)
        config["data"]["path"] = path
        config["run"] = {"dir": "runs/tiny"}  # as configs/*.toml write it: inside the job's own folder
        r = client.post("/v1/projects/llm/jobs", headers=llm, json={"cluster": "c", "config": config, "max_restarts": 0})
        assert r.status_code == 202, r.text
        assert _wait(client, f"/v1/projects/llm/jobs/{r.json()['id']}", llm)["state"] == "completed"
    assert _digests(their_run) == before


def test_a_local_job_cannot_name_its_run_dir_and_reads_through_checked_absolute_paths(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('[model]\npreset = "tiny"\n[train]\nseq_len = 64\n[data]\npath = "corpus"\n[run]\ndir = "runs/tiny"\n')
    (tmp_path / "corpus").mkdir()
    pinned = pin_paths(config, ["train.steps=3"], JobArea(base=tmp_path))
    assert pinned[0] == "train.steps=3"
    assert load_config(config, pinned).data.path == str((tmp_path / "corpus").resolve())
    for bad in ("/elsewhere/run", "../x", "a/../../x"):
        with pytest.raises(PathRefused, match="run.dir"):
            pin_paths(config, [f"run.dir={bad}"], JobArea(base=tmp_path))
    with pytest.raises(PathRefused, match="data.path"):
        pin_paths(config, ["data.path=../../etc"], JobArea(base=tmp_path, readable=(tmp_path,)))
    # the fleet's run directory is the last word on the command line, whatever the overrides say
    spec = JobSpec(job_id=1, job_dir="/jobs/job-1", config=str(config), overrides=("run.dir=/victim",), nodes=("n",),
                   gpus_per_node=1, max_restarts=0)
    cmd = train_command(spec, 1)
    assert cmd[-2:] == ["--set", "run.dir=/jobs/job-1/run"]
    assert load_config(config, [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]).run.dir == "/jobs/job-1/run"
