"""Run configuration: one dataclass per section, a TOML file plus ``--set section.key=value`` overrides.

Every key is declared here with its type, default and range; an unknown key, a wrong type or an out-of-range
value raises :class:`ConfigError` naming the key and the value (the CLI turns it into exit status 2).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from downpour.errors import NESTS_TOO_DEEPLY, ConfigError
from downpour.penalty_spec import parse_penalty

DATA_SOURCES = ("natural-patches", "natural-images", "lfw-faces", "digits")
# Users' own data (downpour.data.own): folder:PATH, video:PATH_OR_GLOB, torchvision:NAME.
OWN_SOURCES = ("folder", "video", "torchvision")
TORCHVISION_SETS = ("STL10", "CIFAR10")
MODELS = ("rica", "cat", "sparse-ae", "rbm", "conv")
FIRST_LAYER_INITS = ("learned", "gabor", "dog", "random")  # model.init (downpour.nn.templates)
RULES = ("sgd", "adagrad")
BACKENDS = ("local", "sim", "ray")
# Consistency policies (downpour.ps.policies.POLICIES, repeated here so that reading a config imports no torch).
POLICIES = ("downpour", "sync", "ssp", "staleness-lr", "dc-asgd", "easgd")
LOCAL_POLICIES = POLICIES  # the local backend runs every policy
RAY_POLICIES = POLICIES  # and so does the ray backend
INT64_MAX = 2**63 - 1  # no integer key may exceed this (numpy and torch hold them in 64 bits)
MAX_SEED = 2**32 - 1  # train.seed: derived seeds (train.seed + i) stay well inside 64 bits
MAX_FEATURES = 1_000_000  # model.features
MAX_THREADS_PER_WORKER = 1024  # cluster.threads_per_worker: far more OpenMP threads than that crash a worker


@dataclass
class DataConfig:
    """Where examples come from and how they are preprocessed."""

    source: str = "natural-patches"
    patch_size: int = 16  # natural-patches only: side of the square patches
    image_size: int = 32  # natural-images only: side of the square crops
    channels: int = 1  # natural-images only: 1 (grayscale) or 3 (colour photos)
    examples: int = 50_000  # natural-patches / natural-images: how many training examples to cut
    held_out: int = 1024  # examples kept out of every worker's shard, for initial/final loss
    whiten: bool = True  # ZCA whitening (its matrix is saved with the run)
    whiten_eps: float = 1.0  # ZCA regularizer, as a fraction of the mean eigenvalue (keeps pixel noise down)
    whiten_centre: bool = False  # ZCA: remove the training examples' mean of each value first (Coates & Ng 2011)
    frame_stride: int = 30  # video: keep every frame_stride-th frame
    max_side: int = 512  # folder / video: shrink pictures whose longer side exceeds this (0 = never)
    cache_dir: str = ""  # torchvision: where sets are downloaded ("" = $XDG_CACHE_HOME/downpour or ~/.cache/downpour)


@dataclass
class ModelConfig:
    """Which network and its size."""

    name: str = "rica"
    features: int = 256
    sparsity: float = 0.1  # λ, the weight of the sparsity penalty
    epsilon: float = 0.01  # ε in sqrt(ε + h²), the smoothed L1
    # cat only: stages of (locally connected filtering -> L2 pooling -> local contrast normalization)
    stages: int = 1  # 3 in the full 200x200 layout of Le et al. 2012; 1 fits the 32x32 demo crops
    receptive_field: int = 18
    maps: int = 8
    pool: int = 5
    lcn: int = 5
    greedy: bool = True  # each stage learns on the previous stage's output without gradients across stages
    tied: bool = False  # convolution (tied weights) in place of local connections
    skip_variance: float = 0.0  # τ: receptive fields with input variance below τ output 0, uncomputed (0 = off)
    # every design (downpour.objectives, downpour.nn.templates)
    penalty: str = "default"  # none | l1:λ | l2:λ | kl:ρ,β | rica:λ; default: the design's own
    weight_decay: float = 0.0  # λ of ½ λ Σ W² over the weight matrices (0 = off)
    init: str = "learned"  # first layer: learned (the design's init) | gabor | dog | random (fresh Gaussian)
    freeze_first: bool = False  # keep the first layer at its initial values while the rest trains
    cd_k: int = 1  # rbm: Gibbs steps of contrastive divergence
    pcd: bool = False  # rbm: persistent chains (PCD) in place of chains started at the data


@dataclass
class TrainConfig:
    """Budget, batch and bookkeeping of one run."""

    batch_size: int = 128
    seconds: float = 60.0  # wall-clock budget; 0 means no limit
    steps: int = 0  # pushes across all workers, rejected ones too (the global step); 0 means no limit
    seed: int = 0
    tensorboard: bool = False  # also write the metrics as TensorBoard event files into RUN_DIR/tensorboard/
    checkpoint_every: float = 30.0  # seconds between checkpoints
    eval_every: float = 0.0  # local and Ray backends: seconds between held-out loss evaluations ("eval" rows); 0 = off


@dataclass
class PSConfig:
    """The sharded parameter server and the Downpour client."""

    shards: int = 2
    rule: str = "adagrad"
    lr: float = 0.02
    adagrad_eps: float = 1e-8
    n_fetch: int = 1  # fetch all shards every n_fetch steps
    n_push: int = 1  # push the accumulated update every n_push steps
    local_apply: bool = False  # apply each gradient to the local copy between fetches (plain SGD, ps.lr)
    policy: str = "downpour"  # consistency policy: downpour, sync, ssp, staleness-lr, dc-asgd, easgd
    staleness_bound: int = 3  # ssp: no worker more than this many clocks ahead of the slowest
    backup_workers: int = 0  # sync: apply once N - b pushes arrived, drop the late ones
    dc_lambda: float = 0.04  # dc-asgd: λ of the delay compensation
    easgd_rho: float = 5.0  # easgd: elastic strength (α = lr · rho)
    easgd_tau: int = 4  # easgd: local steps between elastic exchanges


@dataclass
class ClusterConfig:
    """Where and how many workers run."""

    backend: str = "local"
    workers: int = 2
    threads_per_worker: int = 0  # torch intra-op threads per worker; 0 = cores // workers (at least 1)
    # sim backend: the simulated cluster (simulated seconds; train.seconds is then simulated time too)
    sim_compute_mean: float = 1.0  # mean seconds per gradient
    sim_compute_sigma: float = 0.0  # 0: constant; > 0: lognormal with this sigma of the log, same mean
    sim_stragglers: float = 0.0  # fraction of workers that are slower (rounded half up; at least one when > 0)
    sim_straggler_slowdown: float = 1.0  # how many times slower they compute
    sim_network_mean: float = 0.0  # mean one-way message delay
    sim_network_sigma: float = 0.0  # 0: constant; > 0: lognormal
    # ray backend: "" starts a private Ray instance on 127.0.0.1; "auto" or "host:port" joins a running cluster
    address: str = ""
    chaos: str = ""  # ray backend: injected faults, e.g. "kill-worker:30s,kill-shard:60s" (see backends/chaos.py)


@dataclass
class Config:
    """A whole run: the five sections of ``config.toml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The resolved configuration as nested plain dicts (what ``config.toml`` holds)."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML text."""
        return tomli_w.dumps(self.to_dict())


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if not -INT64_MAX <= value <= INT64_MAX:  # numpy and torch hold integers in 64 bits
            raise ConfigError(f"invalid {key}: {value!r} (far too large: must be within ±{INT64_MAX})")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {expected}")  # pragma: no cover


