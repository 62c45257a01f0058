"""pytest: make the checkout itself importable first (``efficient_nlp`` and ``configs``),
so the tests exercise this tree even where another checkout is pip-installed in editable mode."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
