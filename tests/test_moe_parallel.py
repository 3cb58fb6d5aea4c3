"""Expert parallelism on CPU ranks (gloo, real torchrun): a tiny MoE model trains to the
single-process losses with its experts split over 2 ranks, alone, with FSDP over the ranks
left over, and with a pipeline; a checkpoint saved at ep 2 resumes at ep 1."""

import shutil
from pathlib import Path

import pytest

from supercluster.train.config import load_config
from supercluster.train.launch import TorchrunSpec, launch_training
from test_parallel import assert_same_losses, losses
from test_parallel import torchrun as _torchrun

STEPS = 4
# Layer 0 dense, 1..3 MoE (4 experts, top-2, one shared); both balancing methods on.
MOE = ["model.preset=tiny-moe", "model.layers=4", "model.moe_bias_update_rate=0.001", "model.moe_aux_loss_coef=0.01",
       f"train.steps={STEPS}"]


def torchrun(corpus, run_dir, nproc, *extra):
    return _torchrun(corpus, run_dir, nproc, *MOE, *extra)


@pytest.fixture(scope="module")
def corpus(small_corpus):
    return small_corpus


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    from test_parallel import overrides

    run = tmp_path_factory.mktemp("single")
    launch_training(load_config(None, overrides(corpus, run, *MOE)), TorchrunSpec())
    by_step = losses(run)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return by_step


@pytest.fixture(scope="module")
def ep2_run(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("ep2") / "run"
    return run, torchrun(corpus, run, 2, "parallel.ep=2", "train.checkpoint_every=2", "train.keep_checkpoints=3")


def test_ep2_matches_single_process_and_logs_expert_load(reference, ep2_run):
    run, summary = ep2_run
    assert "ep2" in summary["layout"]
    assert_same_losses(run, reference, range(1, STEPS + 1))
    from supercluster.train.metrics import read_metrics

    last = read_metrics(Path(run) / "metrics.jsonl")[-1]
    assert {f"moe_load_max_over_mean/{i}" for i in (1, 2, 3)} <= set(last)
    assert all(last[f"moe_load_max_over_mean/{i}"] >= 1.0 for i in (1, 2, 3))
    assert 0 < last["moe_aux_loss"] and last["moe_bias_abs_max"] == pytest.approx(0.001 * STEPS, rel=0.5)


def test_checkpoint_at_ep2_resumes_in_one_process(corpus, reference, ep2_run, tmp_path):
    """DCP reshards the experts (and keeps the balancing bias): ep 2 -> one process, ep 1."""
    from test_parallel import overrides

    saved, _ = ep2_run
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    summary = launch_training(load_config(None, overrides(corpus, run, *MOE)), TorchrunSpec())
    assert str(summary["resumed_from"]).endswith("step_00000002")
    assert sorted(losses(run)) == [3, 4]
    assert_same_losses(run, reference, [3, 4])


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("ep 2 x fsdp 2", ["parallel.ep=2"]),
    ("ep 2 x pp 2", ["parallel.ep=2", "parallel.pp=2"]),
])
def test_ep2_composed_matches_single_process(corpus, reference, tmp_path, name, extra):
    summary = torchrun(corpus, tmp_path / "run", 4, *extra)
    assert "ep2" in summary["layout"]
    assert_same_losses(tmp_path / "run", reference, range(1, STEPS + 1))


def test_trained_moe_samples_and_the_engine_refuses_it_by_name(ep2_run):
    """Sampling (a KV cache through MoE layers) runs the trained model; the serving engine, dense
    only this round, says so in one sentence."""
    from supercluster.errors import UserError
    from supercluster.serve.engine import Engine
    from supercluster.train.sample import sample_run

    run, _ = ep2_run
    text = sample_run(run, "def", 8, temperature=0)[0]
    assert text.startswith("def") and len(text) > 3
    with pytest.raises(UserError, match="Mixture-of-Experts model, which this serving engine does not run yet"):
        Engine(run)
