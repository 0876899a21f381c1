"""Reports: markdown tables and PNG plots built from run directories alone.

`write_run_report(run_dir)` writes one run's `report.md` and `plots/`;
`write_compare_report(run_dirs, out_dir)` compares methods over seeds (`flexmoe compare`,
`flexmoe report`).
"""

from flexmoe.report.runs import CLIENTS_FILE, Run, find_runs, read_run, run_label
from flexmoe.report.writer import group_runs, write_compare_report, write_run_report

__all__ = ["CLIENTS_FILE", "Run", "find_runs", "group_runs", "read_run", "run_label", "write_compare_report",
           "write_run_report"]
