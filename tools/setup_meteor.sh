#!/usr/bin/env bash
# METEOR 1.5 data for `paligemma score`: the English function words, nonbreaking prefixes, WordNet
# synonyms (inside meteor-1.5.jar) and the paraphrase table (data/paraphrase-en.gz), taken from the
# pycocoevalcap 1.2 wheel on PyPI — the same files pycocoevalcap's METEOR runs with.
# Destination (outside git): $1, else $XDG_DATA_HOME/tq/meteor, else ~/.local/share/tq/meteor,
# which is where the scorer looks by default. Idempotent and quiet when the data is present.
set -euo pipefail

dest="${1:-${XDG_DATA_HOME:-$HOME/.local/share}/tq/meteor}"
files=(function/english.words nonbreaking/english.prefixes synonym/english.exceptions
       synonym/english.synsets data/paraphrase-en.gz)

present=1
for f in "${files[@]}"; do [[ -s "$dest/$f" ]] || present=0; done
((present)) && exit 0

command -v python3 >/dev/null || { echo "setup_meteor: python3 is needed to fetch the data" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "setup_meteor: downloading pycocoevalcap 1.2 (about 100 MB) for the METEOR data"
python3 -m pip download --no-deps --only-binary=:all: -q -d "$tmp" "pycocoevalcap==1.2"
wheel="$(ls "$tmp"/pycocoevalcap-*.whl)"

mkdir -p "$dest"
python3 - "$wheel" "$tmp/out" <<'PY'
import io, os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
inside_jar = ["function/english.words", "nonbreaking/english.prefixes",
              "synonym/english.exceptions", "synonym/english.synsets"]
def put(name, data):
    path = os.path.join(out, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
with zipfile.ZipFile(wheel) as w:
    put("data/paraphrase-en.gz", w.read("pycocoevalcap/meteor/data/paraphrase-en.gz"))
    with zipfile.ZipFile(io.BytesIO(w.read("pycocoevalcap/meteor/meteor-1.5.jar"))) as jar:
        for name in inside_jar:
            put(name, jar.read(name))
PY
# Move into place file by file so a concurrent reader never sees a partial file.
for f in "${files[@]}"; do
  mkdir -p "$(dirname "$dest/$f")"
  mv -f "$tmp/out/$f" "$dest/$f"
done
echo "setup_meteor: METEOR data in $dest"
