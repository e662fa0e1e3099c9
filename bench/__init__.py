"""The benchmarks as a package, so they import each other and the test helpers (``tests.servers``)
from the checkout root; each script is still run as ``python bench/<name>.py``."""
