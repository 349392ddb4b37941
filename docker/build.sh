#!/usr/bin/env bash
# Build the ptlm image (docker/Dockerfile) with one command, from anywhere in the checkout:
#
#   docker/build.sh                                  # image "ptlm:latest"
#   PTLM_BUILD_CA=/etc/ssl/certs/ca-certificates.crt docker/build.sh     # behind a TLS proxy
#   PTLM_IMAGE=ptlm:dev docker/build.sh --build-arg PTLM_UID=$(id -u)   # more `docker build` args
#
# Environment:
#   PTLM_IMAGE       tag of the image (default ptlm:latest)
#   PTLM_BUILD_CA    a CA bundle (PEM) for pip inside the build, e.g. the one of a TLS-inspecting
#                    proxy: passed as the BuildKit secret "ptlm_ca", mounted only during the RUNs
#                    that download, never stored in the image or its layers
#   PTLM_BASE_BOOTSTRAP  auto (default): if the base image (debian:bookworm-slim) is neither
#                    present nor pullable, make it with debootstrap from Debian's archive and
#                    `docker import` it under the same name; never: fail instead; always: remake it
#   PTLM_DEBIAN_MIRROR   archive for debootstrap (default http://deb.debian.org/debian)
#   DOCKER           the docker client (default: the first on PATH that builds with BuildKit)
# Prints the build time and the image size at the end. See docs/docker.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${PTLM_IMAGE:-ptlm:latest}"
DOCKER="${DOCKER:-}"
BOOTSTRAP="${PTLM_BASE_BOOTSTRAP:-auto}"
MIRROR="${PTLM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

say() { echo "[ptlm build] $*" >&2; }
die() { say "error: $*"; exit 1; }

# The base image: the FROM lines of the Dockerfile (one Debian image for both stages).
mapfile -t BASES < <(awk 'toupper($1) == "FROM" {print $2}' "$ROOT/docker/Dockerfile" | sort -u)
[ "${#BASES[@]}" -eq 1 ] || die "expected one base image in docker/Dockerfile, found: ${BASES[*]}"
BASE="${BASES[0]}"
case "$BASE" in
  debian:*-slim) SUITE="${BASE#debian:}"; SUITE="${SUITE%-slim}" ;;
  *) SUITE="" ;;
esac

bootstrap_base() {
  # The same Debian release as the official image, from Debian's archive: a minimal root file
  # system (debootstrap --variant=minbase), trimmed the way the official -slim images are (no
  # documentation, man pages or locales from later installs; no apt lists), imported under the
  # official name so that the Dockerfile's FROM needs no registry.
  [ -n "$SUITE" ] || die "cannot bootstrap $BASE: not a debian:<release>-slim image"
  command -v debootstrap >/dev/null || die "$BASE cannot be pulled and debootstrap is missing (apt-get install debootstrap)"
  [ "$(id -u)" -eq 0 ] || die "debootstrap needs root to make $BASE"
  local dir
  dir="$(mktemp -d "${TMPDIR:-/tmp}/ptlm-debootstrap.XXXXXX")"
  say "bootstrapping $BASE: debootstrap --variant=minbase $SUITE from $MIRROR"
  debootstrap --variant=minbase "$SUITE" "$dir/rootfs" "$MIRROR" >"$dir/debootstrap.log" 2>&1 \
    || { tail -20 "$dir/debootstrap.log" >&2; die "debootstrap failed"; }
  local rootfs="$dir/rootfs"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
  # As the official slim images: no docs/man/locales from packages installed later, no apt cache.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/tmp/* \
         "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
  : >"$rootfs/etc/machine-id"
  tar --numeric-owner -C "$rootfs" -c . \
    | "$DOCKER" import --change 'CMD ["bash"]' \
        --message "ptlm docker/build.sh: debootstrap --variant=minbase $SUITE $MIRROR" - "$BASE" >/dev/null
  rm -rf "$dir"
  say "made $BASE locally ($("$DOCKER" image inspect -f '{{.Size}}' "$BASE" | numfmt --to=iec) )"
}

ensure_base() {
  if [ "$BOOTSTRAP" = always ]; then bootstrap_base; return; fi
  if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
    say "base image $BASE: present locally"
    return
  fi
  say "base image $BASE: pulling"
  if "$DOCKER" pull "$BASE" >&2; then return; fi
  [ "$BOOTSTRAP" = never ] && die "cannot pull $BASE (PTLM_BASE_BOOTSTRAP=never)"
  say "cannot pull $BASE (no registry access?): making it locally"
  bootstrap_base
}

# A docker client that builds with BuildKit (needed for the build secret): one with the buildx
# plugin, or a classic client older than 23.0 (BuildKit built in, DOCKER_BUILDKIT=1). The first
# such `docker` on PATH, unless DOCKER names one.
buildkit_client() {
  "$1" buildx version >/dev/null 2>&1 && return 0
  local major
  major=$("$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1) || return 1
  [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null
}
if [ -z "$DOCKER" ]; then
  while read -r candidate; do
    if buildkit_client "$candidate"; then DOCKER="$candidate"; break; fi
  done < <(type -ap docker | awk '!seen[$0]++')
  [ -n "$DOCKER" ] || die "no docker client on PATH can build with BuildKit: install the buildx plugin (docker-buildx), or set DOCKER=/path/to/docker"
  say "docker client: $DOCKER"
fi

SECRET=()
if [ -n "${PTLM_BUILD_CA:-}" ]; then
  [ -s "$PTLM_BUILD_CA" ] || die "PTLM_BUILD_CA=$PTLM_BUILD_CA: not a readable, non-empty file"
  SECRET=(--secret "id=ptlm_ca,src=$PTLM_BUILD_CA")
  say "CA bundle for pip: $PTLM_BUILD_CA (build secret, not stored in the image)"
fi

start=$(date +%s)
ensure_base
say "building $IMAGE from $ROOT"
DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain -f "$ROOT/docker/Dockerfile" -t "$IMAGE" \
  "${SECRET[@]}" "$@" "$ROOT"
end=$(date +%s)

size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
secs=$((end - start))
say "built $IMAGE in ${secs} s ($((secs / 60)) min $((secs % 60)) s)"
say "image size: $size bytes ($(numfmt --to=iec --suffix=B "$size"); $(numfmt --to=si --suffix=B "$size"))"
