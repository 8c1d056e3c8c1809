#!/usr/bin/env bash
# Install what acme's two commands need on a fresh Debian or Ubuntu machine, and say what was
# done: Rust (rustup), a C toolchain, PostgreSQL server binaries, the `postgres` OS user when
# running as root, and the Python environment of the tests' outside parts. Safe to run again:
# anything already present is left as it is. (Not the CI script: `.ci/run` also lints, tests and
# fuzzes.)
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup.sh: run as root or install sudo" >&2; exit 1; }
    SUDO="sudo"
fi
RUST_VERSION="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
VENV="${ACME_VENV:-/var/tmp/acme-venv}"
packages=()

have_postgres() { ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1; }

command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1 || packages+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || packages+=(pkg-config)
command -v curl >/dev/null 2>&1 || packages+=(curl ca-certificates)
have_postgres || packages+=(postgresql-15)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || packages+=(python3 python3-venv)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "== apt-get install ${packages[*]}"
    $SUDO apt-get update -q
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${packages[@]}"; then
        # Distributions without a postgresql-15 package: their default server.
        packages=("${packages[@]/postgresql-15/postgresql}")
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${packages[@]}"
    fi
else
    echo "== system packages: a C toolchain, pkg-config, PostgreSQL and python3-venv are present"
fi
have_postgres && echo "   PostgreSQL server binaries: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tr '\n' ' ')"

if [ "$(id -u)" = "0" ] && ! id postgres >/dev/null 2>&1; then
    # PostgreSQL refuses to run as root: the test harness and the demo run it as this user.
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/sh postgres
    echo "== created the system user postgres (PostgreSQL refuses to run as root)"
fi

version_ok() { [ "$(printf '%s\n%s\n' "$RUST_VERSION" "$1" | sort -V | head -n 1)" = "$RUST_VERSION" ]; }
current="$(rustc --version 2>/dev/null | awk '{print $2}' || true)"
if [ -n "$current" ] && version_ok "$current"; then
    echo "== Rust $current (at least $RUST_VERSION)"
elif command -v rustup >/dev/null 2>&1; then
    echo "== rustup toolchain install $RUST_VERSION (found: ${current:-none})"
    rustup toolchain install "$RUST_VERSION" --profile minimal --component clippy,rustfmt
    rustup default "$RUST_VERSION"
else
    echo "== installing Rust $RUST_VERSION with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --default-toolchain "$RUST_VERSION" --component clippy,rustfmt
    echo "   open a new shell, or run: source \"\$HOME/.cargo/env\""
fi

if "$VENV/bin/python" -c "import duckdb, pyarrow, moto, deltalake" >/dev/null 2>&1 && [ -x "$VENV/bin/moto_server" ]; then
    echo "== Python environment $VENV is complete"
else
    echo "== creating the Python environment $VENV (acme-testkit/python-requirements.txt)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r acme-testkit/python-requirements.txt
fi

cat <<'EOF'
== ready. The two commands:
    cargo run --release --example demo
    cargo test --workspace --all-features
A cold build takes long on few cores (see README, "Prerequisites"); set CARGO_TARGET_DIR to keep
build artefacts outside the clone.
EOF
