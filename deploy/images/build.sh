#!/usr/bin/env bash
# deploy/images/build.sh ROLE BINARY VERSION REVISION SOURCE
# Builds the image easguard/ROLE:latest (and :VERSION) FROM scratch, with a
# build context of only BINARY, the probe (bin/tools/probe, or $PROBE: the
# health-check command, since the image has no shell), the CA certificates
# and a passwd line.
set -euo pipefail
role=$1 binary=$2 version=$3 revision=$4 source=$5
here=$(cd "$(dirname "$0")" && pwd)
ctx=bin/images/$role
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/usr/local/bin" "$ctx/data"
name=$(basename "$binary")
cp "$binary" "$ctx/rootfs/usr/local/bin/$name"
probe=${PROBE:-bin/tools/probe}
[ -x "$probe" ] || { echo "images: no probe at $probe (make tools)" >&2; exit 1; }
cp "$probe" "$ctx/rootfs/usr/local/bin/probe"
if [ "$(od -An -c -N4 "$binary" | tr -d ' ')" != '177ELF' ]; then
	echo "images: $binary is not an ELF binary" >&2
	exit 1
fi
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -r "$ca" ] || { echo "images: no CA bundle at $ca (Debian: ca-certificates)" >&2; exit 1; }
cp "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/var/lib/easguard:/sbin/nologin\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ctx/rootfs/etc/group"
touch "$ctx/data/.keep"
sed "s/@BINARY@/$name/g" "$here/Dockerfile.in" >"$ctx/Dockerfile"
tag=easguard/$role
# The build's output only when it fails (the legacy builder's deprecation
# notice on every build says nothing about the image).
if ! log=$(docker build -q -t "$tag:latest" -t "$tag:${version//[^A-Za-z0-9_.-]/_}" \
	--build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg SOURCE="$source" \
	--build-arg TITLE="$role" "$ctx" 2>&1); then
	echo "$log" >&2
	echo "images: docker build of $tag failed" >&2
	exit 1
fi
echo "images: $tag:latest $(docker image inspect -f '{{.Size}}' "$tag:latest" | awk '{printf "%.1f MB", $1/1e6}') ($version)"
