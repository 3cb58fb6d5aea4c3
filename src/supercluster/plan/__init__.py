"""The planner: predict a training step of any layout, and choose the best one (torch-free).

    cost.py       FLOPs, bytes and seconds of one step of one layout, memory per GPU, its
                  terms (`plan --explain`) and its interval from left-out residuals
    moe.py        the Mixture-of-Experts terms: expert GEMMs, all-to-all tiers, expert sharding
    search.py     every layout the fixed knobs allow, checked for memory, ranked by step time
    build.py      CLI flags -> Request; best plan -> train config sections
    profiles.py   named software stacks (supercluster, megatron, deepspeed) and their switches
    goodput.py    failures, the Young/Daly checkpoint interval and effective training time
    calibrate.py  `python -m supercluster.plan.calibrate`: fits constants.json per profile
                  against calibration/published-runs.csv, reports leave-one-source-out error
"""

from supercluster.plan.build import build_model, build_request, train_config
from supercluster.parallel.layout import Layout
from supercluster.plan.cost import Estimate, System, Workload, estimate
from supercluster.plan.profiles import PROFILES, Software, profile
from supercluster.plan.search import Request, search

__all__ = [
    "PROFILES", "Estimate", "Layout", "Request", "Software", "System", "Workload", "profile",
    "build_model", "build_request", "estimate", "search", "train_config",
]
