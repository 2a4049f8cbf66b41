# llama.cpp from nixpkgs built the way mesh-inference needs it: the RPC backend
# (rpc-server, GGML_RPC=ON) plus exactly one accelerator.
#
#   pkgs.callPackage ./llama-cpp.nix { accelerator = "cuda"; }
#
# accelerator: "cpu" | "cuda" | "rocm" | "vulkan". Each choice sets all three GPU
# switches, so nixpkgs' config.cudaSupport / config.rocmSupport cannot leak in.
{
  lib,
  llama-cpp,
  accelerator ? "cpu",
}:
let
  switches = {
    cpu = {
      cudaSupport = false;
      rocmSupport = false;
      vulkanSupport = false;
    };
    cuda = {
      cudaSupport = true;
      rocmSupport = false;
      vulkanSupport = false;
    };
    rocm = {
      cudaSupport = false;
      rocmSupport = true;
      vulkanSupport = false;
    };
    vulkan = {
      cudaSupport = false;
      rocmSupport = false;
      vulkanSupport = true;
    };
  };
  # The arguments this nixpkgs' llama-cpp accepts. An accelerator switch it lacks is
  # an error; a missing rpcSupport is caught by package.nix, which insists on rpc-server.
  accepted = lib.functionArgs llama-cpp.override;
  wanted = switches.${accelerator} // {
    rpcSupport = true;
  };
  missing = builtins.filter (n: n != "rpcSupport" && wanted.${n} && !(accepted ? ${n})) (
    builtins.attrNames wanted
  );
in
if !(switches ? ${accelerator}) then
  throw "mesh-inference: unknown accelerator '${accelerator}' (cpu, cuda, rocm, vulkan)"
else if accepted != { } && missing != [ ] then
  throw "mesh-inference: this nixpkgs' llama-cpp has no ${builtins.concatStringsSep ", " missing}"
else
  llama-cpp.override (
    if accepted == { } then wanted else builtins.intersectAttrs accepted wanted
  )
