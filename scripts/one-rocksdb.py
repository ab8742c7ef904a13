#!/usr/bin/env python3
"""Checks that every cargo command `make demo`, `make test` and `make bench`
run shares one RocksDB build (about 30 minutes on 2 cores each).

RocksDB's build script output depends on the cargo profile, on the
features of librocksdb-sys and of everything its build script is built
from (bindgen, cc, regex...), and on their profiles. Cargo's unit graph
(`--unit-graph`, read with `__CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS`
so that a stable toolchain prints it) lists exactly those: this script
collects them for each command and fails, showing the difference, when
two commands would build RocksDB differently. Nothing is built.
"""
import hashlib
import json
import os
import subprocess
import sys

COMMANDS = [
    "build --release --example support_desk",
    "clippy --release --workspace --all-targets",
    "test --release --workspace --no-run",
    "build --release --examples",
    "build --release --workspace --examples",
    "bench --no-run",
    "clippy --release -p troupe --features cluster --lib --test cluster",
    "test --release -p troupe --features cluster --lib --test cluster --no-run",
    "build --release -p troupe_cli",
    "build --release -p troupe_cli --features cluster",
]


def rocksdb_inputs(command):
    env = dict(os.environ, __CARGO_TEST_CHANNEL_OVERRIDE_DO_NOT_USE_THIS="nightly")
    cargo = os.environ.get("CARGO", "cargo")
    out = subprocess.run(
        [cargo] + command.split() + ["--unit-graph", "-Z", "unstable-options"],
        env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        sys.exit(f"one-rocksdb: `cargo {command} --unit-graph` failed:\n{out.stderr}")
    units = json.loads(out.stdout)["units"]
    seen = set()

    def walk(i):
        u = units[i]
        p = u["profile"]
        prof = {k: p.get(k) for k in (
            "opt_level", "debuginfo", "debug_assertions", "overflow_checks",
            "codegen_units", "incremental", "strip", "lto", "panic")}
        line = "%s %s %s [%s] %s" % (
            u["pkg_id"].split("#")[-1], u["target"]["name"], u["mode"],
            ",".join(sorted(u["features"])), json.dumps(prof, sort_keys=True))
        if line in seen:
            return
        seen.add(line)
        for d in u["dependencies"]:
            walk(d["index"])

    roots = [i for i, u in enumerate(units)
             if "librocksdb-sys" in u["pkg_id"] and u["mode"] == "run-custom-build"]
    if len(roots) != 1:
        sys.exit(f"one-rocksdb: `cargo {command}` has {len(roots)} RocksDB build runs")
    walk(roots[0])
    return sorted(seen)


def main():
    first = None
    for command in COMMANDS:
        inputs = rocksdb_inputs(command)
        digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:12]
        print(f"one-rocksdb: {digest}  cargo {command}")
        if first is None:
            first = (command, inputs)
        elif inputs != first[1]:
            a, b = set(first[1]), set(inputs)
            print(f"one-rocksdb: `cargo {command}` would build RocksDB again; "
                  f"its build inputs differ from `cargo {first[0]}`:", file=sys.stderr)
            for line in sorted(a - b):
                print(f"  - {line}", file=sys.stderr)
            for line in sorted(b - a):
                print(f"  + {line}", file=sys.stderr)
            sys.exit(1)
    print("one-rocksdb: every command shares one RocksDB build")


if __name__ == "__main__":
    main()
