{
  description = "mesh-inference: pool several machines' CPUs and GPUs into one llama.cpp inference service";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f system);
      pkgsFor = system: nixpkgs.legacyPackages.${system};
      # CUDA is unfree: only that variant's package set allows it.
      pkgsUnfreeFor =
        system:
        import nixpkgs {
          inherit system;
          config.allowUnfree = true;
        };
      meshFor = pkgs: accelerator: pkgs.callPackage ./nix/package.nix { inherit accelerator; };
      catalog = builtins.fromJSON (builtins.readFile ./mesh_inference/models/catalog.json);
      smollm2 = builtins.head (builtins.filter (m: m.name == "smollm2-135m") catalog);
    in
    {
      packages = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        rec {
          default = cpu;
          cpu = meshFor pkgs "cpu";
          cuda = meshFor (pkgsUnfreeFor system) "cuda";
          rocm = meshFor pkgs "rocm";
          vulkan = meshFor pkgs "vulkan";
          # The shipped default model, pinned by the catalog's revision and sha256.
          smollm2-135m = pkgs.fetchurl {
            name = smollm2.file;
            url = "https://huggingface.co/${smollm2.repo}/resolve/${smollm2.revision}/${smollm2.file}";
            sha256 = smollm2.sha256;
          };
        }
      );

      apps = forAllSystems (system: {
        default = {
          type = "app";
          program = "${self.packages.${system}.default}/bin/mesh-inference";
        };
      });

      devShells = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
          mesh = self.packages.${system}.default;
          python = pkgs.python3.withPackages (
            ps:
            map (name: ps.${name}) mesh.pythonDependencyNames
            ++ (with ps; [
              hypothesis
              mypy
              openai
              pytest
              pytest-asyncio
              pytest-timeout
            ])
          );
        in
        {
          default = pkgs.mkShell {
            packages = [
              python
              mesh.llamaBin
              pkgs.just
              pkgs.ruff
              pkgs.mypy
              pkgs.hadolint
            ];
            shellHook = ''
              if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
                echo "mesh-inference dev shell: NVIDIA GPU found ($(nvidia-smi -L | head -1)); nix build .#cuda for a CUDA engine"
              elif command -v rocm-smi >/dev/null 2>&1 && rocm-smi --showproductname >/dev/null 2>&1; then
                echo "mesh-inference dev shell: AMD GPU found (rocm-smi); nix build .#rocm for a ROCm engine"
              else
                echo "mesh-inference dev shell: no GPU found (no nvidia-smi/rocm-smi): CPU engine"
              fi
              echo "llama.cpp (GGML_RPC): $(command -v llama-server)  |  just --list for the recipes"
            '';
          };
        }
      );

      nixosModules.default = ./nix/module.nix;

      checks = forAllSystems (
        system:
        {
          package = self.packages.${system}.default;
        }
        // nixpkgs.lib.optionalAttrs (system == "x86_64-linux") {
          nixos-mesh = import ./nix/test.nix {
            pkgs = pkgsFor system;
            inherit self;
            model = self.packages.${system}.smollm2-135m;
          };
        }
      );

      formatter = forAllSystems (system: (pkgsFor system).nixfmt-rfc-style);
    };
}
