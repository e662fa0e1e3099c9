"""The test suite as a package: its helpers import as ``tests.servers``, ``tests.mitm``, ... from
the checkout root (pyproject's pytest ``pythonpath``; bench/ scripts put the root there too)."""
