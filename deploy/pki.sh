#!/usr/bin/env bash
# Private certificate authority and Mosquitto ACL for a sortline fleet, built with openssl only.
# Run `deploy/pki.sh help` for the commands. deploy/README.md describes the whole setup.
#
# Layout of the PKI folder:
#   ca.crt, ca.crl                      CA certificate and revocation list (public)
#   private/ca.key                      CA key (mode 600)
#   db/                                 openssl ca database: index.txt, serial, crlnumber, openssl.cnf
#   broker/broker.{crt,key}             broker server certificate
#   trainer/trainer.{crt,key}           trainer client certificate, CN "trainer"
#   observers/SITE/observer.{crt,key}   read-only decision reader of one site, CN "observer:SITE"
#   devices/SITE/DEVICE/device.{crt,key} edge device, CN "SITE/DEVICE"
#   revoked/                            files of revoked certificates, one folder per certificate
#
# Site and device names may contain '.', so "SITE.DEVICE" would be ambiguous ("a.b" + "c" and
# "a" + "b.c"). The device CN joins them with '/', which names never contain, and the trainer and
# observer CNs contain no '/', so no two identities can share a CN.
set -euo pipefail

readonly NAME_PATTERN='^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'
readonly TOPIC_ROOT='sortline/v1'
readonly TRAINER_CN='trainer'
readonly CA_DAYS=3650
# Validity of new broker, device, trainer and observer certificates, in days.
CERT_DAYS="${SORTLINE_PKI_CERT_DAYS:-825}"
# The broker rejects every client certificate once the CRL is past its next update date, so
# `pki.sh crl DIR` must run again (and the broker reload) before this many days pass.
CRL_DAYS="${SORTLINE_PKI_CRL_DAYS:-365}"

umask 077

usage() {
  cat <<'EOF'
Usage: pki.sh COMMAND DIR [ARGS]

  init DIR                        create the CA in DIR (ECDSA P-256, valid 10 years)
  broker DIR HOSTNAME [NAME|IP...] issue the broker certificate; every argument becomes a
                                  subjectAltName (DNS for names, IP for addresses)
  device DIR SITE DEVICE          issue a device certificate, CN "SITE/DEVICE"
  fleet DIR INVENTORY             issue a device certificate for every "SITE DEVICE" line
  trainer DIR                     issue the trainer certificate, CN "trainer"
  observer DIR SITE               issue a read-only certificate for the decisions of SITE,
                                  CN "observer:SITE"
  acl DIR INVENTORY               print the Mosquitto ACL for the inventory on stdout
  revoke DIR device SITE DEVICE   revoke a certificate, move its files to DIR/revoked/ and
  revoke DIR observer SITE        rewrite DIR/ca.crl; issuing again creates a new key
  revoke DIR trainer
  crl DIR                         rewrite DIR/ca.crl (run before its next update date)

Commands never overwrite an existing key or certificate and never print a private key.
Names match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$. INVENTORY has one "SITE DEVICE" pair per
line; blank lines and lines starting with '#' are ignored.

Environment: SORTLINE_PKI_CERT_DAYS (default 825) sets the validity of new certificates,
SORTLINE_PKI_CRL_DAYS (default 365) the time until the CRL's next update.
EOF
}

die() {
  printf 'pki.sh: %s\n' "$*" >&2
  exit 1
}

check_name() {
  local kind="$1" value="$2"
  if [[ ! "$value" =~ $NAME_PATTERN ]]; then
    die "invalid $kind name $(printf '%q' "$value"): use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
  fi
}

check_days() {
  local variable="$1" value="$2"
  [[ "$value" =~ ^[1-9][0-9]{0,4}$ ]] || die "invalid $variable $(printf '%q' "$value"): expected a number of days"
}

