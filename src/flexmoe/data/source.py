"""A run's examples from its `data` config, and the "N of M rows" log of its partition.

Every engine and command that reads a run's data goes through here, so a file's field mapping
(`data.fields`) and `data.skip_invalid` mean the same everywhere.
"""

from __future__ import annotations

import logging

from flexmoe.data.example import Example

log = logging.getLogger("flexmoe.data")


def configured_examples(data) -> tuple[list[Example], list[str]]:
    """The examples `data` (a `DataConfig`) names: the builtin dataset or its file, mapped and checked;
    and the message of each invalid row left out (`data.skip_invalid`), which the report lists."""
    import flexmoe.data  # through the package: tests substitute its builtin_examples

    log.info("reading the data: %s", "the builtin WordNet dataset" if data.source == "builtin" else data.source)
    if data.source == "builtin":
        return flexmoe.data.builtin_examples(), []
    return flexmoe.data.load_data(data.source, format=None if data.format == "auto" else data.format,
                                  fields=dict(data.fields) or None, skip_invalid=data.skip_invalid)


def log_partition(parts, total: int, by: str) -> None:
    """"N of M rows" per client and overall, so no row is lost without saying so."""
    from flexmoe.data.partition import partition_lines, partition_stats

    for line in partition_lines(partition_stats(parts, total=total), by):
        log.info("partition: %s", line.strip())
