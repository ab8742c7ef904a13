#!/usr/bin/env bash
# Installs what building and testing Troupe needs, when it is missing:
# clang + libclang-dev (the rocksdb crate's bindgen and C++ build),
# postgresql (a throwaway server for the PostgreSQL journal's tests), mdbook,
# Node.js and the MCP servers the MCP client is tested against (tests/mcp,
# pinned with their hashes in package-lock.json), and the LiteLLM proxy the
# structured-output tests run against (tests/litellm, pinned with hashes in
# requirements.txt).
set -euo pipefail

MDBOOK_VERSION="0.5.4"

# apt_install WHY NEED PACKAGE...: installs Debian packages as root, or says
# how to and stops ("installing PACKAGES (WHY)"; "NEED. Install them with:").
apt_install() {
    local why="$1" need="$2"
    shift 2
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $* ($why)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "$need. Install them with:" >&2
        echo "    sudo apt-get install -y $*" >&2
        exit 1
    fi
}

have_libclang() {
    command -v clang >/dev/null 2>&1 && dpkg -s libclang-dev >/dev/null 2>&1
}

if ! have_libclang; then
    apt_install "needed to build RocksDB" "RocksDB needs clang and libclang-dev" clang libclang-dev
fi

have_postgres() {
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! have_postgres; then
    apt_install "the PostgreSQL journal's tests start a throwaway server" \
        "The PostgreSQL journal's tests need PostgreSQL" postgresql
    # Only the binaries are needed: no cluster runs as a service.
    if command -v pg_lsclusters >/dev/null 2>&1; then
        pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
            pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
        done
    fi
fi

for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done

if ! command -v mdbook >/dev/null 2>&1; then
    echo "installing mdbook ${MDBOOK_VERSION} (builds the guide)"
    cargo install --locked mdbook --version "${MDBOOK_VERSION}" --no-default-features --features search
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install "the MCP reference servers the tests run" "The MCP tests need Node.js and npm" nodejs npm
fi

# The reference MCP server, exactly as package-lock.json pins it; again only
# when the lock changed since the last install.
mcp_dir="$(dirname "$0")/../tests/mcp"
if ! cmp -s "$mcp_dir/package-lock.json" "$mcp_dir/node_modules/.installed-lock.json" 2>/dev/null; then
    echo "installing the MCP reference server (npm ci in tests/mcp)"
    npm ci --prefix "$mcp_dir" --no-audit --no-fund --loglevel=error >/dev/null
    cp "$mcp_dir/package-lock.json" "$mcp_dir/node_modules/.installed-lock.json"
fi

if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
    apt_install "the LiteLLM proxy the tests run" \
        "The structured-output tests need Python 3 with venv" python3 python3-venv
fi

# The LiteLLM proxy, exactly as requirements.txt pins it (every package with
# its hashes), in a virtual environment of its own; again only when the pins
# changed since the last install.
llm_dir="$(dirname "$0")/../tests/litellm"
if ! cmp -s "$llm_dir/requirements.txt" "$llm_dir/.venv/.installed-requirements.txt" 2>/dev/null; then
    echo "installing the LiteLLM proxy (pip in tests/litellm/.venv; a minute or two)"
    rm -rf "$llm_dir/.venv"
    python3 -m venv "$llm_dir/.venv"
    "$llm_dir/.venv/bin/pip" install -q --disable-pip-version-check --no-input \
        --require-hashes -r "$llm_dir/requirements.txt"
    cp "$llm_dir/requirements.txt" "$llm_dir/.venv/.installed-requirements.txt"
fi
