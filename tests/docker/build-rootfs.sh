#!/usr/bin/env bash
# Builds the root filesystem of the small image the Docker tests run jobs in: Debian bookworm (minbase) with
# Python 3.11 and a venv at /opt/venv holding pip, mpi4py, MPICH and NumPy. No registry is involved: the packages come
# from Debian's mirror and PyPI (wheels downloaded by the host's pip, installed offline inside the chroot), and the
# tests turn the archive into an image with `docker import`.
#
#   tests/docker/build-rootfs.sh OUT.tar [VENV_PIP]
set -euo pipefail
out=${1:?usage: build-rootfs.sh OUT.tar [pip]}
pip=${2:-pip}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ -s "$out" ]; then
    echo "test image rootfs: $out (cached)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/cadre-rootfs.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
echo "test image rootfs: debootstrap bookworm into $root"
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
"$pip" download --quiet --dest "$work/wheels" mpi4py mpich numpy
mkdir -p "$root/tmp/wheels"
cp "$work"/wheels/*.whl "$root/tmp/wheels/"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" /usr/bin/python3 -m venv /opt/venv
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" /opt/venv/bin/pip install --quiet --no-index \
    --find-links /tmp/wheels mpi4py mpich numpy
rm -rf "$root"/tmp/wheels "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale
mkdir -p "$(dirname "$out")"
tar -C "$root" -cf "$out.part" .
mv "$out.part" "$out"
echo "test image rootfs: $out ($(du -h "$out" | cut -f1))"
