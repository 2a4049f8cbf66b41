# NixOS module: services.mesh-inference, one mesh node as a hardened systemd service.
#
#   services.mesh-inference = {
#     enable = true;
#     model = "smollm2-135m";                        # the first node
#     # joinTokenFile = "/run/secrets/mesh-token";   # every other node
#     httpHost = "0.0.0.0"; apiKeyFile = "/run/secrets/mesh-api-key";
#     openFirewall = true;
#     accelerator = "cuda";
#   };
#
# Secrets (join token, API key) are never in the Nix store: the options hold paths,
# read at start through systemd's LoadCredential, so only the service sees them.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.mesh-inference;
  inherit (lib) mkOption types;

  stateDir = "/var/lib/mesh-inference";
  loopback = [
    "127.0.0.1"
    "::1"
    "localhost"
  ];

  # "auto" follows nixpkgs' config.cudaSupport / config.rocmSupport, as llama-cpp itself does.
  configAccelerator =
    if pkgs.config.cudaSupport or false then
      "cuda"
    else if pkgs.config.rocmSupport or false then
      "rocm"
    else
      "cpu";
  packageAccelerator = if cfg.accelerator == "auto" then configAccelerator else cfg.accelerator;
  # The devices the service may open follow the package actually run.
  accelerator =
    if cfg.accelerator == "auto" then cfg.package.accelerator or configAccelerator else cfg.accelerator;

  # Device cgroup allow-list (DevicePolicy=closed adds only /dev/null, zero, full,
  # random, urandom, tty, ptmx). Group names as in /proc/devices.
  devicesFor = {
    cpu = [ ];
    cuda = [
      # /dev/nvidia0.., /dev/nvidiactl, /dev/nvidia-uvm*, /dev/nvidia-caps/*
      "char-nvidia-frontend rw"
      "char-nvidiactl rw"
      "char-nvidia-uvm rw"
      "char-nvidia-caps rw"
    ];
    rocm = [
      "/dev/kfd rw"
      "char-drm rw" # /dev/dri/card*, /dev/dri/renderD*
    ];
    vulkan = [
      "char-drm rw" # /dev/dri/*
    ];
  };

  # One ExecStart word: JSON quoting (which systemd understands) with systemd's own
  # % specifiers and $ variables escaped, so a value is passed through verbatim.
  execArg =
    arg: builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (builtins.toJSON (toString arg));

  args =
    [
      "--state-dir"
      stateDir
      "--models-dir"
      cfg.modelsDir
      "--http-host"
      cfg.httpHost
      "--http-port"
      cfg.httpPort
      "--quic-port"
      cfg.quicPort
    ]
    ++ lib.optionals (cfg.model != null) [
      "--model"
      cfg.model
    ]
    ++ lib.optional (cfg.mode == "client") "--client"
    ++ lib.optionals (cfg.maxVram != null) [
      "--max-vram"
      cfg.maxVram
    ]
    ++ cfg.extraArgs;

  execStart = builtins.concatStringsSep " " (
    [ "${cfg.package}/libexec/mesh-inference-launch" ]
    ++ map execArg args
    # %d is the service's credentials directory: the key file as systemd loaded it.
    ++ lib.optional (cfg.apiKeyFile != null) "--api-key-file %d/api-key"
  );

  isStorePath = p: p != null && lib.hasPrefix builtins.storeDir (toString p);
  modelsInState = lib.hasPrefix "${stateDir}/" cfg.modelsDir || cfg.modelsDir == stateDir;
