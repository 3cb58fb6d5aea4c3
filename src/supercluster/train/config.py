"""The one config system: dataclasses, loaded from TOML, overridden by `section.key=value`.

Every stage reads the same `Config`; `config.toml` in a run directory is this object
written back, so a run can always be repeated or resumed from its own folder.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from supercluster.errors import UserError, closest
from supercluster.files import write_atomic
from supercluster.limits import MAX_CONFIG_BYTES, MAX_GLOBAL_BATCH, MAX_NEW_TOKENS
from supercluster.model.config import PRESETS, ModelConfig, preset
from supercluster.parallel.layout import RECOMPUTE, Layout, schedule_name


@dataclass
class ModelSection:
    # A named preset, or "custom": the Llama-style defaults of ModelConfig and the shape given
    # here (how an imported model is written down).
    preset: str = "small"
    layers: int | None = None  # any field left None keeps the preset's value
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    ffn_hidden: int | None = None
    vocab_size: int | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    rope_theta: float | None = None
    norm_eps: float | None = None
    head_dim: int | None = None
    qk_norm: bool | None = None
    qk_norm_per_head: bool | None = None
    moe_experts: int | None = None  # Mixture of Experts (model.config.ModelConfig has the meaning of each)
    moe_top_k: int | None = None
    moe_shared_experts: int | None = None
    moe_hidden: int | None = None
    moe_dense_layers: int | None = None
    moe_router: str | None = None
    moe_norm_topk: bool | None = None
    moe_route_scale: float | None = None
    moe_groups: int | None = None
    moe_topk_groups: int | None = None
    moe_aux_loss_coef: float | None = None
    moe_bias_update_rate: float | None = None

    def build(self) -> ModelConfig:
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preset"}
        if self.preset != CUSTOM:
            if self.preset not in PRESETS:
                raise UserError(f"Unknown model preset {self.preset!r}{closest(self.preset, [*PRESETS, CUSTOM])}; "
                                f"choose one of {', '.join(PRESETS)}, or {CUSTOM} with the shape given in [model].")
            return preset(self.preset, **overrides)
        missing = [name for name in CUSTOM_REQUIRED if overrides[name] is None]
        if missing:
            raise UserError(f"model.preset = \"{CUSTOM}\" needs model.{missing[0]} too (it has no default).")
        return ModelConfig(**{k: v for k, v in overrides.items() if v is not None}).validate()


CUSTOM = "custom"
CUSTOM_REQUIRED = ("layers", "hidden", "heads", "vocab_size", "max_seq_len")


# Config keys that name a file or folder are marked with what a run does there, so that whoever
# launches a run for someone else (`cluster.isolation`) finds and checks every one, including
# keys added later.
READ, WRITE = {"path": "read"}, {"path": "write"}
READ_EACH = {"path": "read", "tables": True}  # a list of tables, each with a `path` to read


@dataclass
class DataSection:
    path: str | None = field(default=None, metadata=READ)  # None: the Python standard library's source files
    val_fraction: float = 0.05
    max_mb: float | None = None  # read at most this many MB of the corpus
    seed: int = 0
    # Prepared datasets sampled in proportion to their weights: [{path = "DIR", weight = 0.7}, ...]
    mix: list[dict] | None = field(default=None, metadata=READ_EACH)
    # Packed documents (one prepared dataset at data.path): positions restart and attention stays
    # inside each document. None: on for chat data (a dataset with a loss mask), which is then
    # packed; a mixture reads fixed windows (its chat data keeps its loss mask, not its documents).
    document_mask: bool | None = None


@dataclass
class TrainSection:
    seq_len: int = 256
    micro_batch: int = 8  # sequences per forward/backward on one rank
    global_batch: int = 16  # sequences per optimizer step, all ranks together
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 where the device runs it faster)
    compile: bool = False
    recompute: str = "none"  # none | selective | full
    seed: int = 1234
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    async_checkpoint: bool = False  # write checkpoints in the background, committed before the next step
    max_minutes: float | None = None  # stop (and checkpoint) after this much wall time
    tensorboard: bool = False  # also log each step's scalars to run_dir/tensorboard (needs the tensorboard extra)
    predicted_step_time_s: float | None = None  # the planner's prediction, shown beside the measured step time


@dataclass
class ParallelSection:
    """The layout (`parallel.layout.Layout`) in readable keys; train.micro_batch and
    train.recompute complete it."""

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the other degrees leave of the world
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sharding: str = "full"  # none | keep_gathered | full (FSDP2; HSDP when dp_replicate > 1)
    sequence_parallel: bool = True  # with tp > 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    stage_layers: list | None = None  # layers per pipeline stage, e.g. [7, 8, 8, 7]; None: balanced split
    microbatches: int | None = None  # pipeline microbatches; None: global_batch / (dp * micro_batch)
    ep: int = 1  # expert parallel degree, carved out of dp_shard (MoE models)


@dataclass
class LaunchSection:
    """How many ranks the config was planned for: `supercluster train FILE` starts them
    when no --nproc/--nnodes is given."""

    nproc: int | None = None  # ranks per node
    nnodes: int | None = None


@dataclass
class RunSection:
    dir: str = field(default="runs/default", metadata=WRITE)
    resume: bool = True  # continue from the latest checkpoint in dir
    sample_prompt: str = "def"
    sample_tokens: int = 120


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    run: RunSection = field(default_factory=RunSection)
    launch: LaunchSection = field(default_factory=LaunchSection)

    def model_config(self) -> ModelConfig:
        return self.model.build()

    def to_dict(self) -> dict:
        """Nested dict without None values (TOML has no null)."""
        return {
            name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items() if v is not None}
            for name in SECTIONS
        }

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_toml())


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def path_keys() -> dict[str, str]:
    """Every config key that names a path, with what a run does there: {"data.path": "read", ...}."""
    return {f"{section.name}.{f.name}": f.metadata["path"]
            for section in dataclasses.fields(Config) for f in dataclasses.fields(section.default_factory)
            if "path" in f.metadata}


def get(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def _parse_value(text: str):
    """A TOML literal (3, 1e-3, true, "x") or, failing that, the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check_type(key: str, value, f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in kind:
        ok = isinstance(value, bool)
    elif "int" in kind:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "list[dict]" in kind:
        ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
        kind = "list of tables"
    elif "list" in kind:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        kind = "list of integers"
    elif "float" in kind:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if value is None and "None" in kind:
        ok = True
    if not ok:
        raise UserError(f"{key} must be of type {kind}, got {value!r}.")
    # TOML reads nan, inf and integers of any size; no key means them, and they would fail
    # far from here (a nan lr passes every `<= 0` check; torch's seeds are 64-bit).
    for number in value if isinstance(value, list) and "tables" not in kind else [value]:
        if isinstance(number, float) and not math.isfinite(number):
            raise UserError(f"{key} must be a finite number, got {number}.")
        if isinstance(number, int) and not -2**63 <= number < 2**63:
            raise UserError(f"{key} must be a 64-bit integer, got {number}.")
    return float(value) if "float" in kind and not isinstance(value, bool) and value is not None else value


def apply(cfg: Config, key: str, value) -> None:
    """Set `section.key` to `value`, naming the closest key when it does not exist."""
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS or not name:
        all_keys = [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(getattr(cfg, s))]
        raise UserError(f"Unknown config key {key!r}{closest(key, all_keys)}; keys look like train.steps.")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise UserError(f"Unknown config key {key!r}{closest(key, [f'{section_name}.{n}' for n in fields])}.")
    setattr(section, name, _check_type(key, value, fields[name]))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override in order."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Config file {str(path)!r} does not exist.")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"Config file {str(path)!r} is over {MAX_CONFIG_BYTES // 1000} KB; a training config is a few "
                            f"lines of TOML: check the path.")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"Config file {str(path)!r} is not valid TOML ({err}); fix it or pass another file.") from None
        for section_name, section in table.items():
            if not isinstance(section, dict):
                raise UserError(f"Config file {str(path)!r}: {section_name!r} must be a [section], one of {', '.join(SECTIONS)}.")
            for name, value in section.items():
                apply(cfg, f"{section_name}.{name}", value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"Override {item!r} must look like section.key=value.")
        apply(cfg, key.strip(), _parse_value(text.strip()))
    return cfg


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The config's parallel layout on a world of ranks (dp_shard=-1 takes what is left)."""
    p, t = cfg.parallel, cfg.train
    for name in ("dp_replicate", "tp", "pp", "cp", "virtual_stages"):
        if getattr(p, name) < 1:
            raise UserError(f"parallel.{name} must be at least 1, got {getattr(p, name)}.")
    dp_shard, dp_replicate = p.dp_shard, p.dp_replicate
    if dp_shard == -1 and p.sharding == "none" and dp_replicate == 1:
        # Unsharded, every data-parallel rank is a replica: the rest of the world replicates.
        dp_replicate = 0
    if dp_shard == -1:
        fixed = max(1, dp_replicate) * p.tp * p.pp * p.cp
        if world_size % fixed:
            raise UserError(f"The world of {world_size} ranks is not divisible by dp_replicate*tp*pp*cp = {fixed}; "
                            f"change the degrees or the number of ranks.")
        dp_shard = world_size // fixed
        if dp_replicate == 0:
            dp_replicate, dp_shard = dp_shard, 1
    if dp_shard < 1:
        raise UserError(f"parallel.dp_shard must be at least 1 (or -1 for the rest), got {dp_shard}.")
    microbatch = t.micro_batch
    if p.microbatches is not None:
        # A pipeline's microbatch count fixes the microbatch size.
        local = t.global_batch // (dp_replicate * dp_shard)
        if p.microbatches < 1 or local % p.microbatches:
            raise UserError(f"parallel.microbatches ({p.microbatches}) must be a positive divisor of the "
                            f"per-pipeline batch of {local} sequences.")
        microbatch = local // p.microbatches
    return Layout(
        tp=p.tp, pp=p.pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=p.cp, sharding=p.sharding,
        pp_schedule=schedule_name(p.pp_schedule), virtual_stages=p.virtual_stages,
        stage_layers=tuple(p.stage_layers) if p.stage_layers is not None else None,
        microbatch=microbatch, recompute=t.recompute, sequence_parallel=p.sequence_parallel, ep=p.ep,
    )


