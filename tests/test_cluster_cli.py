"""The fleet/cluster/job commands: JSON output and bad input (one sentence, exit 2, state unchanged)."""

import json

import pytest

from supercluster.cli.main import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


@pytest.fixture
def sim(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    spec = tmp_path / "spec.toml"
    spec.write_text('gpu_type = "h100"\nnodes = 64\ngpus_per_node = 8\nnodes_per_leaf = 16\nleaves_per_pod = 2\n')
    code, out, err = run(capsys, "fleet", "init", "--backend", "sim", "--spec", str(spec), "--db", url, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["nodes"], info["gpus"], info["pods"], len(info["leaves"])) == (64, 512, 2, 4)
    return url


def state(capsys, url):
    code, clusters, _ = run(capsys, "cluster", "list", "--db", url, "--json")
    code2, fleet, _ = run(capsys, "fleet", "show", "--db", url, "--json")
    assert code == code2 == 0
    return json.loads(clusters), json.loads(fleet)


def test_create_show_list_delete_json(sim, capsys):
    code, out, _ = run(capsys, "cluster", "create", "train1", "--gpus", "256", "--db", sim, "--json")
    c = json.loads(out)
    assert code == 0 and c["state"] == "ready" and c["leaves"] == c["lower_bound"] == 2 and c["pods"] == 1
    assert set(c) >= {"name", "state", "gpus", "gpu_type", "nodes", "switches", "leaves", "pods", "lower_bound", "jobs"}
    code, out, _ = run(capsys, "cluster", "show", "train1", "--db", sim)
    assert code == 0 and "2 leaf switches" in out and "lower bound 2" in out
    clusters, fleet = state(capsys, sim)
    assert [x["name"] for x in clusters] == ["train1"] and fleet["free_gpus"] == 256
    code, out, _ = run(capsys, "cluster", "delete", "train1", "--db", sim, "--json")
    assert code == 0 and json.loads(out) == {"deleted": "train1", "started": []}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "12"], "not a multiple of 8"),
        (["--gpus", "0"], "greater than or equal to 1"),
        (["--gpus", "-8"], "greater than or equal to 1"),
        (["--gpus", "1024"], "more than the fleet"),
        (["--gpus", "8", "--gpu-type", "h1000"], "did you mean"),
        (["--gpus", "8", "--gpu-type", "a100"], "no a100-80gb nodes"),
        (["--gpus", "256", "--max-switches", "1"], "at least 2 leaf switches"),
        (["--gpus", "8", "--no-wait"], "do not fit now"),
        (["--gpus", "8"], "already exists"),
    ],
)
def test_bad_create_is_one_sentence_exit_2_state_unchanged(sim, capsys, args, message):
    run(capsys, "cluster", "create", "taken", "--gpus", "504", "--db", sim)  # leaves one free node... of 8 GPUs
    run(capsys, "cluster", "create", "filler", "--gpus", "8", "--db", sim)  # now the fleet is full
    before = state(capsys, sim)
    name = "taken" if message == "already exists" else "new"
    code, out, err = run(capsys, "cluster", "create", name, *args, "--db", sim)
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert state(capsys, sim) == before


def test_unknown_names_and_bad_backend(sim, capsys):
    for args in (["cluster", "show", "nope"], ["cluster", "delete", "nope"], ["job", "status", "7"],
                 ["fleet", "init", "--backend", "slurrm"], ["fleet", "init", "--backend", "sim"]):
        code, _, err = run(capsys, *args, "--db", sim)
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, (args, err)


def test_sim_fleet_runs_no_jobs(sim, capsys, tmp_path):
    run(capsys, "cluster", "create", "c", "--gpus", "8", "--db", sim)
    config = tmp_path / "c.toml"
    config.write_text("[train]\nsteps = 1\n")
    code, _, err = run(capsys, "job", "submit", str(config), "--cluster", "c", "--db", sim)
    assert code == 2 and "runs no jobs" in err
    code, out, _ = run(capsys, "job", "list", "--db", sim, "--json")
    assert code == 0 and json.loads(out) == []


def test_priority_preempts_and_show_says_why(sim, capsys):
    assert run(capsys, "cluster", "create", "bulk", "--gpus", "512", "--owner", "batch", "--db", sim)[0] == 0
    code, out, _ = run(capsys, "cluster", "create", "urgent", "--gpus", "64", "--priority", "3", "--db", sim, "--json")
    assert code == 0 and json.loads(out)["state"] == "ready" and json.loads(out)["priority"] == 3
    code, out, _ = run(capsys, "cluster", "show", "bulk", "--db", sim)
    assert code == 0 and "queued (position 1)" in out and "owner batch" in out
    assert "preempted by cluster 'urgent' (priority 3 over 0)" in out


def test_node_drain_and_undrain_on_the_local_database_and_queued_clusters_say_why(sim, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the table's reason column, unwrapped
    assert run(capsys, "node", "drain", "sim00001", "--reason", "fan replaced", "--db", sim)[0] == 0
    code, out, _ = run(capsys, "cluster", "create", "all", "--gpus", "512", "--db", sim)
    assert code == 0 and "queued (position 1)" in out
    assert ("waiting for drained nodes: 8 of the fleet's 512 h100 GPUs are on drained or down nodes (sim00001); "
            "`supercluster node undrain NODE` returns one to service") in out
    code, out, _ = run(capsys, "cluster", "create", "more", "--gpus", "8", "--db", sim, "--json")
    assert code == 0 and json.loads(out)["state"] == "ready"  # backfilled past the waiting one
    code, out, _ = run(capsys, "node", "undrain", "sim00001", "--db", sim, "--json")
    assert code == 0 and json.loads(out) == {"node": "sim00001", "state": "up", "started": []}
    code, out, _ = run(capsys, "cluster", "show", "all", "--db", sim, "--json")
    assert json.loads(out)["reason"] == "waiting for capacity: 504 of the fleet's 512 h100 GPUs are free for 512 asked"
    code, out, _ = run(capsys, "cluster", "list", "--db", sim)
    assert code == 0 and "waiting for capacity" in out  # the table's reason column
    code, out, _ = run(capsys, "cluster", "delete", "more", "--db", sim, "--json")
    assert code == 0 and json.loads(out)["started"] == ["all"]
    code, _, err = run(capsys, "node", "undrain", "sim00001", "--db", sim)
    assert code == 2 and err == "error: Node 'sim00001' is already up; `supercluster fleet show --nodes` lists the drained ones.\n"
    code, _, err = run(capsys, "node", "drain", "sim00001", "--reason", " ", "--db", sim)
    assert code == 2 and "--reason is empty" in err
    code, _, err = run(capsys, "node", "undrain", "sim0001", "--db", sim)
    assert code == 2 and "No node 'sim0001' in the fleet" in err and err.count("\n") == 1


def test_a_health_max_age_of_zero_is_kept(sim, capsys):
    """0 s (every node's health must be fresh) was taken for 'not given' and stored as a day."""
    import sqlalchemy as sa

    for name, args, want in (("fresh", ["--health-max-age", "0"], 0.0), ("default", [], 86400.0)):
        code, _, err = run(capsys, "cluster", "create", name, "--gpus", "8", "--db", sim, *args)
        assert code == 0, err
        with sa.create_engine(sim).connect() as conn:
            got = conn.execute(sa.text("SELECT health_max_age_s FROM clusters WHERE name = :n"), {"n": name}).scalar()
        assert got == want, (name, got)
