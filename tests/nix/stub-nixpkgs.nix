# A stand-in for the nixpkgs flake input, so tests/test_packaging.py can evaluate
# flake.nix's outputs (and through them nix/package.nix, nix/llama-cpp.nix,
# nix/pydeps.nix and nix/test.nix) with a bare nix-instantiate. Builders return
# their arguments, so the test can read what each output would build.
#
# python3Packages only knows the names below, all of which nixpkgs has: a new
# pyproject.toml dependency fails here until it is checked against nixpkgs and added.
let
  lib0 = import ./stub-lib.nix;
  pythonNames = [
    "aiohttp"
    "aioquic"
    "click"
    "cryptography"
    "gguf"
    "huggingface-hub"
    "hypothesis"
    "mypy"
    "openai"
    "prometheus-client"
    "psutil"
    "pytest"
    "pytest-asyncio"
    "pytest-timeout"
    "rich"
    "setuptools"
    "wheel"
    "zeroconf"
  ];
  drv = name: attrs: attrs // {
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  lib = lib0 // {
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    optionalAttrs = cond: attrs: if cond then attrs else { };
    optionalString = cond: s: if cond then s else "";
    licenses.mit = "mit";
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
    # fileset: every path must exist (a renamed directory breaks the real build too).
    fileset = {
      unions = paths:
        map (p: if builtins.pathExists p then toString p else throw "fileset: ${toString p} does not exist") paths;
      toSource = { root, fileset }: { inherit root fileset; outPath = toString root; };
    };
  };

  mkPkgs =
    { system ? "x86_64-linux", config ? { } }:
    let
      self = {
        inherit lib system config;
        stdenv.hostPlatform.system = system;
        # Calls a package function with the arguments it asks for, like the real one.
        callPackage =
          fn: args:
          let
            f = if builtins.isPath fn then import fn else fn;
          in
          f ((builtins.intersectAttrs (builtins.functionArgs f) self) // args);
        runCommand = name: env: script: drv name { inherit env script; };
        fetchurl = args: drv args.name { fetchurl = args; };
        mkShell = args: drv "shell" { shell = args; };
        testers.runNixOSTest = args: drv "nixos-test-${args.name}" { nixosTest = args; };
        llama-cpp = {
          name = "llama-cpp";
          # Like makeOverridable: override reports the package function's arguments.
          override = {
            __functionArgs = {
              cudaSupport = true;
              rocmSupport = true;
              vulkanSupport = true;
              rpcSupport = true;
              blasSupport = true;
            };
            __functor = _: args: drv "llama-cpp" { overrides = args; };
          };
        };
        python3Packages =
          builtins.listToAttrs (map (n: { name = n; value = drv "python3-${n}" { }; }) pythonNames)
          // {
            python.sitePackages = "lib/python3.12/site-packages";
            buildPythonApplication = args: drv "${args.pname}-${args.version}" (args.passthru or { }) // {
              buildPythonApplication = args;
            };
          };
        python3.withPackages = f: drv "python3-env" { pythonPackages = f self.python3Packages; };
        just = drv "just" { };
        ruff = drv "ruff" { };
        mypy = drv "mypy" { };
        hadolint = drv "hadolint" { };
        nixfmt-rfc-style = drv "nixfmt" { };
      };
    in
    self;
in
{
  # `import nixpkgs { system = ...; config = ...; }` in flake.nix lands here.
  outPath = toString ./stub-nixpkgs-import.nix;
  inherit lib;
  legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (system: mkPkgs { inherit system; });
  __mkPkgs = mkPkgs;
}
