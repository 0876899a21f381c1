"""The config machinery every flexmoe config is built on (`flexmoe run`'s `RunConfig`, each
method's section beside its method, `flexmoe pretrain`'s `PretrainConfig`): frozen pydantic
sections, TOML files with `--set KEY=VALUE` overrides, and one-line `FlexmoeError`s that name the
file or `--set` and the key, with the closest valid keys or the allowed values.

Torch-free and light: `flexmoe --help` and the config modules import it.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError

from flexmoe.errors import FlexmoeError

# where a model runs, for a run (`runtime.device`) and for pretraining (`train.device`) alike:
# "auto" = the first CUDA GPU when there is one, else the CPU; "cpu", "cuda" or "cuda:N"
# (resolved by flexmoe.models.device.resolve_device)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class Section(BaseModel):  # no docstring: the config docs show each section's own (inspect.getdoc inherits)
    # unknown keys refused, values frozen, no setting means NaN or inf
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Config = TypeVar("Config", bound=BaseModel)


def is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key `model` accepts, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if is_section(field.annotation):
            keys.extend(valid_keys(field.annotation, f"{prefix}{name}."))
    return keys


def load(model: type[Config], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (optional), apply `key=value` overrides, validate as `model`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(Path(path))
        check_keys(raw, source=str(path), model=model)
    for item in overrides:
        key, value = parse_override(item)
        check_keys(nest(key, value), source="--set", model=model)
        set_dotted(raw, key, value)
    return validate(model, raw)


def to_toml(config: BaseModel) -> str:
    """`config` as TOML text, every key written; `load` reads it back identically."""
    return tomli_w.dumps(config.model_dump(mode="json"))


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlexmoeError(f"{path}: config file not found") from None
    except OSError as err:
        raise FlexmoeError(f"{path}: cannot read the config file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise FlexmoeError(f"{path}: config file is not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise FlexmoeError(f"{path}: invalid TOML: {err}") from None


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FlexmoeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    try:  # a TOML literal (number, bool, quoted string, list); anything else is a bare string
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    set_dotted(out, dotted, value)
    return out


def set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise FlexmoeError(f"config key {part!r} is a value, not a section (in {dotted!r})")
        target = child
    target[leaf] = value


def check_keys(raw: dict[str, Any], source: str, model: type[BaseModel], prefix: str = "",
               root: type[BaseModel] | None = None) -> None:
    """Refuse a key `model` does not have, naming the closest keys of the whole config (`root`)."""
    root = root or model
    for key, value in raw.items():
        dotted = prefix + key
        field = model.model_fields.get(key)
        if field is None:
            close = difflib.get_close_matches(dotted, valid_keys(root), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid_keys(model, prefix))}"
            raise FlexmoeError(f"{source}: unknown config key {dotted!r}{hint}")
        annotation = field.annotation
        if is_section(annotation) and isinstance(value, dict):
            check_keys(value, source, annotation, dotted + ".", root)
        elif is_section(annotation):
            raise FlexmoeError(f"{source}: config key {dotted!r} is a section; set its keys, e.g. {dotted}.<key>=...")


def validate(model: type[Config], raw: dict[str, Any]) -> Config:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a cross-key check
            raise FlexmoeError(f"config: {message}") from None
        key = ".".join(str(part) for part in first["loc"])
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        raise FlexmoeError(f"config key {key}{shown}: {message}") from None
