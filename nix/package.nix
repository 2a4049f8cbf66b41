# mesh-inference: the Python application, with llama.cpp (GGML_RPC=ON) on its PATH.
#
#   pkgs.callPackage ./package.nix { }                          # CPU
#   pkgs.callPackage ./package.nix { accelerator = "vulkan"; }  # or "cuda", "rocm"
#
# The runtime dependencies are read from pyproject.toml ([project] dependencies),
# so this file does not drift from pip's view; pythonRelaxDeps drops the version
# bounds, which nixpkgs pins on its own.
{
  lib,
  callPackage,
  python3Packages,
  runCommand,
  llama-cpp,
  accelerator ? "cpu",
}:
let
  pyproject = builtins.fromTOML (builtins.readFile ../pyproject.toml);
  deps = import ./pydeps.nix { inherit lib; } pyproject.project.dependencies;

  llama = callPackage ./llama-cpp.nix { inherit llama-cpp accelerator; };

  # llama-server and rpc-server side by side: mesh-inference takes llama-server from
  # PATH and the rpc-server next to it (engine/backends.py). nixpkgs has installed
  # the RPC server as rpc-server, llama-rpc-server or ggml-rpc-server over time.
  llamaBin = runCommand "mesh-inference-llama-bin-${accelerator}" { } ''
    mkdir -p $out/bin
    ln -s ${llama}/bin/llama-server $out/bin/llama-server
    for n in rpc-server llama-rpc-server ggml-rpc-server; do
      if [ -x ${llama}/bin/$n ]; then
        ln -s ${llama}/bin/$n $out/bin/rpc-server
        break
      fi
    done
    if [ ! -e $out/bin/rpc-server ]; then
      echo "${llama.name} has no rpc-server: it must be built with rpcSupport (GGML_RPC=ON)" >&2
      exit 1
    fi
  '';
in
python3Packages.buildPythonApplication {
  pname = "mesh-inference";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../mesh_inference
      ../console
      ../packaging/mesh-inference-launch
    ];
  };

  build-system = with python3Packages; [
    setuptools
    wheel
  ];
  dependencies = map (name: python3Packages.${name}) deps;
  pythonRelaxDeps = true;

  # The console ships next to the package (cli/main.py looks for mesh_inference/console);
  # the launcher reads the join token from a file (systemd LoadCredential).
  postInstall = ''
    cp -r console $out/${python3Packages.python.sitePackages}/mesh_inference/console
    install -Dm755 packaging/mesh-inference-launch $out/libexec/mesh-inference-launch
    substituteInPlace $out/libexec/mesh-inference-launch \
      --replace-fail '"''${MESH_INFERENCE_BIN:-mesh-inference}"' "$out/bin/mesh-inference"
  '';
  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    "${llamaBin}/bin"
  ];

  # The test suite starts real meshes and browsers; it runs in the repository (scripts/test).
  doCheck = false;
  pythonImportsCheck = [
    "mesh_inference"
    "mesh_inference.cli.main"
  ];

  passthru = {
    inherit accelerator llamaBin;
    pythonDependencyNames = deps;
    llama-cpp = llama;
  };

  meta = {
    description = "Pool the GPUs and CPUs of several machines into one llama.cpp inference service";
    license = lib.licenses.mit;
    mainProgram = "mesh-inference";
    platforms = lib.platforms.linux;
  };
}
