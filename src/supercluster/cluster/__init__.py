"""Clusters on demand: fleet inventory and state, topology-aware gang placement, backends, jobs.

    state.py       SQLAlchemy models, the fleet database and its lock (migrations/: Alembic, run on open)
    fleet.py       fleet init/show and the health hooks (record_health, drain_node, resume_node)
    placement.py   pure placement: fewest leaf switches, then pods, then best fit
    queue.py       the queue of waiting clusters (priority, FIFO, backfill) and the health gate
    preempt.py     a higher-priority request reclaims nodes from lower ones; their jobs resume later
    clusters.py    create/delete/list/show (with an owner tag and a priority)
    usage.py       GPU-seconds per owner and GPU type from allocation intervals
    jobs.py        submit/status/cancel and `refresh`, which recovers jobs requeued after a node failure
    launch.py      starting a job through the backend (on submit and after a preemption)
    backends/      local (this machine), slurm (a real Slurm), sim (a simulated fat tree) behind one Backend
"""
