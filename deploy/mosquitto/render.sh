#!/usr/bin/env bash
# Writes a ready Mosquitto configuration for a sortline fleet into one folder: sortline.conf
# from the template next to this script, the ACL from `pki.sh acl`, and copies of the CA
# certificate, the CRL and the broker certificate and key. Run it again after adding devices
# or revoking a certificate, then reload the broker (SIGHUP).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: render.sh [OPTIONS] PKI_DIR INVENTORY OUT_DIR

  --port N          TCP port of the TLS listener (default 8883)
  --bind ADDRESS    listen on this address only (default: every interface)
  --data-dir DIR    persistence folder (default /var/lib/mosquitto)
  --log-file FILE   log file (default /var/log/mosquitto/mosquitto.log)
  --user NAME       user that a broker started as root switches to (default mosquitto)
  --conf-dir DIR    absolute path where the files will be installed on the broker host,
                    written into sortline.conf (default: the absolute path of OUT_DIR)

OUT_DIR receives sortline.conf, acl, ca.crt, ca.crl, broker.crt and broker.key (mode 600).
EOF
}

die() {
  printf 'render.sh: %s\n' "$*" >&2
  exit 1
}

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port=8883
bind_address=""
data_dir=/var/lib/mosquitto
log_file=/var/log/mosquitto/mosquitto.log
user=mosquitto
conf_dir=""

while (($# > 0)); do
  case "$1" in
    --port) port="${2:?--port requires a value}"; shift 2 ;;
    --bind) bind_address="${2:?--bind requires a value}"; shift 2 ;;
    --data-dir) data_dir="${2:?--data-dir requires a value}"; shift 2 ;;
    --log-file) log_file="${2:?--log-file requires a value}"; shift 2 ;;
    --user) user="${2:?--user requires a value}"; shift 2 ;;
    --conf-dir) conf_dir="${2:?--conf-dir requires a value}"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option $(printf '%q' "$1")" ;;
    *) break ;;
  esac
done
(($# == 3)) || { usage >&2; exit 2; }
pki_dir="$1" inventory="$2" out_dir="$3"

[[ "$port" =~ ^[0-9]{1,5}$ ]] && ((port >= 1 && port <= 65535)) || die "invalid port $(printf '%q' "$port"): expected 1 to 65535"
[[ -z "$bind_address" || "$bind_address" =~ ^[0-9A-Za-z.:-]+$ ]] || die "invalid bind address $(printf '%q' "$bind_address")"
[[ "$user" =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "invalid user name $(printf '%q' "$user")"
# Paths end up in the configuration file, where Mosquitto splits values at whitespace.
for path in "$data_dir" "$log_file" "$out_dir" ${conf_dir:+"$conf_dir"}; do
  [[ "$path" =~ ^[A-Za-z0-9._/+-]+$ ]] || die "invalid path $(printf '%q' "$path"): use letters, digits and . _ / + - only"
done
for file in ca.crt ca.crl broker/broker.crt broker/broker.key; do
  [[ -f "$pki_dir/$file" ]] || die "$pki_dir/$file not found: run pki.sh init and pki.sh broker first"
done
[[ -z "$conf_dir" || "$conf_dir" == /* ]] || die "invalid --conf-dir $(printf '%q' "$conf_dir"): expected an absolute path"

mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
conf_dir="${conf_dir:-$out_dir}"
conf_dir="${conf_dir%/}"

# The ACL is written in full before it replaces the old one, so a failed run leaves the
# previous ACL in place.
trap 'rm -f "$out_dir/acl.partial"' EXIT
"$script_dir/../pki.sh" acl "$pki_dir" "$inventory" >"$out_dir/acl.partial"
install -m 644 "$pki_dir/ca.crt" "$out_dir/ca.crt"
install -m 644 "$pki_dir/ca.crl" "$out_dir/ca.crl"
install -m 644 "$pki_dir/broker/broker.crt" "$out_dir/broker.crt"
install -m 600 "$pki_dir/broker/broker.key" "$out_dir/broker.key"
chmod 644 "$out_dir/acl.partial"
mv -f "$out_dir/acl.partial" "$out_dir/acl"

sed -e "s|@PORT@|$port|g" \
  -e "s|@BIND_ADDRESS@|$bind_address|g" \
  -e "s|@CONF_DIR@|$conf_dir|g" \
  -e "s|@DATA_DIR@|${data_dir%/}|g" \
  -e "s|@LOG_FILE@|$log_file|g" \
  -e "s|@USER@|$user|g" \
  -e 's|[[:space:]]*$||' \
  "$script_dir/sortline.conf" >"$out_dir/sortline.conf"

echo "wrote $out_dir/sortline.conf, the ACL and the certificates for installation in $conf_dir"
