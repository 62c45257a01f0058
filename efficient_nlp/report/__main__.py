"""``python -m efficient_nlp.report``: see `efficient_nlp.report.cli.main`."""
from efficient_nlp.report.cli import main

main()
