"""CLI sub-commands, one module each (see flexmoe.cli)."""
