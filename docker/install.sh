#!/usr/bin/env bash
# llmgw installer: writes docker/.env and docker/config/users.json, then (unless --no-start) starts the
# compose stack.  Run it from a checkout; it fetches nothing and pipes nothing into a shell.
#
#   docker/install.sh                                   # asks for what it needs
#   docker/install.sh --non-interactive --upstream http://host.docker.internal:8080 \
#       --user alice --max-concurrent auto --tunnel-token "$TOKEN" [--no-start] [--dir DIR] [--force]
#
# Idempotent: an existing .env or user is kept (use --force to rewrite .env).  JSON is written by Python.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="$here"
upstream=""
max_concurrent=""
tunnel_token=""
user=""
interactive=1
start=1
force=0

die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --upstream) upstream="${2:?--upstream needs a URL}"; shift 2 ;;
    --max-concurrent) max_concurrent="${2:?--max-concurrent needs a number}"; shift 2 ;;
    --tunnel-token) tunnel_token="${2:?--tunnel-token needs a value}"; shift 2 ;;
    --user) user="${2:?--user needs a name}"; shift 2 ;;
    --dir) dir="${2:?--dir needs a folder}"; shift 2 ;;
    --non-interactive) interactive=0; shift ;;
    --no-start) start=0; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

command -v python3 >/dev/null || die "python3 is needed to write JSON safely"

ask() {  # ask VAR "question" DEFAULT
  local answer
  if [ "$interactive" = 1 ] && [ -z "${!1}" ]; then
    read -r -p "$2 [$3]: " answer
    printf -v "$1" '%s' "${answer:-$3}"
  elif [ -z "${!1}" ]; then
    printf -v "$1" '%s' "$3"
  fi
}

ask upstream "Upstream URL (the llama.cpp server, as the container reaches it)" "http://host.docker.internal:8080"
ask max_concurrent "Generations at once per upstream ('auto': llama.cpp's slots)" "auto"
ask user "First user name" "admin"
if [ "$interactive" = 1 ] && [ -z "$tunnel_token" ]; then
  read -r -s -p "Cloudflare tunnel token (empty: LAN only): " tunnel_token; echo
fi

# validate
python3 - "$upstream" <<'PY' || die "invalid --upstream: $upstream (http:// or https:// URLs with a host, comma separated, each optionally #slots=N)"
import re
import sys
from urllib.parse import urlsplit
urls = [u for u in sys.argv[1].replace(",", " ").split() if u]
ok = bool(urls)
for url in urls:
    parts = urlsplit(url)
    ok = ok and parts.scheme in ("http", "https") and bool(parts.hostname)
    ok = ok and (not parts.fragment or re.fullmatch(r"slots=[1-9][0-9]*", parts.fragment) is not None)
sys.exit(0 if ok else 1)
PY
[[ "$max_concurrent" =~ ^([1-9][0-9]*|auto)$ ]] || die "invalid --max-concurrent: $max_concurrent (auto, or a whole number >= 1)"
[[ "$user" =~ ^[A-Za-z0-9._@-]{1,64}$ ]] || die "invalid --user: $user (letters, digits, . _ @ -)"
[[ "$tunnel_token" =~ ^[A-Za-z0-9._=+/-]*$ ]] || die "the tunnel token has unexpected characters"

mkdir -p "$dir/config"
env_file="$dir/.env"
if [ -e "$env_file" ] && [ "$force" = 0 ]; then
  echo "keeping existing $env_file (--force to rewrite it)"
  # a .env from before cloudflared became a compose profile: the tunnel runs only if it has a token
  if ! grep -q '^COMPOSE_PROFILES=' "$env_file"; then
    if grep -q '^TUNNEL_TOKEN=..*' "$env_file"; then profiles=tunnel; else profiles=""; fi
    echo "COMPOSE_PROFILES=$profiles" >> "$env_file"
    echo "added COMPOSE_PROFILES=$profiles to $env_file"
  fi
else
  umask 077
  {
    echo "UPSTREAM_URL=$upstream"
    echo "UPSTREAM_API_KEY="
    echo "MAX_CONCURRENT=$max_concurrent"
    echo "MAX_QUEUE=100"
    echo "METRICS_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
    echo "LISTEN=tcp:8000"
    echo "LAN_PORT=8000"
    echo "LAN_TLS_PORT=8443"
    echo "USAGE_DB=/data/llmgw-usage.sqlite3"
    echo "POSTGRES_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
    echo "STATE_URL="
    echo "CLUSTER=llmgw"
    echo "LAN_PORT_2=8001"
    echo "TUNNEL_TOKEN=$tunnel_token"
    if [ -n "$tunnel_token" ]; then echo "COMPOSE_PROFILES=tunnel"; else echo "COMPOSE_PROFILES="; fi
  } > "$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
  echo "wrote $env_file"
fi

# users.json: add the user with a new key, stored as its sha256; an existing user is left alone
python3 - "$dir/config/users.json" "$user" <<'PY'
import hashlib, json, os, secrets, sys, tempfile
path, user = sys.argv[1], sys.argv[2]
doc = {"users": {}}
if os.path.exists(path):
    with open(path) as f:
        doc = json.load(f)
    if "users" not in doc or not isinstance(doc["users"], dict):  # the original {"key": "user"} form
        doc = {"users": {name: {"keys": [k for k, n in doc.items() if n == name]} for name in set(doc.values())}}
if user in doc["users"]:
    print(f"user {user} already exists in {path}; keeping it")
    sys.exit(0)
key = "sk-" + secrets.token_urlsafe(32)
doc["users"][user] = {"keys": ["sha256:" + hashlib.sha256(key.encode()).hexdigest()]}
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".")
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, path)
print(f"added user {user}; their key (shown once): {key}")
PY

if [ "$start" = 1 ]; then
  [ "$dir" = "$here" ] || die "--dir is for --no-start only: compose.yaml mounts $here/config"
  command -v docker >/dev/null || die "docker is not installed; start later with: docker compose -f $dir/compose.yaml up -d --build"
  docker compose -f "$here/compose.yaml" --env-file "$env_file" up -d --build --remove-orphans
fi
