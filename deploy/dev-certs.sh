#!/usr/bin/env bash
# Certificates for trying TLS and mTLS on one machine: a private CA, a server certificate for
# localhost / 127.0.0.1 (plus any names given), a client certificate, and a random token.
#   bash deploy/dev-certs.sh tls [extra-dns-name ...]
# writes tls/ca.crt, tls/server.{crt,key}, tls/client.{crt,key}, tls/tokens (the server's
# accepted tokens) and tls/token (the client's copy). Keys are for testing only; in a cluster
# the usual source is cert-manager (deploy/README.md, "Secure serving").
set -euo pipefail

out=${1:-tls}
shift || true
mkdir -p "$out"
cd "$out"
umask 077

sans="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do sans="$sans,DNS:$name"; done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=mha-serve dev CA" -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null

issue() {  # name, extendedKeyUsage, extra extensions
  local name=$1 usage=$2 extra=$3
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=mha-serve $name" \
    -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=%s\n%s\n' "$usage" "$extra" \
    > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
issue server serverAuth "subjectAltName=$sans"
issue client clientAuth ""
rm -f ca.srl

token=$(openssl rand -hex 24)
printf '%s\n' "$token" > tokens
printf '%s\n' "$token" > token
echo "wrote $out/: ca.crt server.crt server.key client.crt client.key tokens token ($sans)"
