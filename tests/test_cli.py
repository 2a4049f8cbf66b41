"""The CLI validates its flags with clear errors, before touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mesh_inference.cli.main import cli


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_help_explains_every_flag() -> None:
    code, out = run("--help")
    assert code == 0
    for flag in (
        "--model",
        "--join",
        "--client",
        "--http-port",
        "--quic-port",
        "--http-host",
        "--max-vram",
        "--state-dir",
        "--no-mdns",
        "--engine",
        "--llama-bin",
    ):
        assert flag in out


def test_needs_model_or_join(tmp_path: Path) -> None:
    code, out = run("--state-dir", str(tmp_path))
    assert code == 2 and "--model" in out and "--join" in out


def test_client_needs_join(tmp_path: Path) -> None:
    code, out = run("--client", "--state-dir", str(tmp_path))
    assert code == 2 and "--client needs --join" in out


@pytest.mark.parametrize("token", ["nope", "mi1.!!!", "mi1." + "A" * 40])
def test_bad_join_token_is_a_clear_error(tmp_path: Path, token: str) -> None:
    code, out = run("--join", token, "--state-dir", str(tmp_path))
    assert code == 2 and "--join" in out


@pytest.mark.parametrize("flag", ["--http-port", "--quic-port"])
def test_bad_ports(tmp_path: Path, flag: str) -> None:
    code, out = run("--model", "x", flag, "70000", "--state-dir", str(tmp_path))
    assert code == 2 and flag in out and "70000" in out


def test_negative_memory(tmp_path: Path) -> None:
    code, out = run("--model", "x", "--max-vram", "-1", "--state-dir", str(tmp_path))
    assert code == 2 and "--max-vram" in out


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    code, out = run(
        "--model",
        "no-such-model-anywhere",
        "--state-dir",
        str(tmp_path),
        "--models-dir",
        str(tmp_path / "models"),
        "--no-mdns",
        "--http-port",
        "0",
        "--quic-port",
        "0",
    )
    assert code == 2
    assert "no-such-model-anywhere" in out


def test_status_without_a_node(tmp_path: Path) -> None:
    code, out = run("status", "--url", "http://127.0.0.1:9", "--state-dir", str(tmp_path))
    assert code == 1 and "no node answering" in out


def test_models_list_and_rm(tmp_path: Path) -> None:
    (tmp_path / "mine.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    result = CliRunner().invoke(cli, ["models", "list", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m" in result.output and "mine" in result.output
    result = CliRunner().invoke(cli, ["models", "rm", "mine", "--models-dir", str(tmp_path)])
    assert result.exit_code == 0 and not (tmp_path / "mine.gguf").exists()
    result = CliRunner().invoke(
        cli, ["models", "rm", "smollm2-135m", "--models-dir", str(tmp_path)]
    )
    # Shipped by a package here (not a download), or absent: either way nothing to remove.
    assert result.exit_code == 1
    assert "not a downloaded model" in result.output or "not downloaded" in result.output


def test_models_download_unknown(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["models", "download", "nope-xyz", "--models-dir", str(tmp_path)]
    )
    assert result.exit_code == 1 and "unknown model" in result.output


def test_the_console_is_found_in_a_source_checkout() -> None:
    from mesh_inference.cli.main import _console_dir

    found = _console_dir()
    assert found is not None and (found / "index.html").is_file() and (found / "app.js").is_file()
