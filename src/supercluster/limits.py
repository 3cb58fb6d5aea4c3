"""Bounds on the sizes a user may ask for: one set, read by the CLI's flags and the service's
request bodies, so that what a server refuses is refused locally too, and no command spends
hours on a size nobody means (a typo's extra zeros)."""

MAX_GPUS = 1_000_000  # a cluster or a plan: several times the largest machines built
MAX_LOCAL_GPUS = 4096  # slots of the local backend, which is one machine
MAX_SWITCHES = 100_000
MAX_PRIORITY = 100
MAX_RESTARTS = 100
MAX_SEQ_LEN = 1_048_576
MAX_GLOBAL_BATCH = 1_000_000
MAX_ID = 2**31 - 1  # job ids are PostgreSQL INTEGERs
MAX_NEW_TOKENS = 100_000  # `sample`: hours of CPU time already
MAX_SAMPLES = 100
MAX_TEMPERATURE = 2.0  # OpenAI's range, which the serving API enforces too
MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds
MAX_CONFIG_BYTES = 1_000_000  # a training config: a few KB in practice
