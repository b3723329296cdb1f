"""The cluster spec: a SkyPilot-like YAML file, validated with pydantic (DESIGN.md §7).

Shape (per-node resources nested under ``resources``; everything but ``resources`` optional)::

    name: demo                  # DNS label: lower-case letters, digits, '-'; <= 63 chars
    nodes: 3                    # 1..64 cluster members, one per supplier node
    resources:                  # what EACH node must offer
      gpu: "rtx4090:1"          # MODEL[:COUNT], or an any-of list: [rtx4090, "a100-80gb:2"]
      # cpus: 2                 # ...or CPU cores instead of GPUs (exactly one of gpu/cpus;
      #                         #    neither means cpus: 1)
      min_vram_gb: 24           # per device
      min_ram_gb: 32            # per node
    regions: [eu-west]          # any of these (empty or absent: anywhere); a string is one
    security: community         # minimum tier: community < datacenter < confidential
    connectivity: medium        # minimum tier: low < medium < high < ultra
    min_reliability: 0.9        # optional, 0..1
    max_price: 0.40             # credits per device-hour (cpu: per core-hour), <= 6 decimals
    duration: 2h                # "90s", "30m", "1h30m", "2d"; default 1h; at most 30d
    env: {WANDB_MODE: offline}  # names [A-Za-z_][A-Za-z0-9_]*, not LOOM_* or RAY_*

Parsed values are typed: ``gpu`` is a tuple of :class:`GpuOption` with catalog slugs,
``security``/``connectivity`` are tiers, ``max_price`` is integer micro-credits, ``duration``
is integer seconds. ``model_dump()`` gives back the user-facing form (``"0.4"``, ``"2h"``,
``"community"``), so a dumped spec validates to the same spec.

Errors: :func:`load_spec` and :func:`parse_spec` raise :class:`SpecError`, whose message lists
one ``path.to.field: what's wrong`` line per problem (YAML syntax errors carry line and column).
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from loom.core.catalog import CPU_MODEL, normalize_model
from loom.core.models import ConnectivityTier, SecurityTier, validate_region
from loom.core.money import format_credits, parse_credits

__all__ = [
    "MAX_DURATION_S",
    "MAX_GPUS_PER_NODE",
    "MAX_NODES",
    "ClusterSpec",
    "GpuOption",
    "Resources",
    "SpecError",
    "check_env",
    "env_problem",
    "format_duration",
    "load_spec",
    "merge_overrides",
    "parse_duration",
    "parse_spec",
    "spec_from_flags",
    "spec_to_yaml",
]

MAX_NODES = 64
MAX_GPUS_PER_NODE = 16
MAX_CPUS_PER_NODE = 1024
DEFAULT_DURATION_S = 3600
MAX_DURATION_S = 30 * 24 * 3600
#: Bounds on a spec's ``env`` (a ``member.start`` must stay far below the 1 MiB frame).
MAX_ENV_VARS = 64
MAX_ENV_NAME = 128
MAX_ENV_VALUE = 4096
MAX_ENV_TOTAL = 64 * 1024

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_RESERVED_ENV = ("LOOM_", "RAY_")
#: Loader and interpreter hooks: they change what the sandbox's own launcher runs.
_HOOK_ENV_PREFIXES = ("LD_", "DYLD_", "MALLOC_", "BASH_FUNC_")
_HOOK_ENV = frozenset(
    {
        "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE", "PYTHONEXECUTABLE",
        "PYTHONPLATLIBDIR", "PYTHONBREAKPOINT", "PYTHONWARNINGS", "PYTHONINSPECT",
        "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONPYCACHEPREFIX", "PYTHONCASEOK",
        "BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "CDPATH",
        "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "RUBYOPT", "RUBYLIB",
        "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
        "GCONV_PATH", "GETCONF_DIR", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF",
        "GLIBC_TUNABLES", "TMPDIR", "HOME", "PATH", "USER", "LOGNAME", "SHELL",
        "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER",
    }
)  # fmt: skip


def env_problem(name: object, value: object) -> str | None:
    """Why ``name=value`` may not enter a member's sandbox, or None if it may."""
    if not isinstance(name, str) or not _ENV_RE.match(name):
        return (
            f"invalid variable name {str(name)[:40]!r}: use [A-Za-z_][A-Za-z0-9_]*, "
            f"at most {MAX_ENV_NAME} characters"
        )
    upper = name.upper()
    if upper.startswith(_RESERVED_ENV):
        return f"{name}: names starting with LOOM_ or RAY_ are reserved"
    if upper.startswith(_HOOK_ENV_PREFIXES) or upper in _HOOK_ENV:
        return (
            f"{name}: this variable is set by Loom or changes how programs are loaded "
            "(loader and interpreter hooks are refused); remove it"
        )
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"{name}: value must be text; quote it, e.g. {name}: '{value}'"
    text = str(value)
    if "\0" in text:
        return f"{name}: value contains a NUL character"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ENV_VALUE:
        return f"{name}: value longer than {MAX_ENV_VALUE} bytes"
    return None


