# The README's two commands. Each sets up .venv/ (scripts/bootstrap.sh) when it is missing or stale.
.PHONY: smoke test venv

venv:
	@bash scripts/bootstrap.sh

# Each smoke run gets its own name, so the command can be repeated (runs are never overwritten).
smoke: venv
	.venv/bin/regscale submit recipes/smoke.yaml run.name=smoke-$$(date +%Y%m%d-%H%M%S)

test: venv
	bash scripts/test.sh
