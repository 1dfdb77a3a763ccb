# The two commands of a fresh clone. Each creates the locked environment in .venv the first time (or
# when constraints.txt / pyproject.toml change) with scripts/setup-env, then reuses it.
#   make demo    the demo on SmolLM2-135M-Instruct: writes prefixlens-demo.html
#   make test    the default test run (slow tests skipped; `make test-slow` runs them)
.PHONY: demo test test-slow env

env:
	scripts/setup-env .venv

demo: env
	.venv/bin/prefixlens demo

test: env
	.venv/bin/python -m pytest -q

test-slow: env
	.venv/bin/python -m pytest -q -m slow
