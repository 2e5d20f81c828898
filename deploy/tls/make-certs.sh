#!/bin/sh
# Make a private CA, a server certificate for the screener's DICOM listener (with subjectAltName), and a
# client certificate (for the PACS, when the listener demands one; or for the screener when a PACS does).
#
#   deploy/tls/make-certs.sh OUT_DIR [SERVER_NAME [EXTRA_SAN ...]]
#
#   deploy/tls/make-certs.sh /etc/cxr-screener/tls screener.hospital.example DNS:screener IP:10.1.2.3
#
# Writes, in OUT_DIR: ca.crt ca.key server.crt server.key client.crt client.key (keys mode 0600).
# Keep ca.key offline in production; this script is for labs and first set-ups. Certificates are valid
# for 825 days (CA: 10 years), ECDSA P-256 keys, SHA-256 signatures.
set -eu

out=${1:?usage: make-certs.sh OUT_DIR [SERVER_NAME [EXTRA_SAN ...]]}
server=${2:-localhost}
[ $# -ge 2 ] && shift 2 || shift $#

san="DNS:${server}"
case "$server" in
  localhost) san="${san},IP:127.0.0.1,IP:::1" ;;
esac
for extra in "$@"; do san="${san},${extra}"; done

mkdir -p "$out"
umask 077
cd "$out"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

newkey ca.key
openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=CXR Screener private CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt

sign() {  # NAME CN EXTFILE
  newkey "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
      -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

cat > server.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=${san}
EXT
cat > client.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
EXT

sign server "$server" server.ext
sign client "CXR Screener client" client.ext
rm -f server.ext client.ext ca.srl
chmod 0644 ca.crt server.crt client.crt
echo "wrote $(pwd): ca.crt ca.key server.crt server.key client.crt client.key (server SAN: ${san})"
