"""Clusters on demand: fleet inventory and state, topology-aware gang placement, backends, jobs.

    state.py       SQLAlchemy models, the fleet database and its lock (migrations.py: schema versions)
    fleet.py       fleet init/show and the health hooks (record_health, drain_node, resume_node)
    placement.py   pure placement: fewest leaf switches, then pods, then best fit
    queue.py       the FIFO + backfill queue of waiting clusters and the health gate
    clusters.py    create/delete/list/show
    jobs.py        submit/status/cancel and `refresh`, which recovers jobs requeued after a node failure
    backends/      local (this machine), slurm (a real Slurm), sim (a simulated fat tree) behind one Backend
"""
