"""atheris fuzz targets; tests/unit/test_fuzz_targets.py runs each `one_input(data)` too."""
