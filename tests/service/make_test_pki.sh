#!/usr/bin/env bash
# Makes a throwaway PKI for the TLS tests in DIR (created if needed), valid for two days:
#   ca.pem/.key            the test CA
#   server.pem/.key        signed by it, for DNS:localhost and IP:127.0.0.1
#   client.pem/.key        signed by it, for client authentication
#   other_ca.pem/.key      an unrelated CA
#   other_client.pem/.key  signed by the unrelated CA
# Keys are unencrypted P-256. Needs openssl (Debian package openssl).
#
#   tests/service/make_test_pki.sh DIR
set -euo pipefail
dir="${1:?usage: make_test_pki.sh DIR}"
mkdir -p "$dir"
cd "$dir"

# openssl's chatter goes to a log, shown only if a step fails.
quiet() {
  "$@" 2>>openssl.log || { cat openssl.log >&2; exit 1; }
}

ca() {  # NAME CN
  quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$1.key" -out "$1.pem" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

leaf() {  # NAME CN CA EXTENSIONS
  quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
  printf '%s\n' "$4" > "$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA "$3.pem" -CAkey "$3.key" -CAcreateserial -days 2 \
    -extfile "$1.ext" -out "$1.pem"
  rm -f "$1.csr" "$1.ext"
}

ca ca "gradservice test CA"
ca other_ca "unrelated test CA"
leaf server localhost ca \
  "$(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth')"
leaf client "gradservice test client" ca "extendedKeyUsage=clientAuth"
leaf other_client "unrelated test client" other_ca "extendedKeyUsage=clientAuth"
rm -f ./*.srl openssl.log
