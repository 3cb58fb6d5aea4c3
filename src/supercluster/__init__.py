"""supercluster: plan, allocate, train and keep healthy an AI supercomputer."""

__version__ = "0.1.0"