def _field_types(section_cls: type) -> dict[str, type]:
    names = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: names[str(f.type)] for f in dataclasses.fields(section_cls)}


def from_dict(raw: dict[str, Any], base: Config | None = None, *, check: bool = True) -> Config:
    """Build a :class:`Config` from nested dicts, starting from ``base`` (defaults when None); validated unless
    ``check`` is false (when more overrides are still to come)."""
    config = dataclasses.replace(base) if base is not None else Config()
    for section_name, values in raw.items():
        if section_name not in SECTIONS:
            raise ConfigError(f"unknown config section {section_name!r} = {values!r} (sections: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section_name!r} must be a table, got {values!r}")
        section = dataclasses.replace(getattr(config, section_name))
        types = _field_types(type(section))
        for key, value in values.items():
            full = f"{section_name}.{key}"
            if key not in types:
                raise ConfigError(
                    f"unknown config key {full} = {value!r} (keys in [{section_name}]: {', '.join(types)})"
                )
            setattr(section, key, _check_type(full, value, types[key]))
        setattr(config, section_name, section)
    if check:
        validate(config)
    return config


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value``; the value is read as a TOML literal, else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    except RecursionError:  # [[[[...]]]]: a RecursionError is no bare string either
        raise ConfigError(f"invalid {parts[0]}.{parts[1]}: its value {NESTS_TOO_DEEPLY}") from None
    return parts[0], parts[1], value


