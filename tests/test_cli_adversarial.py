"""An adversarial pass over the CLI and config edge (issue 23): sizes nobody means, nan and inf,
out-of-range numbers, files that are not what they claim, a full or read-only disk. Each one
ends in one line (`error: ...`) and exit 2 (a usage error) or 1 (the machine's fault, a full
disk), never a traceback, a hang or exit 0, and leaves what was saved as it was.

The commands run in this process through `cli.main.main`, as a user's argv. The flag cases
name a run directory that does not exist, so that without the check under test they fail on
that instead (a wrong message), rather than hanging or training."""

import contextlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supercluster.cli.main import main

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
# A data path that does not exist: a train command that gets past the check under test stops
# there, in a second, instead of preparing the standard library and training.
NO_DATA = ["--set", "data.path=/no/such/corpus"]


def invoke(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `supercluster ARGV`; any exception but SystemExit propagates."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    return code, out.getvalue(), err.getvalue()


def assert_one_line(code: int, out: str, err: str, expected_code: int, fragment: str) -> None:
    assert "Traceback" not in out + err
    assert code == expected_code, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Files the cases point at: {name: path}."""
    from supercluster.cluster.fleet import init_fleet

    root = tmp_path_factory.mktemp("adversarial")
    files = {"root": root, "run": root / "no-run", "file": root / "a-file", "binary": root / "binary.toml",
             "not_sqlite": root / "not-sqlite.db", "emitted": root / "emitted.toml", "huge": root / "huge.toml",
             "neg_steps": root / "neg-steps.toml", "nan_lr": root / "nan-lr.toml", "fresh_db": root / "fresh.db"}
    files["file"].write_text("not a folder\n")
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["not_sqlite"].write_bytes(b"\x00\x01 this is no SQLite database " * 100)
    files["emitted"].write_text("# a config written earlier, which a refused command must leave alone\n")
    files["huge"].write_text("[run]\nsample_prompt = \"" + "x" * 1_100_000 + "\"\n")
    files["neg_steps"].write_text("[model]\npreset = \"tiny\"\n[train]\nsteps = -3\n")
    files["nan_lr"].write_text("[model]\npreset = \"tiny\"\n[train]\nlr = nan\n")
    files["db"] = f"sqlite:///{root / 'fleet.db'}"
    init_fleet(files["db"], "local", gpus=2)
    return files


CASES = [
    # Hangs on sizes no one means.
    (["sample", "{run}", "--tokens", "99999999999"], 2, "less than or equal to 100000"),
    (["sample", "{run}", "--samples", "1e9"], 2, "Invalid value for '--samples'"),
    (["sample", "{run}", "--samples", "1000000000"], 2, "less than or equal to 100"),
    (["plan", "llama3-8b", "--gpus", "999999999999"], 2, "--gpus must be in 1..1,000,000"),
    (["plan", "--layers", "2", "--hidden", "99999999996", "--heads", "4", "--gpus", "8"], 2, "model.hidden must be in 1..262,144"),
    # Tracebacks instead of one line.
    (["train", "{binary}"], 2, "is not valid TOML"),
    (["train", TINY, *NO_DATA, "--set", "model.hidden=99999999996"], 2, "model.hidden must be in 1..262,144"),
    (["train", TINY, *NO_DATA, "--set", "run.dir={file}"], 2, "is a file, not a folder"),
    (["sample", "{run}", "--temperature", "nan"], 2, "must be a number in [0, 2], got nan"),
    (["serve", "{run}", "--port", "70000"], 2, "less than or equal to 65535"),
    (["serve", "{run}", "--port", "0", "--kv-cache-gib", "nan"], 2, "must be a number in (0, inf), got nan"),
    (["fleet", "show", "--db", "sqlite:///{not_sqlite}"], 2, "file is not a database"),
    (["cluster", "create", "c", "--gpus", "1", "--priority", "99999999999999999999", "--db", "{db}"], 2,
     "less than or equal to 100"),
    (["train", TINY, *NO_DATA, "--nnodes", "2", "--rdzv", "no-port"], 2, "--rdzv must be HOST:PORT"),
    (["train", TINY, *NO_DATA, "--nnodes", "2", "--rdzv", "host:99999"], 2, "port in 1..65535"),
    (["job", "status", "99999999999", "--db", "{db}"], 2, "less than or equal to 2147483647"),
    (["endpoint", "deploy", "e", "--cluster", "c", "--job", "99999999999"], 2, "less than or equal to 2147483647"),
    (["sample", "{run}", "--seed", "99999999999999999999999"], 2, "Invalid value for '--seed'"),
    (["sample", "{run}", "--top-k", "-3"], 2, "greater than or equal to 0"),
    # Accepted with exit 0 before.
    (["fleet", "init", "--gpus", "-4", "--db", "sqlite:///{fresh_db}"], 2, "greater than or equal to 1"),
    (["fleet", "init", "--gpus", "0", "--db", "sqlite:///{fresh_db}"], 2, "greater than or equal to 1"),
    (["fleet", "init", "--gpus", "1e8", "--db", "sqlite:///{fresh_db}"], 2, "Invalid value for '--gpus'"),
    (["fleet", "init", "--gpus", "100000000", "--db", "sqlite:///{fresh_db}"], 2, "less than or equal to 4096"),
    (["train", TINY, *NO_DATA, "--nproc", "0"], 2, "Invalid value for '--nproc'"),
    (["sample", "{run}", "--temperature", "-1"], 2, "must be a number in [0, 2], got -1"),
    (["sample", "{run}", "--temperature", "inf"], 2, "must be a number in [0, 2], got inf"),
    (["sample", "{run}", "--top-p", "2"], 2, "must be a number in (0, 1], got 2"),
    (["sample", "{run}", "--top-p", "0"], 2, "must be a number in (0, 1], got 0"),
    (["plan", "llama3-8b", "--gpus", "8", "--tokens", "nan"], 2, "must be a number in (0, inf), got nan"),
    (["plan", "llama3-8b", "--gpus", "8", "--checkpoint-gbps", "0"], 2, "must be a number in (0, inf), got 0"),
    (["plan", "llama3-8b", "--gpus", "8", "--seq-len", "0"], 2, "--seq-len must be in 1..1,048,576"),
    (["plan", "small", "--gpus", "1", "--gpu", "local", "--emit-config", "{emitted}", "--steps", "-5"], 2,
     "greater than or equal to 1"),
    (["plan", "small", "--gpus", "1", "--gpu", "local", "--emit-config", "{emitted}", "--lr", "-1"], 2,
     "must be a number in (0, inf), got -1"),
    (["train", "{neg_steps}", *NO_DATA], 2, "train.steps must be positive, got -3"),
    (["train", "{nan_lr}", *NO_DATA], 2, "train.lr must be a finite number, got nan"),
    (["train", TINY, *NO_DATA, "--set", "train.lr=inf"], 2, "train.lr must be a finite number, got inf"),
    (["train", TINY, *NO_DATA, "--set", "train.beta2=1.5"], 2, "train.beta2 must be in [0, 1)"),
    (["train", TINY, *NO_DATA, "--set", "train.grad_clip=0"], 2, "train.grad_clip must be in (0, inf)"),  # would zero every gradient
    (["train", TINY, *NO_DATA, "--set", "train.seed=99999999999999999999"], 2, "must be a 64-bit integer"),
    (["chat", "{run}", "--max-tokens", "-1"], 2, "greater than or equal to 1"),
    (["chat", "{run}", "--temperature", "inf"], 2, "must be a number in [0, 2], got inf"),
    (["cluster", "create", "c", "--gpus", "1", "--health-max-age", "-1", "--db", "{db}"], 2,
     "must be a number in [0, inf), got -1"),
    (["cluster", "create", "c", "--gpus", "1", "--health-max-age", "nan", "--db", "{db}"], 2, "got nan"),
    (["job", "submit", TINY, "--cluster", "c", "--max-restarts", "101", "--db", "{db}"], 2, "less than or equal to 100"),
    # Smaller: a config file of megabytes.
    (["train", "{huge}"], 2, "is over 1000 KB"),
]


@pytest.mark.parametrize("argv, code, fragment", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(place, argv, code, fragment):
    saved = {name: Path(place[name]).read_bytes() for name in ("emitted", "not_sqlite")}
    clusters = invoke("cluster", "list", "--db", place["db"], "--json")[1]
    argv = [arg.format(**place) for arg in argv]
    assert_one_line(*invoke(*argv), code, fragment)
    assert {name: Path(place[name]).read_bytes() for name in saved} == saved
    assert not place["fresh_db"].exists() and not place["run"].exists()
    assert invoke("cluster", "list", "--db", place["db"], "--json")[1] == clusters


# ---- --set overrides: whatever the key and value, a sentence --------------------------------------

KEYS = st.one_of(
    st.sampled_from(["train.steps", "train.lr", "train.seq_len", "train.micro_batch", "train.global_batch",
                     "train.precision", "train.recompute", "train.beta1", "train.max_minutes", "train.seed",
                     "model.preset", "model.hidden", "model.heads", "model.layers", "model.vocab_size",
                     "model.max_seq_len", "model.rope_theta", "model.norm_eps", "parallel.tp", "parallel.pp",
                     "parallel.dp_shard", "parallel.stage_layers", "parallel.sharding", "parallel.microbatches",
                     "launch.nproc", "launch.nnodes", "data.val_fraction", "data.max_mb", "run.sample_tokens"]),
    st.text(max_size=20),
)
VALUES = st.one_of(
    st.integers().map(str), st.floats().map(repr), st.text(max_size=20),
    st.sampled_from(["true", "nan", "-inf", "[1, 2]", "[]", "[1.5]", "{a = 1}", '"x"', "1e400", "0", "-1"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_any_override_is_refused_in_one_line_or_accepted(place, overrides):
    """Random `--set key=value`s, then a run.dir that is a file: the command can never train,
    so it must end in one sentence and exit 2, whichever check (if any) the overrides trip first.
    (No NO_DATA here: every check of the config runs before the data is read.)"""
    sets = [arg for key, value in overrides for arg in ("--set", f"{key}={value}")]
    code, out, err = invoke("train", TINY, *sets, "--set", f"run.dir={place['file']}")
    assert_one_line(code, out, err, 2, "")


# ---- files that are not what they claim ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_corpus):
    """A tiny run trained for two steps (seconds), to be copied and damaged."""
    from supercluster.train.config import load_config
    from supercluster.train.launch import TorchrunSpec, launch_training

    run = tmp_path_factory.mktemp("trained") / "run"
    launch_training(load_config(TINY, [f"data.path={small_corpus}", f"run.dir={run}", "train.steps=2",
                                       "train.eval_every=0", "train.precision=fp32"]), TorchrunSpec())
    return run


def test_a_truncated_checkpoint_shard_is_named_by_sample_and_export(trained, tmp_path):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    checkpoint = run / "checkpoints" / "step_00000002"
    shard = next(checkpoint.glob("*.distcp"))
    with open(shard, "r+b") as f:  # the tail only: the model's own bytes still read back
        f.truncate(shard.stat().st_size - 1000)
    for argv in (["sample", str(run), "--tokens", "2"], ["export", str(run), str(tmp_path / "out.safetensors")]):
        assert_one_line(*invoke(*argv), 2, f"Checkpoint {str(checkpoint)!r} is corrupt: {shard.name} holds")
    assert not (tmp_path / "out.safetensors").exists()
    code, out, err = invoke("sample", str(trained), "--tokens", "2")  # the intact original still samples
    assert code == 0 and out.strip() and not err


@pytest.mark.parametrize("content, fragment", [
    ("{\"bos\": 1, \"eos\": [", "is not valid JSON"),
    ("[1, 2]", "must hold an object"),
    ("{\"bos\": null, \"eos\": [99999], \"pad\": null}", "eos id 99999 is not a token id of the vocabulary of 512"),
    ("{\"bos\": \"<s>\", \"eos\": [0]}", "bos id '<s>' is not a token id"),
])
def test_a_garbage_special_tokens_file_is_named(trained, tmp_path, content, fragment):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (run / "special_tokens.json").write_text(content)
    code, out, err = invoke("serve", str(run), "--port", "0")
    assert_one_line(code, out, err, 2, fragment)
    assert f"{str(run / 'special_tokens.json')!r}" in err


def test_the_service_refuses_a_config_of_megabytes(tmp_path):
    from fastapi.testclient import TestClient

    from supercluster.service import tenancy
    from supercluster.service.app import create_app
    from supercluster.service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'service.db'}")
    with store.session() as s:
        op = {"Authorization": f"Bearer {tenancy.init_operator(s)}"}
    with TestClient(create_app(store=store)) as client:
        client.post("/v1/orgs", headers=op, json={"name": "acme"}).raise_for_status()
        client.post("/v1/orgs/acme/projects", headers=op, json={"name": "llm"}).raise_for_status()
        huge = {"run": {"sample_prompt": "x" * 10_000_000}}
        r = client.post("/v1/projects/llm/jobs", headers=op, json={"cluster": "c1", "config": huge})
        assert r.status_code == 422 and "over the 1000 KB" in r.json()["detail"], r.text
        r = client.post("/v1/projects/llm/jobs", headers=op, json={"cluster": "c1", "config": {"train": {"steps": 2}}})
        assert r.status_code == 404, r.text  # a small config gets past the size check to the missing cluster
    store.dispose()


# ---- a full or read-only disk -----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs of its own (needs root and mount), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small file system of its own needs root and mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(small_disk, trained):
    saved = small_disk / "plan.toml"
    saved.write_text("# the previous plan\n")
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb") as f:
        while True:  # until the disk is full
            f.write(b"\0" * 4096)
            f.flush()
    plan = ["plan", "small", "--gpus", "1", "--gpu", "local", "--emit-config", str(saved)]
    assert_one_line(*invoke(*plan), 1, f"No space left on device ({saved}); free some space")
    assert_one_line(*invoke("export", str(trained), str(small_disk / "model.safetensors")), 2, "No space left on device")
    assert saved.read_text() == "# the previous plan\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "plan.toml"]  # no .tmp left by either

    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert_one_line(*invoke(*plan), 1, "Read-only file system")
    assert saved.read_text() == "# the previous plan\n"

