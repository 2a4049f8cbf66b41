# A stand-in for the few nixpkgs `lib` functions nix/module.nix, nix/llama-cpp.nix and
# nix/pydeps.nix use, so tests/test_packaging.py can evaluate them with a bare
# nix-instantiate (no nixpkgs checkout here). Types carry a `check`, so option
# values are type-checked as the module system would.
let
  mkType = name: check: { inherit name check; };
  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  literalExpression = text: { _type = "literalExpression"; inherit text; };
  mkIf = condition: content: { _type = "if"; inherit condition content; };

  types = {
    bool = mkType "bool" builtins.isBool;
    str = mkType "str" builtins.isString;
    number = mkType "number" (v: builtins.isInt v || builtins.isFloat v);
    port = mkType "port" (v: builtins.isInt v && v >= 0 && v <= 65535);
    package = mkType "package" (v: builtins.isAttrs v && v ? outPath);
    enum = values: mkType "enum ${builtins.toJSON values}" (v: builtins.elem v values);
    nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v);
    listOf = t: mkType "list of ${t.name}" (v: builtins.isList v && builtins.all t.check v);
  };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  toLower = builtins.replaceStrings upper lower;
  functionArgs = f: if f ? __functionArgs then f.__functionArgs else builtins.functionArgs f;
}
