#!/usr/bin/env bash
# The package as a user installs it: `pip install .` (then `pip install -e .`) in a fresh virtual
# environment, used from another folder: `import schp`, every console command's --help and --version,
# the installed default checkpoint folder, and no generic top-level name (datasets, utils, networks)
# in site-packages, where it would shadow Hugging Face `datasets` and others.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet torch==2.14.1   # the release this machine has on disk, as in .ci/run
commands="schp-extract schp-train schp-evaluate schp-export schp-multi-person schp-serve"
check() {  # $1: where schp must be imported from
    cd "$work"   # not the checkout: only the installed package can be found
    "$py" -c "import schp; assert schp.__file__.startswith('$1'), schp.__file__; print('import schp:', schp.__version__)"
    for c in $commands; do
        "$work/venv/bin/$c" --help > /dev/null
        "$work/venv/bin/$c" --version
    done
    [ "$1" = "$repo/schp/" ] && { cd "$repo"; return; }  # editable: the checkout's checkpoints/ is the default
    env -u SCHP_CHECKPOINT_DIR HOME="$work/home" XDG_CACHE_HOME= "$py" -c "
from pathlib import Path
from schp.checkpoint import default_checkpoint_dir
assert default_checkpoint_dir() == Path('$work/home/.cache/schp/checkpoints'), default_checkpoint_dir()"
    SCHP_CHECKPOINT_DIR="$work/mine" "$py" -c "
from schp.checkpoint import default_checkpoint_dir; assert str(default_checkpoint_dir()) == '$work/mine'"
    cd "$repo"
}
"$py" -m pip install --quiet "$repo"
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
generic=$(ls "$site" | grep -E '^(datasets|utils|networks)(\.py)?$' || true)
[ -z "$generic" ] || { echo "install check: generic top-level names in site-packages: $generic"; exit 1; }
for top in $(cat "$site"/schp-*.dist-info/top_level.txt 2>/dev/null || echo schp); do
    [ "$top" = schp ] || { echo "install check: top-level package $top installed"; exit 1; }
done
check "$site/schp/"
[ -f "$site/schp/service/static/index.html" ] || { echo "install check: the service page is not installed"; exit 1; }
"$py" -m pip uninstall --quiet --yes schp
"$py" -m pip install --quiet -e "$repo"
check "$repo/schp/"
echo "install check: pip install . and pip install -e . give import schp and $(echo $commands | wc -w) commands"