# Runs openssl with its output captured, so a failure shows openssl's message and a success
# prints nothing. openssl never writes a private key to these streams because every key
# goes to a file given with -out.
run_openssl() {
  local output
  if ! output="$(openssl "$@" 2>&1)"; then
    printf '%s\n' "$output" >&2
    die "openssl $1 failed"
  fi
}

# Points the openssl configuration at the PKI folder. SORTLINE_PKI_SAN is set for every
# command because openssl expands ${ENV::...} in all sections when it loads the file.
use_pki() {
  local dir="$1"
  [[ -f "$dir/ca.crt" && -f "$dir/private/ca.key" && -f "$dir/db/openssl.cnf" ]] \
    || die "no CA in $dir: run 'pki.sh init $dir' first"
  SORTLINE_PKI_DIR="$(cd "$dir" && pwd)"
  export SORTLINE_PKI_DIR
  export SORTLINE_PKI_SAN="DNS:unused.invalid"
}

write_ca_config() {
  local file="$1"
  cat >"$file" <<EOF
# openssl ca configuration written by pki.sh init. pki.sh sets SORTLINE_PKI_DIR to the PKI
# folder and SORTLINE_PKI_SAN to the broker's subjectAltName before each openssl call.
[ ca ]
default_ca = sortline_ca

[ sortline_ca ]
dir              = \${ENV::SORTLINE_PKI_DIR}
database         = \$dir/db/index.txt
new_certs_dir    = \$dir/db/certs
serial           = \$dir/db/serial
crlnumber        = \$dir/db/crlnumber
certificate      = \$dir/ca.crt
private_key      = \$dir/private/ca.key
default_md       = sha256
default_days     = 825
default_crl_days = 365
policy           = policy_cn_only
# Revoking a device and issuing it again reuses its subject.
unique_subject   = no
copy_extensions  = none
email_in_dn      = no

[ policy_cn_only ]
commonName = supplied

[ req ]
distinguished_name = req_dn
prompt             = no

[ req_dn ]
CN = sortline fleet CA

[ ext_ca ]
basicConstraints       = critical, CA:true, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[ ext_server ]
basicConstraints       = critical, CA:false
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectAltName         = \${ENV::SORTLINE_PKI_SAN}
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid

# Client certificates carry only clientAuth, so a device key cannot act as the broker, and the
# broker certificate (serverAuth only) is rejected when a client presents it.
[ ext_client ]
basicConstraints       = critical, CA:false
keyUsage               = critical, digitalSignature
extendedKeyUsage       = clientAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid

[ ext_crl ]
authorityKeyIdentifier = keyid:always
EOF
}

# Writes a new P-256 key to PATH unless PATH exists. The key appears under its final name
# only when complete, and an existing file is never replaced.
generate_key() {
  local path="$1" partial
  [[ -e "$path" ]] && return 0
  partial="$(mktemp "$path.partial.XXXXXX")"
  run_openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$partial"
  chmod 600 "$partial"
  if ! ln "$partial" "$path" 2>/dev/null; then
    rm -f "$partial"
    [[ -e "$path" ]] || die "failed to create $path"
    return 0
  fi
  rm -f "$partial"
}

write_crl() {
  local dir="$1" partial
  partial="$(mktemp "$dir/ca.crl.partial.XXXXXX")"
  run_openssl ca -batch -config "$dir/db/openssl.cnf" -gencrl -crldays "$CRL_DAYS" -crlexts ext_crl -out "$partial"
  chmod 644 "$partial"
  mv -f "$partial" "$dir/ca.crl"
}

