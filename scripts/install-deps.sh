#!/usr/bin/env bash
# Installs what building and testing Troupe needs, when it is missing:
# clang + libclang-dev (the rocksdb crate's bindgen and C++ build),
# postgresql (a throwaway server for the PostgreSQL journal's tests) and mdbook.
set -euo pipefail

MDBOOK_VERSION="0.5.4"

have_libclang() {
    command -v clang >/dev/null 2>&1 && dpkg -s libclang-dev >/dev/null 2>&1
}

if ! have_libclang; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing clang and libclang-dev (needed to build RocksDB)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev >/dev/null
    else
        echo "RocksDB needs clang and libclang-dev. Install them with:" >&2
        echo "    sudo apt-get install -y clang libclang-dev" >&2
        exit 1
    fi
fi

have_postgres() {
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

if ! have_postgres; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing postgresql (the PostgreSQL journal's tests start a throwaway server)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        # Only the binaries are needed: no cluster runs as a service.
        if command -v pg_lsclusters >/dev/null 2>&1; then
            pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
                pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
            done
        fi
    else
        echo "The PostgreSQL journal's tests need PostgreSQL. Install it with:" >&2
        echo "    sudo apt-get install -y postgresql" >&2
        exit 1
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
