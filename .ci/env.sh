# Shared by the .ci scripts: where the virtual environments live and how to make them.
# Sourced, not run.  Environments live outside the repository and are reused
# when complete (a stamp holds the hash of the requirements they were made from).

VENVS="${VISUALIZER_VENVS:-$HOME/.cache/visualizer-venvs}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$VENVS"

# python_for VERSION: the interpreter of that minor version (pyenv first, then PATH).
python_for() {
    local v="$1" root
    root="$(pyenv root 2>/dev/null || true)"
    if [ -n "$root" ]; then
        local found
        found="$(ls -d "$root"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -n 1)"
        if [ -n "$found" ]; then echo "$found"; return 0; fi
    fi
    command -v "python$v" || return 1
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
    "$dir/bin/python" -m pip install -q -r "$reqs" >&2 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
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
    "$pip" install -q --no-deps --target "$dir" -r "$reqs" >&2 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" > "$dir/.stamp"
    echo "$dir"
}
