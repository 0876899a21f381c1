"""Reading finished (or partly finished) run directories back: config, metrics, summary, clients.

Everything a report shows comes from the files a run writes, so a report can be rebuilt at any
time from the directories alone (`flexmoe report DIR...`).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.methods.fcmoe.config import FcmoeConfig
from flexmoe.methods.flex.config import FlexConfig
from flexmoe.methods.registry import registered

CLIENTS_FILE = "clients.json"  # what the server may show of each client: domains and split sizes
DEFAULT_SCOPE = "attention"


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    config: dict
    summary: dict
    records: list[dict]
    clients: list[dict]

    @property
    def label(self) -> str:
        return run_label(self.config)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def servers(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "server" and r["round"] > 0]

    def base(self) -> dict:
        return next((r for r in self.records if r["kind"] == "server" and r["round"] == 0), {})

    def evals(self, round_index: int | None = None) -> list[dict]:
        """Per-client evaluation records of one round (default: the last evaluated round > 0)."""
        evals = [r for r in self.records if r["kind"] == "eval"]
        if round_index is None:
            rounds = [r["round"] for r in evals if r["round"] > 0]
            if not rounds:
                return []
            round_index = max(rounds)
        return sorted((r for r in evals if r["round"] == round_index), key=lambda r: r["client"])

    def bytes_per_round(self) -> float:
        servers = self.servers()
        return sum(r["bytes_up"] + r["bytes_down"] for r in servers) / len(servers) if servers else 0.0


def run_label(config: dict) -> str:
    """A run's name in comparisons: the method, plus what sets a variant apart from its defaults
    (FLEx ablations: -nogate, -random, -frequency, -k2, -zero, -full (graft_train)...; baselines: +experts /
    +full scope; FC-MoE: -key=value for each [fcmoe] knob off its default; any method: -plr<rate>
    (-plr=lr: train.lr) for a personal learning rate other than its method's default)."""
    method = config.get("method", "flex")
    label = method
    if method.startswith("flex"):
        flex = config.get("flex", {})
        if flex.get("gate", "sigmoid") == "none":
            label += "-nogate"
        if flex.get("selection", "reconstruction") != "reconstruction":
            label += "-" + flex["selection"]
        if int(flex.get("k", 1)) > 1:
            label += f"-k{flex['k']}"
        if flex.get("federate_routers"):
            label += "-routers"
        if flex.get("aggregator", "fedavg") != "fedavg":
            label += "-" + flex["aggregator"]
        if flex.get("graft_init", "copy") != "copy":
            label += "-" + flex["graft_init"]
        default = FlexConfig.model_fields["graft_train"].default  # (a key not stored: the default, as loading does)
        if flex.get("graft_train", default) != default and flex.get("graft_init") != "zero":  # zero: always full
            label += "-" + flex["graft_train"]
    else:
        scope = config.get("lora", {}).get("scope", DEFAULT_SCOPE)
        if scope != DEFAULT_SCOPE and method != "fcmoe":  # FC-MoE sets its scope in [fcmoe]
            label += "+" + scope.replace("attention+", "")
    if method.endswith("fcmoe"):  # its ablations: every [fcmoe] key off its default, e.g. -project=false
        for key, value in config.get("fcmoe", {}).items():
            field = FcmoeConfig.model_fields.get(key)
            if field is not None and key != "scope" and value != field.default:
                label += f"-{key}={_shown(value)}"
    info = registered().get(method)
    own = info.personal_lr if info is not None else 0.0  # the method's default rate
    personal_lr = config.get("train", {}).get("personal_lr", own)
    if personal_lr != own:
        label += f"-plr{personal_lr:g}" if personal_lr else "-plr=lr"
    return label


def _shown(value) -> str:
    """A config value as TOML writes it: true/false, 0.5, tensor."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def is_run(path: Path) -> bool:
    return (path / "config.toml").is_file() and (path / "metrics.jsonl").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among `paths` and below them, in sorted order; refuses a path with none."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise FlexmoeError(f"{path}: no such directory")
        runs = [path] if is_run(path) else sorted(p.parent for p in path.rglob("metrics.jsonl") if is_run(p.parent))
        if not runs:
            raise FlexmoeError(f"{path}: no run directory (config.toml + metrics.jsonl) in or below it")
        found.extend(runs)
    return found


def read_run(path: Path) -> Run:
    path = Path(path)
    try:
        config = tomllib.loads((path / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise FlexmoeError(f"{path / 'config.toml'}: unreadable run config ({err})") from None
    records = _read_metrics(path / "metrics.jsonl")
    summary = _read_json(path / "summary.json", default={})
    clients = _read_json(path / CLIENTS_FILE, default=[])
    if not clients:  # older runs: at least the client ids seen in the metrics
        ids = sorted({r["client"] for r in records if "client" in r})
        clients = [{"client_id": cid} for cid in ids]
    return Run(path, config, summary, records, clients)


def _read_metrics(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a last line cut short by a kill; the checkpoint never covered it
        if not isinstance(record, dict) or "round" not in record or "kind" not in record:
            raise FlexmoeError(f"{path}:{number}: not a metrics record (needs \"round\" and \"kind\")")
        records.append(record)
    return records


def _read_json(path: Path, default):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FlexmoeError(f"{path}: invalid JSON ({err})") from None


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None when fewer than 2 values) of the finite values."""
    values = finite(values)
    if not values:
        return None, None
    mu = sum(values) / len(values)
    if len(values) < 2:
        return mu, None
    return mu, math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
