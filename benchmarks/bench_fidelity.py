"""The fidelity study: every claim of the FLEx paper and of FC-MoE tested with paired statistics.

Two settings of the builtin data (both in the datasheet): `persona` (clients that conflict: each
answers in its own convention, Dirichlet(0.5) content skew, at most 256 training examples) and
`paper-category` (the FLEx paper's split: two task categories per client). In each, every study
variant (`VARIANTS`: a method name plus config overrides) runs over the seeds on the same
partitions, one `flexmoe run` per (setting, variant, seed) into `ROOT/<setting>/<variant>/seed-<S>`
(FLEXMOE_BENCH_JOBS of them at once, each single-threaded; a variant whose resolved config equals
an earlier one's is not run again but read from it). Every claim row (`CLAIMS`, lettered a–j as
in issue 27) is then a paired difference (A − B on the same examples: the same stratified test
sample of each client, the same probes, the same held-out documents) with its stratified
bootstrap 95% CI over clients × examples pooled across seeds and its sign per seed, judged
supported / contradicted / inconclusive (`flexmoe.analysis.stats.verdict`). Rows d, e and i also
get tables from the runs' summaries (k = 1, 2, 3 against bytes, personal state and step time;
expert-load std; routing drift, entropy and bytes per round), means with 95% CIs over
clients × seeds where per-client values exist.

The full study takes many CPU hours: FLEXMOE_FIDELITY_PLAN=1 prints every run it would make, how
many are finished and an estimate of the CPU minutes left (from the wall time of finished runs),
and writes nothing. FLEXMOE_FIDELITY_METHODS (";"-separated `setting=variant,variant`; a setting
left out is not run), FLEXMOE_FIDELITY_SEEDS and FLEXMOE_FIDELITY_SET (";"-separated KEY=VALUE
overrides for every run, on top of `STUDY_SET`) reduce it, and the result file says so;
FLEXMOE_FIDELITY_ROOT pins the run directory (default `runs/fidelity-<today>`, so a study spanning
midnight needs it); FLEXMOE_FIDELITY_REPORT_ONLY=1 runs nothing and reports the finished runs only
(those whose summary says every round ran); FLEXMOE_FIDELITY_NOTE adds a paragraph on how the runs
were made. Finished runs are skipped and interrupted ones resumed, so the runs can also be made
beforehand, in any order, by other processes into the same directories.

A finished run's results (its config, metrics, summary, per-example scores, expert selections and
log; not its checkpoints) are copied into the archive, `benchmarks/results/fidelity-runs/<setting>/
<variant>/seed-<S>` (FLEXMOE_FIDELITY_ARCHIVE pins another), with the commit that made them
(`provenance.json`). The archive is committed, so the study resumes on another machine or in a
later session: a run whose archived config equals the planned one is not made again, and every
table is computed from the archive.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.machine import PREVIOUS_FLEX_RECIPE, bench_jobs, header_markdown, run_each, write_result
from flexmoe.commands.compare import VARIANTS as COMPARE_VARIANTS

if TYPE_CHECKING:  # for annotations only: this file imports flexmoe.analysis inside the functions that use it
    from flexmoe.analysis.stats import McNemar, PairedDifference

SETTINGS = {
    "persona": ("configs/persona.toml", "clients that conflict (each its own answer convention, Dirichlet(0.5) "
                "content skew over domains, at most 256 training examples each)"),
    "paper-category": ("configs/paper-category.toml", "the FLEx paper's split (two task categories per client)"),
}
REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERTS = "lora.scope=attention+experts"
# variant -> (method, config overrides). Registered methods run as they are; `flexmoe compare`'s
# named variants keep their definitions (`COMPARE_VARIANTS`); the rest are the study's own.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # (a) the paper's table: MoE + X with the same shared part (attention LoRA) and with the experts trainable
    "flex": ("flex", ()),
    "fedavg": ("fedavg", ()),
    "fedprox": ("fedprox", ()),
    "scaffold": ("scaffold", ()),
    "fedadam": ("fedadam", ()),
    "fedavg+experts": COMPARE_VARIANTS["fedavg+experts"],
    "fedprox+experts": ("fedprox", (EXPERTS,)),
    "scaffold+experts": ("scaffold", (EXPERTS,)),
    "fedadam+experts": ("fedadam", (EXPERTS,)),
    # (c) the gate; (d) k grafted experts per layer; (f) the selection
    "flex-nogate": COMPARE_VARIANTS["flex-nogate"],
    "flex-k2": COMPARE_VARIANTS["flex-k2"],
    "flex-k3": COMPARE_VARIANTS["flex-k3"],
    "flex-random": COMPARE_VARIANTS["flex-random"],
    "flex-frequency": ("flex", ("flex.selection=frequency",)),
    # (g) grafting against the same personal capacity, fine-tuning, local training, a zero-initialised graft
    "local": ("local", ()),
    "fedper": ("fedper", ()),
    "fedavg-ft": ("fedavg-ft", ()),
    "fedper-graft-lr": ("fedper", ("train.personal_lr=4e-5",)),  # the same capacity at the graft's rate
    "flex-zero": COMPARE_VARIANTS["flex-zero"],  # trains in full (no copy to put LoRA on): paired with flex-full
    # (h) FC-MoE and its three parts, each off (importance off: weights by examples alone, as FedAvg's)
    "fcmoe": ("fcmoe", ()),
    "fcmoe-noimportance": ("fcmoe", ("fcmoe.frequency_power=0", "fcmoe.norm_power=0")),
    "fcmoe-noprojection": ("fcmoe", ("fcmoe.project=false",)),
    "fcmoe-noretention": ("fcmoe", ("fcmoe.retention=0",)),
    # (j) the default recipe (a frozen copy under LoRA, the authors' personal lr 4e-5, gate bias -2) against
    # the full trainable copy, against the shared lr for the graft, and against the previous default
    "flex-full": COMPARE_VARIANTS["flex-full"],
    "flex-shared-lr": ("flex", ("train.personal_lr=0",)),
    "flex-previous": ("flex", PREVIOUS_FLEX_RECIPE),
}
# config keys a variant needs that the config does not have yet: such a variant is listed by the
# plan as not runnable (and its claim rows as not run) until the key exists
PENDING_KEYS: dict[str, str] = {}  # none at present
METHODS = {setting: tuple(VARIANTS) for setting in SETTINGS}  # every variant in both settings
SEEDS = (1, 2, 3)  # the defaults were chosen on seed 100 (development seed), never on these
# the study's training budget is the default run's, written out so that the study does not move
# with a later default; its evaluation sizes are smaller than a single run's defaults, so that the
# study fits a small machine (pooled over 3 seeds × 4 clients: 768 answer pairs, 3,600 probe pairs)
STUDY_SET = ("rounds=5", "train.local_steps=30", "train.lr=4e-3", "train.precision=bf16",
             "flex.graft_train=lora", "flex.gate_init_bias=-2",  # (the graft's rate: each method's default)
             "eval.max_test_examples=64", "eval.max_probes=300", "eval.knowledge_max_docs=256",
             "eval.global_model=false", "eval.every=0", "eval.batch_size=8")

_BASELINES = ("fedavg", "fedprox", "scaffold", "fedadam")
_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD", "fedadam": "FedAdam"}
# (A, B, the claim "A is better than B"), lettered as issue 27's rows (b: the knowledge columns of
# the a rows with the experts trainable); the paper's claims first, then its ablations, then FC-MoE's
CLAIMS = (
    *(("flex", m, f"(a) FLEx beats MoE + {_NAMES[m]} with the same shared part (attention LoRA)") for m in _BASELINES),
    *(("flex", f"{m}+experts", f"(a, b) FLEx beats MoE + {_NAMES[m]} with trainable experts (the paper's MoE + X)")
      for m in _BASELINES),
    ("flex", "flex-nogate", "(c) the adaptive gate helps (no-gate ablation)"),
    ("flex-k2", "flex", "(d) two grafted experts per layer beat one"),
    ("flex-k3", "flex", "(d) three grafted experts per layer beat one"),
    ("flex-k3", "flex-k2", "(d) three grafted experts per layer beat two"),
    ("flex", "flex-random", "(f) the reconstruction-selected expert beats a random one"),
    ("flex", "flex-frequency", "(f) the reconstruction-selected expert beats the most frequently routed one"),
    ("flex", "fedper", "(g) grafting beats the same personal capacity as expert LoRA (FedPer-style control)"),
    ("flex", "fedper-graft-lr", "(g) grafting beats the same personal capacity trained at the graft's rate (4e-5)"),
    ("flex", "fedavg-ft", "(g) FLEx beats FedAvg followed by local fine-tuning"),
    ("flex", "local", "(g) FLEx beats local training alone"),
    ("flex-full", "flex-zero", "(g) grafting a pretrained expert beats a zero-initialised one of the same shape "
                               "(both trained in full)"),
    ("flex", "fcmoe", "(h) FLEx beats FC-MoE"),
    ("fcmoe", "fedavg+experts", "(h) FC-MoE's conflict-aware aggregation beats FedAvg of the same trainables "
                                "(all three parts off)"),
    ("fcmoe", "fcmoe-noimportance", "(h) FC-MoE's importance-aware weighting helps"),
    ("fcmoe", "fcmoe-noprojection", "(h) FC-MoE's gradient consensus projection helps"),
    ("fcmoe", "fcmoe-noretention", "(h) FC-MoE's local knowledge retention helps"),
    ("flex", "flex-full", "(j) the graft as a frozen copy under LoRA (the authors', the default) beats the full "
                          "trainable copy, both at lr 4e-5"),
    ("flex", "flex-shared-lr", "(j) the graft at the authors' personal lr 4e-5 (the default) beats it at the "
                               "shared lr 4e-3"),
    ("flex", "flex-previous", "(j) the chosen recipe beats the previous default (a full copy at 4e-3, gate bias -4)"),
)
# (e): expert-load std, lower = better balanced, paired per (seed, client)
LOAD_CLAIMS = tuple(("flex", b, f"(e) FLEx's expert load is more balanced than {b}'s")
                    for b in (*_BASELINES, *(f"{m}+experts" for m in _BASELINES), "fcmoe", "local", "fedper"))
K_VARIANTS = (("flex", 1), ("flex-k2", 2), ("flex-k3", 3))  # (d)


def _env_list(name: str, default: tuple) -> tuple:
    text = os.environ.get(name, "")
    return tuple(item.strip() for item in text.split(",") if item.strip()) if text else default


def study_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FLEXMOE_FIDELITY_ROOT") or
                        pathlib.Path("runs") / f"fidelity-{datetime.date.today().isoformat()}")


# ---- the plan: every (setting, variant, seed) run ------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    setting: str
    variant: str
    seed: int
    run_dir: pathlib.Path  # where it runs (an alias: the run it is read from)
    overrides: tuple[str, ...]  # after the setting's config file: the study's, the variant's, the seed
    alias_of: str | None = None  # the earlier variant with the same resolved config, whose run it reads
    archived: pathlib.Path | None = None  # where its results are kept once finished (see `archive_run`)

    @property
    def status(self) -> str:
        if _finished(self.results):
            return "finished"
        return "partial" if (self.run_dir / "config.toml").exists() else "to run"

    @property
    def results(self) -> pathlib.Path:
        """The directory its results are read from: the archived copy once there is one."""
        return self.archived if self.archived is not None and _finished(self.archived) else self.run_dir

    def command(self) -> list[str]:
        """The `flexmoe run` that makes (or, once started, resumes) this run."""
        if (self.run_dir / "config.toml").exists():
            return ["flexmoe", "run", "--quiet", "--resume", str(self.run_dir)]
        return ["flexmoe", "run", "--quiet", "--config", SETTINGS[self.setting][0],
                *(a for o in self.overrides for a in ("--set", o)), "--output-dir", str(self.run_dir)]


def run_overrides(variant: str, seed: int, extra: tuple | list = ()) -> tuple[str, ...]:
    """A variant's overrides after its setting's config file (`flexmoe compare`'s order)."""
    method, own = VARIANTS[variant]
    return (*STUDY_SET, *extra, f"method={method}", *own, f"seed={seed}")


def missing_keys(variant: str) -> list[str]:
    """The variant's override keys the config does not know (see PENDING_KEYS)."""
    from flexmoe.config import parse_override, valid_keys

    known = set(valid_keys())
    return [key for key in (parse_override(o)[0] for o in VARIANTS[variant][1]) if key not in known]


def plan_runs(chosen: dict[str, tuple[str, ...]], seeds: tuple, extra: tuple | list, root: pathlib.Path,
              archive: pathlib.Path | None = None):
    """(every planned run, {setting: {variant: its missing config keys}} of the variants left out).
    Every config is resolved and validated here, before anything runs."""
    from flexmoe.config import load_config

    runs, blocked = [], {}
    for setting, variants in chosen.items():
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"fidelity: unknown variant(s) {', '.join(unknown)}; variants: {', '.join(VARIANTS)}")
        configs: dict[str, object] = {}  # canonical variant -> its config at the first seed
        for variant in variants:
            missing = missing_keys(variant)
            if missing:
                blocked.setdefault(setting, {})[variant] = missing
                continue
            first = load_config(SETTINGS[setting][0], list(run_overrides(variant, seeds[0], extra)))
            alias = next((name for name, config in configs.items() if config == first), None)
            if alias is None:
                configs[variant] = first
            for seed in seeds:
                overrides = run_overrides(variant, seed, extra)
                if alias is None and seed != seeds[0]:
                    load_config(SETTINGS[setting][0], list(overrides))  # validated now, not mid-study
                where = pathlib.Path(setting) / (alias or variant) / f"seed-{seed}"
                runs.append(PlannedRun(setting, variant, seed, root / where, overrides, alias,
                                       archive / where if archive is not None else None))
    return runs, blocked


