# NixOS configuration of the sandbox guest. It keeps the same guest contract as the Debian
# CI guest (sandbox_kernels/guest/sandbox-init):
#
#   * the per-VM seed is a tar archive on the virtio disk with serial "sandbox-seed":
#       ssh_host_ed25519_key  the host key the provisioner pins
#       authorized_keys       the client key allowed to log in as executor
#       hostname              the guest's hostname
#       network               present: outbound network allowed (default route + DNS
#                             through the NIC with MAC 52:54:00:5a:4b:01, the host's passt)
#       random_seed           mixed into /dev/urandom
#       workspace             present: mount the disk with serial "sandbox-workspace" at
#                             /home/executor/work (formatted ext4 on first use)
#   * sshd: key-only, user executor only, direct-tcpip to the guest's loopback only;
#   * "SANDBOX-READY" on the serial console once sshd listens, or
#     "SANDBOX-FAILED: <reason>" and power-off if the seed cannot be applied;
#   * reseeding (golden snapshots): a root service waits on the second serial port (ttyS1)
#     for "reseed <unix seconds>", then re-reads the seed disk (the restored clone's own),
#     installs its host key, authorized key and hostname, sets the clock, reseeds the
#     kernel's RNG, reloads sshd, prints SANDBOX-READY and answers "reseeded" (or
#     "reseed-failed: <reason>") on the port;
#   * no passwords anywhere; eth0 is 10.0.2.15/24 on QEMU's user-mode network (restrict=on:
#     only the host's SSH forward); outbound traffic has a NIC of its own (10.0.3.15/24).
{ config, lib, pkgs, modulesPath, ... }:

let
  authorizedKeysDir = "/etc/ssh/sandbox-authorized-keys";

  # disk_by_serial SERIAL: print /dev/vdX of the virtio disk with that serial (both scripts).
  diskBySerial = ''
    disk_by_serial() {
      for block in /sys/block/*; do
        if [ -r "$block/serial" ] && [ "$(cat "$block/serial")" = "$1" ]; then
          echo "/dev/$(basename "$block")"
          return 0
        fi
      done
      return 1
    }
  '';

  # Reads the seed and applies it. Runs before sshd (which must not generate its own host key).
  seedScript = pkgs.writeShellScript "sandbox-seed" ''
    set -u
    fail() {
      echo "SANDBOX-FAILED: $*" > /dev/console
      systemctl --no-block poweroff
      exit 1
    }
    ${diskBySerial}

    seed_dev=""
    for _ in $(seq 100); do
      seed_dev=$(disk_by_serial sandbox-seed) && break
      sleep 0.1
    done
    [ -n "$seed_dev" ] || fail "no seed disk (virtio disk with serial sandbox-seed)"

    seed=/run/sandbox-seed
    rm -rf "$seed"
    mkdir -m 0700 "$seed" || fail "mkdir $seed"
    tar -x --no-same-owner --no-same-permissions -f "$seed_dev" -C "$seed" \
      || fail "cannot read the seed archive on $seed_dev"
    for required in ssh_host_ed25519_key authorized_keys hostname; do
      [ -f "$seed/$required" ] || fail "seed has no $required"
    done

    name=$(head -n 1 "$seed/hostname")
    case "$name" in
      ""|-*|*[!A-Za-z0-9.-]*) fail "seed hostname is not a valid host name" ;;
    esac
    echo "$name" > /proc/sys/kernel/hostname

    install -D -m 0600 -o root -g root "$seed/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key \
      || fail "cannot install the host key"
    rm -f /etc/ssh/ssh_host_ed25519_key.pub
    install -d -m 0755 -o root -g root ${authorizedKeysDir}
    install -m 0644 -o root -g root "$seed/authorized_keys" ${authorizedKeysDir}/executor \
      || fail "cannot install authorized_keys"

    if [ -f "$seed/random_seed" ]; then
      cat "$seed/random_seed" > /dev/urandom
    fi

    # The kernel's user fails fast on slirp's host addresses (restrict=on: nothing answers).
    ip rule add pref 102 uidrange 1000-4294967294 to 10.0.2.2/31 prohibit || true
    # Outbound traffic goes through a NIC of its own, the host's passt, which rejects this
    # machine's addresses itself (see sandbox_kernels/vm/outbound.py).
    out=""
    for nic in /sys/class/net/*; do
      [ "$(cat "$nic/address" 2>/dev/null)" = 52:54:00:5a:4b:01 ] && out=$(basename "$nic")
    done
    if [ -e "$seed/network" ] && [ -n "$out" ]; then
      ip link set "$out" up
      ip addr add 10.0.3.15/24 dev "$out"
      ip route replace default via 10.0.3.2 dev "$out" || fail "cannot add the default route"
      echo "nameserver 10.0.3.3" | resolvconf -a "$out.sandbox" || true
      echo "sandbox-seed: outbound network: allowed through $out" > /dev/console
    else
      ip route del default 2>/dev/null || true
      echo "sandbox-seed: outbound network: off" > /dev/console
    fi

    if [ -e "$seed/workspace" ]; then
      work_dev=$(disk_by_serial sandbox-workspace) \
        || fail "seed asks for a workspace but there is no disk with serial sandbox-workspace"
      if ! blkid "$work_dev" > /dev/null 2>&1; then
        mkfs.ext4 -q -L workspace "$work_dev" || fail "cannot format the workspace disk"
      fi
      install -d -o executor -g users /home/executor/work
      mount -o nosuid,nodev "$work_dev" /home/executor/work || fail "cannot mount the workspace"
      chown executor:users /home/executor/work
    fi
    rm -rf "$seed"
  '';

  readyScript = pkgs.writeShellScript "sandbox-ready" ''
    for _ in $(seq 200); do
      if ss -Hltn 'sport = :22' | grep -q .; then
        echo "SANDBOX-READY" > /dev/console
        exit 0
      fi
      sleep 0.05
    done
    echo "SANDBOX-FAILED: sshd did not listen on port 22" > /dev/console
    exit 1
  '';

  # The reseed agent (see the contract above): a VM restored from a golden snapshot becomes its
  # own machine before the host logs in.
  reseedScript = pkgs.writeShellScript "sandbox-reseed" ''
    set -u
    grep -q '^1: uart:16550A' /proc/tty/driver/serial || exit 0
    stty -F /dev/ttyS1 raw -echo
    exec 3<> /dev/ttyS1
    ${diskBySerial}
    listener_inode() {
      ss -Hltne 'sport = :22' | sed -n 's/.* ino:\([0-9]*\).*/\1/p' | head -n 1
    }
    reseed() (
      fail() { echo "$*"; exit 1; }
      seed_dev=$(disk_by_serial sandbox-seed) || fail "no seed disk"
      blockdev --flushbufs "$seed_dev" || fail "cannot drop the cached seed"
      seed=/run/sandbox-seed
      rm -rf "$seed"
      mkdir -m 0700 "$seed" || fail "mkdir $seed"
      tar -x --no-same-owner --no-same-permissions -f "$seed_dev" -C "$seed" \
        || fail "cannot read the seed archive"
      name=$(head -n 1 "$seed/hostname")
      case "$name" in
        ""|-*|*[!A-Za-z0-9.-]*) fail "seed hostname is not a valid host name" ;;
      esac
      hostname "$name" || fail "cannot set hostname"
      install -m 0600 -o root -g root "$seed/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key \
        || fail "cannot install the host key"
      install -m 0644 -o root -g root "$seed/authorized_keys" ${authorizedKeysDir}/executor \
        || fail "cannot install authorized_keys"
      [ -f "$seed/random_seed" ] && cat "$seed/random_seed" > /dev/urandom
      rm -rf "$seed"
      case "$1" in ""|*[!0-9]*) fail "bad time $1" ;; esac
      date -u -s "@$1" > /dev/null || fail "cannot set the clock"
      python3 -S -c 'import fcntl, os; fcntl.ioctl(os.open("/dev/urandom", os.O_WRONLY), 0x5207)' \
        || fail "cannot reseed the kernel's random number generator"
      old=$(listener_inode)
      systemctl reload sshd.service || fail "cannot reload sshd"
      for _ in $(seq 200); do
        inode=$(listener_inode)
        [ -n "$inode" ] && [ "$inode" != "$old" ] && exit 0
        sleep 0.05
      done
      fail "sshd did not listen again after the reload"
    )
    while :; do
      read -r word epoch <&3 || { sleep 1; continue; }
      [ "$word" = reseed ] || continue
      if result=$(reseed "$epoch" 2>&1); then
        echo "SANDBOX-READY" > /dev/console
        echo "reseeded" >&3
      else
        echo "sandbox-reseed: $result" > /dev/console
        echo "reseed-failed: $(echo "$result" | tail -n 1)" >&3
      fi
    done
  '';