def overrides_to_dict(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``--set`` strings into the nested form :func:`from_dict` takes."""
    nested: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        nested.setdefault(section, {})[key] = value
    return nested


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning a missing or malformed file into a :class:`ConfigError`."""
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8-sig")  # a byte-order mark (some Windows editors write one) is no key
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is not valid TOML: it {NESTS_TOO_DEEPLY}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None


# Keys whose global default does not suit a design: the design gets this value when neither the config file nor
# --set names the key (config.toml then records it like any other value).
DESIGN_DEFAULTS: dict[str, dict[str, Any]] = {
    "cat": {"data.source": "natural-images"},  # 32×32 crops: 18×18 fields and 5×5 pooling need more than 16×16
    "conv": {"model.receptive_field": 8},  # 16×16 patches: the cat's 18×18 would not fit
}
_NAMES_TOO = {"data.patch_size": "data.source"}  # naming the patch size chooses natural-patches


def _named(raw: dict[str, Any]) -> set[str]:
    """The ``section.key`` names a nested config (a TOML file's, ``--set``'s) gives."""
    return {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}


def named_keys(path: Path | None, overrides: list[str] | None) -> set[str]:
    """The ``section.key`` names the config file at ``path`` and the ``--set`` overrides give (a key's value alone
    cannot tell whether it was given)."""
    return _named(read_toml(path) if path is not None else {}) | _named(overrides_to_dict(overrides or []))


def load(path: Path | None = None, overrides: list[str] | None = None, *,
         base: dict[str, dict[str, Any]] | None = None) -> Config:  # fmt: skip
    """Defaults, then ``base`` (a command's own defaults, nested like the TOML file), then the TOML file (if any),
    then ``--set`` overrides, then :data:`DESIGN_DEFAULTS` for the keys none of them named; validated."""
    config, given = Config(), set()
    for raw in (base or {}, read_toml(path) if path is not None else {}, overrides_to_dict(overrides or [])):
        config = from_dict(raw, config, check=False)
        given |= _named(raw)
    given |= {_NAMES_TOO[key] for key in given if key in _NAMES_TOO}
    design_defaults: dict[str, dict[str, Any]] = {}
    for dotted, value in DESIGN_DEFAULTS.get(config.model.name, {}).items():
        if dotted not in given:
            section, key = dotted.split(".")
            design_defaults.setdefault(section, {})[key] = value
    config = from_dict(design_defaults, config, check=False)
    validate(config)
    return config


# Keys that only some designs or sources read: set away from their default elsewhere, they are ignored (warned of).
DESIGN_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    **{key: ("cat",) for key in ("stages", "maps", "pool", "lcn", "greedy", "tied", "skip_variance")},
    "receptive_field": ("cat", "conv"),
    "cd_k": ("rbm",),
    "pcd": ("rbm",),
    "features": ("rica", "sparse-ae", "rbm", "conv"),  # the cat network's width is model.maps per location
}
SPARSITY_DESIGNS = ("rica", "conv", "cat")  # whose default penalty is rica:λ with λ = model.sparsity
CHANNEL_SOURCES = ("natural-images", *(f"{kind}:" for kind in OWN_SOURCES))  # data.channels: these read colour
# Data keys that only some sources read (prefixes of data.source), and how the warning names those sources.
SOURCE_ONLY_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "patch_size": (("natural-patches",), "data.source=natural-patches"),
    "image_size": (CHANNEL_SOURCES, "data.source=natural-images and users' own pictures"),
    "channels": (CHANNEL_SOURCES, "data.source=natural-images and users' own pictures"),
    "examples": (("natural-patches", *CHANNEL_SOURCES), "sources cut into examples (not lfw-faces or digits)"),
    "frame_stride": (("video:",), "data.source=video:..."),
    "max_side": (("folder:", "video:"), "data.source=folder:... and video:..."),
    "cache_dir": (("torchvision:",), "data.source=torchvision:..."),
}
# Server keys that only one push policy reads.
POLICY_ONLY_KEYS: dict[str, str] = {"staleness_bound": "ssp", "backup_workers": "sync", "dc_lambda": "dc-asgd",
                                    "easgd_rho": "easgd", "easgd_tau": "easgd"}  # fmt: skip