cmd_init() {
  local dir="$1"
  if [[ -f "$dir/ca.crt" && -f "$dir/private/ca.key" ]]; then
    echo "CA exists: $dir/ca.crt (not changed)"
    return 0
  fi
  [[ -e "$dir/private/ca.key" || -e "$dir/ca.crt" ]] \
    && die "$dir contains only part of a CA (ca.crt or private/ca.key is missing). Move it away or restore the missing file"

  mkdir -p "$dir/private" "$dir/db/certs"
  chmod 700 "$dir" "$dir/private"
  write_ca_config "$dir/db/openssl.cnf"
  [[ -f "$dir/db/index.txt" ]] || : >"$dir/db/index.txt"
  [[ -f "$dir/db/serial" ]] || openssl rand -hex 16 >"$dir/db/serial"
  [[ -f "$dir/db/crlnumber" ]] || echo 01 >"$dir/db/crlnumber"
  SORTLINE_PKI_DIR="$(cd "$dir" && pwd)"
  export SORTLINE_PKI_DIR
  export SORTLINE_PKI_SAN="DNS:unused.invalid"

  generate_key "$dir/private/ca.key"
  local partial
  partial="$(mktemp "$dir/ca.crt.partial.XXXXXX")"
  run_openssl req -new -x509 -config "$dir/db/openssl.cnf" -extensions ext_ca \
    -key "$dir/private/ca.key" -sha256 -days "$CA_DAYS" -set_serial "0x$(openssl rand -hex 16)" -out "$partial"
  chmod 644 "$partial"
  mv -n "$partial" "$dir/ca.crt"
  rm -f "$partial"
  write_crl "$dir"
  echo "created CA: $dir/ca.crt (key: $dir/private/ca.key, CRL: $dir/ca.crl)"
}

# Issues a certificate for CN with the given extension section into FOLDER/BASE.{key,crt},
# keeping an existing key and skipping the whole step when the certificate exists.
issue() {
  local dir="$1" folder="$2" base="$3" cn="$4" extensions="$5"
  local key="$folder/$base.key" crt="$folder/$base.crt"
  if [[ -f "$crt" ]]; then
    echo "exists: $crt (CN $cn, not changed)"
    return 0
  fi
  mkdir -p "$folder"
  generate_key "$key"

  local work
  work="$(mktemp -d "$folder/.issue.XXXXXX")"
  # Device CNs contain '/', which -subj reads as a field separator unless escaped.
  run_openssl req -new -key "$key" -subj "/CN=${cn//\//\\/}" -out "$work/request.csr"
  run_openssl ca -batch -notext -config "$dir/db/openssl.cnf" -extensions "$extensions" \
    -days "$CERT_DAYS" -in "$work/request.csr" -out "$work/cert.pem"
  chmod 644 "$work/cert.pem"
  mv -n "$work/cert.pem" "$crt"
  rm -rf "$work"
  echo "issued: $crt (CN $cn, valid $CERT_DAYS days)"
}

