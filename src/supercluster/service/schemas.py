"""Request bodies: unknown fields are refused (extra="forbid"), sizes are bounded."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from supercluster.limits import MAX_CONFIG_BYTES, MAX_GLOBAL_BATCH, MAX_GPUS, MAX_PRIORITY, MAX_RESTARTS, MAX_SEQ_LEN, MAX_SWITCHES
from supercluster.serve.quantizations import DEFAULT as DEFAULT_QUANTIZATION
from supercluster.serve.quantizations import QUANTIZATIONS

Name = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", description="lower-case letters, digits, '_' or '-'; up to 32")
ClusterName = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$", description="letters, digits, '_' or '-'; up to 48")


NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: refuse it here, not as a database error


def Text(max_length: int, **kw):
    return Field(max_length=max_length, pattern=NO_NUL, **kw)


# serve --quantize's values, from its one list
Quantization = Literal[tuple(QUANTIZATIONS)]  # type: ignore[valid-type]

class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrgIn(Body):
    name: str = Name


class ProjectIn(Body):
    name: str = Name


class UserIn(Body):
    name: str = Name
    org: str = Text(64)


class TokenIn(Body):
    user: str = Text(64)
    project: str = Text(64)
    role: Literal["viewer", "member", "admin"] = "viewer"  # least privilege unless asked
    days: float | None = Field(default=None, gt=0, le=365, description="lifetime in days (default 30)")


class ClusterIn(Body):
    name: str = ClusterName
    gpus: int = Field(ge=1, le=MAX_GPUS)
    gpu_type: str | None = Text(64, default=None)
    max_switches: int | None = Field(default=None, ge=1, le=MAX_SWITCHES)
    require_health: bool = False
    priority: int = Field(default=0, ge=0, le=MAX_PRIORITY, description="a higher one may preempt lower ones (up to the project's max_priority)")


class JobIn(Body):
    cluster: str = ClusterName
    config: dict = Field(description="the training config's sections, as the TOML file would hold them")
    overrides: list[Annotated[str, Text(500)]] = Field(default_factory=list, max_length=64)
    max_restarts: int = Field(default=3, ge=0, le=MAX_RESTARTS)

    @field_validator("config")
    @classmethod
    def _small(cls, config: dict) -> dict:
        size = len(json.dumps(config, default=str))
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"the config is {size // 1000} KB, over the {MAX_CONFIG_BYTES // 1000} KB a training config "
                             f"may have (a few KB of sections in practice); send the config file's sections only")
        return config


class QuotaIn(Body):
    gpu_type: str = Text(64)
    max_gpus: int | None = Field(default=None, ge=0, le=MAX_GPUS)
    gpu_hours: float | None = Field(default=None, ge=0, le=1e9)
    max_priority: int = Field(default=0, ge=0, le=MAX_PRIORITY)


class DrainIn(Body):
    reason: str = Text(500, min_length=1, description="why, shown beside the node and to queued clusters")


class PlanIn(Body):
    model: str = Text(64, description="a model preset, e.g. llama3-8b")
    gpus: int = Field(ge=1, le=MAX_GPUS)
    gpu: str = Text(64, default="h100")
    seq_len: int | None = Field(default=None, ge=1, le=MAX_SEQ_LEN)
    global_batch: int | None = Field(default=None, ge=1, le=MAX_GLOBAL_BATCH)
    top: int = Field(default=5, ge=1, le=50)


class EndpointIn(Body):
    name: str = ClusterName
    cluster: str = ClusterName
    run_dir: str | None = Text(1000, default=None, description="a run directory in the model library ($SUPERCLUSTER_HOME/models)")
    job: int | None = Field(default=None, ge=1, le=2**31 - 1, description="or: serve the run of this project's training job")
    max_running: int = Field(default=32, ge=1, le=1024, description="sequences the server decodes at once")
    quantize: Quantization = Field(default=DEFAULT_QUANTIZATION, description="as serve --quantize")
    # Checked in `endpoints.check_replicas` (a 400 that names both bounds), not here.
    min_replicas: int = Field(default=1, description="replicas always kept (each one model server)")
    max_replicas: int | None = Field(default=None, description="replicas the scaler may add under load (default: min_replicas)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run_dir is None) == (self.job is None):
            raise ValueError("give exactly one of run_dir and job")
        return self