def model_key_read(model: ModelConfig, key: str) -> bool:
    """Whether ``model``'s design reads ``model.<key>`` (what :func:`ignored_keys` warns of when set, it does not)."""
    if key in DESIGN_ONLY_KEYS and model.name not in DESIGN_ONLY_KEYS[key]:
        return False
    return key != "sparsity" or (model.penalty == "default" and model.name in SPARSITY_DESIGNS)


def data_key_read(data: DataConfig, key: str) -> bool:
    """Whether ``data``'s source and settings read ``data.<key>`` (as :func:`model_key_read`)."""
    if key in SOURCE_ONLY_KEYS:
        return data.source.startswith(SOURCE_ONLY_KEYS[key][0])
    return key not in ("whiten_eps", "whiten_centre") or data.whiten


# Model keys a resumed session may change: how it trains, not the network or its cost (recorded in its start row)
RESUMABLE_MODEL_KEYS = ("cd_k", "freeze_first")


def trained_differently(saved: Any, config: Config, *, ignoring: tuple[str, ...] = ()) -> list[str]:
    """What fixes a run's examples, network and cost and differs between ``saved`` (a checkpoint's recorded config,
    as a dict) and ``config``: ``["data.source 'natural-patches' vs 'natural-images'", ...]``. Compared: the data
    keys the source reads (but where torchvision sets are cached), the model keys the design reads (but
    :data:`RESUMABLE_MODEL_KEYS`) and ``train.seed``, but those named in ``ignoring`` (``"data.held_out"``); a key
    newer than the checkpoint had its default then."""
    saved = saved if isinstance(saved, dict) else {}
    saved_data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    saved_model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    saved_train = saved.get("train") if isinstance(saved.get("train"), dict) else {}
    problems = []
    for key, value in config.to_dict()["data"].items():
        if key == "cache_dir" or f"data.{key}" in ignoring or not data_key_read(config.data, key):
            continue
        if (before := saved_data.get(key, getattr(DataConfig, key))) != value:
            problems.append(f"data.{key} {before!r} vs {value!r}")
    for key, value in config.to_dict()["model"].items():
        if key in RESUMABLE_MODEL_KEYS or not model_key_read(config.model, key):
            continue
        if (before := saved_model.get(key, getattr(ModelConfig, key))) != value:
            problems.append(f"model.{key} {before!r} vs {value!r}")
    if saved_train.get("seed") != config.train.seed:
        problems.append(f"train.seed {saved_train.get('seed')!r} vs {config.train.seed!r}")
    return problems