# Prints the subjectAltName value for the broker arguments: IP entries for IPv4 and IPv6
# addresses, DNS entries for host names.
broker_san() {
  local entries=() name
  for name in "$@"; do
    if [[ "$name" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; then
      local octet
      for octet in ${name//./ }; do
        ((10#$octet <= 255)) || die "invalid IPv4 address $(printf '%q' "$name")"
      done
      entries+=("IP:$name")
    elif [[ "$name" == *:* ]]; then
      [[ "$name" =~ ^[0-9A-Fa-f:.]{2,45}$ ]] || die "invalid IPv6 address $(printf '%q' "$name")"
      entries+=("IP:$name")
    elif [[ ${#name} -le 253 && "$name" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$ ]]; then
      entries+=("DNS:$name")
    else
      die "invalid host name $(printf '%q' "$name"): use letters, digits, '-' and '.', or an IP address"
    fi
  done
  local IFS=,
  printf '%s' "${entries[*]}"
}

cmd_broker() {
  local dir="$1" hostname="$2"
  shift 2
  local san
  san="$(broker_san "$hostname" "$@")"
  use_pki "$dir"
  if [[ -f "$dir/broker/broker.crt" ]]; then
    echo "exists: $dir/broker/broker.crt (not changed); its names:"
    openssl x509 -in "$dir/broker/broker.crt" -noout -ext subjectAltName | sed -n '2,$p'
    echo "To issue it with other names, move broker.crt away and run this command again; the key is kept."
    return 0
  fi
  SORTLINE_PKI_SAN="$san"
  issue "$dir" "$dir/broker" broker "$hostname" ext_server
}

cmd_device() {
  local dir="$1" site="$2" device="$3"
  check_name site "$site"
  check_name device "$device"
  use_pki "$dir"
  issue "$dir" "$dir/devices/$site/$device" device "$site/$device" ext_client
}

cmd_trainer() {
  local dir="$1"
  use_pki "$dir"
  issue "$dir" "$dir/trainer" trainer "$TRAINER_CN" ext_client
}

cmd_observer() {
  local dir="$1" site="$2"
  check_name site "$site"
  use_pki "$dir"
  issue "$dir" "$dir/observers/$site" observer "observer:$site" ext_client
}

# Reads INVENTORY into the global arrays SITES and DEVICES, rejecting the whole file on the
# first invalid or repeated line so that no certificate or ACL is written from a bad file.
read_inventory() {
  local file="$1" line number=0 site device rest
  declare -gA seen=()
  SITES=()
  DEVICES=()
  [[ -f "$file" ]] || die "inventory not found: $file"
  while IFS= read -r line || [[ -n "$line" ]]; do
    number=$((number + 1))
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    read -r site device rest <<<"$line"
    [[ -n "${device:-}" && -z "${rest:-}" ]] \
      || die "$file:$number: expected 'SITE DEVICE', got $(printf '%q' "$line")"
    check_name site "$site"
    check_name device "$device"
    [[ -z "${seen["$site/$device"]:-}" ]] || die "$file:$number: device $site $device is listed twice"
    seen["$site/$device"]=1
    SITES+=("$site")
    DEVICES+=("$device")
  done <"$file"
  ((${#SITES[@]} > 0)) || die "inventory $file lists no devices"
}

cmd_fleet() {
  local dir="$1" inventory="$2" index
  read_inventory "$inventory"
  use_pki "$dir"
  for index in "${!SITES[@]}"; do
    issue "$dir" "$dir/devices/${SITES[$index]}/${DEVICES[$index]}" device \
      "${SITES[$index]}/${DEVICES[$index]}" ext_client
  done
}

cmd_acl() {
  local dir="$1" inventory="$2" index site base
  read_inventory "$inventory"
  use_pki "$dir"

  cat <<EOF
# Mosquitto ACL of the sortline fleet, written by 'pki.sh acl' from $(basename "$inventory").
# Regenerate it instead of editing it. The broker uses the client certificate CN as the user
# name (use_identity_as_username true). There are no lines before the first 'user' line, so
# a client whose CN has no block below can connect but cannot publish or subscribe.

# Trainer: sends commands, upload acknowledgements and model downloads to every device, and
# reads status, decisions, replies, uploads and download acknowledgements.
user $TRAINER_CN
topic write $TOPIC_ROOT/+/+/cmd
topic write $TOPIC_ROOT/+/+/up/ack
topic write $TOPIC_ROOT/+/+/down/data
topic read $TOPIC_ROOT/+/+/status
topic read $TOPIC_ROOT/+/+/decision
topic read $TOPIC_ROOT/+/+/reply
topic read $TOPIC_ROOT/+/+/up/data
topic read $TOPIC_ROOT/+/+/down/ack
EOF

  for index in "${!SITES[@]}"; do
    site="${SITES[$index]}"
    base="$TOPIC_ROOT/$site/${DEVICES[$index]}"
    cat <<EOF

user $site/${DEVICES[$index]}
topic readwrite $base/status
topic write $base/decision
topic write $base/reply
topic write $base/up/data
topic write $base/down/ack
topic read $base/cmd
topic read $base/up/ack
topic read $base/down/data
EOF
  done

  # One read-only observer per site, for PLC bridges that read the decisions of that site.
  local -A observed=()
  for site in "${SITES[@]}"; do
    [[ -n "${observed["$site"]:-}" ]] && continue
    observed["$site"]=1
    printf '\nuser observer:%s\ntopic read %s/%s/+/decision\n' "$site" "$TOPIC_ROOT" "$site"
  done
}

cmd_revoke() {
  local dir="$1" kind="$2"
  shift 2
  local folder base label
  case "$kind" in
    device)
      (($# == 2)) || die "usage: pki.sh revoke DIR device SITE DEVICE"
      check_name site "$1"
      check_name device "$2"
      folder="$dir/devices/$1/$2" base=device label="device-$1-$2"
      ;;
    observer)
      (($# == 1)) || die "usage: pki.sh revoke DIR observer SITE"
      check_name site "$1"
      folder="$dir/observers/$1" base=observer label="observer-$1"
      ;;
    trainer)
      (($# == 0)) || die "usage: pki.sh revoke DIR trainer"
      folder="$dir/trainer" base=trainer label=trainer
      ;;
    *) die "unknown certificate kind $(printf '%q' "$kind"): use device, observer or trainer" ;;
  esac
  use_pki "$dir"
  [[ -f "$folder/$base.crt" ]] || die "no certificate to revoke: $folder/$base.crt not found"

  local serial
  serial="$(openssl x509 -in "$folder/$base.crt" -noout -serial)"
  serial="${serial#serial=}"
  # A revocation that stopped before moving the files leaves the serial marked R in the index.
  if ! awk -F'\t' -v serial="$serial" '$1 == "R" && toupper($4) == toupper(serial) { found = 1 } END { exit !found }' \
    "$dir/db/index.txt"; then
    run_openssl ca -batch -config "$dir/db/openssl.cnf" -revoke "$folder/$base.crt"
  fi
  write_crl "$dir"

  mkdir -p "$dir/revoked"
  local target="$dir/revoked/$label-$serial"
  mv "$folder" "$target"
  echo "revoked: serial $serial, files moved to $target"
  echo "Copy $dir/ca.crl to the broker and reload it (systemctl reload mosquitto) to reject this certificate."
}

cmd_crl() {
  local dir="$1"
  use_pki "$dir"
  write_crl "$dir"
  echo "wrote $dir/ca.crl, $(openssl crl -in "$dir/ca.crl" -noout -nextupdate)"
}

main() {
  check_days SORTLINE_PKI_CERT_DAYS "$CERT_DAYS"
  check_days SORTLINE_PKI_CRL_DAYS "$CRL_DAYS"
  command -v openssl >/dev/null || die "openssl not found in PATH"

  local command="${1:-help}"
  [[ $# -gt 0 ]] && shift
  case "$command" in
    help | -h | --help) usage ;;
    init) (($# == 1)) || die "usage: pki.sh init DIR"; cmd_init "$@" ;;
    broker) (($# >= 2)) || die "usage: pki.sh broker DIR HOSTNAME [NAME|IP...]"; cmd_broker "$@" ;;
    device) (($# == 3)) || die "usage: pki.sh device DIR SITE DEVICE"; cmd_device "$@" ;;
    fleet) (($# == 2)) || die "usage: pki.sh fleet DIR INVENTORY"; cmd_fleet "$@" ;;
    trainer) (($# == 1)) || die "usage: pki.sh trainer DIR"; cmd_trainer "$@" ;;
    observer) (($# == 2)) || die "usage: pki.sh observer DIR SITE"; cmd_observer "$@" ;;
    acl) (($# == 2)) || die "usage: pki.sh acl DIR INVENTORY"; cmd_acl "$@" ;;
    revoke) (($# >= 2)) || die "usage: pki.sh revoke DIR device SITE DEVICE | observer SITE | trainer"; cmd_revoke "$@" ;;
    crl) (($# == 1)) || die "usage: pki.sh crl DIR"; cmd_crl "$@" ;;
    *) usage >&2; die "unknown command $(printf '%q' "$command")" ;;
  esac
}

main "$@"
