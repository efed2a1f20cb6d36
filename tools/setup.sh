#!/usr/bin/env bash
# Installs the Debian packages tq's build needs (DESIGN.md "Dependencies"), only those missing.
# Idempotent: a second run installs nothing and says so.
set -euo pipefail

# METEOR data (paraphrase table, synonyms, function words) comes from the pycocoevalcap
# package on the Python package index: tools/setup_meteor.sh, run at the end when present.
pkgs=(cmake ninja-build g++ pkg-config
      libgtest-dev libgmock-dev libbenchmark-dev
      libsentencepiece-dev nlohmann-json3-dev libcli11-dev
      libstb-dev libjpeg62-turbo-dev libsnappy-dev libzstd-dev zlib1g-dev
      fonts-dejavu-core)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

meteor() {
  local here
  here="$(dirname "$0")"
  if [[ -x "$here/setup_meteor.sh" ]]; then "$here/setup_meteor.sh" || echo "setup: METEOR data unavailable (METEOR will be reported as unavailable)"; fi
}

if ((${#missing[@]} == 0)); then
  echo "setup: all build dependencies present"
  meteor
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# Update the package lists once when they are missing or stale (older than a day).
lists=/var/lib/apt/lists
if [[ -z $(find "$lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1) ]]; then
  $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: installed ${missing[*]}"
meteor
