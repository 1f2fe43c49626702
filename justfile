# FineTune tasks. `just` installs as `pip install rust-just`.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"

# Create the virtualenv and install FineTune with its test and parity extras.
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q -e '.[test,parity]'

# Example tests (real MLX, tiny models in HF layout).
test: install
    {{py}} -m pytest tests

# Hypothesis property suites.
props: install
    {{py}} -m pytest properties

# Lint with ruff.
lint: install
    {{py}} -m ruff check finetune tests properties benchmarks data

# Benchmarks (results in benchmarks/README.md).
bench: install
    {{py}} benchmarks/data_pipeline.py

# The demo: check the quick recipe end to end with the built-in tiny model.
quick: install
    {{venv}}/bin/ft train validate recipes/quick.toml