in
{
  imports = [
    "${modulesPath}/profiles/qemu-guest.nix"
    "${modulesPath}/profiles/minimal.nix"
  ];

  system.stateVersion = "24.05";

  # -- boot: direct kernel boot from the host, bare ext4 root on /dev/vda -------------------
  boot.loader.grub.enable = false;
  boot.initrd.availableKernelModules = [ "virtio_pci" "virtio_blk" "virtio_net" "virtio_rng" "ext4" ];
  boot.initrd.kernelModules = [ "virtio_pci" "virtio_blk" ];
  boot.kernelParams = [ "console=ttyS0" ];
  boot.growPartition = false;
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
    autoResize = false;
  };
  boot.tmp.useTmpfs = true;

  # -- users: executor (uid 1000) only, no password anywhere ---------------------------------
  users.mutableUsers = false;
  users.users.root.hashedPassword = "!";
  users.users.executor = {
    isNormalUser = true;
    uid = 1000;
    home = "/home/executor";
    hashedPassword = "!";
    extraGroups = [ ];
  };
  security.sudo.enable = false;

  # -- the kernel's Python ------------------------------------------------------------------
  environment.systemPackages = [
    (pkgs.python3.withPackages (ps: [ ps.ipykernel ]))
    pkgs.iproute2
  ];

  # -- network: QEMU user-mode networking; outbound only if the seed says so -----------------
  networking.hostName = ""; # set from the seed at boot
  networking.useDHCP = false;
  networking.usePredictableInterfaceNames = false; # eth0, as in the Debian guest
  networking.interfaces.eth0.ipv4.addresses = [{ address = "10.0.2.15"; prefixLength = 24; }];
  networking.enableIPv6 = false;
  networking.firewall.enable = true;
  networking.firewall.allowedTCPPorts = [ 22 ];
  services.timesyncd.enable = false;

  # -- sshd ---------------------------------------------------------------------------------
  services.openssh = {
    enable = true;
    startWhenNeeded = false;
    openFirewall = true;
    hostKeys = [ ]; # the host key comes from the seed; sshd must not generate one
    authorizedKeysFiles = lib.mkForce [ "${authorizedKeysDir}/%u" ];
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
      PermitRootLogin = "no";
      AllowUsers = [ "executor" ];
      X11Forwarding = false;
      UseDns = false;
    };
    extraConfig = ''
      HostKey /etc/ssh/ssh_host_ed25519_key
      AuthenticationMethods publickey
      HostbasedAuthentication no
      PermitEmptyPasswords no
      AllowTcpForwarding local
      PermitOpen 127.0.0.1:* localhost:*
      AllowStreamLocalForwarding no
      GatewayPorts no
      PermitTunnel no
      AllowAgentForwarding no
      PermitUserEnvironment no
      PermitUserRC no
      ClientAliveInterval 15
      ClientAliveCountMax 4
    '';
  };

  systemd.services.sandbox-seed = {
    description = "Apply the sandbox-kernels seed disk (host key, client key, hostname, network)";
    wantedBy = [ "multi-user.target" ];
    requiredBy = [ "sshd.service" ];
    before = [ "sshd.service" ];
    after = [ "network-setup.service" "network-addresses-eth0.service" "local-fs.target" ];
    wants = [ "network-addresses-eth0.service" ];
    path = with pkgs; [ coreutils gnutar iproute2 util-linux e2fsprogs openresolv systemd ];
    unitConfig.DefaultDependencies = false;
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStart = seedScript;
    };
  };

  systemd.services.sandbox-ready = {
    description = "Tell the host (serial console) that sshd is ready";
    wantedBy = [ "multi-user.target" ];
    after = [ "sshd.service" "sandbox-seed.service" ];
    requires = [ "sshd.service" "sandbox-seed.service" ];
    path = with pkgs; [ coreutils iproute2 gnugrep ];
    serviceConfig = {
      Type = "oneshot";
      ExecStart = readyScript;
    };
  };

  systemd.services.sandbox-reseed = {
    description = "Take a fresh seed when the host says so (VMs restored from a golden snapshot)";
    wantedBy = [ "multi-user.target" ];
    after = [ "sandbox-ready.service" ];
    path = with pkgs; [ coreutils gnutar gnugrep gnused iproute2 util-linux systemd
                        (pkgs.python3.withPackages (ps: [ ps.ipykernel ])) ];
    serviceConfig = {
      Type = "simple";
      ExecStart = reseedScript;
      Restart = "always";
    };
  };

  # -- keep the guest small and quick to boot -------------------------------------------------
  documentation.enable = false;
  services.udisks2.enable = false;
  xdg.autostart.enable = false;
  systemd.services."serial-getty@ttyS0".enable = false;
  systemd.services."getty@tty1".enable = false;
}