def estimate_seconds(runs: list[PlannedRun]) -> tuple[float | None, int]:
    """(wall seconds the runs still to make would take, how many finished runs the estimate is from):
    each is estimated by the mean wall time of the finished runs of its variant (any setting), else
    of its method, else of every finished run; single-threaded, so CPU seconds ≈ wall seconds."""
    walls: dict[str, list[float]] = {}
    for run in {r.run_dir: r for r in runs}.values():
        if run.status == "finished":
            wall = json.loads((run.results / "summary.json").read_text())["wall_seconds"]
            walls.setdefault(run.run_dir.parent.name, []).append(wall)
    if not walls:
        return None, 0
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    by_method: dict[str, list[float]] = {}
    for variant, values in walls.items():
        by_method.setdefault(VARIANTS.get(variant, (variant,))[0], []).extend(values)
    everything = [w for values in walls.values() for w in values]
    total = 0.0
    for run in {r.run_dir: r for r in runs if r.alias_of is None}.values():
        if run.status != "finished":
            total += mean(walls.get(run.variant) or by_method.get(VARIANTS[run.variant][0]) or everything)
    return total, len(everything)


def plan_lines(runs: list[PlannedRun], blocked: dict, root: pathlib.Path, jobs: int = 1) -> list[str]:
    """What FLEXMOE_FIDELITY_PLAN=1 prints: every run, its state, the totals and the estimate."""
    lines = [f"fidelity plan: {root} (FLEXMOE_BENCH_JOBS={jobs})"]
    for run in runs:
        state = f"same config as {run.alias_of}: read from it, not run" if run.alias_of else run.status
        lines.append(f"  {run.setting}/{run.variant}/seed-{run.seed}: {state}  "
                     f"[method={VARIANTS[run.variant][0]}{''.join(' ' + o for o in VARIANTS[run.variant][1])}]")
    for setting, variants in blocked.items():
        for variant, keys in variants.items():
            lines.append(f"  {setting}/{variant}: not runnable, unknown config key(s) {', '.join(keys)} — "
                         + "; ".join(PENDING_KEYS.get(k, "not a config key") for k in keys))
    own = list({r.run_dir: r for r in runs if r.alias_of is None}.values())
    counts = {state: sum(r.status == state for r in own) for state in ("finished", "partial", "to run")}
    lines.append(f"runs: {len(own)} to make ({counts['finished']} finished, {counts['partial']} partial, "
                 f"{counts['to run']} not started); {len(runs) - len(own)} (setting, variant, seed) read from an "
                 f"identical run; {sum(map(len, blocked.values()))} (setting, variant) not runnable")
    seconds, basis = estimate_seconds(runs)
    if seconds is None:
        lines.append("estimate: no finished run yet to time (the 2026-11-27 study: 6-8 CPU minutes per persona run)")
    else:
        lines.append(f"estimate: {seconds / 60:.0f} CPU minutes for the {counts['partial'] + counts['to run']} "
                     f"unfinished runs (partial ones counted whole), from the wall time of {basis} finished runs; "
                     f"about {seconds / 60 / jobs:.0f} minutes of wall time at {jobs} job(s) on an idle machine")
    return lines


