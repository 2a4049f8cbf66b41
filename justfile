# mesh-inference tasks: each recipe runs the same script a person or CI would.
# `just` is on PyPI as rust-just (pip install rust-just) and in the Nix dev shell.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := ".venv/bin/python"

# List the recipes
default:
    @just --list

# Install .venv: Python deps, llama.cpp (GGML_RPC) build, the default model (--test: + test tools)
setup *args:
    scripts/setup {{args}}

# Start a local 3-node mesh on the shipped model and print the console URL
demo *args:
    scripts/demo {{args}}

# Set up, then ruff, mypy and pytest (extra args go to pytest)
test *args:
    scripts/test {{args}}

# ruff and mypy only
lint: (setup "--test")
    {{python}} -m ruff check mesh_inference tests scripts/*.py
    {{python}} -m mypy

# Direct llama.cpp RPC vs the QUIC mesh
bench *args:
    scripts/bench {{args}}

# Run one node on the default model; it prints the console URL (with its login token)
console *args: setup
    .venv/bin/mesh-inference --model smollm2-135m {{args}}

# Build and smoke-test the CPU container image (mmdebstrap + podman; slow, needs root)
package *args:
    scripts/package {{args}}

# Remove build outputs and caches (keeps .venv; `just clean-all` removes it too)
clean:
    rm -rf build .mypy_cache .ruff_cache .pytest_cache .hypothesis
    find mesh_inference tests scripts -name __pycache__ -type d -prune -exec rm -rf {} +

# clean, and remove .venv
clean-all: clean
    rm -rf .venv
