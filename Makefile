# The README's two commands. Each sets up .venv/ (scripts/bootstrap.sh) when it is missing or stale.
.PHONY: smoke test venv

venv:
	@bash scripts/bootstrap.sh

smoke: venv
	.venv/bin/regscale submit recipes/smoke.yaml

test: venv
	bash scripts/test.sh
