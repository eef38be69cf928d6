#!/usr/bin/env bash
# Copies the Hadoop daemons' jars (tests/hadoop/pom.xml, pinned) into build/hadoop/lib from Maven
# Central, through the local Maven cache. Idempotent: a stamp records the pom's hash.
set -euo pipefail
pom=tests/hadoop/pom.xml
lib=build/hadoop/lib
stamp=build/hadoop/.stamp
want=$(sha256sum "$pom" scripts/fetch-hadoop.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "fetch-hadoop: $lib is up to date"
  exit 0
fi
rm -rf "$lib.tmp"
mvn -q -B -f "$pom" dependency:copy-dependencies -DoutputDirectory="$(pwd)/$lib.tmp"
rm -rf "$lib"
mv "$lib.tmp" "$lib"
echo "$want" > "$stamp"
echo "fetch-hadoop: $(ls "$lib" | wc -l) jars in $lib"
