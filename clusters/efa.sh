#!/usr/bin/env bash
# Installs AWS EFA's user-space stack into a container: libfabric with its efa provider, rdma-core, and the
# aws-ofi-nccl plugin through which NCCL sends its collectives over EFA (the EFA installer bundles the plugin since
# version 1.39). The kernel driver stays the host's: EFA-enabled AMIs (the DLAMI) ship it. Used by clusters/Dockerfile
# at build time and by clusters/aws-gpu.yaml on each GPU worker at start. Needs root or passwordless sudo and curl.
#
#   EFA_INSTALLER_VERSION=1.39.0 bash clusters/efa.sh   # default: latest; pin it for reproducible images
set -euo pipefail

version="${EFA_INSTALLER_VERSION:-latest}"
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi

workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
cd "$workdir"
"${as_root[@]}" apt-get update -y
curl -fsSL "https://efa-installer.amazonaws.com/aws-efa-installer-${version}.tar.gz" | tar -xz
cd aws-efa-installer
# --skip-kmod: a container cannot load kernel modules (the host has the driver); --skip-limit-conf: memlock comes
# from the container's --ulimit; --no-verify: the build machine has no EFA device to test against.
"${as_root[@]}" ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify
"${as_root[@]}" ldconfig

# Fail the build here, not 2 days into a run that silently fell back to TCP sockets.
plugin=""
for candidate in /opt/amazon/ofi-nccl/lib/libnccl-net*.so; do
    if [ -e "$candidate" ]; then
        plugin="$candidate"
        break
    fi
done
if [ -z "$plugin" ] || [ ! -e /opt/amazon/efa/lib/libfabric.so ]; then
    echo "efa.sh: the EFA installer ${version} did not install libfabric and the aws-ofi-nccl plugin" \
         "(/opt/amazon/efa/lib, /opt/amazon/ofi-nccl/lib); use installer 1.39 or later" >&2
    exit 1
fi
echo "efa.sh: libfabric $(/opt/amazon/efa/bin/fi_info --version | head -n 1), NCCL plugin ${plugin}"
