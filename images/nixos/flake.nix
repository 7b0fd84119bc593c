# The NixOS sandbox guest for the "Python (NixOS VM)" kernel (sandbox-nixos-vm).
#
#   nix build .#qcow2          ->  result/sandbox-nixos.{qcow2,vmlinuz,initrd,cmdline,os-release}
#   sandbox-kernels image check result/sandbox-nixos.qcow2
#
# The qcow2 is a bare ext4 filesystem (no partition table, no boot loader): sandbox-kernels
# boots it with libvirt's direct kernel boot, using the kernel and initrd next to it and the
# extra command line words in sandbox-nixos.cmdline (the NixOS system's init path).
{
  description = "sandbox-kernels NixOS guest image (qcow2 + kernel + initrd for direct boot)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      lib = nixpkgs.lib;
      guest = lib.nixosSystem {
        inherit system;
        modules = [ ./configuration.nix ];
      };
      cfg = guest.config;
      disk = import "${nixpkgs}/nixos/lib/make-disk-image.nix" {
        inherit pkgs lib;
        config = cfg;
        name = "sandbox-nixos-disk";
        format = "qcow2";
        partitionTableType = "none"; # root=/dev/vda, as for the Debian guest
        label = "nixos";
        installBootLoader = false; # direct kernel boot
        copyChannel = false;
        diskSize = "auto";
        additionalSpace = "1024M"; # room for the kernel user's files
      };
      kernel = "${cfg.system.build.kernel}/${cfg.system.boot.loader.kernelFile}";
      initrd = "${cfg.system.build.initialRamdisk}/${cfg.system.boot.loader.initrdFile}";
      cmdline = lib.concatStringsSep " "
        ([ "init=${cfg.system.build.toplevel}/init" ] ++ cfg.boot.kernelParams);
    in
    {
      nixosConfigurations.sandbox = guest;

      packages.${system} = {
        qcow2 = pkgs.runCommand "sandbox-nixos-image" { } ''
          mkdir -p $out
          ln -s ${disk}/nixos.qcow2 $out/sandbox-nixos.qcow2
          ln -s ${kernel} $out/sandbox-nixos.vmlinuz
          ln -s ${initrd} $out/sandbox-nixos.initrd
          echo ${lib.escapeShellArg cmdline} > $out/sandbox-nixos.cmdline
          # What doctor, the panel and the kernel's start log name as the guest OS.
          ln -s ${cfg.system.build.etc}/etc/os-release $out/sandbox-nixos.os-release
        '';
        default = self.packages.${system}.qcow2;
      };
    };
}