# ---- running ---------------------------------------------------------------------------------------
def run_one(run: PlannedRun) -> str | None:
    """Make, resume or skip (when finished) one planned run: None, or why it failed."""
    from flexmoe.config import load_config

    if run.alias_of:
        return None
    wanted = load_config(SETTINGS[run.setting][0], list(run.overrides))
    for where in dict.fromkeys((run.results, run.run_dir)):
        if (where / "config.toml").exists() and load_config(where / "config.toml") != wanted:
            return (f"{where} holds a run with another config; move it away or pick another "
                    "FLEXMOE_FIDELITY_ROOT / FLEXMOE_FIDELITY_ARCHIVE")
    if run.status == "finished":
        return archive_run(run)
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_file = run.run_dir.parent / f"{run.run_dir.name}.log"  # appended: a resumed run keeps its earlier timings
    print(f"== {run.setting}/{run.variant}/seed-{run.seed} -> {run.run_dir} (log {log_file})", flush=True)
    command = [sys.executable, "-m", "flexmoe.cli", *run.command()[1:]]
    with log_file.open("a") as log:
        log.write(f"# command: {shlex.join(run.command())}\n")
        log.flush()
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        return f"{run.run_dir}: exit status {done.returncode} (see {log_file})"
    return archive_run(run)


