#!/usr/bin/env bash
# Installs the external tools the tests and benchmarks need, if they are missing.
# Idempotent: a second run with everything present installs nothing and touches no network.
#
#   apt (needs root or sudo):  haproxy nghttp2-client etcd-server etcd-client chromium valgrind
#                              (chromium: the admin page test renders it headless;
#                              valgrind: loadtest.instructions runs the proxies under callgrind)
#   go install into .tools/bin: h2spec, ghz, grpcurl, interop_client, interop_server (grpc-go interop)
#   npm install into .tools/npm: grpc-web (the browser test's gRPC-Web client; needs apt's npm)
#
# Never fails just because a tool cannot be installed: it says what is missing and goes on;
# the tests that need a missing tool skip locally and fail under CI (see tests/tools.py).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_BIN="$ROOT/.tools/bin"
mkdir -p "$TOOLS_BIN"

# grpc-go release whose interop client/server we build. v1.85.0 needs Go >= 1.26;
# the fallback builds with Go >= 1.22.
GRPC_GO_VERSION="${GRPC_GO_VERSION:-v1.85.0}"
GRPC_GO_FALLBACK_VERSION="v1.70.0"
H2SPEC_PKG="github.com/summerwind/h2spec/cmd/h2spec@latest"
GHZ_PKG="github.com/bojand/ghz/cmd/ghz@latest"
GRPCURL_PKG="github.com/fullstorydev/grpcurl/cmd/grpcurl@latest"

APT_PACKAGES=(haproxy nghttp2-client etcd-server etcd-client chromium valgrind curl)
# npm from apt only where there is none (a machine may have Node.js from elsewhere, whose npm
# Debian's package would conflict with).
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(npm)
# The gRPC-Web client library the browser test loads (tests/grpcweb/test_browser.py).
GRPC_WEB_NPM_VERSION="${GRPC_WEB_NPM_VERSION:-2.1.1}"

missing_report=()

log() { echo "install-tools: $*"; }

# ---------------------------------------------------------------- apt packages
apt_missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        apt_missing+=("$pkg")
    fi
done

if ((${#apt_missing[@]} == 0)); then
    log "apt packages present: ${APT_PACKAGES[*]}"
elif ! command -v apt-get >/dev/null 2>&1; then
    log "no apt-get here; missing packages: ${apt_missing[*]}"
    missing_report+=("${apt_missing[@]}")
else
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n)
        else
            SUDO=(none)
        fi
    fi
    if [[ "${SUDO[*]}" == "none" ]]; then
        log "not root and no passwordless sudo; please install: ${apt_missing[*]}"
        missing_report+=("${apt_missing[@]}")
    else
        log "installing apt packages: ${apt_missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if "${SUDO[@]}" apt-get update -q \
            && "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${apt_missing[@]}" </dev/null; then
            log "apt packages installed"
        else
            log "apt-get failed; missing packages: ${apt_missing[*]}"
            missing_report+=("${apt_missing[@]}")
        fi
    fi
fi

# ---------------------------------------------------------------- Go tools
GO=""
if command -v go >/dev/null 2>&1; then
    GO="$(command -v go)"
elif [[ -x /usr/local/go/bin/go ]]; then
    GO=/usr/local/go/bin/go
fi

# go_install NAME PKG...: installs PKG (one or more candidates, first that works wins)
# into .tools/bin unless .tools/bin/NAME already exists.
go_install() {
    local name="$1"
    shift
    if [[ -x "$TOOLS_BIN/$name" ]]; then
        log "$name present"
        return 0
    fi
    local pkg
    for pkg in "$@"; do
        log "go install $pkg"
        # GOTOOLCHAIN=local: never download another Go toolchain; fall back instead.
        if GOBIN="$TOOLS_BIN" GOTOOLCHAIN=local "$GO" install "$pkg"; then
            return 0
        fi
        log "go install $pkg failed"
    done
    return 1
}

# go_install_interop: builds grpc-go's interop client and server and names them
# interop_client / interop_server (go install names them `client` and `server`).
go_install_interop() {
    local built=""
    [[ -f "$TOOLS_BIN/.interop-version" ]] && built="$(cat "$TOOLS_BIN/.interop-version")"
    if [[ -x "$TOOLS_BIN/interop_client" && -x "$TOOLS_BIN/interop_server" ]] &&
        [[ "$built" == "$GRPC_GO_VERSION" || "$built" == "$GRPC_GO_FALLBACK_VERSION" ]]; then
        log "interop_client and interop_server present (grpc-go $built)"
        return 0
    fi
    local version tmp
    for version in "$GRPC_GO_VERSION" "$GRPC_GO_FALLBACK_VERSION"; do
        tmp="$(mktemp -d)"
        log "go install google.golang.org/grpc/interop/{client,server}@$version"
        if GOBIN="$tmp" GOTOOLCHAIN=local "$GO" install \
            "google.golang.org/grpc/interop/client@$version" \
            "google.golang.org/grpc/interop/server@$version"; then
            mv -f "$tmp/client" "$TOOLS_BIN/interop_client"
            mv -f "$tmp/server" "$TOOLS_BIN/interop_server"
            echo "$version" >"$TOOLS_BIN/.interop-version"
            rm -rf "$tmp"
            return 0
        fi
        rm -rf "$tmp"
        log "grpc-go interop $version failed to build"
    done
    return 1
}

if [[ -z "$GO" ]]; then
    log "Go is not installed: skipping h2spec, ghz, grpcurl, interop_client, interop_server"
    for t in h2spec ghz grpcurl interop_client interop_server; do
        [[ -x "$TOOLS_BIN/$t" ]] || missing_report+=("$t")
    done
else
    go_install h2spec "$H2SPEC_PKG" || missing_report+=(h2spec)
    go_install ghz "$GHZ_PKG" || missing_report+=(ghz)
    go_install grpcurl "$GRPCURL_PKG" || missing_report+=(grpcurl)
    go_install_interop || missing_report+=(interop_client interop_server)
fi

# ---------------------------------------------------------------- npm packages
NPM_DIR="$ROOT/.tools/npm"
if [[ -f "$NPM_DIR/node_modules/grpc-web/package.json" ]] &&
    grep -q "\"version\": \"$GRPC_WEB_NPM_VERSION\"" "$NPM_DIR/node_modules/grpc-web/package.json"; then
    log "grpc-web $GRPC_WEB_NPM_VERSION (npm) present"
elif ! command -v npm >/dev/null 2>&1; then
    log "no npm: skipping grpc-web (npm)"
    missing_report+=(grpc-web)
else
    mkdir -p "$NPM_DIR"
    log "npm install grpc-web@$GRPC_WEB_NPM_VERSION into $NPM_DIR"
    if ! npm install --prefix "$NPM_DIR" --no-audit --no-fund --no-save \
        "grpc-web@$GRPC_WEB_NPM_VERSION" </dev/null; then
        log "npm install grpc-web failed"
        missing_report+=(grpc-web)
    fi
fi

if ((${#missing_report[@]} > 0)); then
    log "STILL MISSING: ${missing_report[*]} (tests needing them skip locally, fail under CI)"
else
    log "all tools present"
fi
exit 0
