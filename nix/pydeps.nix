# pyproject.toml dependency strings -> python3Packages attribute names:
#   [ "aioquic>=1.7.2,<1.8" "huggingface-hub>=0.24" "foo[bar]; python_version<'3.12'" ]
#   -> [ "aioquic" "huggingface-hub" "foo" ]
# Names are normalised as PEP 503 does (lower case, runs of -_. become -), which is
# how nixpkgs names most Python packages; `renames` holds the exceptions.
{ lib }:
let
  renames = { };
  nameOf =
    spec:
    let
      m = builtins.match "[[:space:]]*([A-Za-z0-9][A-Za-z0-9._-]*).*" spec;
    in
    if m == null then
      throw "mesh-inference: cannot read the dependency '${spec}' in pyproject.toml"
    else
      let
        norm = lib.toLower (
          builtins.concatStringsSep "-" (
            builtins.filter (s: builtins.isString s && s != "") (builtins.split "[-_.]+" (builtins.head m))
          )
        );
      in
      renames.${norm} or norm;
in
specs: map nameOf specs
