"""docs/config.md is generated from the config model: it must match, and every key must say what it means."""

from __future__ import annotations

from flexmoe.config import RunConfig, valid_keys
from flexmoe.config_docs import DOC_PATH, field_comments, main, render, sections, stale_meanings, undocumented

SECTIONS = {name for name, _ in sections() if name}


def test_committed_config_reference_is_up_to_date():
    assert DOC_PATH.read_text() == render(), "docs/config.md is stale: run `python -m flexmoe.config_docs`"


def test_every_key_is_documented_with_its_default():
    assert undocumented() == [], "give these keys a comment in config.py (or an entry in config_docs.MEANINGS)"
    assert stale_meanings() == []
    rows = {line.split("`")[1]: line for line in render().splitlines() if line.startswith("| `")}
    leaves = [key for key in valid_keys() if key not in SECTIONS]
    assert sorted(rows) == sorted(leaves)
    for key in leaves:  # the declared default (clients_per_round's 0 resolves to num_clients in a config)
        model, *sections_, name = [RunConfig, *key.split(".")]
        for section in sections_:
            model = model.model_fields[section].annotation
        default = model.model_fields[name].default
        shown = str(default).lower() if isinstance(default, bool) else (f'"{default}"' if isinstance(default, str) else str(default))
        assert f"| `{shown}` |" in rows[key], key


def test_comments_beside_or_above_a_field_are_its_meaning():
    from flexmoe.config import FcmoeConfig, RuntimeConfig

    assert field_comments(RuntimeConfig)["threads"].startswith("torch intra-op threads; 0 = torch's default.")
    assert field_comments(FcmoeConfig)["retention"].startswith("λ;")


def test_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert main(["--check", "--out", str(stale)]) == 1
    assert main(["--out", str(stale)]) == 0 and main(["--check", "--out", str(stale)]) == 0
    assert stale.read_text() == render()
