# What `import nixpkgs { ... }` evaluates to with the stub input (see stub-nixpkgs.nix).
args: (import ./stub-nixpkgs.nix).__mkPkgs args