def ignored_keys(config: Config) -> list[str]:
    """One line per key set away from its default that this run's design or data source never reads."""
    lines = []
    defaults = ModelConfig()
    for key, designs in DESIGN_ONLY_KEYS.items():
        value = getattr(config.model, key)
        if not model_key_read(config.model, key) and value != getattr(defaults, key):
            lines.append(f"model.{key} applies only to model.name={' or '.join(designs)}; ignored "
                         f"(model.{key} = {value!r} with model.name = {config.model.name!r})")  # fmt: skip
    model = config.model
    if model.sparsity != defaults.sparsity and not model_key_read(model, "sparsity"):
        why = (f"model.penalty = {model.penalty!r} names the penalty" if model.penalty != "default"
               else f"model.name = {model.name!r} has another default penalty")  # fmt: skip
        lines.append(f"model.sparsity is λ of the rica penalty that {', '.join(SPARSITY_DESIGNS)} use by default; "
                     f"ignored ({why}; model.sparsity = {model.sparsity!r})")  # fmt: skip
    if config.data.whiten_centre and not config.data.whiten:
        lines.append("data.whiten_centre applies only with data.whiten = true; ignored (data.whiten_centre = True "
                     "with data.whiten = False)")  # fmt: skip
    for key, (_, which) in SOURCE_ONLY_KEYS.items():
        value = getattr(config.data, key)
        if value != getattr(DataConfig, key) and not data_key_read(config.data, key):
            lines.append(f"data.{key} applies only to {which}; ignored "
                         f"(data.{key} = {value!r} with data.source = {config.data.source!r})")  # fmt: skip
    if config.cluster.backend == "sim" and config.ps.shards != PSConfig.shards:
        lines.append(f"ps.shards applies only to the local and Ray backends (the simulator keeps one parameter "
                     f"vector); ignored (ps.shards = {config.ps.shards} with cluster.backend = 'sim')")  # fmt: skip
    if config.cluster.backend == "sim" and config.train.eval_every != TrainConfig.eval_every:
        lines.append(
            f"train.eval_every applies only to the local and Ray backends (a simulated run evaluates 50 "
            f"times); ignored (train.eval_every = {config.train.eval_every:g} with cluster.backend = 'sim')"
        )
    for key, value in vars(config.cluster).items():
        if key.startswith("sim_") and config.cluster.backend != "sim" and value != getattr(ClusterConfig, key):
            lines.append(f"cluster.{key} applies only to cluster.backend = 'sim'; ignored (cluster.{key} = "
                         f"{value!r} with cluster.backend = {config.cluster.backend!r})")  # fmt: skip
    ps = config.ps
    if ps.policy == "easgd" and ps.rule != PSConfig.rule:
        lines.append(f"ps.rule is the shards' update rule, which easgd's elastic exchange replaces; ignored "
                     f"(ps.rule = {ps.rule!r} with ps.policy = 'easgd')")  # fmt: skip
    elif ps.adagrad_eps != PSConfig.adagrad_eps and (ps.rule != "adagrad" or ps.policy == "easgd"):
        lines.append(f"ps.adagrad_eps applies only to ps.rule = 'adagrad'; ignored (ps.adagrad_eps = "
                     f"{ps.adagrad_eps!r} with ps.rule = {ps.rule!r}, ps.policy = {ps.policy!r})")  # fmt: skip
    for key, policy in POLICY_ONLY_KEYS.items():
        value = getattr(config.ps, key)
        if config.ps.policy != policy and value != getattr(PSConfig, key):
            lines.append(f"ps.{key} applies only to ps.policy = {policy!r}; ignored (ps.{key} = {value!r} with "
                         f"ps.policy = {config.ps.policy!r})")  # fmt: skip
    return lines


