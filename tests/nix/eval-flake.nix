# Evaluates flake.nix's outputs against tests/nix/stub-nixpkgs.nix and summarises
# them as JSON for tests/test_packaging.py:
#   nix-instantiate --eval --strict --json tests/nix/eval-flake.nix
let
  nixpkgs = import ./stub-nixpkgs.nix;
  flake = import ../../flake.nix;
  self = flake.outputs { inherit self nixpkgs; } // { outPath = toString ../..; };
  system = "x86_64-linux";
  names = builtins.attrNames;
  package = p: {
    inherit (p) name accelerator pythonDependencyNames;
    llamaOverrides = p.llama-cpp.overrides;
    llamaBinScript = p.llamaBin.script;
    src = p.buildPythonApplication.src.fileset;
    inherit (p.buildPythonApplication) postInstall makeWrapperArgs pythonRelaxDeps;
    dependencies = map (d: d.name) p.buildPythonApplication.dependencies;
    mainProgram = p.buildPythonApplication.meta.mainProgram;
  };
  shell = self.devShells.${system}.default.shell;
  test = self.checks.${system}.nixos-mesh.nixosTest;
in
{
  description = flake.description;
  inputs = flake.inputs;
  outputs = names self;
  systems = names self.packages;
  packageNames = names self.packages.${system};
  packages = builtins.mapAttrs (_: package) {
    inherit (self.packages.${system}) default cpu cuda rocm vulkan;
  };
  model = self.packages.${system}.smollm2-135m.fetchurl;
  app = self.apps.${system}.default;
  devShell = {
    packages = map (p: p.name) shell.packages;
    pythonPackages = map (p: p.name) (builtins.head shell.packages).pythonPackages;
    inherit (shell) shellHook;
  };
  nixosModule = toString self.nixosModules.default;
  checks = names self.checks.${system};
  aarch64Checks = names self.checks.aarch64-linux;
  nixosTest = {
    inherit (test) name testScript;
    nodes = names test.nodes;
  };
}
