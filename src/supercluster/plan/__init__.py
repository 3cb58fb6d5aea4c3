"""The planner: predict a training step of any layout, and choose the best one (torch-free).

    cost.py       FLOPs, bytes and seconds of one step of one layout, memory per GPU
    search.py     every layout the fixed knobs allow, checked for memory, ranked by step time
    build.py      CLI flags -> Request; best plan -> train config sections
    calibrate.py  `python -m supercluster.plan.calibrate`: fits constants.json once against
                  ../shared/calibration/published-runs.csv
"""

from supercluster.plan.build import build_model, build_request, train_config
from supercluster.plan.cost import Estimate, Layout, Software, System, Workload, estimate
from supercluster.plan.search import Request, search

__all__ = [
    "Estimate", "Layout", "Request", "Software", "System", "Workload",
    "build_model", "build_request", "estimate", "search", "train_config",
]
