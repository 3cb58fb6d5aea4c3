"""Parallel degrees, the device mesh, and the one `parallelize` function."""

from supercluster.parallel.dims import ParallelDims

__all__ = ["ParallelDims"]