def validate(cfg: Config) -> ModelConfig:
    """Checks that need no data or devices; returns the model config. The layout is checked
    by `parallel.ParallelDims.of` once the world is known."""
    model = cfg.model_config()
    t = cfg.train
    for name in ("seq_len", "micro_batch", "global_batch", "steps"):
        if getattr(t, name) <= 0:
            raise UserError(f"train.{name} must be positive, got {getattr(t, name)}.")
    if t.seq_len > model.max_seq_len:
        raise UserError(
            f"train.seq_len ({t.seq_len}) is beyond the model's limit of {model.max_seq_len} positions; "
            f"lower train.seq_len or raise model.max_seq_len."
        )
    if t.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}.")
    if t.recompute not in RECOMPUTE:
        raise UserError(f"train.recompute must be one of {', '.join(RECOMPUTE)}, got {t.recompute!r}{closest(t.recompute, RECOMPUTE)}.")
    for name in ("nproc", "nnodes"):
        if getattr(cfg.launch, name) is not None and getattr(cfg.launch, name) < 1:
            raise UserError(f"launch.{name} must be at least 1, got {getattr(cfg.launch, name)}.")
    if max(t.micro_batch, t.global_batch) > MAX_GLOBAL_BATCH:
        raise UserError(f"train.micro_batch and train.global_batch must be at most {MAX_GLOBAL_BATCH:,} sequences, "
                        f"got {t.micro_batch} and {t.global_batch}.")
    if t.lr <= 0:
        raise UserError(f"train.lr must be positive, got {t.lr}.")
    _check_ranges(cfg)
    if t.eval_every < 0 or t.checkpoint_every < 0:
        raise UserError(f"train.eval_every and train.checkpoint_every must be 0 (never) or positive, got {t.eval_every} and {t.checkpoint_every}.")
    if t.keep_checkpoints < 1:
        raise UserError(f"train.keep_checkpoints must be at least 1 (the newest checkpoints kept), got {t.keep_checkpoints}.")
    if not 0 <= cfg.data.val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}.")
    if cfg.data.mix is not None:
        from supercluster.data.mixture import check_mix

        check_mix(cfg.data.mix)
        if cfg.data.path is not None:
            raise UserError("Set data.path or data.mix, not both: a single prepared folder is a mix of one.")
        if cfg.data.document_mask:
            raise UserError("data.document_mask packs the documents of one prepared dataset (data.path), not a mixture; "
                            "leave it unset with data.mix.")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.tensorboard needs the tensorboard package: pip install 'supercluster[tensorboard]', "
                        "or set train.tensorboard=false.")
    return model


