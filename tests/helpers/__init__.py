"""Plain functions and constants shared by several test modules, imported as `helpers.NAME` from any
folder of tests/ (fixtures live in conftest.py: tests/conftest.py for those used by several
folders, a folder's own conftest.py for the rest; no test module imports from a conftest)."""