def _require(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {key}: {value!r} ({what})")


def _valid_address(address: str) -> bool:
    """``""``, ``"auto"``, or ``host:port`` with a port 1..65535 (``[v6]:port`` too)."""
    if address in ("", "auto"):
        return True
    host, sep, port = address.rpartition(":")
    return bool(sep and host.strip("[]") and " " not in host and port.isdigit() and 1 <= int(port) <= 65535)


def _utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a command-line path of undecodable bytes holds lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(config: Config) -> None:
    """Check every value's range and choices; raise :class:`ConfigError` naming the first bad key."""
    d, m, t, p, c = config.data, config.model, config.train, config.ps, config.cluster
    for section in SECTIONS:  # config.toml is UTF-8: a path of undecodable bytes failed there with a traceback
        for item in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), item.name)
            _require(not isinstance(value, str) or _utf8(value), f"{section}.{item.name}", value,
                     "holds bytes that are not UTF-8, as a file name from another system may: rename it, or link to "
                     "it from a UTF-8 name")  # fmt: skip
    kind, _, where = d.source.partition(":")
    _require(d.source in DATA_SOURCES or (kind in OWN_SOURCES and where.strip() != ""), "data.source", d.source,
             f"choose one of {', '.join(DATA_SOURCES)}, folder:PATH, video:PATH_OR_GLOB, torchvision:NAME")  # fmt: skip
    _require(kind != "torchvision" or where in TORCHVISION_SETS, "data.source", d.source,
             f"torchvision sets: {', '.join('torchvision:' + name for name in TORCHVISION_SETS)}")  # fmt: skip
    _require(d.frame_stride >= 1, "data.frame_stride", d.frame_stride, "must be at least 1")
    _require(d.max_side == 0 or d.max_side >= 8, "data.max_side", d.max_side, "must be 0 (never shrink) or >= 8")
    _require(2 <= d.patch_size <= 128, "data.patch_size", d.patch_size, "must be 2..128")
    _require(2 <= d.image_size <= 1024, "data.image_size", d.image_size, "must be 2..1024")
    _require(d.channels in (1, 3), "data.channels", d.channels, "must be 1 or 3")
    _require(d.examples >= 1, "data.examples", d.examples, "must be at least 1")
    _require(d.held_out >= 1, "data.held_out", d.held_out, "must be at least 1")
    _require(math.isfinite(d.whiten_eps) and d.whiten_eps > 0, "data.whiten_eps", d.whiten_eps, "must be > 0")
    _require(m.name in MODELS, "model.name", m.name, f"choose one of {', '.join(MODELS)}")
    _require(1 <= m.features <= MAX_FEATURES, "model.features", m.features, f"must be 1..{MAX_FEATURES}")
    _require(math.isfinite(m.sparsity) and m.sparsity >= 0, "model.sparsity", m.sparsity, "must be >= 0")
    _require(math.isfinite(m.epsilon) and m.epsilon > 0, "model.epsilon", m.epsilon, "must be > 0")
    _require(1 <= m.stages <= 8, "model.stages", m.stages, "must be 1..8")
    _require(m.receptive_field >= 1, "model.receptive_field", m.receptive_field, "must be at least 1")
    _require(m.maps >= 1, "model.maps", m.maps, "must be at least 1")
    _require(m.pool >= 1, "model.pool", m.pool, "must be at least 1")
    _require(m.lcn >= 1 and m.lcn % 2 == 1, "model.lcn", m.lcn, "must be an odd number >= 1")
    _require(math.isfinite(m.skip_variance) and m.skip_variance >= 0, "model.skip_variance", m.skip_variance,
             "must be a finite number >= 0 (0 = off)")  # fmt: skip
    _require(not (m.skip_variance > 0 and m.tied), "model.skip_variance", m.skip_variance,
             "skipping needs untied layers: set model.tied = false or model.skip_variance = 0")  # fmt: skip
    _require(math.isfinite(m.weight_decay) and m.weight_decay >= 0, "model.weight_decay", m.weight_decay,
             "must be a finite number >= 0 (0 = off)")  # fmt: skip
    _require(m.init in FIRST_LAYER_INITS, "model.init", m.init, f"choose one of {', '.join(FIRST_LAYER_INITS)}")
    _require(m.cd_k >= 1, "model.cd_k", m.cd_k, "must be at least 1")
    parse_penalty(m.penalty)
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be at least 1")
    _require(math.isfinite(t.seconds) and t.seconds >= 0, "train.seconds", t.seconds, "must be >= 0 (0 = no limit)")
    _require(t.steps >= 0, "train.steps", t.steps, "must be >= 0 (0 = no limit)")
    _require(t.seconds > 0 or t.steps > 0, "train.seconds", t.seconds, "set train.seconds or train.steps")
    _require(0 <= t.seed <= MAX_SEED, "train.seed", t.seed, f"must be 0..{MAX_SEED}")
    _require(
        math.isfinite(t.checkpoint_every) and t.checkpoint_every > 0,
        "train.checkpoint_every",
        t.checkpoint_every,
        "must be > 0",
    )
    _require(p.shards >= 1, "ps.shards", p.shards, "must be at least 1")
    _require(p.rule in RULES, "ps.rule", p.rule, f"choose one of {', '.join(RULES)}")
    _require(math.isfinite(p.lr) and p.lr > 0, "ps.lr", p.lr, "must be a finite number > 0")
    _require(math.isfinite(p.adagrad_eps) and p.adagrad_eps > 0, "ps.adagrad_eps", p.adagrad_eps,
             "must be a finite number > 0")  # fmt: skip
    _require(p.n_fetch >= 1, "ps.n_fetch", p.n_fetch, "must be at least 1")
    _require(p.n_push >= 1, "ps.n_push", p.n_push, "must be at least 1")
    _require(p.policy in POLICIES, "ps.policy", p.policy, f"choose one of {', '.join(POLICIES)}")
    _require(p.staleness_bound >= 0, "ps.staleness_bound", p.staleness_bound, "must be >= 0")
    _require(c.workers >= 1, "cluster.workers", c.workers, "must be at least 1")  # before the keys that compare to it
    _require(0 <= p.backup_workers < c.workers, "ps.backup_workers", p.backup_workers,
             f"must be >= 0 and < cluster.workers = {c.workers}")  # fmt: skip
    _require(math.isfinite(p.dc_lambda) and p.dc_lambda >= 0, "ps.dc_lambda", p.dc_lambda, "must be >= 0")
    _require(math.isfinite(p.easgd_rho) and p.easgd_rho > 0, "ps.easgd_rho", p.easgd_rho, "must be > 0")
    _require(p.lr * p.easgd_rho < 1 or p.policy != "easgd", "ps.easgd_rho", p.easgd_rho,
             f"ps.lr · ps.easgd_rho must be < 1 (the elastic step α), got {p.lr * p.easgd_rho:g}")  # fmt: skip
    _require(p.easgd_tau >= 1, "ps.easgd_tau", p.easgd_tau, "must be at least 1")
    _require(c.backend in BACKENDS, "cluster.backend", c.backend, f"choose one of {', '.join(BACKENDS)}")
    _require(p.n_fetch == 1 or p.policy != "sync", "ps.n_fetch", p.n_fetch,
             "sync fetches once per round, after the round closes: leave it at 1")  # fmt: skip
    _require(p.n_fetch == 1 or p.policy != "ssp", "ps.n_fetch", p.n_fetch,
             "ssp bounds staleness by waiting before each fetch, so every clock must fetch: leave it at 1")  # fmt: skip
    _require(not p.local_apply or p.policy != "dc-asgd", "ps.local_apply", p.local_apply,
             "dc-asgd compensates a push against the weights its worker fetched, which local steps would have "
             "moved: leave it false")  # fmt: skip
    _require(p.n_push == 1 or p.policy != "dc-asgd", "ps.n_push", p.n_push,
             "dc-asgd compensates each gradient against the weights it was computed at; a sum of several would "
             "be compensated as one (its square holds their cross terms): leave it at 1")  # fmt: skip
    _require(p.n_fetch % p.n_push == 0 or p.policy != "staleness-lr", "ps.n_fetch", p.n_fetch,
             f"staleness-lr scales a push by its staleness, but with ps.n_push = {p.n_push} a fetch would fall "
             "between the gradients of one push, which then hold several stalenesses: make ps.n_fetch a multiple "
             "of ps.n_push")  # fmt: skip
    if p.policy == "easgd":
        for key, value, default in (("ps.n_fetch", p.n_fetch, 1), ("ps.n_push", p.n_push, 1),
                                    ("ps.local_apply", p.local_apply, False)):  # fmt: skip
            _require(value == default, key, value, "easgd takes ps.easgd_tau local SGD steps between exchanges; "
                     f"leave it at {str(default).lower()}")  # fmt: skip
    _require(math.isfinite(t.eval_every) and t.eval_every >= 0, "train.eval_every", t.eval_every,
             "must be >= 0 (0 = off)")  # fmt: skip
    _require(c.backend == "ray" or not c.address, "cluster.address", c.address, "only the ray backend connects")
    _require(_valid_address(c.address), "cluster.address", c.address,
             '"" (a private Ray instance), "auto" or "host:port"')  # fmt: skip
    _require(c.backend == "ray" or not c.chaos, "cluster.chaos", c.chaos, "faults are injected by the ray backend only")
    if c.chaos:
        from downpour.backends.chaos import parse_chaos

        parse_chaos(c.chaos)
    mean = c.sim_compute_mean
    _require(math.isfinite(mean) and mean > 0, "cluster.sim_compute_mean", mean, "must be > 0")
    for key in ("sim_compute_sigma", "sim_stragglers", "sim_network_mean", "sim_network_sigma"):
        value = getattr(c, key)
        _require(math.isfinite(value) and value >= 0, f"cluster.{key}", value, "must be >= 0")
    _require(c.sim_stragglers <= 1, "cluster.sim_stragglers", c.sim_stragglers, "a fraction of workers, 0..1")
    _require(math.isfinite(c.sim_straggler_slowdown) and c.sim_straggler_slowdown >= 1,
             "cluster.sim_straggler_slowdown", c.sim_straggler_slowdown, "must be >= 1")  # fmt: skip
    if c.backend == "sim":
        for key, value, default in (("ps.n_fetch", p.n_fetch, 1), ("ps.n_push", p.n_push, 1)):
            _require(value == default, key, value, "the sim backend models one gradient per push: leave it at 1")
        _require(not p.local_apply, "ps.local_apply", p.local_apply, "not modelled by the sim backend")
    _require(0 <= c.threads_per_worker <= MAX_THREADS_PER_WORKER, "cluster.threads_per_worker", c.threads_per_worker,
             f"must be 0 (cores // workers) .. {MAX_THREADS_PER_WORKER}; more threads than cores only slow a worker "
             f"down (this machine has {os.cpu_count() or 1})")  # fmt: skip


def write(config: Config, path: Path) -> None:
    """Write the fully resolved configuration as TOML (atomically: a temporary file, then a rename)."""
    from downpour.rundir import atomic_write_text

    atomic_write_text(path, config.to_toml())
