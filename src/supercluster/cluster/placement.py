"""Topology-aware gang placement: pure functions over free capacity, no database.

A request of one node or more takes whole nodes (its size a multiple of the node's GPU
count); a smaller one takes part of a single node. Among the placements that fit, prefer
  1. the fewest leaf switches (traffic between them crosses the spine),
  2. then the fewest pods (traffic between pods crosses the core),
  3. then the best fit: take from the leaf or node with the least room left that still fits,
     so that large empty blocks stay whole for large requests.
All or nothing: `place` returns None when the request does not fit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple


class Free(NamedTuple):
    """One eligible node's free capacity (a tuple: a placement builds one per node of the fleet)."""

    name: str
    leaf: str
    pod: str
    free: int  # GPUs not allocated
    total: int  # GPUs on the node


@dataclass(frozen=True)
class Placement:
    nodes: tuple[tuple[str, int], ...]  # (node name, GPUs taken)
    leaves: int
    pods: int


def lower_bound(gpus: int, node_gpus: int, nodes_per_leaf: int) -> int:
    """The fewest leaf switches any placement of `gpus` can use on an empty fleet."""
    nodes = max(1, math.ceil(gpus / node_gpus))
    return math.ceil(nodes / nodes_per_leaf)


def place(free: list[Free], gpus: int, node_gpus: int, max_switches: int | None = None) -> Placement | None:
    if gpus < node_gpus:
        return _place_partial(free, gpus)
    if gpus % node_gpus:
        raise ValueError(f"{gpus} GPUs is not a whole number of {node_gpus}-GPU nodes")
    placement = _place_whole(free, gpus // node_gpus)
    if placement and max_switches is not None and placement.leaves > max_switches:
        return None  # the fewest switches possible is still too many
    return placement


def _place_partial(free: list[Free], gpus: int) -> Placement | None:
    # Best fit: the node with the least free room that holds the request; partly used nodes
    # first on ties so that empty nodes stay empty.
    fits = [n for n in free if n.free >= gpus]
    if not fits:
        return None
    best = min(fits, key=lambda n: (n.free, n.free == n.total, n.name))
    return Placement(((best.name, gpus),), 1, 1)


def _place_whole(free: list[Free], count: int) -> Placement | None:
    by_leaf: dict[str, list[Free]] = defaultdict(list)
    pod_of: dict[str, str] = {}
    for n in free:
        if n.free == n.total:
            by_leaf[n.leaf].append(n)
            pod_of[n.leaf] = n.pod
    if sum(len(v) for v in by_leaf.values()) < count:
        return None
    for nodes in by_leaf.values():
        nodes.sort(key=lambda n: n.name)

    leaves = _choose_leaves({leaf: len(v) for leaf, v in by_leaf.items()}, pod_of, count)
    chosen, need = [], count
    for leaf in leaves:
        take = by_leaf[leaf][: min(need, len(by_leaf[leaf]))]
        chosen += [(n.name, n.total) for n in take]
        need -= len(take)
    return Placement(tuple(chosen), len(leaves), len({pod_of[leaf] for leaf in leaves}))


def _choose_leaves(free_per_leaf: dict[str, int], pod_of: dict[str, str], count: int) -> list[str]:
    """Leaves holding `count` free nodes: fewest leaves, then fewest pods, then best fit."""
    order = sorted(free_per_leaf, key=lambda leaf: (-free_per_leaf[leaf], leaf))
    fewest = _greedy_leaf_count([free_per_leaf[leaf] for leaf in order], count)

    # Fewest pods with that many leaves: try the pods richest in their top `fewest` leaves first,
    # adding pods until `count` fits (exact for one pod, a greedy heuristic beyond).
    pods: dict[str, list[str]] = defaultdict(list)
    for leaf in order:
        pods[pod_of[leaf]].append(leaf)
    pod_order = sorted(pods, key=lambda p: (-sum(free_per_leaf[leaf] for leaf in pods[p][:fewest]), p))
    for npods in range(1, len(pod_order) + 1):
        # One pod: every pod is a candidate and the tightest wins. More pods: the richest first.
        groups = [[p] for p in pod_order] if npods == 1 else [pod_order[:npods]]
        options = []
        for group in groups:
            candidates = sorted((leaf for p in group for leaf in pods[p]), key=lambda leaf: (-free_per_leaf[leaf], leaf))
            if _greedy_leaf_count([free_per_leaf[leaf] for leaf in candidates], count) == fewest:
                chosen = _best_fit(candidates, free_per_leaf, count, fewest)
                options.append((sum(free_per_leaf[leaf] for leaf in chosen), chosen))
        if options:
            return min(options)[1]
    raise AssertionError("unreachable: all pods together reach the fewest leaves")


def _greedy_leaf_count(sizes_desc: list[int], count: int) -> int:
    """Fewest leaves (largest first) whose free nodes add up to `count`; big if impossible."""
    total = 0
    for i, size in enumerate(sizes_desc, 1):
        total += size
        if total >= count:
            return i
    return 1 << 30


def _best_fit(candidates: list[str], free_per_leaf: dict[str, int], count: int, leaves: int) -> list[str]:
    """`leaves` leaves from `candidates` (largest first) that hold `count` with the least room to spare.

    Start from the largest leaves, then swap each (largest first) for the smallest unused leaf
    that still leaves enough room: partly used leaves fill up and empty ones stay whole.
    """
    if leaves == 1:
        return [min((leaf for leaf in candidates if free_per_leaf[leaf] >= count), key=lambda leaf: (free_per_leaf[leaf], leaf))]
    chosen = candidates[:leaves]
    spare = sorted(candidates[leaves:], key=lambda leaf: (free_per_leaf[leaf], leaf))
    total = sum(free_per_leaf[leaf] for leaf in chosen)
    for i in range(len(chosen)):
        big = chosen[i]
        for j, small in enumerate(spare):
            if free_per_leaf[small] < free_per_leaf[big] and total - free_per_leaf[big] + free_per_leaf[small] >= count:
                total += free_per_leaf[small] - free_per_leaf[big]
                chosen[i], spare[j] = small, big
                break
    # Fill the largest first so that the smallest keeps what is left over.
    return sorted(chosen, key=lambda leaf: (-free_per_leaf[leaf], leaf))