# what a finished run's results are: everything the study's tables read (its checkpoints and client
# states, which only resuming needs, stay behind)
ARCHIVED_FILES = ("config.toml", "metrics.jsonl", "summary.json", "clients.json")
ARCHIVED_TREES = ("evals",)


def archive_root(results_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.environ.get("FLEXMOE_FIDELITY_ARCHIVE") or results_dir / "fidelity-runs")


def archive_run(run: PlannedRun) -> str | None:
    """Copy a finished run's results into `run.archived` (a temporary folder renamed into place, so
    an interrupted copy leaves no half archive), with its log beside it and the commit that made it."""
    if run.archived is None or run.alias_of or _finished(run.archived) or not _finished(run.run_dir):
        return None
    temporary = run.archived.with_name(run.archived.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for name in ARCHIVED_FILES:
        if (run.run_dir / name).exists():
            shutil.copy2(run.run_dir / name, temporary / name)
    for name in ARCHIVED_TREES:
        if (run.run_dir / name).is_dir():
            shutil.copytree(run.run_dir / name, temporary / name)
    for selection in sorted(run.run_dir.glob("clients/*/selection.json")):
        (temporary / "clients" / selection.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(selection, temporary / "clients" / selection.parent.name / selection.name)
    provenance = {"commit": _commit(), "archived": datetime.date.today().isoformat()}
    (temporary / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    log_file = run.run_dir.parent / f"{run.run_dir.name}.log"
    if log_file.exists():  # step_seconds reads the training time it printed; the machine's paths left out
        root = str(run.run_dir.parents[2])
        text = log_file.read_text(errors="replace").replace(root, "$FLEXMOE_FIDELITY_ROOT")
        (run.archived.parent / log_file.name).write_text(text)
    shutil.rmtree(run.archived, ignore_errors=True)  # a copy without a finished summary (put there by hand)
    temporary.rename(run.archived)
    return None


@functools.cache
def _commit() -> str:
    found = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                           cwd=pathlib.Path(__file__).parent)
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def main(results_dir: pathlib.Path) -> None:
    chosen = chosen_methods(os.environ.get("FLEXMOE_FIDELITY_METHODS", ""))
    seeds = tuple(int(s) for s in _env_list("FLEXMOE_FIDELITY_SEEDS", tuple(map(str, SEEDS))))
    extra = [s.strip() for s in os.environ.get("FLEXMOE_FIDELITY_SET", "").split(";") if s.strip()]
    root = study_root()
    archive = archive_root(results_dir)
    runs, blocked = plan_runs(chosen, seeds, extra, root, archive)
    if os.environ.get("FLEXMOE_FIDELITY_PLAN") == "1":
        print("\n".join(plan_lines(runs, blocked, root, bench_jobs())))
        return
    failed = []
    if os.environ.get("FLEXMOE_FIDELITY_REPORT_ONLY") != "1":
        failed = [why for why in run_each([r for r in runs if r.alias_of is None], run_one, bench_jobs()) if why]
        for why in failed:
            print(f"fidelity: run failed: {why}", file=sys.stderr)
    else:  # runs made beforehand by other processes are archived all the same
        for run in runs:
            archive_run(run)
    studied = []
    for setting, variants in chosen.items():
        left_out = report_finished(root / setting, [r for r in runs if r.setting == setting])
        studied.append((setting, tuple(v for v in variants if v not in blocked.get(setting, {})), left_out))
    write_fidelity(results_dir, root, archive, studied, seeds, extra, runs, blocked, failed)


def report_finished(root: pathlib.Path, runs: list[PlannedRun]) -> dict[str, str]:
    """The comparison report (`root/report.md`) of the finished runs of one setting (nothing is run);
    returns {variant left out: the variant whose label it shares}.
    A variant is left out when it is read from another's runs, or when the report's labels (read
    from each run's config, `flexmoe.report.run_label`) cannot tell it from an earlier variant."""
    from flexmoe.report import read_run, write_compare_report

    labels: dict[str, str] = {}  # report label -> variant
    finished, left_out = [], {}
    for run in runs:
        if run.alias_of or run.status != "finished":
            continue
        label = read_run(run.results).label
        if labels.setdefault(label, run.variant) == run.variant:
            finished.append(run.results)
        else:
            left_out[run.variant] = labels[label]
    if finished:
        reference = "fedavg" if "fedavg" in labels else None
        write_compare_report(finished, root, command="python -m benchmarks fidelity", reference=reference)
    return left_out


def _finished(run_dir: pathlib.Path) -> bool:
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    found = json.loads(summary.read_text())
    return found.get("wall_seconds") is not None and found.get("rounds_completed") == found.get("rounds", 5)


def chosen_methods(text: str) -> dict[str, tuple[str, ...]]:
    """{setting: variants} from "setting=v,v;setting=v" (every setting's full list when empty)."""
    if not text.strip():
        return dict(METHODS)
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        setting, _, names = part.partition("=")
        if setting.strip() not in SETTINGS:
            raise SystemExit(f"FLEXMOE_FIDELITY_METHODS: unknown setting {setting.strip()!r}; settings: {', '.join(SETTINGS)}")
        out[setting.strip()] = tuple(n.strip() for n in names.split(",") if n.strip())
    return out


# ---- the result file -------------------------------------------------------------------------------
def write_fidelity(results_dir: pathlib.Path, root: pathlib.Path, archive: pathlib.Path, studied: list,
                   seeds: tuple, extra: list, runs: list[PlannedRun], blocked: dict, failed: list) -> None:
    full = (len(studied) == len(SETTINGS) and all(set(v) | set(blocked.get(s, {})) == set(METHODS[s])
                                                  for s, v, _ in studied)
            and set(seeds) >= set(SEEDS) and not extra)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (
        ("FLEXMOE_FIDELITY_ROOT", os.environ.get("FLEXMOE_FIDELITY_ROOT", "")),
        ("FLEXMOE_FIDELITY_METHODS", "" if full else ";".join(f"{s}={','.join(v)}" for s, v, _ in studied)),
        ("FLEXMOE_FIDELITY_SEEDS", ",".join(map(str, seeds)) if seeds != SEEDS else ""),
        ("FLEXMOE_FIDELITY_SET", ";".join(extra))) if v)
    lines = [header_markdown("The fidelity study: FLEx and FC-MoE claims with paired statistics",
                             f"{env + ' ' if env else ''}python -m benchmarks fidelity"), ""]
    if not full:
        left = [f"{v} ({s})" for s, variants, _ in studied for v in METHODS[s]
                if v not in variants and v not in blocked.get(s, {})]
        lines += ["**Reduced study.** " + "; ".join(f"{s}: {', '.join(v)}" for s, v, _ in studied)
                  + f"; seeds {', '.join(map(str, seeds))}" + (f"; not run: {', '.join(left)}" if left else "")
                  + (f"; extra overrides: {', '.join(extra)}" if extra else "") + ".", ""]
    pending = sorted({v for variants in blocked.values() for v in variants})
    if pending:
        keys = sorted({k for variants in blocked.values() for ks in variants.values() for k in ks})
        lines += [f"**Not runnable yet:** {', '.join(pending)} — " + "; ".join(PENDING_KEYS.get(k, k) for k in keys)
                  + ". Their claim rows are left out.", ""]
    if failed:
        lines += ["**Runs that failed** (left out of every row): " + "; ".join(failed) + ".", ""]
    note = os.environ.get("FLEXMOE_FIDELITY_NOTE", "")
    if note:
        lines += [note, ""]
    lines += ["Every run is one `flexmoe run` (FLEXMOE_BENCH_JOBS at a time, one torch thread each):", "",
              f"    flexmoe run --config <setting's file> {' '.join('--set ' + o for o in (*STUDY_SET, *extra))} "
              f"--set method=<method> <the variant's --set> --set seed=<S> --output-dir {root}/<setting>/<variant>/seed-<S>",
              "", *archive_line(archive, runs), "",
              *variant_table({r.variant: r.alias_of for r in runs}), "", _how_to_read(), ""]
    aliases = {setting: {r.variant: r.alias_of for r in runs if r.setting == setting and r.alias_of}
               for setting, _, _ in studied}
    claims = {setting: claim_results(archive / setting, variants, seeds, aliases[setting])
              for setting, variants, _ in studied}
    glance = glance_table(claims)
    if glance:
        lines += ["## Every claim at a glance", "", *glance, ""]
    for setting, variants, left_out in studied:
        lines += study_section(archive / setting, setting, variants, seeds, aliases[setting], claims[setting])
        if left_out:
            lines += ["Left out of the comparison report below because its labels cannot tell them apart (their rows "
                      "above are theirs): " + ", ".join(f"{v} (labelled as {o})" for v, o in left_out.items()) + ".", ""]
        lines += [*_report_body(root / setting / "report.md"), ""]
    write_result(results_dir, "fidelity", lines, echo=False)


def archive_line(archive: pathlib.Path, runs: list[PlannedRun]) -> list[str]:
    """Where the tables' runs are kept and which commits made them."""
    kept = {r.results for r in runs if r.status == "finished" and r.results == r.archived}
    commits = sorted({json.loads((d / "provenance.json").read_text())["commit"][:10] for d in kept
                      if (d / "provenance.json").exists()})
    shown = archive.relative_to(REPO) if archive.is_relative_to(REPO) else archive
    return [f"The tables below are computed from the archived results of {len(kept)} finished runs in "
            f"`{shown}` (made at commit{'s' if len(commits) > 1 else ''} {', '.join(commits) or 'unknown'}); "
            "a planned run already there is not made again."]


def variant_table(aliases: dict[str, str | None]) -> list[str]:
    lines = ["| variant | method | overrides | runs |", "|---|---|---|---|"]
    for name, (method, overrides) in VARIANTS.items():
        runs = (f"read from {aliases[name]} (same resolved config)" if aliases.get(name)
                else "own" if name in aliases else "not run")
        lines.append(f"| {name} | {method} | {' '.join(f'`{o}`' for o in overrides) or '—'} | {runs} |")
    return lines


def _how_to_read() -> str:
    return ("How to read a claim row: *A − B* on the same examples, pooled over clients and seeds, with the "
            "stratified bootstrap 95% CI (2000 resamples) and the sign of each seed's difference. ROUGE-L and "
            "exact match: higher is better; held-out loss per document: lower is better (a negative difference "
            "means A kept more knowledge); probes: accuracy difference over every (client, probe) pair, exact "
            "McNemar p. *Supported*: the CI excludes 0 on A's side and every seed agrees; *contradicted*: the "
            "same on B's side; otherwise *inconclusive*. The verdict column judges ROUGE-L; the knowledge "
            "verdict judges the held-out loss (row b: the knowledge columns of the rows against MoE + X with "
            "trainable experts). Expert-load rows (e) pair each client's expert-load std per seed (lower = "
            "better balanced). Table cells `m [lo, hi]`: the mean over clients × seeds with its 95% CI "
            "(bootstrap over each seed's clients).")


def _variant_runs(root: pathlib.Path, variants: tuple, seeds: tuple, aliases: dict | None) -> dict:
    """{variant: {seed: its finished run directory}} (an alias reads the run it shares)."""
    aliases = aliases or {}
    return {v: {s: root / aliases.get(v, v) / f"seed-{s}" for s in seeds
                if _finished(root / aliases.get(v, v) / f"seed-{s}")} for v in variants}


@dataclass(frozen=True)
class ClaimResult:
    """One claim row of a setting: A against B on the seeds both have answers for."""

    claim: str
    a: str
    b: str
    seeds: tuple[int, ...]
    rouge: PairedDifference | None
    exact: PairedDifference | None
    probes: McNemar | None
    docs: PairedDifference | None  # held-out documents' losses

    def verdicts(self) -> tuple[str, str, str]:
        """(ROUGE-L, exact match, held-out loss) verdicts; a lower loss is better."""
        from flexmoe.analysis.stats import verdict

        return tuple(verdict(found, direction) if found else "n/a"
                     for found, direction in ((self.rouge, 1), (self.exact, 1), (self.docs, -1)))


def claim_results(root: pathlib.Path, methods: tuple, seeds: tuple, aliases: dict[str, str] | None = None) -> list[ClaimResult]:
    """Every claim of `CLAIMS` whose two variants both have answers on some seed."""
    from flexmoe.analysis.paired import last_round

    runs = _variant_runs(root, methods, seeds, aliases)
    answered = {v: {s for s, d in seed_runs.items() if last_round(d) is not None} for v, seed_runs in runs.items()}
    out = []
    for a, b, claim in CLAIMS:
        common = sorted(answered.get(a, set()) & answered.get(b, set()))  # seeds with per-example answers in both
        if common:
            rouge, exact, (probes, docs) = claim_stats(runs[a], runs[b], common)
            out.append(ClaimResult(claim, a, b, tuple(common), rouge, exact, probes, docs))
    return out


def glance_table(results: dict[str, list[ClaimResult]]) -> list[str]:
    """Every claim's verdicts side by side across the settings (ROUGE-L / exact match / held-out loss)."""
    settings = [s for s in results if results[s]]
    if not settings:
        return []
    by_claim: dict[tuple, dict[str, ClaimResult]] = {}
    for setting in settings:
        for found in results[setting]:
            by_claim.setdefault((found.claim, found.a, found.b), {})[setting] = found
    lines = ["| claim (A better than B) | " + " | ".join(f"{s}: ROUGE-L / exact / knowledge (seeds)" for s in settings)
             + " |", "|---|" + "---|" * len(settings)]
    for (claim, a, b), found in by_claim.items():
        cells = [" / ".join(found[s].verdicts()) + f" ({','.join(map(str, found[s].seeds))})" if s in found else "not run"
                 for s in settings]
        lines.append(f"| {claim} ({a} vs {b}) | " + " | ".join(cells) + " |")
    return lines + ["", "Each cell: the verdicts of the setting's claim row below (its CI and every seed's sign), "
                        "for ROUGE-L, exact match and held-out loss (knowledge: A's loss lower = supported)."]


def study_section(root: pathlib.Path, setting: str, methods: tuple, seeds: tuple,
                  aliases: dict[str, str] | None = None, claims: list[ClaimResult] | None = None) -> list[str]:
    """One setting's claim rows (`claims`, computed here when not given) and its (d), (e), (h), (i) tables."""
    from flexmoe.analysis.stats import verdict
    from flexmoe.report.comparison import fmt_diff, fmt_signs

    runs = _variant_runs(root, methods, seeds, aliases)
    lines = [f"## Setting: {setting} — {SETTINGS[setting][1]}", "",
             "| claim (A better than B) | ROUGE-L A − B [95% CI] | signs | verdict | exact match A − B | "
             "held-out loss A − B [95% CI] | knowledge verdict | probes A − B (McNemar p) |",
             "|---|---:|---:|---|---:|---:|---|---:|"]
    for found in claims if claims is not None else claim_results(root, methods, seeds, aliases):
        rouge_verdict, _, knowledge = found.verdicts()
        probes = found.probes
        lines.append(f"| {found.claim} ({found.a} vs {found.b}) | {fmt_diff(found.rouge)} | {fmt_signs(found.rouge)} | "
                     f"{rouge_verdict} | {fmt_diff(found.exact)} | {fmt_diff(found.docs)} | {knowledge} | "
                     + (f"{probes.accuracy_a - probes.accuracy_b:+.3f} (p = {probes.p_value:.2g})" if probes else "n/a")
                     + " |")
    lines.append("")
    load_lines = []
    for a, b, claim in LOAD_CLAIMS:
        common = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        found = client_difference(runs[a], runs[b], common, "expert_load_std") if common else None
        if found is not None:
            load_lines.append(f"| {claim} ({a} vs {b}) | {found.diff:+.5f} [{found.ci_low:+.5f}, {found.ci_high:+.5f}] | "
                              f"{fmt_signs(found)} | {verdict(found, direction=-1)} |")
    if load_lines:
        lines += ["| claim (A better than B) | expert-load std A − B [95% CI] | signs | verdict |",
                  "|---|---:|---:|---|", *load_lines, ""]
    for label, found in conflict_stats({m: list(r.values()) for m, r in runs.items()}).items():
        projected = _projects(next(iter(runs[label].values())))
        lines.append(f"- (h) {label}: {found['fcmoe_conflict_fraction']:.1%} of the (client, expert or module) updates "
                     "conflicted with their consensus (negative cosine) and "
                     + ("were projected" if projected else "were left as they were (fcmoe.project = false)")
                     + ", averaged over rounds and seeds." + (f" Cosine of an update with its consensus: mean {found['fcmoe_mean_consensus_cosine']:.3f}, "
                                 f"smallest {found['fcmoe_min_consensus_cosine']:+.3f}; between two clients' updates of "
                                 f"the same row: mean {found['fcmoe_mean_client_cosine']:.3f}."
                                 if "fcmoe_mean_client_cosine" in found else ""))
    lines.append("")
    for title, table in (("(d) k grafted experts per layer: what a larger k buys and costs", k_table(k_rows(runs))),
                         ("(e) expert load balance per variant", load_table(load_rows(runs))),
                         ("(i) routing and communication per variant", routing_table(routing_rows(runs)))):
        if table:
            lines += [f"### {title}", "", *table, ""]
    return lines


def claim_stats(runs_a: dict, runs_b: dict, seeds: list[int]):
    """ROUGE-L and exact-match paired differences of A's and B's personalised models, and their
    knowledge (probes, held-out documents) paired per (seed, client)."""
    from flexmoe.analysis.paired import answer_scores, difference, knowledge_between, last_round

    def personal(run_dir, metric):
        return answer_scores(run_dir, last_round(run_dir), "personal", metric)

    rouge, exact = (difference([(s, personal(runs_a[s], metric), personal(runs_b[s], metric)) for s in seeds])
                    for metric in ("rouge_l", "exact_match"))
    return rouge, exact, knowledge_between([(s, runs_a[s], runs_b[s]) for s in seeds])


def _projects(run_dir: pathlib.Path) -> bool:
    """Whether an FC-MoE run projected its conflicting updates (`fcmoe.project` of its config, on by default)."""
    config = run_dir / "config.toml"
    return not config.exists() or tomllib.loads(config.read_text()).get("fcmoe", {}).get("project", True)


def conflict_stats(runs: dict[str, list[pathlib.Path]]) -> dict[str, dict[str, float]]:
    """Per FC-MoE method: the conflict fraction and the mean cosines averaged over rounds and seeds,
    the smallest cosine with the consensus over all of them."""
    out = {}
    for label, run_dirs in runs.items():
        records = [record for run_dir in run_dirs
                   for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if record.get("kind") == "server" and "fcmoe_conflict_fraction" in record]
        if not records:
            continue
        found = {}
        for key in ("fcmoe_conflict_fraction", "fcmoe_mean_consensus_cosine", "fcmoe_mean_client_cosine"):
            values = [r[key] for r in records if key in r]
            if values:
                found[key] = sum(values) / len(values)
        smallest = [r["fcmoe_min_consensus_cosine"] for r in records if "fcmoe_min_consensus_cosine" in r]
        if smallest:
            found["fcmoe_min_consensus_cosine"] = min(smallest)
        out[label] = found
    return out


# ---- the d / e / i tables, from the runs' summaries --------------------------------------------------
def _summary(run_dir: pathlib.Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def client_values(run_dir: pathlib.Path, key: str) -> dict[int, float]:
    """{client: its `key`} from the summary's per_client (a client without it is left out);
    key "rouge_l_gain" = rouge_l − rouge_l_base (its last ROUGE-L over the untouched base's)."""
    out = {}
    for client, row in _summary(run_dir).get("per_client", {}).items():
        if key == "rouge_l_gain":
            if row.get("rouge_l") is not None and row.get("rouge_l_base") is not None:
                out[int(client)] = row["rouge_l"] - row["rouge_l_base"]
        elif row.get(key) is not None:
            out[int(client)] = row[key]
    return out


def mean_ci(values_by_seed: dict[int, list[float]]) -> tuple[float, float, float] | None:
    """(mean over clients × seeds, 95% CI: each seed's clients resampled on their own), None if empty."""
    import numpy as np

    from flexmoe.analysis.stats import bootstrap_ci

    strata = [np.asarray(v, dtype=float) for v in values_by_seed.values() if len(v)]
    if not strata:
        return None
    low, high = bootstrap_ci(strata)
    return float(np.concatenate(strata).mean()), low, high


def _over_seeds(seed_runs: dict[int, pathlib.Path], key: str) -> tuple[float, float, float] | None:
    return mean_ci({s: list(client_values(d, key).values()) for s, d in seed_runs.items()})


def client_difference(runs_a: dict, runs_b: dict, seeds: list[int], key: str):
    """A − B of a per-client summary value, paired per (seed, client) (the clients of a seed are one
    stratum of the bootstrap), or None when no client has it in both."""
    from flexmoe.analysis.stats import paired_difference

    cells = {}
    for seed in seeds:
        a, b = client_values(runs_a[seed], key), client_values(runs_b[seed], key)
        clients = sorted(set(a) & set(b))
        if clients:
            cells[(seed, 0)] = ([a[c] for c in clients], [b[c] for c in clients])
    return paired_difference(cells) if cells else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def bytes_per_round(run_dir: pathlib.Path) -> tuple[float, float]:
    """(bytes up, bytes down) per round, every sampled client's messages together."""
    summary = _summary(run_dir)
    rounds = max(summary.get("rounds_completed") or 0, 1)
    return summary.get("bytes_up", 0) / rounds, summary.get("bytes_down", 0) / rounds


def step_seconds(run_dir: pathlib.Path) -> tuple[float | None, bool]:
    """(wall seconds per local step of one client, whether it is the training phase's own time): the
    training phase's time that `flexmoe run` printed into the run's log, when one invocation made the
    whole run, over the local steps of every client and round (metrics.jsonl); otherwise the run's
    whole wall time (setup and evaluation included) over the same steps."""
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    steps = sum(r.get("steps", 0) for r in records if r.get("kind") == "train")
    if not steps:
        return None, False
    log = run_dir.parent / f"{run_dir.name}.log"
    if log.exists():
        text = log.read_text(errors="replace")
        times = re.findall(r"^time: .*?\btraining (\d+(?:\.\d+)?) s", text, flags=re.M)
        if len(times) == 1 and text.count("# command:") == 1:
            return float(times[0]) / steps, True
    wall = _summary(run_dir).get("wall_seconds")
    return (wall / steps if wall else None), False


def _fmt_ci(found, pattern: str = "{:.4f}") -> str:
    if found is None:
        return "n/a"
    mean, low, high = found
    return f"{pattern.format(mean)} [{pattern.format(low)}, {pattern.format(high)}]"


def _fmt(value, pattern: str = "{:,.0f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def k_rows(runs: dict[str, dict[int, pathlib.Path]]) -> list[dict]:
    """(d): per k, ROUGE-L and its gain over the base (clients × seeds), the paired ROUGE-L
    difference from k = 1, bytes per round, personal bytes per client, seconds per local step."""
    from flexmoe.analysis.paired import last_round

    rows = []
    for variant, k in K_VARIANTS:
        seed_runs = runs.get(variant) or {}
        if not seed_runs:
            continue
        row = {"variant": variant, "k": k, "seeds": sorted(seed_runs),
               "rouge_l": _over_seeds(seed_runs, "rouge_l"), "gain": _over_seeds(seed_runs, "rouge_l_gain"),
               "bytes_per_round": _mean([sum(bytes_per_round(d)) for d in seed_runs.values()]),
               "personal_bytes": _mean([_summary(d).get("personal_bytes") for d in seed_runs.values()]),
               "vs_k1": None}
        steps = [step_seconds(d) for d in seed_runs.values()]
        row["step_seconds"] = _mean([s for s, _ in steps])
        row["step_exact"] = bool(steps) and all(exact for _, exact in steps)
        common = sorted(set(seed_runs) & set(runs.get("flex") or {}))
        if k > 1 and common and all(last_round(d) is not None for d in
                                    (*(seed_runs[s] for s in common), *(runs["flex"][s] for s in common))):
            row["vs_k1"] = claim_stats(seed_runs, runs["flex"], common)[0]
        rows.append(row)
    return rows


def k_table(rows: list[dict]) -> list[str]:
    from flexmoe.report.comparison import fmt_diff

    if not rows:
        return []
    lines = ["| k | variant | seeds | ROUGE-L [95% CI] | ROUGE-L gained over the base [95% CI] | ROUGE-L − k = 1, "
             "paired [95% CI] | bytes / round | personal bytes / client | s / local step |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = "n/a" if r["step_seconds"] is None else f"{'' if r['step_exact'] else '≈ '}{r['step_seconds']:.3f}"
        lines.append(f"| {r['k']} | {r['variant']} | {','.join(map(str, r['seeds']))} | {_fmt_ci(r['rouge_l'])} | "
                     f"{_fmt_ci(r['gain'])} | {fmt_diff(r['vs_k1']) if r['k'] > 1 else '—'} | "
                     f"{_fmt(r['bytes_per_round'])} | {_fmt(r['personal_bytes'])} | {step} |")
    lines += ["", "s / local step: the training phase's wall time over every client's local steps (one client "
              "trains at a time); ≈: the run's whole wall time over those steps (setup and evaluation included: "
              "its log did not hold one invocation's timings). Runs made side by side share the cores, so "
              "compare step times of runs made the same way only."]
    return lines


CLIENT_CI_NOTE = ("[95% CI]: each seed's clients resampled on their own, so the spread between seeds is not in "
                  "it (the claim rows give each seed's sign); a variant without a personal part evaluates one "
                  "model on every client, so its interval has no width.")


def load_rows(runs: dict[str, dict[int, pathlib.Path]]) -> list[dict]:
    """(e): per variant, the personalised models' expert-load std on the held-out corpus (clients ×
    seeds) and the untouched base's."""
    return [{"variant": v, "seeds": sorted(seed_runs), "load_std": _over_seeds(seed_runs, "expert_load_std"),
             "base": _mean([_summary(d).get("expert_load_std_base") for d in seed_runs.values()])}
            for v, seed_runs in runs.items() if seed_runs]


def load_table(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["load_std"] is not None]
    if not rows:
        return []
    return ["| variant | seeds | expert-load std [95% CI] | the base's |", "|---|---|---:|---:|",
            *(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {_fmt_ci(r['load_std'], '{:.5f}')} | "
              f"{_fmt(r['base'], '{:.5f}')} |" for r in rows), "", CLIENT_CI_NOTE]


def routing_rows(runs: dict[str, dict[int, pathlib.Path]]) -> list[dict]:
    """(i): per variant, routing drift from the base and routing entropy (clients × seeds), and the
    bytes per round up and down (mean over seeds)."""
    rows = []
    for v, seed_runs in runs.items():
        if not seed_runs:
            continue
        up_down = [bytes_per_round(d) for d in seed_runs.values()]
        rows.append({"variant": v, "seeds": sorted(seed_runs), "drift": _over_seeds(seed_runs, "routing_drift"),
                     "entropy": _over_seeds(seed_runs, "routing_entropy"),
                     "entropy_base": _mean([_summary(d).get("routing_entropy_base") for d in seed_runs.values()]),
                     "bytes_up": _mean([u for u, _ in up_down]), "bytes_down": _mean([d for _, d in up_down]),
                     "personal_bytes": _mean([_summary(d).get("personal_bytes") for d in seed_runs.values()])})
    return rows


def routing_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["| variant | seeds | routing drift [95% CI] | routing entropy [95% CI] | the base's entropy | "
             "bytes up / round | bytes down / round | personal bytes / client |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {_fmt_ci(r['drift'])} | "
                     f"{_fmt_ci(r['entropy'])} | {_fmt(r['entropy_base'], '{:.4f}')} | {_fmt(r['bytes_up'])} | "
                     f"{_fmt(r['bytes_down'])} | {_fmt(r['personal_bytes'])} |")
    return lines + ["", "Routing drift: total variation distance of each layer's expert load from the untouched "
                        "base's on the held-out corpus; bytes: every sampled client's serialised messages of a round. "
                        + CLIENT_CI_NOTE]


def _report_body(report_file: pathlib.Path) -> list[str]:
    """The comparison report without its title, command and plots (nor the blank lines around them)."""
    if not report_file.exists():
        return []
    report = report_file.read_text()
    lines = [line for line in report[report.index("Each cell"):].splitlines() if not line.startswith("![")]
    return [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]
