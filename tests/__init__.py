"""The test suite. Every folder is a package (``tests.data.test_cache``...), so test files in different folders
may share a base name; shared helpers: ``conftest.py`` (fixtures, ``require_shared``) and ``synth.py``."""