in
{
  options.services.mesh-inference = {
    enable = lib.mkEnableOption "mesh-inference, one node of a pooled llama.cpp inference mesh";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { accelerator = packageAccelerator; };
      defaultText = lib.literalExpression ''pkgs.callPackage ./package.nix { accelerator = <accelerator>; }'';
      description = "The mesh-inference package (with llama.cpp built with GGML_RPC).";
    };

    model = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "smollm2-135m";
      description = ''
        Model this node serves (`--model`): a GGUF path, a file name in
        `modelsDir`, a catalog name, or `hf://owner/repo/file.gguf`. Set it on
        the first node; nodes that join get the model from the mesh.
      '';
    };

    joinTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/mesh-inference-join-token";
      description = ''
        File holding the join token of the mesh to join (what the first node
        printed, also in its `/var/lib/mesh-inference/join-token`). Read at start
        through systemd's `LoadCredential`, never copied to the Nix store: give
        it as a string, not a Nix path literal. The token is the mesh secret.
      '';
    };

    mode = mkOption {
      type = types.enum [
        "auto"
        "client"
      ];
      default = "auto";
      description = ''
        `auto`: a full member that offers its memory to the mesh. `client`
        (`--client`): contributes nothing and runs no engine, only serves the
        API locally, proxied to the mesh's host; needs `joinTokenFile`.
      '';
    };

    httpHost = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address of the OpenAI-compatible API and console (`--http-host`).";
    };

    httpPort = mkOption {
      type = types.port;
      default = 9337;
      description = "TCP port of the API and console (`--http-port`).";
    };

    quicPort = mkOption {
      type = types.port;
      default = 9337;
      description = "UDP port of the QUIC mesh (`--quic-port`): the only port peers use.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open `quicPort`/udp for the mesh, and `httpPort`/tcp when `httpHost` is
        not a loopback address. llama.cpp's rpc-server never needs a port: it
        listens on 127.0.0.1 and peers reach it through the mesh's QUIC tunnels.
      '';
    };

    maxVram = mkOption {
      type = types.nullOr types.number;
      default = null;
      example = 6;
      description = "Memory in GB this node offers the mesh (`--max-vram`); default: detected.";
    };

    accelerator = mkOption {
      type = types.enum [
        "auto"
        "cuda"
        "rocm"
        "vulkan"
        "cpu"
      ];
      default = "auto";
      description = ''
        Which llama.cpp build the default package uses and which devices the
        service may open (`DeviceAllow`): `cuda` (/dev/nvidia*), `rocm`
        (/dev/kfd, /dev/dri), `vulkan` (/dev/dri), `cpu` (none). `auto` follows
        the package's own accelerator, else nixpkgs' `config.cudaSupport` /
        `config.rocmSupport`, else `cpu`. CUDA needs `nixpkgs.config.allowUnfree`.
      '';
    };

    modelsDir = mkOption {
      type = types.str;
      default = "${stateDir}/models";
      description = ''
        Local models directory (`--models-dir`), where downloads and copies from
        peers go. Outside ${stateDir} it must exist and be writable by the
        service's dynamic user (e.g. through a group and `SupplementaryGroups`).
      '';
    };

    apiKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/mesh-inference-api-key";
      description = ''
        File holding the API key clients must send as `Authorization: Bearer`
        (`--api-key-file`), loaded through `LoadCredential`, never via the Nix store.
        Required when `httpHost` is not a loopback address (the CLI refuses a
        public API without a key unless `extraArgs` has `--insecure-public`).
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--no-mdns"
        "--log-format"
        "json"
      ];
      description = "More `mesh-inference` flags, passed verbatim (see `mesh-inference --help`).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.model != null || cfg.joinTokenFile != null;
        message = "services.mesh-inference: set model (the first node) or joinTokenFile (a node that joins).";
      }
      {
        assertion = cfg.mode != "client" || cfg.joinTokenFile != null;
        message = "services.mesh-inference: mode = \"client\" needs joinTokenFile.";
      }
      {
        # The CLI refuses a public API without a key unless told --insecure-public.
        assertion =
          builtins.elem cfg.httpHost loopback
          || cfg.apiKeyFile != null
          || builtins.elem "--insecure-public" cfg.extraArgs;
        message = "services.mesh-inference: httpHost = \"${cfg.httpHost}\" exposes the API: set apiKeyFile (or add \"--insecure-public\" to extraArgs).";
      }
      {
        assertion = !(isStorePath cfg.joinTokenFile) && !(isStorePath cfg.apiKeyFile);
        message = "services.mesh-inference: joinTokenFile and apiKeyFile must not be in the Nix store (it is world-readable).";
      }
    ];

    warnings = lib.optional (
      !(builtins.elem cfg.httpHost loopback) && cfg.apiKeyFile == null
    ) "services.mesh-inference: the API listens on ${cfg.httpHost} without a key (--insecure-public).";

    environment.systemPackages = [ cfg.package ];

    networking.firewall = lib.mkIf cfg.openFirewall {
      allowedUDPPorts = [ cfg.quicPort ];
      allowedTCPPorts = lib.optional (!(builtins.elem cfg.httpHost loopback)) cfg.httpPort;
    };

    systemd.services.mesh-inference = {
      description = "mesh-inference node (pooled llama.cpp inference)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = {
        HOME = stateDir;
        PYTHONUNBUFFERED = "1";
      };
      serviceConfig = {
        Type = "exec";
        ExecStart = execStart;
        Restart = "always";
        RestartSec = 5;
        TimeoutStopSec = 30;
        LoadCredential =
          lib.optional (cfg.joinTokenFile != null) "join-token:${cfg.joinTokenFile}"
          ++ lib.optional (cfg.apiKeyFile != null) "api-key:${cfg.apiKeyFile}";

        DynamicUser = true;
        StateDirectory = "mesh-inference";
        StateDirectoryMode = "0700";
        WorkingDirectory = stateDir;
        ReadWritePaths = lib.optional (!modelsInState) "-${cfg.modelsDir}";
        UMask = "0077";
        OOMScoreAdjust = -500;

        # Devices: only the chosen accelerator's.
        DevicePolicy = "closed";
        DeviceAllow = devicesFor.${accelerator};
        PrivateDevices = accelerator == "cpu";
        # GPU device nodes belong to host groups (render, video): no user namespace then.
        PrivateUsers = accelerator == "cpu";
        SupplementaryGroups = lib.optionals (accelerator == "rocm" || accelerator == "vulkan") [
          "render"
          "video"
        ];

        # Hardening.
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateMounts = true;
        ProtectProc = "invisible";
        ProcSubset = "all"; # psutil reads /proc/meminfo and /proc/cpuinfo
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        LockPersonality = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RestrictNamespaces = true;
        RemoveIPC = true;
        # AF_NETLINK: the node lists its interface addresses for the join token.
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
          "AF_NETLINK"
        ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
        # CPU ggml does not JIT; GPU runtimes (CUDA's PTX JIT, ROCm, Vulkan drivers) may map W+X.
        MemoryDenyWriteExecute = accelerator == "cpu";
      };
    };
  };
}
