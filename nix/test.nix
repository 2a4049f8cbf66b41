# NixOS VM test: three machines form one mesh through the module and answer a chat.
#   node1: the host, serves the pinned SmolLM2 GGUF (a fixed-output fetch)
#   node2: joins with a join token delivered as a file (LoadCredential), offers memory
#   node3: joins as well; its API (bound to 0.0.0.0, with an API key) answers the chat
#
#   nix build .#checks.x86_64-linux.nixos-mesh -L
{
  pkgs,
  self,
  model,
}:
let
  common =
    { lib, ... }:
    {
      imports = [ self.nixosModules.default ];
      virtualisation.memorySize = 2048;
      virtualisation.cores = 2;
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
      ];
      services.mesh-inference = {
        enable = true;
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        accelerator = "cpu";
        openFirewall = true;
        extraArgs = [ "--no-mdns" ];
      };
    };
  joiner =
    maxVram:
    { lib, ... }:
    {
      imports = [ common ];
      services.mesh-inference = {
        joinTokenFile = "/etc/mesh-inference/join-token";
        inherit maxVram;
      };
      # Started by the test once the token is there (the first node makes it at start).
      systemd.services.mesh-inference.wantedBy = lib.mkForce [ ];
    };
in
pkgs.testers.runNixOSTest {
  name = "mesh-inference-three-nodes";
  nodes = {
    node1 = {
      imports = [ common ];
      services.mesh-inference = {
        model = "${model}";
        maxVram = 4;
      };
    };
    node2 = joiner 2;
    node3 =
      { lib, ... }:
      {
        imports = [ (joiner 1) ];
        services.mesh-inference = {
          httpHost = "0.0.0.0";
          apiKeyFile = "/etc/mesh-inference/api-key";
        };
      };
  };

  testScript = ''
    start_all()
    node1.wait_for_unit("mesh-inference.service")
    node1.wait_until_succeeds("test -s /var/lib/mesh-inference/join-token", timeout=120)
    token = node1.succeed("cat /var/lib/mesh-inference/join-token").strip()
    assert token.startswith("mi1."), token

    for node in (node2, node3):
        node.succeed("install -d -m 0700 /etc/mesh-inference")
        node.succeed(f"install -m 0600 /dev/stdin /etc/mesh-inference/join-token <<< '{token}'")
    node3.succeed("install -m 0600 /dev/stdin /etc/mesh-inference/api-key <<< 'test-api-key'")
    for node in (node2, node3):
        node.systemctl("start mesh-inference.service")
        node.wait_for_unit("mesh-inference.service")
        # The token reaches the node through its environment, never its argv.
        node.fail("ps -eo args | grep -v grep | grep -F '" + token[:40] + "'")

    # All three in one plan, engine ready, as node3 sees it.
    node3.wait_until_succeeds(
        "curl -sf http://127.0.0.1:9337/api/status"
        " | jq -e '.ready and (.plan.order | length) == 3'",
        timeout=600,
    )
    node3.fail("curl -sf http://127.0.0.1:9337/v1/models")  # no key: 401
    answer = node3.succeed(
        "curl -sf http://127.0.0.1:9337/v1/chat/completions"
        " -H 'authorization: Bearer test-api-key' -H 'content-type: application/json'"
        " -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}],\"max_tokens\":8}'"
        " | jq -er '.choices[0].message.content'"
    )
    print("chat answer:", answer)
    # node1 keeps its API on loopback: not reachable from node2.
    node2.fail("curl -sf --max-time 5 http://node1:9337/health")
    # The hardening is in force.
    node1.succeed("systemctl show mesh-inference -p DynamicUser | grep -qx DynamicUser=yes")
    node1.succeed("systemctl show mesh-inference -p NoNewPrivileges | grep -qx NoNewPrivileges=yes")
  '';
}
