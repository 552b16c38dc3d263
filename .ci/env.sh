# Shared by the .ci scripts: where the virtual environments live and how to make them.
# Sourced, not run.  Environments live outside the repository and are reused
# when complete (a stamp holds the hash of the requirements they were made from).

VENVS="${VISUALIZER_VENVS:-$HOME/.cache/visualizer-venvs}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$VENVS"

# python_for VERSION: the interpreter of that minor version: pyenv's first, then one on
# PATH, then one that shared/tools/python-next.sh provisions (native builds from Debian's
# newest suite, kept under $VENVS/pythons) when that script sits beside the clone.  So the
# same CI works where these Pythons come some other way.
SHARED_TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/shared/tools"
python_for() {
    local v="$1" root found
    root="$(pyenv root 2>/dev/null || true)"
    if [ -n "$root" ]; then
        found="$(ls -d "$root"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -n 1)"
        if [ -n "$found" ]; then echo "$found"; return 0; fi
    fi
    if command -v "python$v" >/dev/null; then command -v "python$v"; return 0; fi
    local next="$SHARED_TOOLS/python-next.sh"
    [ -f "$next" ] || return 1
    local log="$VENVS/pythons/provision.log"
    mkdir -p "$VENVS/pythons"
    # Always the whole set: the script replaces its folder with the versions it is asked for.
    local want=" 3.14 3.15 "
    case "$want" in *" $v "*) ;; *) want="$want$v " ;; esac
    # Quiet when it works (instant once provisioned); its log when it does not.
    found="$(bash "$next" "$VENVS/pythons" $want 2>"$log" | grep "/python$v\$")"
    if [ -n "$found" ] && [ -x "$found" ]; then echo "$found"; return 0; fi
    echo "python-next.sh could not provision Python $v:" >&2
    tail -n 20 "$log" >&2
    return 1
}

# ensure_venv NAME PYTHON REQUIREMENTS_FILE: print the venv's path after making it if needed.
ensure_venv() {
    local name="$1" python="$2" reqs="$3"
    local dir="$VENVS/$name"
    local want
    want="$(cat "$reqs" | sha256sum | cut -c1-16)-$("$python" -c 'import sys; print(sys.version.split()[0])')"
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
        echo "$dir"; return 0
    fi
    echo "setting up $name (once; later runs reuse it) ..." >&2
    rm -rf "$dir"
    "$python" -m venv "$dir" >&2
    "$dir/bin/python" -m pip install -q --upgrade pip >&2 2>/dev/null || true
    "$dir/bin/python" -m pip install -q -r "$reqs" >&2 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
        || { echo "setting up $name failed" >&2; return 1; }
    echo "$want" > "$dir/.stamp"
    echo "$dir"
}

# ensure_target NAME PIP REQUIREMENTS_FILE: a folder of packages installed with --no-deps
# by PIP (for PYTHONPATH), made once and reused; prints its path.
ensure_target() {
    local name="$1" pip="$2" reqs="$3"
    local dir="$VENVS/$name"
    local want
    want="$(cat "$reqs" | sha256sum | cut -c1-16)"
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$want" ]; then
        echo "$dir"; return 0
    fi
    echo "setting up $name (once; later runs reuse it) ..." >&2
    rm -rf "$dir"
    "$pip" install -q --no-deps --target "$dir" -r "$reqs" >&2 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) \
        || { echo "setting up $name failed" >&2; return 1; }
    echo "$want" > "$dir/.stamp"
    echo "$dir"
}

# ensure_newest NAME PYTHON: print the path of a venv holding what a user's
# `pip install -U ".[all]"` brings today: every extra of pyproject.toml with all their
# dependencies, at the newest releases inside the extras' ranges (torch as this machine's
# pip allows), plus the test tools of requirements-full.txt (its lines other than torch,
# torchvision, timm and transformers).  Reused while pip, asked to upgrade everything in it
# eagerly, would install nothing; made anew from scratch when any release in it is newer.
# Says on one line why when it cannot be set up (a registry error, a release that cannot
# install), and fails: it never passes on stale packages.  PYTHON must be 3.11 or newer.
ensure_newest() {
    local name="$1" python="$2"
    local dir="$VENVS/$name" reqs="$VENVS/$name.requirements.txt" log="$VENVS/$name.log" n
    "$python" - >"$reqs" <<'EOF' || { echo "$name: cannot read the extras of pyproject.toml" >&2; return 1; }
import re, tomllib
with open("pyproject.toml", "rb") as fh:
    wanted = tomllib.load(fh)["project"]["optional-dependencies"]["all"]
with open(".ci/requirements-full.txt") as fh:
    tools = [line.strip() for line in fh if line.strip() and not line.startswith("#")
             and not re.match(r"(torch|torchvision|timm|transformers)\b", line)]
print("\n".join(sorted(set(wanted)) + tools))
EOF
    if [ -x "$dir/bin/python" ] && [ -f "$dir/.stamp" ] && \
            [ "$(cat "$dir/.stamp")" = "$(sha256sum < "$reqs" | cut -c1-16)" ]; then
        if ! "$dir/bin/python" -m pip install -q --dry-run --upgrade --upgrade-strategy eager \
                --report "$dir/.report.json" -r "$reqs" >"$log" 2>&1; then
            echo "$name: pip could not resolve the newest releases: $(grep -m1 -E '^ERROR' "$log" || tail -n 1 "$log")" >&2
            return 1
        fi
        n="$("$dir/bin/python" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["install"]))' "$dir/.report.json")"
        if [ "$n" = 0 ]; then echo "$dir"; return 0; fi
        echo "$name: $n newer release(s) since it was made; making it anew ..." >&2
    else
        echo "setting up $name (the newest releases; reused until one is newer) ..." >&2
    fi
    rm -rf "$dir"
    if ! { "$python" -m venv "$dir" >"$log" 2>&1 &&
           "$dir/bin/python" -m pip install -q --upgrade pip >>"$log" 2>&1 &&
           "$dir/bin/python" -m pip install -q --upgrade -r "$reqs" >>"$log" 2>&1; }; then
        echo "$name: could not install the newest releases: $(grep -m1 -E '^ERROR' "$log" || tail -n 1 "$log")" >&2
        rm -rf "$dir"
        return 1
    fi
    sha256sum < "$reqs" | cut -c1-16 > "$dir/.stamp"
    echo "$dir"
}

# versions_of PYTHON PACKAGE...: "name version" of each package, on one line.
versions_of() {
    local python="$1"; shift
    "$python" - "$@" <<'EOF'
import importlib.metadata as md, sys
found = []
for name in sys.argv[1:]:
    try:
        found.append("{} {}".format(name, md.version(name)))
    except md.PackageNotFoundError:
        found.append("{} (not installed)".format(name))
print(", ".join(found))
EOF
}
