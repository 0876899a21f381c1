"""Is grafting client-specific on the shipped base? The expert each client's reconstruction
selection picks, per MoE layer, under the default partition, `configs/persona.toml` and
`configs/paper-category.toml` (seed 0, 4 clients).

Each client's calibration sample is built as the engine builds it (its first
`flex.calibration_examples` training features, in `train.batch_size` batches, supervised tokens
only) and selected with the run's `flex` settings and the engine's seed for the client. Per layer:
the chosen expert of every client, its reconstruction loss beside the median and the worst single
expert's, and how many distinct experts the 4 clients chose.
"""

from __future__ import annotations

import pathlib

import torch

from benchmarks.machine import header_markdown, write_result

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = {"default": None, "persona": ROOT / "configs" / "persona.toml",
            "paper-category": ROOT / "configs" / "paper-category.toml"}


def client_selections(config_path, seed: int = 0, overrides: tuple[str, ...] = ()) -> list[dict]:
    """[selection JSON per client] under one config, as the engine's grafting step computes it."""
    from flexmoe.config import load_config
    from flexmoe.clients import make_client, partition_data
    from flexmoe.data.sample import derived_seed
    from flexmoe.engine.client import calibration_batches
    from flexmoe.models import load_base, select_experts

    config = load_config(config_path, [f"seed={seed}", *overrides])
    model, tokenizer = load_base(config.model)
    selections = []
    for part in partition_data(config):
        client = make_client(config, part, tokenizer)
        selection = select_experts(model, calibration_batches(config, client, tokenizer.pad_token_id), k=config.flex.k, strategy=config.flex.selection,
                                   max_tokens=config.flex.calibration_max_tokens,
                                   seed=derived_seed(config.seed, client.client_id))
        selections.append(selection.to_json())
    return selections


def setting_lines(name: str, selections: list[dict]) -> tuple[list[str], bool]:
    layers = list(selections[0]["layers"])
    lines = [f"## {name}", "", "| layer | " + " | ".join(f"client {c}" for c in range(len(selections)))
             + " | distinct |", "|---|" + "---|" * len(selections) + "---:|"]
    every_layer = True
    for index, layer in enumerate(layers):
        entries = [s["layers"][layer] for s in selections]
        distinct = len({tuple(e["experts"]) for e in entries})
        every_layer &= distinct >= 2
        cells = [f"e{','.join(map(str, e['experts']))} ({e['loss']:.1f} / {e['median_loss']:.1f} / "
                 f"{e['worst_loss']:.1f})" for e in entries]
        lines.append(f"| {index} | " + " | ".join(cells) + f" | {distinct} |")
    lines.append("")
    return lines, every_layer


def main(results_dir: pathlib.Path) -> None:
    torch.set_num_threads(1)
    lines = [header_markdown("Grafting on the shipped base: is it client-specific?", "python -m benchmarks grafting"),
             __doc__.strip(), "",
             "Cells: chosen expert (its reconstruction loss / the median single expert's / the worst's).", ""]
    verdicts = []
    for name, path in SETTINGS.items():
        table, every_layer = setting_lines(name, client_selections(path))
        lines += table
        verdicts.append(f"- {name}: at least 2 distinct experts across the 4 clients in every MoE layer: "
                        f"{'yes' if every_layer else 'no'}")
    lines += ["## Verdict", "", *verdicts]
    write_result(results_dir, "grafting", lines)