# Keys whose value must lie in a range, with what it means: (low, high, low_open, high_open).
RANGES = {
    "train.min_lr_ratio": (0, 1, False, False), "train.warmup_steps": (0, None, False, False),
    "train.weight_decay": (0, None, False, False), "train.beta1": (0, 1, False, True), "train.beta2": (0, 1, False, True),
    "train.grad_clip": (0, None, True, False), "train.seed": (0, None, False, False), "data.seed": (0, None, False, False),
    "train.max_minutes": (0, None, True, False), "data.max_mb": (0, None, True, False),
    "run.sample_tokens": (1, MAX_NEW_TOKENS, False, False),
}


def _check_ranges(cfg: Config) -> None:
    for key, (low, high, low_open, high_open) in RANGES.items():
        value = get(cfg, key)
        if value is None:
            continue
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            span = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else str(high) + (')' if high_open else ']')}"
            raise UserError(f"{key} must be in {span}, got {value}.")


def check_splits(cfg: Config, train_tokens: int, val_tokens: int) -> None:
    """The data holds a training sequence and, when the run evaluates, a validation sequence:
    validation loss is measured on held-out tokens or not at all, never on training tokens."""
    need = cfg.train.seq_len + 1  # a sequence and its next-token targets
    if train_tokens < need:
        raise UserError(f"The corpus has {train_tokens} training tokens, fewer than one sequence of {cfg.train.seq_len}; "
                        f"lower train.seq_len or add text.")
    if cfg.train.eval_every > 0 and val_tokens < need:
        raise UserError(
            f"The validation split has {val_tokens} tokens, fewer than the {need} one sequence needs; lower train.seq_len, "
            f"raise data.val_fraction (now {cfg.data.val_fraction}), or set train.eval_every=0 to train without validation."
        )
