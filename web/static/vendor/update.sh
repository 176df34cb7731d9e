#!/bin/sh
# Vendors uPlot (the Money page's charts) from the npm registry: the pinned release's tarball,
# checked against its sha256 before anything is copied, then its minified build, stylesheet and
# licence into this folder. The files are committed: the Debian package builds offline and the
# site may have no internet. To update: change VERSION and TARBALL_SHA256 (`npm pack uplot@X`,
# `sha256sum`), run this, look at the diff, run tests/test_technician_page.py.
set -eu
VERSION=1.6.32
TARBALL_SHA256=4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d

here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "uplot@$VERSION" >/dev/null)
echo "$TARBALL_SHA256  $tmp/uplot-$VERSION.tgz" | sha256sum -c --quiet -
tar -xzf "$tmp/uplot-$VERSION.tgz" -C "$tmp"
cp "$tmp/package/dist/uPlot.iife.min.js" "$here/uPlot.iife.min.js"
cp "$tmp/package/dist/uPlot.min.css" "$here/uPlot.min.css"
cp "$tmp/package/LICENSE" "$here/uPlot.LICENSE"
(cd "$here" && sha256sum uPlot.iife.min.js uPlot.min.css uPlot.LICENSE > SHA256SUMS)
echo "uPlot $VERSION vendored into $here"