def check_env(value: Any) -> dict[str, str]:
    """A spec's ``env`` as ``{name: text}``; ValueError naming the first bad variable.

    Also used by the agent, defensively, on what a ``member.start`` command carries.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("env must be a mapping of NAME: value")
    if len(value) > MAX_ENV_VARS:
        raise ValueError(f"at most {MAX_ENV_VARS} environment variables")
    out: dict[str, str] = {}
    total = 0
    for key, val in value.items():
        problem = env_problem(key, val)
        if problem is not None:
            raise ValueError(problem)
        text = str(val)
        total += len(key) + 1 + len(text.encode("utf-8", "surrogatepass"))
        if total > MAX_ENV_TOTAL:
            raise ValueError(f"env is larger than {MAX_ENV_TOTAL} bytes in total")
        out[key] = text
    return out


_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_RESOURCE_KEYS = ("gpu", "cpus", "min_vram_gb", "min_ram_gb")


class SpecError(ValueError):
    """A spec Loom cannot accept. ``problems`` holds ``(path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        lines = [f"{path}: {msg}" if path else msg for path, msg in problems]
        head = "invalid cluster spec" + (":" if len(lines) == 1 else f" ({len(lines)} problems):")
        super().__init__(head + ("\n  " if lines else "") + "\n  ".join(lines))


# ----------------------------------------------------------------------------- durations


def parse_duration(value: str | int) -> int:
    """Parse "2h", "30m", "90s", "1h30m", "2d" into seconds (0 < seconds <= 30 days)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"duration must be text like 2h, 30m, 1h30m, got {value!r}")
    if isinstance(value, int):
        raise ValueError(f"duration {value} needs a unit: write {value}s, {value}m or {value}h")
    text = value.strip().lower().replace(" ", "")
    match = _DURATION_RE.match(text)
    if not text or match is None:
        raise ValueError(f"invalid duration {value!r}: use forms like 2h, 30m, 90s, 1h30m, 2d")
    seconds = sum(int(g) * mult for g, (_, mult) in zip(match.groups(), _UNITS, strict=True) if g)
    if seconds <= 0:
        raise ValueError("duration must be longer than 0s")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {value!r} is longer than the maximum of 30d")
    return seconds


def format_duration(seconds: int) -> str:
    """The shortest unit form: 5400 -> "1h30m", 3600 -> "1h"."""
    if seconds <= 0:
        return "0s"
    parts: list[str] = []
    rest = seconds
    for unit, mult in _UNITS:
        n, rest = divmod(rest, mult)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


# ----------------------------------------------------------------------------- models


class GpuOption(BaseModel):
    """One acceptable GPU choice per node: ``count`` devices of ``model`` on one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    count: int = Field(default=1, ge=1, le=MAX_GPUS_PER_NODE)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        slug = normalize_model(value)
        if slug == CPU_MODEL:
            raise ValueError("cpu is not a GPU model; use resources.cpus: N instead")
        return slug

    def __str__(self) -> str:
        return f"{self.model}:{self.count}"

    @classmethod
    def parse(cls, value: Any) -> Any:
        """``"rtx4090"`` / ``"a100-80gb:2"`` -> dict for validation; other inputs untouched."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f"YAML read this as the number {value}; quote the GPU model")
        if not isinstance(value, str):
            return value
        model, sep, count = value.strip().rpartition(":")
        if not sep:
            return {"model": value.strip()}
        if not count.strip().isdigit():
            raise ValueError(f"invalid GPU count in {value!r}: use MODEL:COUNT such as rtx4090:2")
        return {"model": model.strip(), "count": int(count)}


def _region_item(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"region must be text such as eu-west, got {value!r}")
    return validate_region(value)


_Region = Annotated[str, BeforeValidator(_region_item)]
_GpuItem = Annotated[GpuOption, BeforeValidator(GpuOption.parse)]


class Resources(BaseModel):
    """What each node of the cluster must offer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: tuple[_GpuItem, ...] | None = None
    cpus: int | None = Field(default=None, ge=1, le=MAX_CPUS_PER_NODE)
    min_vram_gb: int | None = Field(default=None, ge=0, le=4096)
    min_ram_gb: int | None = Field(default=None, ge=0, le=65536)

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, value: Any) -> Any:
        if value is None:
            return None
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError("give at least one GPU model, e.g. rtx4090 or [rtx4090, a100-80gb:2]")
        return items

    @field_validator("gpu")
    @classmethod
    def _gpu_unique(cls, value: tuple[GpuOption, ...] | None) -> tuple[GpuOption, ...] | None:
        if value is None:
            return None
        seen: set[str] = set()
        for opt in value:
            if opt.model in seen:
                raise ValueError(f"{opt.model} is listed twice; give each model once")
            seen.add(opt.model)
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_cpus(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("gpu") is None and data.get("cpus") is None:
            return {**data, "cpus": 1}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> Resources:
        if self.gpu is not None and self.cpus is not None:
            raise ValueError("give either gpu or cpus, not both")
        if self.cpus is not None and self.min_vram_gb:
            raise ValueError("min_vram_gb only applies to GPU nodes; drop it or ask for a gpu")
        return self

    @field_serializer("gpu")
    def _dump_gpu(self, value: tuple[GpuOption, ...] | None) -> list[str] | None:
        return None if value is None else [str(opt) for opt in value]

    @property
    def is_gpu(self) -> bool:
        return self.gpu is not None


class ClusterSpec(BaseModel):
    """A validated cluster spec. ``max_price`` is micro-credits, ``duration`` seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    nodes: int = Field(default=1, ge=1, le=MAX_NODES)
    resources: Resources = Field(default_factory=Resources)
    regions: tuple[_Region, ...] = ()
    security: SecurityTier = SecurityTier.COMMUNITY
    connectivity: ConnectivityTier = ConnectivityTier.LOW
    min_reliability: float | None = Field(default=None, ge=0.0, le=1.0)
    max_price: int | None = None
    duration: int = DEFAULT_DURATION_S
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError(
                f"invalid name {value!r}: use 1-63 lower-case letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("regions", mode="before")
    @classmethod
    def _regions(cls, value: Any) -> Any:
        if value is None:
            return ()
        return [value] if isinstance(value, str) else value

    @field_validator("regions")
    @classmethod
    def _regions_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value))

    @field_validator("security", mode="before")
    @classmethod
    def _security(cls, value: Any) -> Any:
        return SecurityTier.parse(value) if isinstance(value, str) else value

    @field_validator("connectivity", mode="before")
    @classmethod
    def _connectivity(cls, value: Any) -> Any:
        return ConnectivityTier.parse(value) if isinstance(value, str) else value

    @field_validator("max_price", mode="before")
    @classmethod
    def _max_price(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("max_price must be a number of credits such as 0.40")
        if isinstance(value, float):
            value = Decimal(repr(value))  # shortest round trip: 0.4 -> 0.4, never 0.40000000001
        if isinstance(value, str | int | Decimal):
            return parse_credits(value)
        raise ValueError("max_price must be a number of credits such as 0.40")

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        return check_env(value)

    @field_serializer("security", "connectivity")
    def _dump_tier(self, value: SecurityTier | ConnectivityTier) -> str:
        return value.slug

    @field_serializer("max_price")
    def _dump_price(self, value: int | None) -> str | None:
        return None if value is None else format_credits(value)

    @field_serializer("duration")
    def _dump_duration(self, value: int) -> str:
        return format_duration(value)

    @property
    def devices_per_node(self) -> int:
        """Devices (cpu: cores) each member takes with the first GPU option."""
        gpu = self.resources.gpu
        return gpu[0].count if gpu else (self.resources.cpus or 1)


# ----------------------------------------------------------------------------- errors


def _allowed_fields(loc: tuple[int | str, ...]) -> list[str] | None:
    """The field names of the model at ``loc`` (inside ClusterSpec), if it is a model."""
    model: type[BaseModel] = ClusterSpec
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        targets: dict[str, type[BaseModel]] = {"resources": Resources, "gpu": GpuOption}
        target = targets.get(str(part))
        if target is None:
            return None
        model = target
    return list(model.model_fields)


def _message(err: Mapping[str, Any]) -> str:
    kind = str(err.get("type", ""))
    loc = tuple(err.get("loc", ()))
    msg = str(err.get("msg", "invalid"))
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc[:-1]) or []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown field{hint} (allowed: {', '.join(allowed)})"
    if kind == "missing":
        return "required field is missing"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
        elif "[" in str(part):
            continue  # pydantic's internal validator names
        else:
            parts.append(str(part))
    return ".".join(parts)


def _from_validation_error(exc: ValidationError) -> SpecError:
    problems: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        # Errors on a GPU option inside a list: report the list item, not its sub-field.
        path = _path(loc)
        if path.endswith(".model") and ".gpu." in f".{path}":
            path = path[: -len(".model")]
        item = (path, _message(err))
        if item not in problems:
            problems.append(item)
    return SpecError(problems)


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_spec(data: Any) -> ClusterSpec:
    """Validate an already-parsed spec (a mapping) or raise SpecError."""
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else type(data).__name__
        raise SpecError([("", f"a cluster spec must be a YAML mapping of fields, got {kind}")])
    try:
        return ClusterSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def load_spec(yaml_text: str) -> ClusterSpec:
    """Parse and validate a YAML cluster spec, or raise SpecError."""
    try:
        data = yaml.load(yaml_text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = exc.problem or exc.context or "syntax error"
        raise SpecError([(where, f"YAML syntax error: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([("", f"YAML error: {exc}")]) from None
    return parse_spec(data)


def spec_to_yaml(spec: ClusterSpec) -> str:
    """The spec as YAML in the user-facing form (what ``load_spec`` reads back)."""
    data = spec.model_dump(mode="json", exclude_none=True)
    if not data.get("env"):
        data.pop("env", None)
    return yaml.safe_dump(data, sort_keys=False)


def merge_overrides(spec_dict: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``spec_dict`` with ``overrides`` applied (CLI flags beat the file).

    ``None`` overrides are ignored. ``gpu``, ``cpus``, ``min_vram_gb`` and ``min_ram_gb`` may be
    given at top level or as ``resources.<key>``; setting ``gpu`` drops a ``cpus`` from the
    file and vice versa. ``env`` is merged key by key. Other dotted keys set nested fields.
    """
    result: dict[str, Any] = copy.deepcopy(dict(spec_dict))
    for raw_key, value in overrides.items():
        if value is None:
            continue
        key = raw_key.removeprefix("resources.")
        if key in _RESOURCE_KEYS:
            res = result.get("resources")
            res = dict(res) if isinstance(res, Mapping) else {}
            if key == "gpu":
                res.pop("cpus", None)
            elif key == "cpus":
                res.pop("gpu", None)
                res.pop("min_vram_gb", None)
            res[key] = value
            result["resources"] = res
        elif key == "env" and isinstance(value, Mapping):
            env = result.get("env")
            merged = dict(env) if isinstance(env, Mapping) else {}
            merged.update(value)
            result["env"] = merged
        elif "." in key:
            head, _, rest = key.partition(".")
            sub = result.get(head)
            result[head] = merge_overrides(sub if isinstance(sub, Mapping) else {}, {rest: value})
        else:
            result[key] = value
    return result


def spec_from_flags(
    base: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    nodes: int | None = None,
    gpu: str | list[str] | None = None,
    cpus: int | None = None,
    min_vram_gb: int | None = None,
    min_ram_gb: int | None = None,
    regions: str | list[str] | None = None,
    security: str | None = None,
    connectivity: str | None = None,
    min_reliability: float | None = None,
    max_price: str | None = None,
    duration: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ClusterSpec:
    """Build a spec from CLI flags, optionally on top of a file's parsed mapping (``base``).

    Flags left ``None`` keep the file's value. ``regions`` may be a comma-separated string.
    Raises SpecError like :func:`load_spec`.
    """
    if isinstance(regions, str):
        regions = [r for r in (p.strip() for p in regions.split(",")) if r]
    if isinstance(gpu, str) and "," in gpu:
        gpu = [g.strip() for g in gpu.split(",") if g.strip()]
    overrides: dict[str, Any] = {
        "name": name,
        "nodes": nodes,
        "gpu": gpu,
        "cpus": cpus,
        "min_vram_gb": min_vram_gb,
        "min_ram_gb": min_ram_gb,
        "regions": regions,
        "security": security,
        "connectivity": connectivity,
        "min_reliability": min_reliability,
        "max_price": max_price,
        "duration": duration,
        "env": env,
    }
    return parse_spec(merge_overrides(base or {}, overrides))
