# Evaluates nix/module.nix against tests/nix/stub-lib.nix the way the NixOS module
# system would for one configuration: option defaults, the given settings laid over
# them (unknown names and ill-typed values are errors), then `config` with every
# mkIf resolved. Used by tests/test_packaging.py:
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --argstr settings '{"model": "smollm2-135m"}' --argstr pkgsConfig '{}'
{
  settings ? "{}",
  pkgsConfig ? "{}",
}:
let
  lib = import ./stub-lib.nix;
  given = builtins.fromJSON settings;
  # A package set with just what the module touches; callPackage records its arguments.
  pkgs = {
    config = builtins.fromJSON pkgsConfig;
    callPackage = _fn: args: {
      outPath = "/nix/store/00000000000000000000000000000000-mesh-inference-${args.accelerator}";
      accelerator = args.accelerator;
    };
  };
  module = import ../../nix/module.nix { inherit lib pkgs config; };
  options = module.options.services.mesh-inference;
  unknown = builtins.filter (n: !(options ? ${n})) (builtins.attrNames given);
  cfg = builtins.mapAttrs (
    name: opt:
    let
      value = if given ? ${name} then given.${name} else opt.default;
    in
    if opt.type.check value then
      value
    else
      throw "services.mesh-inference.${name}: ${builtins.toJSON value} is not ${opt.type.name}"
  ) options;
  config.services.mesh-inference = cfg;
  resolve =
    v:
    if builtins.isAttrs v then
      if (v._type or null) == "if" then
        (if v.condition then resolve v.content else null)
      else if v ? outPath then
        v.outPath
      else
        builtins.mapAttrs (_: resolve) v
    else if builtins.isList v then
      map resolve v
    else
      v;
  # Type-check what was given even when the module stays disabled.
  checked = builtins.all (name: builtins.seq cfg.${name} true) (builtins.attrNames given);
in
if unknown != [ ] then
  throw "unknown services.mesh-inference options: ${builtins.concatStringsSep ", " unknown}"
else
  assert checked;
  {
    options = builtins.mapAttrs (_: opt: {
      type = opt.type.name;
      default = resolve opt.default;
      hasDescription = builtins.isString (opt.description or null);
    }) options;
    config = resolve module.config;
  }
